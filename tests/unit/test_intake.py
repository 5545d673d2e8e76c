from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.clock import ManualClock
from orchestrator.files import FileSources
from orchestrator.pipeline.intake import BATCH_SIZE, ROOM_CHECK, Intake
from orchestrator.queues.base import Delivery, Publisher, Queue
from orchestrator.store.base import State
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import FakeQueue, until

DS = "5c8c3c555033b814b69f947f"


def msg(**fields: Any) -> bytes:
    return json.dumps({"datasetId": DS, **fields}).encode()


def make_intake(
    queue: FakeQueue, store: SqlBatchStore, clock: ManualClock, *, max_backlog: int = 100, **kw: Any
) -> Intake:
    return Intake(queue, store, clock, max_backlog=max_backlog, poll_timeout=0.01, **kw)


async def receive_one(queue: FakeQueue, body: bytes) -> Delivery:
    await queue.publish([body])
    [delivery] = await queue.receive(1, 0)
    return delivery


def test_fake_queue_implements_the_ports() -> None:
    queue: Queue = FakeQueue()  # mypy checks the structure
    publisher: Publisher = FakeQueue()
    assert queue is not publisher


# --- one message at a time ------------------------------------------------------------------------------


async def test_valid_message_is_recorded_then_acked(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    added = asyncio.Event()
    intake = make_intake(queue, store, clock, on_added=added)
    delivery = await receive_one(queue, msg(requestId="r1", inputFormat={"format": "csv"}, tags={"a": ["b"]}))
    with capture_logs() as logs:
        await intake.handle(delivery)
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.dataset_id, record.input_format, dict(record.tags)) == (
        State.PENDING,
        DS,
        "csv",
        {"a": ["b"]},
    )
    assert record.created_at == clock.now()
    assert queue.acked == [delivery]
    assert queue.dead == []
    assert added.is_set()
    assert intake.stats.added == 1
    assert [entry["event"] for entry in logs] == ["intake.accepted"]


