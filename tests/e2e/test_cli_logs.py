"""The logs of a run at debug level, as an operator's log shipper sees them: every line one JSON
object with `timestamp`, `level` and `event`; only our own events (the libraries kept quiet); the
request's keys on its events and on no other; and no secret or token anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, run

UNKNOWN = "0000000000000000deadbeef"
COUNT = 40
EVENT_NAME = re.compile(r"[a-z]+\.[a-z_]+")


async def test_a_debug_run_logs_json_lines_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = Simulator(SimulatorConfig(unknown_datasets=frozenset({UNKNOWN}), error_rate=0.2, seed=5))
    issued: list[str] = []
    issue = sim.issue_token

    def recorded() -> str:
        token = issue()
        issued.append(token)
        return token

    monkeypatch.setattr(sim, "issue_token", recorded)
    await sim.start()
    try:
        env = cli_env(
            tmp_path,
            sim.url,
            LOG__LEVEL="debug",
            RETRY__BASE_DELAY="0.05",
            RETRY__MAX_DELAY="0.2",
            AEP__CATALOG_SETTLE="1",  # 5xx answers are ambiguous: a short window keeps the run short
        )
        ids = [f"{index:024x}" for index in range(COUNT)] + [UNKNOWN]
        assert (await run(["enqueue", *ids], env, tmp_path)).code == 0
        ran = await run(["run", "--until-idle"], env, tmp_path)
        assert ran.code == 1, ran.stderr[-2000:]  # the unknown dataset's request failed
    finally:
        await sim.stop()

    assert issued, "the run fetched a token"
    for secret in ("sim-secret", *issued):
        assert secret not in ran.stderr
    lines = [json.loads(line) for line in ran.stderr.splitlines()]
    for line in lines:
        assert {"timestamp", "level", "event"} <= line.keys(), line
        assert line["timestamp"].endswith("Z")
        # Only our events: no library's internals at debug (aiosqlite's were most of the lines).
        assert EVENT_NAME.fullmatch(line["event"]), line
    by_event: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_event.setdefault(str(line["event"]), []).append(line)

    assert by_event["aep.call"][0]["level"] == "debug"
    # One `batch.created` line per batch, at info, with the request's keys.
    created = by_event["batch.created"] + by_event.get("batch.adopted", [])
    assert len(created) == COUNT == len(sim.stats.batches)
    assert {line["level"] for line in created} == {"info"}
    assert {"request_id", "dataset_id", "attempt", "batch_id"} <= created[0].keys()
    # Retries at warning, with the error and the delay.
    retries = by_event["retry.scheduled"]
    assert {line["level"] for line in retries} == {"warning"}
    assert all("error" in line and isinstance(line["delay"], float | int) for line in retries)
    [failed] = by_event["batch.failed"]
    assert (failed["level"], failed["dataset_id"]) == ("error", UNKNOWN)
    # Events of the process carry no request's keys, though they happen while serving one.
    for name, events in by_event.items():
        if name.split(".")[0] in ("auth", "limiter", "service", "http", "events"):
            for line in events:
                assert "request_id" not in line, line
    assert by_event["auth.token_fetched"]
