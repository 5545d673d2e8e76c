"""The embedded queue on SQLite files in a temporary directory, with a manual clock for leases and
waiting."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from orchestrator.clock import ManualClock
from orchestrator.queues import open_queue
from orchestrator.queues.base import Delivery, Publisher, Queue
from orchestrator.queues.sqlite import SqliteQueue
from orchestrator.settings import ConfigError

MakeQueue = Callable[..., Awaitable[SqliteQueue]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
async def make_queue(queue_path: Path, clock: ManualClock) -> AsyncIterator[MakeQueue]:
    """Opens queues on one file (several consumers, or several names) and closes them all."""
    queues: list[SqliteQueue] = []

    async def make(name: str = "requests", **options: float) -> SqliteQueue:
        queue = SqliteQueue(f"sqlite:///{queue_path}", name, clock=clock, **options)
        queues.append(queue)
        await queue.open()
        return queue

    yield make
    for queue in queues:
        await queue.close()


def rows(path: Path) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT queue, status, attempts, last_error FROM queue_message ORDER BY id"
        ).fetchall()
    finally:
        connection.close()


async def parked(clock: ManualClock, task: asyncio.Task[list[Delivery]]) -> None:
    """Wait (for the database thread, not for time) until `task` sleeps on the clock or is done."""
    for _ in range(2000):
        if clock.sleepers or task.done():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("receive neither slept on the clock nor returned")


def test_sqlite_queue_implements_the_ports() -> None:
    queue: Queue = SqliteQueue("sqlite:///unused.db", "q")  # mypy checks the structure
    publisher: Publisher = SqliteQueue("sqlite:///unused.db", "q")
    assert queue.name == publisher.name == "q"


async def test_a_message_id_published_again_stays_once(make_queue: MakeQueue) -> None:
    """The event relay may publish an event again after a crash: one message, not two."""
    queue = await make_queue()
    assert await queue.publish([b"e1", b"e2"], ["id-1", "id-2"]) == 2
    assert await queue.publish([b"e1 again"], ["id-1"]) == 1
    got = await queue.receive(10, 0)
    assert [(d.message_id, d.body) for d in got] == [("id-1", b"e1"), ("id-2", b"e2")]


async def test_publish_then_receive_in_order(make_queue: MakeQueue) -> None:
    queue = await make_queue()

    assert await queue.publish([b"one", b"two", b"three"]) == 3
    deliveries = await queue.receive(10, timeout=0)

    assert [d.body for d in deliveries] == [b"one", b"two", b"three"]
    assert {d.attempt for d in deliveries} == {1}
    assert len({d.message_id for d in deliveries}) == 3
    assert all(len(d.message_id) == 32 for d in deliveries)
    assert await queue.receive(10, timeout=0) == []  # leased, not redelivered


async def test_receive_takes_at_most_max_messages(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    await queue.publish([b"%d" % n for n in range(5)])

    assert [d.body for d in await queue.receive(2, timeout=0)] == [b"0", b"1"]
    assert [d.body for d in await queue.receive(10, timeout=0)] == [b"2", b"3", b"4"]
    assert await queue.receive(0, timeout=0) == []


async def test_publish_nothing(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    assert await queue.publish([]) == 0
    assert await queue.is_empty()


async def test_an_unacked_lease_expires_and_the_message_comes_back(
    make_queue: MakeQueue, clock: ManualClock
) -> None:
    queue = await make_queue(lease_seconds=60)
    await queue.publish([b"ds1"])
    [first] = await queue.receive(1, timeout=0)

    clock.advance(59.9)
    assert await queue.receive(1, timeout=0) == []
    clock.advance(0.1)
    [again] = await queue.receive(1, timeout=0)

    assert (again.body, again.message_id, again.attempt) == (b"ds1", first.message_id, 2)


async def test_ack_forgets_the_message(make_queue: MakeQueue, clock: ManualClock, queue_path: Path) -> None:
    queue = await make_queue()
    await queue.publish([b"a", b"b"])
    a, b = await queue.receive(2, timeout=0)

    await queue.ack(a)

    assert not await queue.is_empty()
    await queue.ack(b)
    assert await queue.is_empty()
    clock.advance(3600)
    assert await queue.receive(10, timeout=0) == []
    assert rows(queue_path) == []


async def test_acks_are_applied_by_the_next_transaction(make_queue: MakeQueue, queue_path: Path) -> None:
    queue = await make_queue()
    await queue.publish([b"a", b"b"])
    a, b = await queue.receive(2, timeout=0)

    await queue.ack(a)
    assert rows(queue_path) == [("requests", "leased", 1, None)] * 2  # lazy: nothing written yet
    assert await queue.receive(1, timeout=0) == []
    assert rows(queue_path) == [("requests", "leased", 1, None)]

    await queue.ack(b)
    await queue.close()
    assert rows(queue_path) == []


async def test_unapplied_acks_of_a_dead_consumer_mean_redelivery(
    make_queue: MakeQueue, clock: ManualClock
) -> None:
    dying = await make_queue(lease_seconds=30)
    await dying.publish([b"a"])
    [delivery] = await dying.receive(1, timeout=0)
    await dying.ack(delivery)
    dying._acked.clear()  # the process dies before its next transaction

    clock.advance(30)
    [again] = await (await make_queue()).receive(1, timeout=0)

    assert (again.message_id, again.attempt) == (delivery.message_id, 2)


async def test_acks_wait_at_most_a_second(
    make_queue: MakeQueue, clock: ManualClock, queue_path: Path
) -> None:
    queue = await make_queue()
    await queue.publish([b"a", b"b"])
    a, b = await queue.receive(2, timeout=0)

    await queue.ack(a)
    clock.advance(SqliteQueue.MAX_ACK_DELAY)
    await queue.ack(b)

    assert rows(queue_path) == []


@pytest.mark.parametrize(
    ("owner", "recovered"),
    [
        (f"{socket.gethostname()}/4194305/x", True),  # above any pid_max: that process is gone
        (f"{socket.gethostname()}/{os.getppid()}/x", False),  # alive
        ("another-host/4194305/x", False),  # not ours to judge
        ("legacy-owner", False),
    ],
)
async def test_open_recovers_leases_of_dead_local_consumers(
    make_queue: MakeQueue, queue_path: Path, owner: str, recovered: bool
) -> None:
    first = await make_queue()
    await first.publish([b"a"])
    [held] = await first.receive(1, timeout=0)
    first._owner = "closed-elsewhere"  # so closing `first` does not release the lease itself
    connection = sqlite3.connect(queue_path)
    try:
        with connection:
            connection.execute("UPDATE queue_message SET lease_owner = ?", (owner,))
    finally:
        connection.close()

    restarted = await make_queue()
    deliveries = await restarted.receive(1, timeout=0)

    if recovered:
        assert [(d.message_id, d.attempt) for d in deliveries] == [(held.message_id, 2)]
    else:
        assert deliveries == []


async def test_release_makes_a_message_deliverable_at_once_uncounted(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    await queue.publish([b"a"])
    [delivery] = await queue.receive(1, timeout=0)

    await queue.release(delivery)
    [again] = await queue.receive(1, timeout=0)

    assert (again.message_id, again.attempt) == (delivery.message_id, 1)


async def test_a_stale_release_leaves_the_new_lease_alone(make_queue: MakeQueue, clock: ManualClock) -> None:
    queue = await make_queue(lease_seconds=10)
    await queue.publish([b"a"])
    [stale] = await queue.receive(1, timeout=0)
    clock.advance(10)
    [current] = await queue.receive(1, timeout=0)

    await queue.release(stale)

    assert current.attempt == 2
    assert await queue.receive(1, timeout=0) == []


async def test_dead_letter_keeps_the_reason_and_never_redelivers(
    make_queue: MakeQueue, clock: ManualClock, queue_path: Path
) -> None:
    queue = await make_queue()
    await queue.publish([b"{not json"])
    [delivery] = await queue.receive(1, timeout=0)

    await queue.dead_letter(delivery, "not JSON and not a dataset id")

    assert await queue.is_empty()
    clock.advance(3600)
    assert await queue.receive(1, timeout=0) == []
    assert rows(queue_path) == [("requests", "dead", 1, "not JSON and not a dataset id")]


async def test_a_handle_from_elsewhere_is_refused(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    with pytest.raises(TypeError):
        await queue.ack(Delivery(body=b"x", message_id="m", attempt=1, handle=("row", 1)))


async def test_close_releases_this_consumers_leases_only(make_queue: MakeQueue) -> None:
    first, second = await make_queue(), await make_queue()
    await first.publish([b"a", b"b"])
    [a] = await first.receive(1, timeout=0)
    [b] = await second.receive(1, timeout=0)

    await first.close()
    third = await make_queue()

    [again] = await third.receive(10, timeout=0)
    assert (again.message_id, again.attempt) == (a.message_id, 1)
    assert b.body == b"b"


async def test_messages_survive_a_restart(make_queue: MakeQueue) -> None:
    producer = await make_queue()
    await producer.publish([b"kept"])
    await producer.close()

    consumer = await make_queue()

    assert [d.body for d in await consumer.receive(1, timeout=0)] == [b"kept"]


async def test_named_queues_share_a_file(make_queue: MakeQueue, queue_path: Path) -> None:
    requests, other = await make_queue("requests"), await make_queue("other")
    await requests.publish([b"r"])

    assert await other.receive(10, timeout=0) == []
    assert await other.is_empty()
    assert not await requests.is_empty()
    assert [d.body for d in await requests.receive(10, timeout=0)] == [b"r"]
    assert rows(queue_path) == [("requests", "leased", 1, None)]


async def test_is_empty_counts_ready_and_leased(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    assert await queue.is_empty()
    await queue.publish([b"a"])
    assert not await queue.is_empty()
    [delivery] = await queue.receive(1, timeout=0)
    assert not await queue.is_empty()
    await queue.ack(delivery)
    assert await queue.is_empty()


async def test_receive_waits_for_a_message(make_queue: MakeQueue, clock: ManualClock) -> None:
    consumer, producer = await make_queue(poll_interval=0.5), await make_queue()
    waiting = asyncio.create_task(consumer.receive(10, timeout=30))
    await parked(clock, waiting)
    assert not waiting.done()

    await producer.publish([b"late"])
    clock.advance(0.5)

    deliveries = await asyncio.wait_for(waiting, 5)
    assert [d.body for d in deliveries] == [b"late"]


async def test_receive_gives_up_at_the_timeout(make_queue: MakeQueue, clock: ManualClock) -> None:
    queue = await make_queue(poll_interval=1.0)
    waiting = asyncio.create_task(queue.receive(10, timeout=3))
    polls = 0
    while not waiting.done():
        await parked(clock, waiting)
        if not waiting.done():
            clock.advance(1.0)
            polls += 1

    assert waiting.result() == []
    assert polls == 3
    assert clock.monotonic() == 3.0


async def test_receive_notices_an_expired_lease_while_waiting(
    make_queue: MakeQueue, clock: ManualClock
) -> None:
    crashed = await make_queue(lease_seconds=2)
    await crashed.publish([b"a"])
    [lost] = await crashed.receive(1, timeout=0)
    queue = await make_queue(poll_interval=1.0)
    waiting = asyncio.create_task(queue.receive(10, timeout=10))
    while not waiting.done():
        await parked(clock, waiting)
        if not waiting.done():
            clock.advance(1.0)

    [again] = waiting.result()
    assert (again.message_id, again.attempt) == (lost.message_id, 2)
    assert clock.monotonic() == 2.0


async def test_concurrent_consumers_never_share_a_message(make_queue: MakeQueue) -> None:
    consumers = [await make_queue() for _ in range(3)]
    await consumers[0].publish([b"%d" % n for n in range(300)])
    seen: list[bytes] = []

    async def consume(queue: SqliteQueue) -> None:
        while deliveries := await queue.receive(7, timeout=0):
            seen.extend(d.body for d in deliveries)
            for delivery in deliveries:
                await queue.ack(delivery)

    await asyncio.gather(*(consume(consumers[n % 3]) for n in range(9)))

    assert [body for body, count in Counter(seen).items() if count > 1] == []
    assert len(seen) == 300
    assert await consumers[1].is_empty()


async def test_the_default_file_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    queue = SqliteQueue()
    await queue.open()
    try:
        assert await queue.publish([b"x"]) == 1
    finally:
        await queue.close()

    assert (tmp_path / "var" / "queue.db").is_file()
    assert queue.name == "aep.batch-requests"


async def test_open_queue_chooses_by_scheme(tmp_path: Path) -> None:
    queue = open_queue(f"sqlite:///{tmp_path}/q.db", "named")
    assert isinstance(queue, SqliteQueue)
    assert queue.name == "named"
    with pytest.raises(ConfigError, match="ORCH_QUEUE__URL"):
        open_queue("ftp://example.com/q", "q")
