"""Stopping the service the hard way and the polite way: nothing lost, nothing created twice."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, events, run, start

COUNT = 60


@pytest.fixture
async def slow_simulator() -> AsyncIterator[Simulator]:
    # Slow answers keep calls in flight, so a kill lands in the middle of some of them.
    sim = Simulator(SimulatorConfig(latency=0.3, latency_jitter=0.2, seed=3))
    await sim.start()
    yield sim
    await sim.stop()


async def _enqueue(env: dict[str, str], cwd: Path) -> None:
    ids = "\n".join(f"{index:024x}" for index in range(COUNT)).encode()
    result = await run(["enqueue", "--file", "-"], env, cwd, stdin=ids)
    assert result.code == 0, result.stderr


async def _wait_for_batches(sim: Simulator, at_least: int, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while len(sim.stats.batches) < at_least:  # noqa: ASYNC110 - the stats have no event to await
            await asyncio.sleep(0.05)


def _assert_one_batch_per_dataset(sim: Simulator) -> None:
    per_dataset = Counter(batch.dataset_id for batch in sim.stats.batches)
    assert len(per_dataset) == COUNT
    assert max(per_dataset.values()) == 1, [ds for ds, n in per_dataset.items() if n > 1]


# Quick timeouts, retries and settle window, so a run killed mid-call is finished soon after.
KILL_SETTINGS = {
    "LIMITS__RATE": "40",
    "LIMITS__CONCURRENCY": "8",
    "AEP__TIMEOUT": "1",
    "RETRY__MAX_DELAY": "1",
    "RETRY__BASE_DELAY": "0.05",
    "AEP__CATALOG_SETTLE": "1",
}


async def test_kill_9_mid_run_then_restart(tmp_path: Path, slow_simulator: Simulator) -> None:
    env = cli_env(tmp_path, slow_simulator.url, **KILL_SETTINGS)
    await _enqueue(env, tmp_path)
    service = await start(["run"], env, tmp_path)
    await _wait_for_batches(slow_simulator, 10)
    service.signal(signal.SIGKILL)
    killed = await service.wait()
    assert killed.code == -signal.SIGKILL
    assert len(slow_simulator.stats.batches) < COUNT, "the kill came too late to test anything"

    restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    assert restarted.code == 0, restarted.stderr[-2000:]
    # The dead process's leases are taken back at start, not waited out, and each of its requests
    # is looked up before any create.
    [taken_back] = [e for e in events(restarted.stderr) if e["event"] == "dispatcher.dead_leases_taken_back"]
    assert taken_back["requests"] > 0
    assert any(e["event"] == "dispatcher.lease_taken_over" for e in events(restarted.stderr))
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert len(records) == COUNT
    assert {record["state"] for record in records} == {"created"}
    _assert_one_batch_per_dataset(slow_simulator)
    batch_ids = {batch.id for batch in slow_simulator.stats.batches}
    assert {record["batchId"] for record in records} == batch_ids


async def test_sigterm_finishes_calls_in_flight_and_exits_0(
    tmp_path: Path, slow_simulator: Simulator
) -> None:
    env = cli_env(
        tmp_path, slow_simulator.url, LIMITS__RATE="40", LIMITS__CONCURRENCY="8", SHUTDOWN__GRACE="5"
    )
    await _enqueue(env, tmp_path)
    service = await start(["run"], env, tmp_path)
    await _wait_for_batches(slow_simulator, 10)
    service.signal(signal.SIGTERM)
    stopped = await service.wait(timeout=15)
    assert stopped.code == 0, stopped.stderr[-2000:]
    assert '"service.stopped"' in stopped.stderr
    made_before_stop = len(slow_simulator.stats.batches)
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    # Every call that was in flight finished and was recorded: AEP's batches are all in the store.
    recorded = {record["batchId"] for record in records if record["state"] == "created"}
    assert recorded == {batch.id for batch in slow_simulator.stats.batches}
    assert made_before_stop < COUNT

    finished = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    assert finished.code == 0, finished.stderr[-2000:]
    _assert_one_batch_per_dataset(slow_simulator)


async def test_sigterm_waits_for_slow_calls_to_be_recorded(tmp_path: Path) -> None:
    """AEP answers after 2.5 s: SIGTERM mid-call ends the service with exit 0 only once the calls in
    flight are answered and recorded; the next run creates the rest, exactly once."""
    async with Simulator(SimulatorConfig(latency=2.5, seed=8)) as sim:
        env = cli_env(tmp_path, sim.url, LIMITS__CONCURRENCY="4", SHUTDOWN__GRACE="10")
        await _enqueue(env, tmp_path)
        service = await start(["run"], env, tmp_path)
        # The simulator makes a batch when a create arrives and answers 2.5 s later: 8 batches made
        # and 4 answers given means the second 4 calls are in flight.
        async with asyncio.timeout(30):
            while len(sim.stats.batches) < 8:  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.05)
        made_at_signal = len(sim.stats.batches)
        service.signal(signal.SIGTERM)
        stopped = await service.wait(timeout=30)
        assert stopped.code == 0, stopped.stderr[-2000:]
        # No call starts after SIGTERM: the requests claimed for the next calls (16 with 4 call
        # slots) were given back at once, not sent within the grace. (One more round of 4 would
        # need the signal to take 2.5 s to arrive; sending the claimed ones made 12 more.)
        assert len(sim.stats.batches) <= made_at_signal + 4
        assert '"limiter.closed"' in stopped.stderr
        assert '"dispatcher.drain_cancelled"' not in stopped.stderr
        records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
        # Nothing half-done: every batch AEP made is recorded, every other request is untouched.
        created = {r["batchId"] for r in records if r["state"] == "created"}
        assert created == {batch.id for batch in sim.stats.batches}
        assert len(created) >= 8  # the calls in flight at SIGTERM were answered and recorded
        assert {r["state"] for r in records} <= {"created", "pending"}
        sim.config = dataclasses.replace(sim.config, latency=0.05)  # the rest, quickly
        finished = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
        assert finished.code == 0, finished.stderr[-2000:]
        _assert_one_batch_per_dataset(sim)
