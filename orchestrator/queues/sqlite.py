"""The embedded queue: a table in a SQLite file, so the service runs with no broker at all.

Each message is a row. `receive` leases rows (status `leased`, `visible_at` = the lease's expiry);
a lease that expires (its consumer died) makes the row deliverable again, which is the at-least-once
redelivery the port promises. Dead letters stay, with their reason, for an operator to look at
(intake records them as `rejected` in the store as well).

Acked rows are deleted, not marked done: the store, not the queue, is the record of what was asked,
so a `done` row would only be something to prune. The delete is lazy: `ack` remembers the row and
the consumer's next transaction (the claim in `receive`, `is_empty`, `close`) deletes it, because a
synchronous commit per message capped intake near 300 messages a second on the test machine. A crash
before that redelivers those messages; intake acks them only after the store has them, so the
redelivery is a duplicate the store's unique request key absorbs, as with any broker. (Another
consumer may also get them once their lease expires while this one sits idle; same outcome.)
Pending acks are applied within `MAX_ACK_DELAY` seconds when more acks follow.

A consumer that dies holds its leases until they expire, except against a restart on the same host:
`open()` hands back at once the leases of consumers whose process no longer exists (the lease owner
names host and pid), so a service restarted after `kill -9` does not wait out a minute of leases.

Several named queues can share one file: every row carries its queue's name. The `enqueue` CLI
writes into the same file while the service runs; the engine settings (WAL, `busy_timeout`,
`BEGIN IMMEDIATE`) make that safe. Waiting for messages is a cheap indexed read every
`poll_interval` seconds; a claim (a write) only happens when that read sees something deliverable.

The schema is created at `open()` (`CREATE TABLE IF NOT EXISTS` semantics). It has no migrations:
the queue holds only messages in flight, so a future change can drain and recreate it.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import uuid4

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    exists,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Update

from orchestrator.clock import Clock, SystemClock
from orchestrator.owners import died_here, process_owner
from orchestrator.queues.base import Delivery
from orchestrator.store.engine import on_driver, open_engine, reader

DEFAULT_URL = "sqlite:///var/queue.db"

metadata = MetaData()

queue_message = Table(
    "queue_message",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("queue", Text, nullable=False),
    Column("message_id", Text, nullable=False, unique=True),
    Column("payload", LargeBinary, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False),  # deliveries so far
    # When the row is next deliverable: publish time while ready, the lease's expiry while leased.
    # Unix seconds from the wall clock, since leases must mean the same in every process.
    Column("visible_at", Float, nullable=False),
    Column("lease_owner", Text),  # which SqliteQueue holds it (released at its close)
    Column("last_error", Text),  # the dead-letter reason
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    CheckConstraint("status IN ('ready', 'leased', 'dead')", name="ck_queue_message_status"),
    # Only live rows; the literal IN lets SQLite match the claim's WHERE to this index.
    Index(
        "ix_queue_message_live",
        "queue",
        "visible_at",
        "id",
        sqlite_where=text("status IN ('ready', 'leased')"),
    ),
)

_LIVE = queue_message.c.status.in_([literal_column("'ready'"), literal_column("'leased'")])


@dataclass(frozen=True)
class _Lease:
    """A delivery's handle: the row and which of its deliveries this is (fences `release`)."""

    row: int
    attempt: int


