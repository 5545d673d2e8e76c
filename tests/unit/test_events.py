"""Batch events through the outbox: the store writes one with the state change, in its transaction;
the relay publishes the outbox in order and deletes rows only once the publisher returned. Time is a
`ManualClock`: backoff and polling move only when a test moves them."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from orchestrator import service
from orchestrator.clock import ManualClock
from orchestrator.events import BASE_DELAY, MAX_DELAY, POLL_INTERVAL, EventRelay
from orchestrator.messages import BatchRequest
from orchestrator.queues.sqlite import SqliteQueue
from orchestrator.settings import EventSettings, HttpSettings, QueueSettings, Settings, StoreSettings
from orchestrator.store.base import Claim, State
from orchestrator.store.engine import create_engine
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import IMS_URL, aep_settings, open_store, until

CREATE_URL = "https://platform.test/data/foundation/import/batches"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LEASE = 30.0


class FakePublisher:
    """The `Publisher` port in memory: what was published, in order, with message ids. `fail`
    scripts the next publishes to raise; `gate`, when set, holds each publish until it is set."""

    name = "test.events"

    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], str]] = []  # (body, message id)
        self.publishes: list[int] = []  # size of each successful publish
        self.attempts = 0
        self.fail: list[BaseException] = []
        self.refuse_open: list[BaseException] = []
        self.accept_fewer = 0  # the next publish reports this many fewer accepted
        self.gate: asyncio.Event | None = None
        self.open_attempts = 0
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.open_attempts += 1
        if self.refuse_open:
            raise self.refuse_open.pop(0)
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        assert message_ids is not None
        assert len(message_ids) == len(bodies)
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise self.fail.pop(0)
        fewer, self.accept_fewer = self.accept_fewer, 0
        self.messages += [(json.loads(body), mid) for body, mid in zip(bodies, message_ids, strict=True)]
        self.publishes.append(len(bodies))
        return len(bodies) - fewer

    @property
    def request_ids(self) -> list[str]:
        return [body["requestId"] for body, _ in self.messages]


@pytest.fixture
async def events_store(tmp_path: Path) -> AsyncIterator[SqlBatchStore]:
    """A migrated SQLite store with events on (the service's store when ORCH_EVENTS__URL is set)."""
    plain = await open_store(tmp_path)
    await plain.close()
    store = SqlBatchStore(plain.url, events=True)
    await store.open()
    yield store
    await store.close()


@dataclass
class Rig:
    """A relay (batches of 3) between a store with events on and a fake publisher, on a manual clock."""

    store: SqlBatchStore
    publisher: FakePublisher
    relay: EventRelay
    clock: ManualClock
    log: io.StringIO


@pytest.fixture
async def rig(events_store: SqlBatchStore, clock: ManualClock, log_output: io.StringIO) -> AsyncIterator[Rig]:
    publisher = FakePublisher()
    relay = EventRelay(events_store, publisher, clock, batch_size=3, rng=random.Random(7))
    yield Rig(events_store, publisher, relay, clock, log_output)
    await relay.stop(0.0)
    await relay.close()


async def claims(store: SqlBatchStore, *request_ids: str, now: datetime = NOW) -> list[Claim]:
    for request_id in request_ids:
        await store.add(BatchRequest(request_id=request_id, dataset_id=f"ds-{request_id}"), now)
    claimed = await store.claim("test", len(request_ids), LEASE, now)
    assert [claim.record.request_id for claim in claimed] == list(request_ids)
    return claimed


async def created(store: SqlBatchStore, *request_ids: str) -> None:
    """Take each request to `created` (batch `b-<id>`), one outcome each, in the order given."""
    for claim in await claims(store, *request_ids):
        assert await store.mark_created(claim, f"b-{claim.record.request_id}", "loading", NOW)


async def outbox_bodies(store: SqlBatchStore) -> list[dict[str, Any]]:
    return [json.loads(event.body) for event in await store.outbox(100)]


# --- the outbox in the store ------------------------------------------------------------------------


async def test_created_and_failed_write_one_event_each(events_store: SqlBatchStore) -> None:
    made, broken = await claims(events_store, "r1", "r2")
    assert not events_store.events_written.is_set()

    assert await events_store.mark_created(made, "batch-1", "loading", NOW + timedelta(seconds=1))
    assert await events_store.mark_failed(broken, "400: Dataset ds-r2 not found", NOW + timedelta(seconds=2))

    assert events_store.events_written.is_set()
    assert await events_store.events_waiting() == 2
    events = await events_store.outbox(10)
    first, second = (json.loads(event.body) for event in events)
    assert [event.event_id for event in events] == [first["eventId"], second["eventId"]]
    assert uuid.UUID(first["eventId"]) != uuid.UUID(second["eventId"])
    assert first == {
        "type": "batch.created",
        "eventId": first["eventId"],
        "requestId": "r1",
        "datasetId": "ds-r1",
        "batchId": "batch-1",
        "batchStatus": "loading",
        "error": None,
        "at": "2026-11-28T12:00:01.000Z",
    }
    assert second == {
        "type": "batch.failed",
        "eventId": second["eventId"],
        "requestId": "r2",
        "datasetId": "ds-r2",
        "batchId": None,
        "batchStatus": None,
        "error": "400: Dataset ds-r2 not found",
        "at": "2026-11-28T12:00:02.000Z",
    }


async def test_an_adopted_batch_is_the_one_the_event_names(events_store: SqlBatchStore) -> None:
    [claim] = await claims(events_store, "r1")

    await events_store.mark_created(claim, "found-by-lookup", "success", NOW, adopted=True)

    [event] = await outbox_bodies(events_store)
    record = await events_store.get("r1")
    assert record is not None
    assert (event["type"], event["batchId"], event["batchStatus"]) == (
        "batch.created",
        "found-by-lookup",
        "success",
    )
    assert (event["batchId"], event["batchStatus"]) == (record.batch_id, record.batch_status)


async def test_other_changes_write_no_event(events_store: SqlBatchStore) -> None:
    retried, released, reconciled = await claims(events_store, "r1", "r2", "r3")
    await events_store.reject("bad", None, "not JSON", NOW)
    await events_store.mark_retry(retried, "503", NOW, ambiguous=True, now=NOW)
    await events_store.release(released, NOW)
    await events_store.mark_created(reconciled, "b3", "loading", NOW, reconcile_at=NOW)
    [again] = await events_store.claim_reconciliations("test", 1, LEASE, NOW)

    # A reconciliation leaves a trail row "created" but is no arrival in that state.
    assert await events_store.finish_reconciliation(again, NOW, detail="reconciled: aborted b9")

    assert [event["requestId"] for event in await outbox_bodies(events_store)] == ["r3"]


async def test_an_outcome_fenced_out_writes_no_event(events_store: SqlBatchStore) -> None:
    [stale] = await claims(events_store, "r1")
    # The lease runs out and another dispatcher takes the request over.
    [current] = await events_store.claim("other", 1, LEASE, NOW + timedelta(seconds=LEASE))

    assert not await events_store.mark_created(stale, "b-stale", "loading", NOW)
    assert not await events_store.mark_failed(stale, "late", NOW)
    assert await events_store.events_waiting() == 0

    assert await events_store.mark_created(current, "b-current", "loading", NOW)
    assert [event["batchId"] for event in await outbox_bodies(events_store)] == ["b-current"]


async def test_the_event_and_the_state_change_commit_together(events_store: SqlBatchStore) -> None:
    [claim] = await claims(events_store, "r1")
    # An outbox that cannot be written: the state change must not be written either.
    engine = create_engine(events_store.url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE event_outbox RENAME TO event_outbox_away"))
    finally:
        await engine.dispose()

    with pytest.raises(OperationalError, match="event_outbox"):
        await events_store.mark_created(claim, "b1", "loading", NOW)

    record = await events_store.get("r1")
    assert record is not None
    assert (record.state, record.batch_id) == (State.PENDING, None)
    assert [change.to_state for change in await events_store.history("r1")] == [State.PENDING]


async def test_a_store_without_events_writes_none(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        [claim] = await claims(store, "r1")
        assert await store.mark_created(claim, "b1", "loading", NOW)
        assert await store.events_waiting() == 0
        assert not store.events_written.is_set()
    finally:
        await store.close()


# --- the relay --------------------------------------------------------------------------------------


async def test_relay_publishes_in_order_with_event_ids_and_deletes_after_confirm(rig: Rig) -> None:
    await created(rig.store, "r1", "r2", "r3", "r4", "r5")
    expected = await outbox_bodies(rig.store)
    rig.publisher.gate = asyncio.Event()

    rig.relay.start()
    await until(lambda: rig.publisher.attempts == 1)

    # Published, not yet confirmed: the rows stay.
    assert await rig.store.events_waiting() == 5
    rig.publisher.gate.set()
    await until(lambda: len(rig.publisher.messages) == 5)
    await until(lambda: _waiting_is(rig.store, 0))
    assert [body for body, _ in rig.publisher.messages] == expected
    assert [mid for _, mid in rig.publisher.messages] == [body["eventId"] for body in expected]
    assert rig.publisher.publishes == [3, 2]  # batch_size 3
    # Counted once the rows are deleted, which the check above may see first.
    await until(lambda: rig.relay.published == 5)


async def test_relay_retries_after_a_publisher_error_without_losing_or_reordering(rig: Rig) -> None:
    await created(rig.store, "r1", "r2")
    rig.publisher.fail = [ConnectionError("connection to amqp://guest:secret@broker:5672/ lost")]

    rig.relay.start()
    await until(lambda: rig.publisher.attempts == 1 and rig.clock.sleepers == 1)

    assert rig.publisher.messages == []
    assert await rig.store.events_waiting() == 2
    assert rig.publisher.closed == 1  # dropped, to reconnect on the next try
    # Written while the broker is down: published after the earlier ones, never before.
    await created(rig.store, "r3")
    await asyncio.sleep(0)
    assert rig.publisher.attempts == 1  # a new row does not cut the backoff short

    rig.clock.advance(MAX_DELAY)
    await until(lambda: len(rig.publisher.messages) == 3)
    await until(lambda: _waiting_is(rig.store, 0))
    assert rig.publisher.request_ids == ["r1", "r2", "r3"]
    assert rig.publisher.opened == 2
    logged = _logged(rig.log)
    [failed] = _logged(rig.log, "events.publish_failed")
    assert failed["level"] == "warning"
    assert failed["error"] == "ConnectionError: connection to amqp://***@broker:5672/ lost"
    assert BASE_DELAY <= failed["retry_in"] <= BASE_DELAY * 2
    assert any(line["event"] == "events.published" and line["level"] == "debug" for line in logged)
    assert any(line["event"] == "events.publish_restored" for line in logged)


async def test_relay_backs_off_longer_while_the_broker_stays_down(rig: Rig) -> None:
    await created(rig.store, "r1")
    rig.publisher.refuse_open = [ConnectionRefusedError("down")] * 5

    rig.relay.start()
    delays = []
    for failures in range(1, 6):

        def backing_off(after: int = failures) -> bool:
            return rig.publisher.open_attempts == after and rig.clock.sleepers == 1

        await until(backing_off)
        delay = _logged(rig.log, "events.publish_failed")[-1]["retry_in"]
        ceiling = min(MAX_DELAY, BASE_DELAY * 2 ** (failures - 1))
        assert BASE_DELAY <= delay <= ceiling
        delays.append(delay)
        rig.clock.advance(delay - 0.01)
        await asyncio.sleep(0.01)
        assert rig.publisher.open_attempts == failures  # not before its delay
        rig.clock.advance(0.02)

    await until(lambda: rig.publisher.request_ids == ["r1"])
    assert max(delays) > 2 * BASE_DELAY  # the jitter's range grows with the failures


async def test_relay_wakes_when_rows_are_written(rig: Rig) -> None:
    rig.relay.start()
    await until(lambda: rig.publisher.opened == 1 and rig.clock.sleepers == 1)  # idle, polling

    await created(rig.store, "r1")

    await until(lambda: rig.publisher.request_ids == ["r1"])
    assert rig.clock.monotonic() == 0  # no poll interval passed: the commit woke it


async def test_relay_polls_for_rows_another_process_wrote(rig: Rig) -> None:
    rig.relay.start()
    await until(lambda: rig.clock.sleepers == 1)
    # A second store on the same file: a replica, or a run killed before it published.
    other = SqlBatchStore(rig.store.url, events=True)
    await other.open()
    try:
        await created(other, "r1")
    finally:
        await other.close()
    await asyncio.sleep(0.01)
    assert rig.publisher.messages == []

    rig.clock.advance(POLL_INTERVAL)

    await until(lambda: rig.publisher.request_ids == ["r1"])


async def test_events_recorded_before_a_crash_are_published_by_the_next_run(rig: Rig) -> None:
    # The first run recorded the outcomes and died before its relay published anything.
    await created(rig.store, "r1", "r2")
    await rig.store.close()

    restarted = SqlBatchStore(rig.store.url, events=True)
    await restarted.open()
    relay = EventRelay(restarted, rig.publisher, rig.clock)
    try:
        relay.start()
        await until(lambda: rig.publisher.request_ids == ["r1", "r2"])
        await until(lambda: _waiting_is(restarted, 0))
    finally:
        await relay.stop(0.0)
        await restarted.close()


async def test_a_partly_accepted_batch_is_published_again_whole(rig: Rig) -> None:
    await created(rig.store, "r1", "r2")
    rig.publisher.accept_fewer = 1

    rig.relay.start()
    await until(lambda: rig.publisher.attempts == 1 and rig.clock.sleepers == 1)
    assert await rig.store.events_waiting() == 2
    rig.clock.advance(MAX_DELAY)

    await until(lambda: _waiting_is(rig.store, 0))
    # At least once: the repeats carry the same event ids.
    assert rig.publisher.request_ids == ["r1", "r2", "r1", "r2"]
    assert len({mid for _, mid in rig.publisher.messages}) == 2


async def test_stopping_publishes_the_events_of_the_last_outcomes(rig: Rig) -> None:
    stop = asyncio.Event()
    stop.set()
    # Recorded after the service's stop (calls drained in its grace), before the relay ends.
    await created(rig.store, "r1", "r2", "r3", "r4")

    await rig.relay.run(stop)

    assert rig.publisher.request_ids == ["r1", "r2", "r3", "r4"]
    assert rig.publisher.publishes == [3, 1]
    assert await rig.store.events_waiting() == 0


async def test_stop_gives_up_after_its_grace_and_leaves_the_rows(rig: Rig) -> None:
    rig.relay.start()
    await until(lambda: rig.clock.sleepers == 1)
    rig.publisher.gate = asyncio.Event()  # the broker stops answering
    await created(rig.store, "r1")
    await until(lambda: rig.publisher.attempts == 1)

    stopping = asyncio.create_task(rig.relay.stop(5.0))
    await until(lambda: rig.clock.sleepers == 1)
    assert not stopping.done()
    rig.clock.advance(5.0)
    await stopping

    assert rig.relay.task.cancelled()
    assert await rig.store.events_waiting() == 1
    assert '"events.left_in_outbox"' in rig.log.getvalue()


# --- the service ------------------------------------------------------------------------------------


async def test_until_idle_waits_until_every_event_is_published(
    tmp_path: Path, mock: aioresponses, monkeypatch: pytest.MonkeyPatch, log_output: io.StringIO
) -> None:
    mock.post(IMS_URL, payload={"access_token": "t", "expires_in": 86399}, repeat=True)
    mock.post(CREATE_URL, status=201, payload={"id": "batch-1", "status": "loading"})
    # Quick retries: the service keeps its own time here (it claims and leases).
    monkeypatch.setattr(service, "EventRelay", functools.partial(EventRelay, base_delay=0.02, max_delay=0.05))
    events_file = tmp_path / "events.db"
    events_file.mkdir()  # a directory where the file should be: the destination refuses, for now
    settings = Settings(
        aep=aep_settings(),
        store=StoreSettings(url=f"sqlite:///{tmp_path}/store.db"),
        queue=QueueSettings(url=f"sqlite:///{tmp_path}/queue.db"),
        events=EventSettings(url=f"sqlite:///{events_file}", name="test.events"),
        http=HttpSettings(port=0),
    )
    requests = SqliteQueue(settings.queue.url, settings.queue.name)
    await requests.open()
    await requests.publish([b'{"datasetId": "ds1", "requestId": "r1"}'])
    await requests.close()
    looks_since_created = 0

    def progress(parts: service.Components) -> None:
        nonlocal looks_since_created
        if parts.dispatcher.stats.created:
            looks_since_created += 1

    running = asyncio.create_task(service.run(settings, until_idle=True, on_progress=progress))
    # Two idle looks in a row end a run; four pass with the batch made and its event waiting.
    await until(lambda: looks_since_created >= 4)
    assert not running.done()
    assert '"events.publish_failed"' in log_output.getvalue()

    events_file.rmdir()

    assert await asyncio.wait_for(running, 30) == 0
    events = SqliteQueue(f"sqlite:///{events_file}", "test.events")
    await events.open()
    try:
        [delivery] = await events.receive(10, 0)
    finally:
        await events.close()
    body = json.loads(delivery.body)
    assert (body["type"], body["requestId"], body["batchId"]) == ("batch.created", "r1", "batch-1")
    assert delivery.message_id == body["eventId"]


async def _waiting_is(store: SqlBatchStore, count: int) -> bool:
    return await store.events_waiting() == count


def _logged(log_output: io.StringIO, event: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_output.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if event is None or line["event"] == event]
