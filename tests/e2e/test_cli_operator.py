"""The operator commands through the CLI against the simulator: failed requests seen in `status`,
the cause fixed, `requeue` re-drives them, and each still gets exactly one batch, also when an
earlier lost answer had already made it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.clock import ManualClock
from orchestrator.messages import external_id_for
from orchestrator.store.sql import SqlBatchStore
from tests.e2e.cli import Result, cli_env, run

UNKNOWN_A = "0000000000000000deadbee1"
UNKNOWN_B = "0000000000000000deadbee2"
GOOD = "5c8c3c555033b814b69f947f"


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(unknown_datasets=frozenset({UNKNOWN_A, UNKNOWN_B}), seed=1))
    await sim.start()
    yield sim
    await sim.stop()


def states(listed: Result) -> dict[str, str]:
    return {record["requestId"]: record["state"] for record in listed.json_lines()}


def creates(sim: Simulator) -> int:
    return sum(count for (endpoint, _), count in sim.stats.calls.items() if endpoint == "batches.create")


async def test_requeue_after_the_cause_is_fixed_makes_one_batch_each(
    tmp_path: Path, simulator: Simulator
) -> None:
    # A requeued request is looked up before its create and, like any request that was, once more
    # when the settle window has passed (reconciliation), which `--until-idle` waits for: 1 s here.
    env = cli_env(tmp_path, simulator.url, AEP__CATALOG_SETTLE="1")
    messages = [
        {"datasetId": UNKNOWN_A, "requestId": "a-1"},
        {"datasetId": UNKNOWN_A, "requestId": "a-2"},
        {"datasetId": UNKNOWN_B, "requestId": "b-1"},
        {"datasetId": GOOD, "requestId": "good"},
    ]
    body = "\n".join(json.dumps(message) for message in messages).encode()
    assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=body)).code == 0
    ran = await run(["run", "--until-idle"], env, tmp_path)
    assert ran.code == 1, ran.stderr[-2000:]  # three requests failed: AEP does not know their datasets

    status = await run(["status", "--json"], env, tmp_path)
    assert status.code == 0, status.stderr
    seen = json.loads(status.stdout)
    assert (seen["counts"]["failed"], seen["counts"]["created"]) == (3, 1)
    assert {error["requestId"] for error in seen["lastErrors"]} == {"a-1", "a-2", "b-1"}
    assert all("400" in error["lastError"] for error in seen["lastErrors"])
    screen = await run(["status"], env, tmp_path)
    assert "3 failed" in screen.stdout
    assert "Dataset 0000000000000000deadbee1 not found" in " ".join(screen.stdout.split())

    refused = await run(["requeue", "--state", "created"], env, tmp_path)
    assert (refused.code, refused.stdout) == (2, "")
    assert refused.stderr.count("\n") == 1
    assert "only failed requests can be requeued" in refused.stderr
    dry = await run(["requeue", "--state", "failed", "--dry-run"], env, tmp_path)
    assert dry.code == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "would requeue 3 (dry run: nothing changed)"
    assert states(await run(["batches", "--json"], env, tmp_path))["a-1"] == "failed"

    # The cause fixed: AEP knows the datasets now.
    simulator.config = replace(simulator.config, unknown_datasets=frozenset())
    lookups_before = simulator.stats.calls[("batches.list", "200")]
    requeued = await run(["requeue", "--state", "failed", "--dataset", UNKNOWN_A], env, tmp_path)
    assert (requeued.code, requeued.stdout) == (0, "requeued 2\n")
    ran = await run(["run", "--until-idle"], env, tmp_path)
    assert ran.code == 0, ran.stderr[-2000:]
    assert states(await run(["batches", "--json"], env, tmp_path)) == {
        "a-1": "created",
        "a-2": "created",
        "b-1": "failed",
        "good": "created",
    }
    requeued = await run(["requeue", "--state", "failed"], env, tmp_path)
    assert (requeued.code, requeued.stdout) == (0, "requeued 1\n")
    assert (await run(["run", "--until-idle"], env, tmp_path)).code == 0

    listed = await run(["batches", "--json"], env, tmp_path)
    records = {record["requestId"]: record for record in listed.json_lines()}
    assert {record["state"] for record in records.values()} == {"created"}
    assert all(record["attempts"] == 1 for record in records.values())  # reset, then one create
    # One batch each, the one recorded. Each requeued request was looked up before its create, and
    # once more after the settle window (reconciliation): two look-ups each.
    assert sorted(simulator.stats.batches_per_external_id.values()) == [1, 1, 1, 1]
    for request_id, record in records.items():
        assert simulator.live_batches()[external_id_for(request_id)] == [record["batchId"]]
    assert simulator.stats.calls[("batches.list", "200")] - lookups_before == 2 * 3
    store = SqlBatchStore(env["ORCH_STORE__URL"])
    await store.open()
    try:
        trail = [(c.from_state, c.to_state, c.detail) for c in await store.history("b-1")]
    finally:
        await store.close()
    assert [(str(was), str(to)) for was, to, _ in trail] == [
        ("None", "pending"),
        ("pending", "failed"),
        ("failed", "pending"),
        ("pending", "created"),
    ]
    assert trail[2][2] == "requeued by operator"

    # Nothing failed is left: a second requeue requeues nothing, and the next run creates nothing.
    made = creates(simulator)
    again = await run(["requeue", "--state", "failed"], env, tmp_path)
    assert (again.code, again.stdout) == (0, "requeued 0\n")
    assert (await run(["run", "--until-idle"], env, tmp_path)).code == 0
    assert creates(simulator) == made == 4 + 3  # 4 made, 3 refused with 400 in the first run
    assert len(simulator.stats.batches) == 4


async def test_requeue_adopts_the_batch_a_lost_answer_made(tmp_path: Path) -> None:
    # The create makes the batch but its answer is lost, and the catalog lists the batch only after
    # the settle window (set below the catalog's lag here): the request ends failed, its batch in AEP.
    clock = ManualClock()  # the simulator's: its catalog lists the batch once the test moves it
    sim = Simulator(SimulatorConfig(drop_after_rate=1.0, catalog_lag=30, seed=2), clock=clock)
    await sim.start()
    try:
        env = cli_env(tmp_path, sim.url, AEP__CATALOG_SETTLE="0", RETRY__MAX_ATTEMPTS="1")
        assert (await run(["enqueue", "--request-id", "lost-1", GOOD], env, tmp_path)).code == 0
        ran = await run(["run", "--until-idle"], env, tmp_path)
        assert ran.code == 1, ran.stderr[-2000:]
        [made] = sim.stats.batches
        assert states(await run(["batches", "--json"], env, tmp_path)) == {"lost-1": "failed"}

        # Later: the catalog lists the batch, and the dropped connections are fixed.
        clock.advance(30)
        sim.config = replace(sim.config, drop_after_rate=0.0)
        requeued = await run(["requeue", "--state", "failed"], env, tmp_path)
        assert (requeued.code, requeued.stdout) == (0, "requeued 1\n")
        ran = await run(["run", "--until-idle"], env, tmp_path)
        assert ran.code == 0, ran.stderr[-2000:]

        [record] = (await run(["batches", "--json"], env, tmp_path)).json_lines()
        assert (record["state"], record["batchId"]) == ("created", made.id)  # adopted, not made again
        assert len(sim.stats.batches) == 1
        assert sim.live_batches() == {external_id_for("lost-1"): [made.id]}
        assert '"batch.adopted"' in ran.stderr
    finally:
        await sim.stop()
