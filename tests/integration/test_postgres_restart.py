"""PostgreSQL restarted while three replicas work through 200 requests: they wait for it (readiness
says so), reconnect, and every request is created exactly once after it returns.

Three `orchestrator run --until-idle` processes, as an operator runs them, on one embedded queue file and
one PostgreSQL database of the test's own, against the simulator answering in 0.3 to 0.5 s. The cluster
is stopped once some batches exist, kept down for a few seconds, and started again in a `finally`, so a
failing test never leaves the machine's PostgreSQL down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator.aep.simulator import Simulator
from orchestrator.messages import external_id_for
from tests.e2e.cli import Process, cli_env, events, run, start, until
from tests.e2e.test_cli_crash import slow_simulator  # noqa: F401  # the fixture, shared
from tests.e2e.test_cli_http import free_port, wait_for
from tests.integration.test_store_postgres import store_url  # noqa: F401  # the fixture, shared

pytestmark = pytest.mark.integration

COUNT = 200
REPLICAS = 3
# How long the database stays down: longer than a restart (about 2.5 s here), so that every loop of
# every replica meets it, and past the claim loop's first backoffs.
OUTAGE = 4.0
SERVICES_UP = "/work/shared/scripts/services-up"


@pytest.fixture
def cluster() -> str:
    """The version of the machine's PostgreSQL cluster `main`, which the test stops and starts."""
    found = sorted(path.parent.name for path in Path("/etc/postgresql").glob("*/main"))
    if not found or not Path(SERVICES_UP).exists() or shutil.which("pg_ctlcluster") is None:
        pytest.skip("restarting PostgreSQL needs this machine's cluster, pg_ctlcluster and services-up")
    return found[-1]


async def pg_ctlcluster(version: str, action: str) -> None:
    done = await asyncio.create_subprocess_exec(
        "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action
    )
    assert await done.wait() == 0, f"pg_ctlcluster {action} failed"


async def restore_postgresql(version: str) -> None:
    await pg_ctlcluster(version, "start")
    services_up = await asyncio.create_subprocess_exec(
        SERVICES_UP, "postgres", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await services_up.wait()


@contextlib.asynccontextmanager
async def replicas(env: dict[str, str], cwd: Path, http_port: int) -> AsyncIterator[list[Process]]:
    """`REPLICAS` processes of `run --until-idle`; the first serves HTTP on `http_port`. Whichever
    is still running on the way out (a failed test) is killed and reaped."""
    started: list[Process] = []
    try:
        for index in range(REPLICAS):
            port = {"ORCH_HTTP__PORT": str(http_port if index == 0 else 0)}
            started.append(await start(["run", "--until-idle"], {**env, **port}, cwd))
        yield started
    finally:
        for process in started:
            if process.proc.returncode is None:
                process.proc.kill()
                await process.wait(timeout=10)


@pytest.mark.timeout(240)
async def test_a_postgresql_restart_mid_run_loses_and_doubles_nothing(
    tmp_path: Path,
    cluster: str,
    store_url: str,  # noqa: F811  # the fixture
    slow_simulator: Simulator,  # noqa: F811  # the fixture: 0.3 to 0.5 s an answer
) -> None:
    sim = slow_simulator
    env = cli_env(
        tmp_path,
        sim.url,
        STORE__URL=store_url,
        AEP__CATALOG_SETTLE="1",
        # 3 x 8 calls a second: 200 requests take about 9 s, so the outage lands mid-run.
        LIMITS__RATE="8",
        LIMITS__CONCURRENCY="4",
    )
    lines = "\n".join(f"{index:024x}" for index in range(COUNT))
    assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=lines.encode())).code == 0
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"

    async def underway() -> bool:
        return len(sim.stats.batches) >= 40

    async with replicas(env, tmp_path, port) as running, aiohttp.ClientSession() as session:
        await until(underway, "the first batches", timeout=60)
        await pg_ctlcluster(cluster, "stop")
        try:
            at_stop = len(sim.stats.batches)
            assert at_stop < COUNT, "the restart came too late to test anything"
            down = await wait_for(session, readyz, 503, timeout=15)
            # The outage under test lasts this long: its length, not a condition awaited.
            await asyncio.sleep(OUTAGE)
            assert all(replica.proc.returncode is None for replica in running), "a replica ended"
        finally:
            await restore_postgresql(cluster)
        await wait_for(session, readyz, 200, timeout=30)
        results = [await replica.wait(timeout=150) for replica in running]
    live = sim.live_batches()
    stats = sim.stats

    assert "store" in down["reasons"], down
    assert [result.code for result in results] == [0] * REPLICAS, [r.stderr[-2000:] for r in results]
    logged = [entry for result in results for entry in events(result.stderr)]
    unavailable = [entry for entry in logged if entry["event"] == "store.unavailable"]
    recovered = [entry for entry in logged if entry["event"] == "store.recovered"]
    # Every loop that reads the store waited for it: intake, the claim loop, the upload stage's.
    assert {entry["loop"] for entry in unavailable} == {"dispatcher", "intake", "stage"}
    assert len(recovered) >= REPLICAS  # each replica's claim loop, at least
    assert [entry for entry in logged if entry["event"] == "service.crashed"] == []

    listed = await run(["batches", "--json"], env, tmp_path)
    records = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert len(records) == COUNT
    assert {record["state"] for record in records} == {"created"}
    # Exactly once: one batch per request, and it is the one recorded.
    assert len(stats.batches) == COUNT
    assert max(stats.batches_per_dataset.values()) == 1
    assert all(live[external_id_for(record["requestId"])] == [record["batchId"]] for record in records)
    not_recorded = sum(entry["event"] == "dispatcher.outcome_not_recorded" for entry in logged)
    adopted = sum(entry["event"] == "batch.adopted" for entry in logged)
    print(
        f"\nPostgreSQL restart: {at_stop} of {COUNT} batches made when it stopped, down {OUTAGE:g} s; "
        f"{len(unavailable)} store.unavailable, {len(recovered)} store.recovered, "
        f"{not_recorded} outcomes not recorded then, {adopted} adopted after; "
        f"{len(records)} created, {len(stats.batches)} batches, "
        f"at most {max(stats.batches_per_dataset.values())} per dataset"
    )
