"""Batch events through the CLI: with ORCH_EVENTS__URL on a SQLite file, every request that ends
`created` or `failed` has its event in the embedded queue table ORCH_EVENTS__NAME, naming the
recorded batch, also when the service is killed with -9 mid-run and started again.

`run_killed_and_restarted` and `assert_an_event_per_request` are the scenario and the check, shared
with the same acceptance on RabbitMQ (tests/integration/test_events_rabbitmq.py)."""

from __future__ import annotations

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
from tests.e2e.test_cli_crash import COUNT, KILL_SETTINGS, _enqueue, _wait_for_batches

EVENTS = "test.batch-events"
# Every tenth dataset is unknown to AEP: its request fails at once (400).
UNKNOWN = frozenset(f"{index:024x}" for index in range(0, COUNT, 10))

Record = dict[str, Any]


def slow_simulator_config(seed: int) -> SimulatorConfig:
    # Slow answers keep calls in flight, so the kill lands in the middle of some of them.
    return SimulatorConfig(latency=0.3, latency_jitter=0.2, seed=seed, unknown_datasets=UNKNOWN)


@pytest.fixture
async def slow_simulator() -> AsyncIterator[Simulator]:
    async with Simulator(slow_simulator_config(seed=5)) as sim:
        yield sim


def events_env(tmp_path: Path, sim: Simulator, events_url: str, events_name: str) -> dict[str, str]:
    return cli_env(
        tmp_path,
        sim.url,
        **KILL_SETTINGS,
        EVENTS__URL=events_url,
        EVENTS__NAME=events_name,
    )


async def run_killed_and_restarted(env: dict[str, str], sim: Simulator, cwd: Path) -> dict[str, Record]:
    """COUNT requests (those of UNKNOWN datasets fail), the service killed with -9 mid-run, then run
    again until idle; returns the records by request id, every one of them final."""
    await _enqueue(env, cwd)
    service = await start(["run"], env, cwd)
    await _wait_for_batches(sim, 10)
    service.signal(signal.SIGKILL)
    assert (await service.wait()).code == -signal.SIGKILL
    assert len(sim.stats.batches) < COUNT - len(UNKNOWN), "the kill came too late to test anything"

    restarted = await run(["run", "--until-idle"], env, cwd, timeout=60)
    # 1 when some of the unknown datasets were failed by this run rather than by the killed one.
    assert restarted.code in (0, 1), restarted.stderr[-2000:]
    assert any(e["event"] == "service.idle" for e in events(restarted.stderr))

    records = {r["requestId"]: r for r in (await run(["batches", "--json"], env, cwd)).json_lines()}
    assert len(records) == COUNT
    assert {r["state"] for r in records.values()} == {"created", "failed"}
    failed = [r["datasetId"] for r in records.values() if r["state"] == "failed"]
    assert set(failed) == UNKNOWN
    return records


def assert_an_event_per_request(records: dict[str, Record], published: list[Record], sim: Simulator) -> None:
    """One event per request (`published` holds each event once), of its final state, naming the
    recorded batch: the one AEP made for it."""
    by_request = {event["requestId"]: event for event in published}
    assert len(by_request) == len(published) == len(records), "one event per request, none twice"
    for request_id, record in records.items():
        event = by_request[request_id]
        assert event["type"] == f"batch.{record['state']}"
        assert (event["datasetId"], event["batchId"], event["batchStatus"]) == (
            record["datasetId"],
            record["batchId"],
            record["batchStatus"],
        )
        assert event["error"] == (record["lastError"] if record["state"] == "failed" else None)
        assert datetime.fromisoformat(event["at"]).utcoffset() is not None
    made = {batch.id for batch in sim.stats.batches}
    assert {event["batchId"] for event in published if event["type"] == "batch.created"} == made


async def read_events(url: str) -> list[Record]:
    """Every event on the queue table, read as a consumer of that name would (and acked)."""
    consumer = SqliteQueue(url, EVENTS)
    await consumer.open()
    found: list[Record] = []
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
    env = events_env(tmp_path, slow_simulator, events_url, EVENTS)

    records = await run_killed_and_restarted(env, slow_simulator, tmp_path)

    # The embedded queue keeps a message id once: a repeat after the kill is not there twice.
    assert_an_event_per_request(records, await read_events(events_url), slow_simulator)
    # `--until-idle` ended with the outbox empty.
    with sqlite3.connect(tmp_path / "orchestrator.db") as store:
        assert store.execute("SELECT count(*) FROM event_outbox").fetchone() == (0,)