async def test_ack_comes_after_the_store_write(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    seen: list[State | None] = []
    intake = make_intake(queue, store, clock)
    delivery = await receive_one(queue, msg(requestId="r1"))

    async def check() -> None:
        record = await store.get("r1")
        seen.append(None if record is None else record.state)

    original_ack = queue.ack

    async def ack(delivery: Delivery) -> None:
        await check()
        await original_ack(delivery)

    queue.ack = ack  # type: ignore[method-assign]
    await intake.handle(delivery)
    assert seen == [State.PENDING]


async def test_bare_id_is_keyed_by_message_id(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    delivery = await receive_one(queue, DS.encode())
    await intake.handle(delivery)
    record = await store.get(f"msg:{delivery.message_id}")
    assert record is not None
    assert record.dataset_id == DS


async def test_invalid_message_is_recorded_as_rejected_and_dead_lettered(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    queue = FakeQueue()
    added = asyncio.Event()
    intake = make_intake(queue, store, clock, on_added=added)
    delivery = await receive_one(queue, msg(requestId="r1", tags={"source": "crm"}))
    with capture_logs() as logs:
        await intake.handle(delivery)
    [(dead, reason)] = queue.dead
    assert dead == delivery
    assert "tags.source must be a list of strings" in reason
    assert queue.acked == []  # settled by the dead letter, not acked
    assert queue.leased == {}
    assert not added.is_set()
    assert intake.stats.rejected == 1
    assert await store.get("r1") is None  # never recorded as a request
    rejected = await store.get(f"msg:{delivery.message_id}")
    assert rejected is not None
    assert (rejected.state, rejected.last_error, rejected.dataset_id) == (State.REJECTED, reason, DS)
    assert rejected.attempts == 0
    assert await store.unfinished() == 0
    assert [entry["event"] for entry in logs] == ["intake.rejected"]
    assert logs[0]["reason"] == reason


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        (b"\xff\xfe", ""),
        (b"not json at all!", ""),
        (json.dumps({"datasetId": "bad id"}).encode(), "bad id"),
        (json.dumps({"datasetId": 5}).encode(), ""),
        (json.dumps({"datasetId": "x" * 300}).encode(), "x" * 128),
        (json.dumps(["a"]).encode(), ""),
        # Nothing a store or a log line cannot hold: no NUL (PostgreSQL text), no lone surrogate.
        (json.dumps({"datasetId": "a\u0000b"}).encode(), ""),
        (json.dumps({"datasetId": "ab\ud800"}).encode(), ""),
        # Rejected for its nesting; reading the dataset id for the record must not crash either.
        (b'{"datasetId": "ab", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", ""),
    ],
)
async def test_rejected_record_keeps_a_dataset_hint(
    store: SqlBatchStore, clock: ManualClock, raw: bytes, hint: str
) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    delivery = await receive_one(queue, raw)
    await intake.handle(delivery)
    record = await store.get(f"msg:{delivery.message_id}")
    assert record is not None
    assert record.state is State.REJECTED
    assert record.dataset_id == hint
    assert record.last_error
    assert record.last_error.isprintable()
    assert len(queue.dead) == 1


async def test_redelivered_invalid_message_is_one_record(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    delivery = await receive_one(queue, b"{oops")
    await intake.handle(delivery)
    queue.leased[delivery.message_id] = delivery  # the broker delivers it again
    await intake.handle(delivery)
    assert len(await store.records(state=State.REJECTED)) == 1
    assert len(queue.dead) == 2


async def test_duplicate_is_acked_and_ignored(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    added = asyncio.Event()
    intake = make_intake(queue, store, clock, on_added=added)
    first = await receive_one(queue, msg(requestId="r1"))
    await intake.handle(first)
    added.clear()
    second = await receive_one(queue, msg(requestId="r1"))  # re-sent: another broker message
    clock.advance(5)
    with capture_logs() as logs:
        await intake.handle(second)
    assert queue.acked == [first, second]
    assert (intake.stats.added, intake.stats.duplicates) == (1, 1)
    assert not added.is_set()
    assert len(await store.records()) == 1
    record = await store.get("r1")
    assert record is not None
    assert record.updated_at == record.created_at  # untouched
    assert [entry["event"] for entry in logs] == ["intake.duplicate"]


async def test_redelivery_of_a_bare_id_is_a_duplicate(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    delivery = await receive_one(queue, DS.encode())
    await intake.handle(delivery)
    again = Delivery(delivery.body, delivery.message_id, delivery.attempt + 1)
    queue.leased[again.message_id] = again
    await intake.handle(again)
    assert intake.stats.duplicates == 1
    assert len(await store.records()) == 1


async def test_conflict_keeps_the_first(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    await intake.handle(await receive_one(queue, msg(requestId="r1")))
    conflicting = await receive_one(queue, json.dumps({"datasetId": "other", "requestId": "r1"}).encode())
    with capture_logs() as logs:
        await intake.handle(conflicting)
    assert intake.stats.conflicts == 1
    assert queue.acked[-1] == conflicting
    record = await store.get("r1")
    assert record is not None
    assert record.dataset_id == DS
    assert [entry["event"] for entry in logs] == ["intake.conflict"]
    assert logs[0]["log_level"] == "warning"


# --- the loop ---------------------------------------------------------------------------------------------


async def test_run_takes_everything_in_batches(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, batch_size=4)
    await queue.publish([msg(requestId=f"r{i}") for i in range(10)] + [b"bad one"])
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop))
    await until(lambda: len(queue.acked) + len(queue.dead) == 11)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert await store.unfinished() == 10
    assert (intake.stats.added, intake.stats.rejected) == (10, 1)
    assert max(queue.receive_calls) == 4
    assert await queue.is_empty()


async def test_room_is_counted_once_per_many_batches(
    store: SqlBatchStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The unfinished count is a query: asked once, then kept and reduced by each batch's adds.
    counted: list[int] = []
    unfinished = store.unfinished

    async def counting() -> int:
        counted.append(await unfinished())
        return counted[-1]

    monkeypatch.setattr(store, "unfinished", counting)
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, max_backlog=1000, batch_size=4)
    await queue.publish([msg(requestId=f"r{i}") for i in range(40)])
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop))
    await until(lambda: len(queue.acked) == 40)
    assert counted == [0]
    clock.advance(ROOM_CHECK)  # trusted for ROOM_CHECK seconds, then counted again
    await queue.publish([msg(requestId="r40")])
    await until(lambda: len(queue.acked) == 41)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert len(counted) == 2  # once more, before or after r40's batch
    assert counted[1] >= 40


async def test_the_bound_holds_when_batches_are_counted_down(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, max_backlog=10, batch_size=4)
    await queue.publish([msg(requestId=f"r{i}") for i in range(30)])
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop))
    await until(lambda: clock.sleepers == 1)  # paused at the bound
    stop.set()
    await asyncio.wait_for(task, 1)
    assert await store.unfinished() == 10
    assert queue.receive_calls == [4, 4, 2]  # the last batch only as large as the room left
    assert len(queue.ready) == 20


