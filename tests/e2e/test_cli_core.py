"""The core path through the CLI, as a user drives it, against the simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, events, run

UNKNOWN = "0000000000000000deadbeef"


def ds(index: int) -> str:
    return f"{index:024x}"


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(unknown_datasets=frozenset({UNKNOWN}), latency=0.005, seed=1))
    await sim.start()
    yield sim
    await sim.stop()


async def test_150_requests_one_batch_each(tmp_path: Path, simulator: Simulator) -> None:
    env = cli_env(tmp_path, simulator.url, LIMITS__RATE="200", LIMITS__CONCURRENCY="16")
    lines = []
    for index in range(147):
        if index % 2:
            lines.append(ds(index))
        else:
            lines.append(json.dumps({"datasetId": ds(index), "requestId": f"req-{index}"}))
    # Two messages sharing a requestId: one request, one batch.
    lines.append(json.dumps({"datasetId": ds(500), "requestId": "shared"}))
    lines.append(json.dumps({"datasetId": ds(500), "requestId": "shared"}))
    lines.append(json.dumps({"datasetId": UNKNOWN, "requestId": "unknown-dataset"}))
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")

    enqueued = await run(["enqueue", "--file", "ids.txt"], env, tmp_path)
    assert enqueued.code == 0, enqueued.stderr
    assert "published 150" in enqueued.stdout

    ran = await run(["run", "--until-idle"], env, tmp_path)
    assert ran.code == 1, ran.stderr[-2000:]  # the unknown dataset's request ended failed

    listed = await run(["batches", "--json"], env, tmp_path)
    records = {record["requestId"]: record for record in listed.json_lines()}
    assert len(records) == 149  # 147 + "shared" once + the unknown dataset
    stats = simulator.stats
    by_id = {batch.id: batch for batch in stats.batches}
    created = [record for record in records.values() if record["state"] == "created"]
    assert len(created) == 148
    assert len(by_id) == 148, "exactly one batch per distinct request"
    for record in created:
        batch = by_id[record["batchId"]]
        assert batch.dataset_id == record["datasetId"]
        assert record["batchStatus"] == "loading"
    failed = records["unknown-dataset"]
    assert failed["state"] == "failed"
    assert failed["attempts"] == 1
    assert "400" in failed["lastError"]
    assert UNKNOWN in failed["lastError"]
    assert stats.tokens_issued == 1
    assert stats.header_rejections == 0
    assert stats.unauthorized == 0
    # Logs are JSON with the contract's keys bound, and no secret appears anywhere.
    created_events = [e for e in events(ran.stderr) if e["event"] == "batch.created"]
    assert len(created_events) == 148
    assert {"timestamp", "level", "request_id", "dataset_id", "batch_id", "attempt"} <= created_events[
        0
    ].keys()
    assert "sim-secret" not in ran.stderr


async def test_enqueue_names_invalid_lines_and_publishes_the_rest(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    content = "\n".join(
        [
            ds(1),
            "{not json",
            json.dumps({"datasetId": 42}),
            "",
            json.dumps({"requestId": "no-dataset"}),
            json.dumps({"datasetId": ds(2), "inputFormat": {"format": "xml"}}),
            "../../etc/passwd",
            json.dumps({"datasetId": ds(3), "requestId": "ok"}),
        ]
    )
    result = await run(["enqueue", "--file", "-"], env, tmp_path, stdin=content.encode())
    assert result.code == 1
    assert "published 2" in result.stdout
    for line in (2, 3, 5, 6, 7):
        assert f"line {line}:" in result.stderr
    assert "line 1:" not in result.stderr
    assert "line 8:" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_enqueue_arguments_with_request_id(tmp_path: Path, simulator: Simulator) -> None:
    env = cli_env(tmp_path, simulator.url)
    first = await run(
        ["enqueue", ds(7), "--request-id", "only-once", "--input-format", "parquet"], env, tmp_path
    )
    again = await run(
        ["enqueue", ds(7), "--request-id", "only-once", "--input-format", "parquet"], env, tmp_path
    )
    assert first.code == again.code == 0
    assert (await run(["run", "--until-idle"], env, tmp_path)).code == 0
    records = (await run(["batches", "--json", "--state", "created"], env, tmp_path)).json_lines()
    assert [record["requestId"] for record in records] == ["only-once"]
    assert len(simulator.stats.batches) == 1
    batch = simulator.batch(simulator.stats.batches[0].id)
    assert batch is not None
    assert batch["inputFormat"] == {"format": "parquet"}


async def test_configuration_errors_exit_2_naming_each_setting(tmp_path: Path) -> None:
    env = cli_env(tmp_path, LIMITS__RATE="0", AEP__TIMEOUT="soon", AEP__CLIENT_SECRET="hunter2-secret")
    result = await run(["run"], env, tmp_path)
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert any("ORCH_LIMITS__RATE" in line for line in lines)
    assert any("ORCH_AEP__TIMEOUT" in line for line in lines)
    assert len(lines) == 2
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


async def test_missing_credentials_exit_2(tmp_path: Path) -> None:
    result = await run(["run", "--until-idle"], cli_env(tmp_path), tmp_path)
    assert result.code == 2
    assert "ORCH_AEP__ORG_ID" in result.stderr
    assert "ORCH_AEP__CLIENT_ID" in result.stderr
    assert "Traceback" not in result.stderr
