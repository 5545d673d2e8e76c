"""A catalog that lists a new batch only seconds after it was made, through the CLI: a look-up soon
after a lost answer finds nothing, and only the settle window keeps that from becoming a second
batch. Every request ends `created`, with exactly one live batch in AEP: the one recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.messages import external_id_for
from tests.e2e.cli import cli_env, events, run

COUNT = 60
LAG = 3.0

LAGGING = SimulatorConfig(
    drop_after_rate=0.15,  # the batch is made, the answer lost
    slow_rate=0.08,
    slow_delay=1.5,  # answered after the orchestrator's 1 s timeout: made, answer too late
    catalog_lag=LAG,  # longer than the first look-up after a lost answer (1 s)
    seed=4,
)


@pytest.mark.timeout(120)
async def test_one_live_batch_per_request_when_the_catalog_lags(tmp_path: Path) -> None:
    sim = Simulator(LAGGING)
    await sim.start()
    try:
        env = cli_env(
            tmp_path,
            sim.url,
            AEP__TIMEOUT="1",
            AEP__CATALOG_SETTLE=str(LAG + 1),
            RETRY__BASE_DELAY="0.05",
            RETRY__MAX_DELAY="1",
        )
        ids = "\n".join(f"{index:024x}" for index in range(COUNT)).encode()
        assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0
        ran = await run(["run", "--until-idle"], env, tmp_path, timeout=100)
        live = sim.live_batches()
        stats = sim.stats
    finally:
        await sim.stop()
    assert ran.code == 0, ran.stderr[-3000:]
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert [record["state"] for record in records] == ["created"] * COUNT
    assert stats.faults["drop_after"] + stats.faults["slow"] >= 8, "too few lost answers to prove anything"
    seen = [event["event"] for event in events(ran.stderr)]
    assert seen.count("batch.lookup_empty") > 0, "no look-up came before the catalog listed the batch"
    # Exactly one batch per request, live and recorded: no second create inside the lag.
    assert len(stats.batches) == COUNT
    assert all(live[external_id_for(record["requestId"])] == [record["batchId"]] for record in records)