class SqliteQueue:
    """`Consumer` and `Publisher` on a SQLite table. `url` is `sqlite:///PATH` (relative to the
    working directory)."""

    # Acks wait for the next transaction, at most this many and this many seconds.
    MAX_PENDING_ACKS = 500
    MAX_ACK_DELAY = 1.0

    def __init__(
        self,
        url: str = DEFAULT_URL,
        name: str = "aep.batch-requests",
        *,
        lease_seconds: float = 60.0,
        # A new message waits at most this long to be read; an idle service pays a query per poll.
        poll_interval: float = 0.2,
        clock: Clock | None = None,
    ) -> None:
        if not url.lower().startswith("sqlite"):
            raise ValueError("the embedded queue needs a sqlite:/// URL")
        self.url = url
        self.name = name
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self._clock = clock or SystemClock()
        # One owner per instance, so close() releases exactly this consumer's leases; host and pid
        # let a later consumer on this machine tell that the process holding a lease is gone.
        self._owner = process_owner()
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._acked: list[int] = []  # rows acked but not yet deleted
        self._acked_since = 0.0  # clock.monotonic() of the oldest of them

    async def open(self) -> None:
        if self._engine is not None:
            return
        # FULL: a publish the producer was told succeeded must survive a power cut.
        engine = await open_engine(self.url, synchronous="FULL")
        try:
            # BEGIN IMMEDIATE: two processes opening a new file take turns creating the table.
            async with engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
                await self._recover(connection)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._reader = reader(engine)

    async def close(self) -> None:
        engine, self._engine, self._reader = self._engine, None, None
        if engine is None:
            return
        try:
            # Hand unacked deliveries back now rather than when their leases expire.
            async with engine.begin() as connection:
                await self._apply_acks(connection)
                await connection.execute(
                    self._release(self._now()).where(
                        queue_message.c.queue == self.name,
                        queue_message.c.lease_owner == self._owner,
                        queue_message.c.status == "leased",
                    )
                )
        finally:
            await engine.dispose()

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        if not bodies:
            return 0
        if message_ids is not None and len(message_ids) != len(bodies):
            raise ValueError("one message id per body")
        now = self._now()
        ids = message_ids or [uuid4().hex for _ in bodies]
        rows = [
            {
                "queue": self.name,
                "message_id": message_id,
                "payload": bytes(body),
                "status": "ready",
                "attempts": 0,
                "visible_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for body, message_id in zip(bodies, ids, strict=True)
        ]
        # All or nothing; a message id already in the table is that message published before (an
        # event relayed again after a crash): it stays once.
        statement = sqlite_insert(queue_message).on_conflict_do_nothing(index_elements=["message_id"])
        async with self._writer.begin() as connection:
            await connection.execute(statement, rows)
        return len(rows)

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        deadline = self._clock.monotonic() + max(0.0, timeout)
        deliverable = True  # try a claim straight away: under load there is nearly always work
        while True:
            if deliverable:
                deliveries = await self._claim(max_messages)
                if deliveries:
                    return deliveries
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return []
            await self._clock.sleep(min(self.poll_interval, remaining))
            # A read (deferred transaction) that never waits for the writer nor holds it up.
            first = await self._first_visible()
            deliverable = first is not None and first <= self._now()

    async def ack(self, delivery: Delivery) -> None:
        # Applied lazily, in the next transaction this consumer makes anyway (see the module notes).
        # Not fenced by the lease: the message is recorded, so even if a slow consumer's lease
        # expired and another consumer holds it now, nobody needs it any more.
        row = _lease(delivery).row
        if not self._acked:
            self._acked_since = self._clock.monotonic()
        self._acked.append(row)
        # Bounded in number and in age, so a consumer busy with a long batch still forgets its
        # messages promptly (a crash then redelivers little).
        if (
            len(self._acked) >= self.MAX_PENDING_ACKS
            or self._clock.monotonic() - self._acked_since >= self.MAX_ACK_DELAY
        ):
            async with self._writer.begin() as connection:
                await self._apply_acks(connection)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:  # each only remembered (see `ack`): nothing to save
            await self.ack(delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        lease = _lease(delivery)
        statement = (
            update(queue_message)
            .where(queue_message.c.id == lease.row)
            .values(status="dead", last_error=reason, lease_owner=None, updated_at=self._now())
        )
        async with self._writer.begin() as connection:
            await connection.execute(statement)

    async def release(self, delivery: Delivery) -> None:
        lease = _lease(delivery)
        # Fenced: if this lease expired and the row was delivered again, that delivery stays.
        statement = self._release(self._now()).where(
            queue_message.c.id == lease.row,
            queue_message.c.attempts == lease.attempt,
            queue_message.c.lease_owner == self._owner,
            queue_message.c.status == "leased",
        )
        async with self._writer.begin() as connection:
            await connection.execute(statement)

    async def is_empty(self) -> bool:
        if self._acked:
            async with self._writer.begin() as connection:
                await self._apply_acks(connection)
        statement = select(exists().where(queue_message.c.queue == self.name, _LIVE))
        async with self._read.connect() as connection:
            return not (await connection.execute(statement)).scalar_one()

    async def _claim(self, limit: int) -> list[Delivery]:
        now = self._now()
        lease = functools.partial(_lease_rows, self.name, self._owner, limit, now, now + self.lease_seconds)
        async with self._writer.begin() as connection:
            await self._apply_acks(connection)
            rows = await on_driver(connection, lease)
        return [
            Delivery(body=payload, message_id=message_id, attempt=attempts, handle=_Lease(row, attempts))
            for row, message_id, payload, attempts in sorted(rows)
        ]

    async def _apply_acks(self, connection: AsyncConnection) -> None:
        """Delete the acked rows, in the caller's transaction."""
        # Taken before the await, so a concurrent call on this instance cannot apply them twice.
        acked, self._acked = self._acked, []
        if not acked:
            return
        try:
            await on_driver(connection, functools.partial(_delete_rows, acked))
        except BaseException:
            self._acked[:0] = acked  # not applied: keep them for the next transaction
            raise

    async def _recover(self, connection: AsyncConnection) -> None:
        """Make the leases of consumers that died on this machine deliverable now, not at expiry.

        A restart after a crash (kill -9, OOM) would otherwise wait out the whole lease before the
        messages the dead process held come back. Only processes of this host are judged; a pid
        that is alive (even if reused by another program) keeps its lease until it expires.
        """
        owners = await connection.execute(
            select(queue_message.c.lease_owner)
            .where(queue_message.c.queue == self.name, queue_message.c.status == "leased")
            .distinct()
        )
        dead = [owner for (owner,) in owners if owner is not None and died_here(owner)]
        if dead:
            await connection.execute(
                update(queue_message)
                .where(
                    queue_message.c.queue == self.name,
                    queue_message.c.status == "leased",
                    queue_message.c.lease_owner.in_(dead),
                )
                .values(status="ready", lease_owner=None, visible_at=self._now(), updated_at=self._now())
            )

    async def _first_visible(self) -> float | None:
        statement = select(func.min(queue_message.c.visible_at)).where(
            queue_message.c.queue == self.name, _LIVE
        )
        async with self._read.connect() as connection:
            value = (await connection.execute(statement)).scalar_one_or_none()
        return None if value is None else float(value)

    def _release(self, now: float) -> Update:
        # Deliverable again at once; the delivery was not processed, so it does not count.
        return update(queue_message).values(
            status="ready",
            attempts=queue_message.c.attempts - 1,
            lease_owner=None,
            visible_at=now,
            updated_at=now,
        )

    def _now(self) -> float:
        return self._clock.now().timestamp()

    @property
    def _writer(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the queue is not open")
        return self._engine

    @property
    def _read(self) -> AsyncEngine:
        if self._reader is None:
            raise RuntimeError("the queue is not open")
        return self._reader


# The embedded queue's two statements per receive, sent to the driver directly (`on_driver`). The
# literal `status IN ('ready', 'leased')` lets SQLite match the claim to ix_queue_message_live.
_LEASE_ROWS = (
    "UPDATE queue_message SET status = 'leased', attempts = attempts + 1, lease_owner = :owner, "
    "visible_at = :until, updated_at = :now WHERE id IN ("
    "SELECT id FROM queue_message WHERE queue = :queue AND status IN ('ready', 'leased') "
    "AND visible_at <= :now ORDER BY visible_at, id LIMIT :limit) "
    "RETURNING id, message_id, payload, attempts"
)
_DELETE_ROWS = "DELETE FROM queue_message WHERE id IN (SELECT value FROM json_each(?))"


def _lease_rows(
    queue: str, owner: str, limit: int, now: float, until: float, db: sqlite3.Connection
) -> list[tuple[int, str, bytes, int]]:
    """Lease up to `limit` deliverable rows (ready, or leased with the lease run out), in the order
    they became visible; one statement in a BEGIN IMMEDIATE transaction, so two consumers never
    lease the same row."""
    parameters = {"owner": owner, "until": until, "now": now, "queue": queue, "limit": limit}
    return db.execute(_LEASE_ROWS, parameters).fetchall()


def _delete_rows(rows: list[int], db: sqlite3.Connection) -> None:
    db.execute(_DELETE_ROWS, (json.dumps(rows),))


def _lease(delivery: Delivery) -> _Lease:
    if not isinstance(delivery.handle, _Lease):
        raise TypeError("not a delivery of the embedded queue")
    return delivery.handle
