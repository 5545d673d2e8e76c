"""Batch events through the CLI: with ORCH_EVENTS__URL on a SQLite file, every request that ends
`created` or `failed` has its event in the embedded queue table ORCH_EVENTS__NAME, naming the
recorded batch, also when the service is killed with -9 mid-run and started again."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.queues.sqlite import SqliteQueue
from tests.e2e.cli import cli_env, events, run, start

COUNT = 60
EVENTS = "test.batch-events"
# Every tenth dataset is unknown to AEP: its request fails at once (400).
UNKNOWN = frozenset(f"{index:024x}" for index in range(0, COUNT, 10))


@pytest.fixture
async def slow_simulator() -> AsyncIterator[Simulator]:
    # Slow answers keep calls in flight, so the kill lands in the middle of some of them.
    sim = Simulator(SimulatorConfig(latency=0.3, latency_jitter=0.2, seed=5, unknown_datasets=UNKNOWN))
    await sim.start()
    yield sim
    await sim.stop()


async def read_events(url: str) -> list[dict[str, Any]]:
    """Every event on the queue table, read as a consumer of that name would (and acked)."""
    consumer = SqliteQueue(url, EVENTS)
    await consumer.open()
    found: list[dict[str, Any]] = []
    try:
        while deliveries := await consumer.receive(500, 0):
            for delivery in deliveries:
                body = json.loads(delivery.body)
                assert delivery.message_id == body["eventId"]  # brokers that de-duplicate can
                found.append(body)
                await consumer.ack(delivery)
    finally:
        await consumer.close()
    return found


async def test_an_event_for_every_created_and_failed_request_across_a_kill_9(
    tmp_path: Path, slow_simulator: Simulator
) -> None:
    events_url = f"sqlite:///{tmp_path}/events.db"
    env = cli_env(
        tmp_path,
        slow_simulator.url,
        LIMITS__RATE="40",
        LIMITS__CONCURRENCY="8",
        AEP__TIMEOUT="1",
        RETRY__MAX_DELAY="1",
        RETRY__BASE_DELAY="0.05",
        AEP__CATALOG_SETTLE="1",
        EVENTS__URL=events_url,
        EVENTS__NAME=EVENTS,
    )
    ids = "\n".join(f"{index:024x}" for index in range(COUNT)).encode()
    enqueued = await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)
    assert enqueued.code == 0, enqueued.stderr

    service = await start(["run"], env, tmp_path)
    async with asyncio.timeout(30):
        while len(slow_simulator.stats.batches) < 10:  # noqa: ASYNC110 - the stats have no event to await
            await asyncio.sleep(0.05)
    service.signal(signal.SIGKILL)
    assert (await service.wait()).code == -signal.SIGKILL
    assert len(slow_simulator.stats.batches) < COUNT - len(UNKNOWN), "the kill came too late to test anything"

    restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    # 1 when some of the unknown datasets were failed by this run rather than by the killed one.
    assert restarted.code in (0, 1), restarted.stderr[-2000:]
    assert any(e["event"] == "service.idle" for e in events(restarted.stderr))

    records = {r["requestId"]: r for r in (await run(["batches", "--json"], env, tmp_path)).json_lines()}
    assert len(records) == COUNT
    failed = {request_id for request_id, r in records.items() if r["state"] == "failed"}
    assert {records[request_id]["datasetId"] for request_id in failed} == UNKNOWN
    assert {r["state"] for r in records.values()} == {"created", "failed"}

    published = await read_events(events_url)
    by_request = {event["requestId"]: event for event in published}
    assert len(by_request) == len(published) == COUNT, "one event per request, none twice"
    for request_id, record in records.items():
        event = by_request[request_id]
        assert event["type"] == f"batch.{record['state']}"
        assert (event["datasetId"], event["batchId"], event["batchStatus"]) == (
            record["datasetId"],
            record["batchId"],
            record["batchStatus"],
        )
        assert event["error"] == (record["lastError"] if request_id in failed else None)
        assert datetime.fromisoformat(event["at"]).utcoffset() is not None
    # Each created request names the one batch AEP made for it.
    made = {batch.id for batch in slow_simulator.stats.batches}
    assert {event["batchId"] for event in published if event["type"] == "batch.created"} == made
    # `--until-idle` ended with the outbox empty.
    with sqlite3.connect(tmp_path / "orchestrator.db") as store:
        assert store.execute("SELECT count(*) FROM event_outbox").fetchone() == (0,)
