"""The call path under about 30 % faults and 5-second tokens, through the CLI: every request ends
`created`, no request gets two batches, no retry comes sooner than its Retry-After, the rate holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.messages import external_id_for
from tests.e2e.cli import cli_env, events, run

COUNT = 120
RATE = 40

CHAOS = SimulatorConfig(
    token_lifetime=5,
    latency=0.01,
    latency_jitter=0.02,
    throttle_rate=0.04,
    unavailable_rate=0.04,
    error_rate=0.10,
    drop_before_rate=0.04,
    drop_after_rate=0.05,
    slow_rate=0.03,
    slow_delay=1.5,  # longer than the orchestrator's 1 s timeout: the answer never arrives in time
    catalog_lag=0.5,
    seed=11,
)


@pytest.fixture
async def chaos() -> AsyncIterator[Simulator]:
    sim = Simulator(CHAOS)
    await sim.start()
    yield sim
    await sim.stop()


@pytest.mark.timeout(120)
async def test_chaos_every_request_created_exactly_once(tmp_path: Path, chaos: Simulator) -> None:
    env = cli_env(
        tmp_path,
        chaos.url,
        LIMITS__RATE=str(RATE),
        LIMITS__CONCURRENCY="16",
        AEP__TIMEOUT="1",
        RETRY__BASE_DELAY="0.05",
        RETRY__MAX_DELAY="2",
        RETRY__MAX_ATTEMPTS="12",
        AEP__CATALOG_SETTLE="1",
    )
    ids = "\n".join(f"{index:024x}" for index in range(COUNT)).encode()
    assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0

    ran = await run(["run", "--until-idle"], env, tmp_path, timeout=100)
    assert ran.code == 0, ran.stderr[-3000:]

    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert len(records) == COUNT
    assert {record["state"] for record in records} == {"created"}, [
        record for record in records if record["state"] != "created"
    ][:3]
    stats = chaos.stats
    assert sum(stats.faults.values()) > COUNT * 0.2, "the faults did not happen: the test proves nothing"
    # Exactly one batch per request, and it is the one recorded.
    assert max(stats.batches_per_dataset.values()) == 1
    assert len(stats.batches) == COUNT
    assert {record["batchId"] for record in records} == {batch.id for batch in stats.batches}
    live = chaos.live_batches()
    assert all(live[external_id_for(r["requestId"])] == [r["batchId"]] for r in records)
    assert stats.faults["drop_after"] > 0
    assert stats.faults["slow"] > 0
    assert any(event["event"] == "batch.adopted" for event in events(ran.stderr))
    # Never sooner than Retry-After, never more calls in a second than the rate.
    assert stats.early_retries == 0
    assert stats.max_calls_per_second <= RATE
    # Tokens live 5 s and are refreshed ahead of expiry, so almost no call meets an expired one.
    assert stats.tokens_issued >= 2
    assert stats.unauthorized <= 2
