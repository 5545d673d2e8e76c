"""How `run` ends, as a cron job or an operator sees it: exit 1 when requests of the run failed, and a
stop with exit 1 when the store's or the queue's file is deleted or replaced while it works."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, events, run, start

UNKNOWN = "0000000000000000deadbeef"


def ds(index: int) -> str:
    return f"{index:024x}"


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(unknown_datasets=frozenset({UNKNOWN}), seed=9))
    await sim.start()
    yield sim
    await sim.stop()


async def test_until_idle_exits_1_when_requests_of_the_run_failed(
    tmp_path: Path, simulator: Simulator
) -> None:
    env = cli_env(tmp_path, simulator.url)
    assert (await run(["enqueue", ds(1), UNKNOWN], env, tmp_path)).code == 0

    failed = await run(["run", "--until-idle"], env, tmp_path)
    assert failed.code == 1, failed.stderr[-2000:]
    [stopped] = [event for event in events(failed.stderr) if event["event"] == "service.stopped"]
    assert (stopped["created"], stopped["failed"], stopped["exit_code"]) == (1, 1, 1)

    # The next run has nothing of its own that failed: the earlier failure is not counted again.
    assert (await run(["enqueue", ds(2)], env, tmp_path)).code == 0
    again = await run(["run", "--until-idle"], env, tmp_path)
    assert again.code == 0, again.stderr[-2000:]
    states = {
        r["datasetId"]: r["state"] for r in (await run(["batches", "--json"], env, tmp_path)).json_lines()
    }
    assert states == {ds(1): "created", ds(2): "created", UNKNOWN: "failed"}


def delete(path: Path) -> str:
    path.unlink()
    return "deleted"


def replace(path: Path) -> str:
    other = path.with_name("other.db")
    other.write_bytes(b"")
    os.replace(other, path)
    return "replaced by another file"


# The files `cli_env` names.
FILES = {"store": "orchestrator.db", "queue": "queue.db"}


@pytest.mark.parametrize(("role", "lose"), [("store", delete), ("queue", replace), ("store", replace)])
async def test_a_file_lost_while_run_works_stops_it(
    tmp_path: Path, simulator: Simulator, role: str, lose: Callable[[Path], str]
) -> None:
    # Slow enough (2 calls a second) that the run is still at work when the file goes; a short
    # grace, so that stopping does not wait for every claimed call.
    env = cli_env(tmp_path, simulator.url, LIMITS__RATE="2", SHUTDOWN__GRACE="1")
    ids = "\n".join(ds(index) for index in range(20)).encode()
    assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0
    service = await start(["run", "--until-idle"], env, tmp_path)
    async with asyncio.timeout(30):
        while not simulator.stats.batches:  # noqa: ASYNC110 - the stats have no event to await
            await asyncio.sleep(0.05)
    path = tmp_path / FILES[role]
    how = lose(path)

    result = await service.wait(timeout=60)

    assert result.code == 1, result.stderr[-2000:]
    [lost] = [event for event in events(result.stderr) if event["event"] == f"service.{role}_lost"]
    assert lost["level"] == "error"
    assert (lost["path"], lost["problem"]) == (str(path), how)
    if role == "store":
        # It stopped there, calls waiting for the limiter included, rather than creating batches
        # whose records go to a file nobody will open. (A lost queue lets claimed calls finish.)
        assert len(simulator.stats.batches) < 20