async def test_backpressure_pauses_receive(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, max_backlog=3)
    await queue.publish([msg(requestId=f"r{i}") for i in range(6)])
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(intake.run(stop))
        await until(lambda: clock.sleepers == 1)  # paused, on the clock
        assert await store.unfinished() == 3
        assert queue.receive_calls == [3]  # never asked for more than there was room for
        assert len(queue.ready) == 3  # the rest stays in the broker
        calls = len(queue.receive_calls)
        clock.advance(5)
        await until(lambda: clock.sleepers == 1)
        assert len(queue.receive_calls) == calls  # still full: still not reading

        # The dispatcher finishes two requests: room for two more.
        for claim in await store.claim("test", 2, 60, clock.now()):
            assert await store.mark_created(claim, f"b-{claim.record.request_id}", "loading", clock.now())
        clock.advance(1)
        await until(lambda: len(queue.acked) == 5)
        await until(lambda: clock.sleepers == 1)
        assert queue.receive_calls[calls:] == [2]
        assert len(queue.ready) == 1
        stop.set()
        await asyncio.wait_for(task, 1)
    events = [entry["event"] for entry in logs]
    assert events.count("intake.paused") == 2
    assert events.count("intake.resumed") == 1


async def test_stop_during_backpressure(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, max_backlog=1)
    await queue.publish([msg(requestId="a"), msg(requestId="b")])
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop))
    await until(lambda: clock.sleepers == 1)
    stop.set()
    await asyncio.wait_for(task, 1)  # no clock advance needed
    assert len(queue.ready) == 1


async def test_stop_while_handling_finishes_the_batch_and_reads_no_more(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, max_backlog=10 * BATCH_SIZE)  # reads BATCH_SIZE at a time
    await queue.publish([msg(requestId=f"r{i}") for i in range(BATCH_SIZE + 6)])
    stop = asyncio.Event()
    queue.on_ack = lambda delivery: stop.set()  # SIGTERM arrives while the first batch is handled
    await asyncio.wait_for(intake.run(stop), 1)
    # The batch in hand is recorded and acked (nothing half-done); the rest stays in the queue.
    assert len(queue.acked) == BATCH_SIZE
    assert queue.released == []
    assert queue.leased == {}
    assert len(queue.ready) == 6
    assert len(await store.records()) == BATCH_SIZE


async def test_stop_before_handling_releases_everything(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    await queue.publish([msg(requestId="a"), msg(requestId="b")])
    stop = asyncio.Event()
    original = queue.receive

    async def receive(max_messages: int, timeout: float) -> list[Delivery]:
        deliveries = await original(max_messages, timeout)
        stop.set()  # the signal lands while receive was waiting
        return deliveries

    queue.receive = receive  # type: ignore[method-assign]
    await asyncio.wait_for(intake.run(stop), 1)
    assert len(queue.released) == 2
    assert queue.acked == []
    assert await store.records() == []


async def test_next_attempt_time_is_the_intake_time(store: SqlBatchStore, clock: ManualClock) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    clock.advance(42)
    await intake.handle(await receive_one(queue, msg(requestId="r1")))
    record = await store.get("r1")
    assert record is not None
    assert record.next_attempt_at == clock.now()
    assert record.created_at - ManualClock().now() == timedelta(seconds=42)


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (["missing.json"], "files[0]: no such file under ORCH_UPLOAD__ROOT"),
        (["link.json"], "files[0]: leads outside ORCH_UPLOAD__ROOT"),
        (["in.json", "s3://bucket/x.json"], "files[1]: s3:// is not accepted (ORCH_UPLOAD__PROTOCOLS: file)"),
        (["../in.json"], "files[0]: empty, '.' and '..' path segments are refused"),
    ],
)
async def test_a_message_naming_files_it_cannot_upload_is_rejected_with_the_reason(
    store: SqlBatchStore, clock: ManualClock, tmp_path: Path, files: list[str], reason: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.json").write_text("{}\n")
    (tmp_path / "secret.json").write_text("{}\n")
    (root / "link.json").symlink_to(tmp_path / "secret.json")
    queue = FakeQueue()
    intake = make_intake(queue, store, clock, sources=FileSources(root, ["file"]))

    await intake.handle(await receive_one(queue, msg(requestId="r1", files=files)))
    await intake.handle(await receive_one(queue, msg(requestId="ok", files=["in.json"])))

    [rejected] = await store.records(state=State.REJECTED)
    assert rejected.last_error == reason
    assert queue.dead[0][1] == reason
    accepted = await store.get("ok")
    assert accepted is not None
    assert [ref.name for ref in accepted.files] == ["in.json"]


async def test_without_sources_a_message_naming_files_is_rejected(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    queue = FakeQueue()
    intake = make_intake(queue, store, clock)
    await intake.handle(await receive_one(queue, msg(requestId="r1", files=["in.json"])))
    [rejected] = await store.records(state=State.REJECTED)
    assert rejected.last_error == "files: this service does not upload files"
