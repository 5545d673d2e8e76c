"""Redis Streams: requests are entries of the stream NAME, read through the consumer group
`orchestrator`; one class is both the `Consumer` (intake) and the `Publisher` (`enqueue`, events).

Entries. The JSON message is in field `message`. A message's identity is the entry's field `id`
when the producer set one (`enqueue` always does), else the stream entry id (`1718000000000-0`);
both stay the same across redeliveries. `attempt` is the entry's delivery count in the group.

Reading. The group is created with MKSTREAM from id 0 at the first read (not at `open`, so that a
publisher never creates a group on a stream others consume), which means entries added before the
service first started are read too. Each instance reads under its own consumer name,
`host/pid/random` (`orchestrator.owners`), and `receive` takes, in this order:
- entries pending in the group for longer than the lease (`lease_seconds`, 60 s; XAUTOCLAIM): those
  of a consumer that died or hung, and those given back by `release` and `close`, which mark them
  idle for a day so that the next claim by any consumer takes them at once;
- new entries (XREADGROUP `>`, blocking up to the timeout, at most `MAX_BLOCK` at a time).
A process restarted after `kill -9` does not wait out the lease: at its first read it takes over
the pending entries of consumers whose process no longer exists on this host, then deletes those
consumers (deleting a consumer first would drop its pending entries for good).

Settling. `ack` is XACK; the stream keeps the entry (trimming it, `XADD ... MAXLEN` or `XTRIM`, is
the operator's call: the store, not the stream, is the record). `dead_letter` adds the entry to
`NAME.dead` with fields `message` and `reason` and acks it, in one MULTI/EXEC. An entry delivered
more than `max_deliveries` times (10) without being acked (a message that crashes every consumer
that reads it) is dead-lettered the same way by the adapter, with the reason
"delivered N times without being recorded" (intake never saw it, so it is not in the store).
`release` gives a delivery back without counting it as an attempt.

Connection loss. The client retries a command twice on a fresh connection; past that, `receive`
backs off (0.1 s doubling to 5 s) and logs `queue.disconnected` once and `queue.reconnected` when
Redis answers again, and an ack or dead letter that could not be sent is kept and sent with the
next successful read (until then the entry stays pending; a crash meanwhile redelivers it and the
store absorbs the duplicate). A group missing after a restart is created again. Whether entries
survive a Redis restart is the Redis operator's setting (AOF, `appendonly yes`): without
persistence, entries not yet read are lost with the restart.

Standalone Redis only: NAME and NAME.dead are written in one transaction, which Redis Cluster
refuses for keys in different slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamIdT

from orchestrator import logs
from orchestrator.clock import Clock, SystemClock
from orchestrator.owners import died_here, process_owner
from orchestrator.queues.base import Delivery

log = logs.get("queue")

GROUP = "orchestrator"
MESSAGE = b"message"
ID = b"id"
REASON = b"reason"

# The connection is gone (a restart, a network cut): worth retrying, unlike a refused command.
_DOWN = (RedisConnectionError, RedisTimeoutError)

T = TypeVar("T")


class _Unsent(Generic[T]):
    """Settlements (acks, dead letters) a dropped connection kept from being sent."""

    def __init__(self) -> None:
        self._items: list[T] = []

    def add(self, item: T) -> None:
        self._items.append(item)

    async def send(self, send: Callable[[list[T]], Awaitable[None]]) -> None:
        # Taken before the await, so that concurrent callers (intake, the idle check) never send
        # the same ones twice; put back if the send fails.
        items, self._items = self._items, []
        if not items:
            return
        try:
            await send(items)
        except BaseException:
            self._items[:0] = items
            raise


@dataclass(frozen=True)
class _Entry:
    """A delivery's handle: the stream entry, and whether it lacked the `message` field (said in
    its dead letter's reason, since its body is then empty)."""

    entry_id: bytes
    no_message_field: bool = False


class RedisStreamQueue:
    """`Consumer` and `Publisher` on a Redis stream. `url` is `redis://[:password@]host[:port][/db]`
    or `rediss://` (TLS)."""

    MAX_BLOCK = 5.0  # seconds one XREADGROUP blocks; below the socket timeout, which would cut it
    SOCKET_TIMEOUT = MAX_BLOCK + 5.0
    # How long `release` and `close` make an entry look idle: longer than any consumer's lease (a
    # setting is at most a day), so the next XAUTOCLAIM by anyone takes it.
    GIVEN_BACK_IDLE_MS = 86_400_000
    PAGE = 500  # entries per XPENDING / XCLAIM call
    FIRST_BACKOFF = 0.1
    MAX_BACKOFF = 5.0

    def __init__(
        self,
        url: str,
        name: str = "aep.batch-requests",
        *,
        lease_seconds: float = 60.0,
        max_deliveries: int = 10,
        clock: Clock | None = None,
    ) -> None:
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            raise ValueError("the Redis adapter needs a redis:// or rediss:// URL")
        self.url = url
        self.name = name
        self.dead_name = f"{name}.dead"
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries
        self.consumer_name = process_owner()
        self._clock = clock or SystemClock()
        self._client: redis.asyncio.Redis | None = None
        self._group_ready = False
        self._group_lock = asyncio.Lock()  # one creation and take-over at a time (intake, idle check)
        self._consumed = False  # this instance read as a consumer: `close` gives its entries back
        self._cursor: bytes | str = "0-0"  # where the next XAUTOCLAIM scan of the PEL starts
        # Settlements the connection failed to send, sent with the next successful read.
        self._unsent_acks = _Unsent[bytes]()
        self._unsent_dead = _Unsent[tuple[bytes, bytes, str]]()
        self._down_since: float | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    async def open(self) -> None:
        if self._client is not None:
            return
        client = redis.asyncio.Redis.from_url(
            self.url,
            socket_timeout=self.SOCKET_TIMEOUT,
            socket_connect_timeout=5.0,
            protocol=2,  # the replies parsed here are RESP2's
            # A connection error (a pooled connection that a restart cut) is retried on a fresh
            # connection; a timeout is not: the server may be hung, and the caller backs off.
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2, (RedisConnectionError,)),
        )
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def close(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            if self._consumed:
                await self._send_unsent()
                await self._give_back_own()
        except (*_DOWN, ResponseError) as exc:
            log.warning(
                "queue.close_incomplete",
                queue=self.name,
                error=str(exc),
                hint="its pending entries come back once their lease has passed",
            )
        finally:
            self._client = None
            await client.aclose()

    # -- Publisher -------------------------------------------------------------------------

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        if not bodies:
            return 0
        if message_ids is not None and len(message_ids) != len(bodies):
            raise ValueError("one message id per body")
        # Every entry gets an `id`: the client replays a transaction whose reply a dropped
        # connection lost, and the replayed entries must then be the same messages, not new ones.
        ids = message_ids or [uuid4().hex for _ in bodies]
        async with self._redis.pipeline(transaction=True) as pipe:
            for body, message_id in zip(bodies, ids, strict=True):
                pipe.xadd(self.name, {MESSAGE: bytes(body), ID: message_id.encode()})
            added = await pipe.execute()
        return len(added)

    # -- Consumer --------------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        deadline = self._clock.monotonic() + max(0.0, timeout)
        while True:
            remaining = deadline - self._clock.monotonic()
            if self._clock.monotonic() >= self._retry_at:
                block = min(max(0.0, remaining), self.MAX_BLOCK)
                try:
                    deliveries = await self._receive_once(max_messages, block)
                except _DOWN as exc:
                    self._went_down(exc)
                else:
                    self._came_back()
                    # Done when something came, or when that read waited out the whole timeout.
                    if deliveries or block >= remaining:
                        return deliveries
                    continue
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return []
            await self._clock.sleep(min(remaining, self._retry_at - self._clock.monotonic()))

    async def ack(self, delivery: Delivery) -> None:
        await self.ack_many([delivery])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        entry_ids = [_entry(delivery).entry_id for delivery in deliveries]
        if not entry_ids:
            return
        try:
            await self._ack(entry_ids)  # one XACK for them all
        except _DOWN as exc:
            # Intake must go on: the requests are recorded, so the acks can wait for the connection.
            for entry_id in entry_ids:
                self._unsent_acks.add(entry_id)
            log.warning(
                "queue.ack_deferred",
                queue=self.name,
                entry=entry_ids[0].decode(),
                entries=len(entry_ids),
                error=str(exc),
            )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        entry = _entry(delivery)
        if entry.no_message_field:
            reason += " (the entry has no field `message`)"
        item = (entry.entry_id, delivery.body, reason)
        try:
            await self._dead_letter([item])
        except _DOWN as exc:
            self._unsent_dead.add(item)
            log.warning(
                "queue.dead_letter_deferred", queue=self.name, entry=entry.entry_id.decode(), error=str(exc)
            )

    async def release(self, delivery: Delivery) -> None:
        entry_id = _entry(delivery).entry_id
        # This delivery did not count: the claim that takes it again adds the one taken off here.
        retries = None if delivery.attempt is None else max(0, delivery.attempt - 1)
        try:
            await self._give_back([entry_id], retries)
        except _DOWN as exc:
            log.warning(
                "queue.release_failed",
                queue=self.name,
                entry=entry_id.decode(),
                error=str(exc),
                hint="it comes back once its lease has passed",
            )
        except ResponseError as exc:
            if not _group_missing(exc):
                raise

    async def is_empty(self) -> bool:
        try:
            await self._send_unsent()
            empty = await self._with_group(self._nothing_waiting)
        except _DOWN as exc:
            self._went_down(exc)
            return False  # unknown: `run --until-idle` asks again
        self._came_back()
        return empty

    # -- reading ---------------------------------------------------------------------------

    async def _receive_once(self, max_messages: int, block: float) -> list[Delivery]:
        await self._send_unsent()
        claimed = await self._with_group(lambda: self._claim_idle(max_messages))
        if claimed:
            return claimed
        return await self._with_group(lambda: self._read_new(max_messages, block))

    async def _read_new(self, max_messages: int, block: float) -> list[Delivery]:
        block_ms = int(block * 1000)
        response = await self._redis.xreadgroup(
            GROUP,
            self.consumer_name,
            {self.name: ">"},
            count=max_messages,
            block=block_ms if block_ms > 0 else None,  # BLOCK 0 would wait forever
        )
        # A new entry's delivery count is 1: it was never delivered before.
        return [self._delivery(entry_id, fields, 1) for entry_id, fields in _entries(response)]

    async def _claim_idle(self, max_messages: int) -> list[Delivery]:
        """Entries pending past the lease (a dead or hung consumer's, or given back), taken over."""
        cursor, claimed, _deleted = await self._redis.xautoclaim(
            self.name,
            GROUP,
            self.consumer_name,
            min_idle_time=int(self.lease_seconds * 1000),
            start_id=self._cursor,
            count=max_messages,
        )
        # XAUTOCLAIM scans a bounded part of the PEL per call; the next call goes on from here.
        self._cursor = cursor
        live = [(entry_id, fields) for entry_id, fields in claimed if fields is not None]
        if not live:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in live])
        deliveries: list[Delivery] = []
        poison: list[tuple[bytes, bytes, str]] = []
        for entry_id, fields in live:
            count = counts.get(entry_id)
            if count is not None and count > self.max_deliveries:
                reason = f"delivered {count - 1} times without being recorded"
                poison.append((entry_id, fields.get(MESSAGE, b""), reason))
                log.warning("queue.dead_lettered", queue=self.name, entry=entry_id.decode(), reason=reason)
            else:
                deliveries.append(self._delivery(entry_id, fields, count))
        if poison:
            await self._dead_letter(poison)
        if deliveries:
            log.info("queue.claimed", queue=self.name, entries=len(deliveries))
        return deliveries

    async def _delivery_counts(self, entry_ids: list[bytes]) -> dict[bytes, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.name, GROUP, min=entry_id, max=entry_id, count=1)
            pages = await pipe.execute()
        return {row["message_id"]: int(row["times_delivered"]) for page in pages for row in page}

    def _delivery(self, entry_id: bytes, fields: dict[bytes, bytes], attempt: int | None) -> Delivery:
        self._consumed = True
        body = fields.get(MESSAGE)
        producer_id = fields.get(ID)
        message_id = producer_id.decode("utf-8", "replace") if producer_id else entry_id.decode()
        return Delivery(
            body=body or b"",
            message_id=message_id,
            attempt=attempt,
            handle=_Entry(entry_id, no_message_field=body is None),
        )

    async def _nothing_waiting(self) -> bool:
        groups = await self._redis.xinfo_groups(self.name)
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:  # the stream is there (a producer wrote after a restart), the group not
            raise ResponseError("NOGROUP the consumer group is missing")
        if int(group["pending"]):
            return False
        # Anything after the group's last delivered entry is waiting (precise where XINFO's `lag`
        # is not: it is unknown after deletions inside the stream).
        after = await self._redis.xrange(self.name, min=b"(" + _bytes(group["last-delivered-id"]), count=1)
        return not after

    # -- settling and giving back -------------------------------------------------------------

    async def _ack(self, entry_ids: list[bytes]) -> None:
        try:
            await self._redis.xack(self.name, GROUP, *entry_ids)
        except ResponseError as exc:
            if not _group_missing(exc):  # gone with a restart: nothing left to ack
                raise

    async def _dead_letter(self, items: list[tuple[bytes, bytes, str]]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for _, body, reason in items:
                pipe.xadd(self.dead_name, {MESSAGE: body, REASON: reason.encode()})
            pipe.xack(self.name, GROUP, *(entry_id for entry_id, _, _ in items))
            try:
                await pipe.execute()
            except ResponseError as exc:
                if not _group_missing(exc):  # the dead letters are written; the entries are gone
                    raise

    async def _send_unsent(self) -> None:
        await self._unsent_dead.send(self._dead_letter)
        await self._unsent_acks.send(self._ack)

    async def _give_back(self, entry_ids: list[bytes], retries: int | None = None) -> None:
        """Make entries this consumer holds look idle past any lease, so that the next claim (by
        any consumer) takes them. JUSTID leaves the delivery count alone unless `retries` sets it."""
        for start in range(0, len(entry_ids), self.PAGE):
            page: list[StreamIdT] = list(entry_ids[start : start + self.PAGE])
            await self._redis.xclaim(
                self.name,
                GROUP,
                self.consumer_name,
                0,
                page,
                idle=self.GIVEN_BACK_IDLE_MS,
                retrycount=retries,
                justid=True,
            )

    async def _give_back_own(self) -> None:
        """At close: what this consumer still holds goes to whoever reads next; a consumer that
        holds nothing is deleted (with entries pending it must stay, or they would be dropped)."""
        own = await self._pending_of(self.consumer_name)
        if own:
            await self._give_back(own)
            log.info("queue.given_back", queue=self.name, entries=len(own))
        else:
            await self._redis.xgroup_delconsumer(self.name, GROUP, self.consumer_name)

    async def _take_over_dead(self) -> None:
        """Take over the pending entries of consumers whose process died on this host, then delete
        those consumers. Two processes starting at once may both take an entry; the second claim
        then redelivers it, a duplicate the store absorbs."""
        consumers = await self._redis.xinfo_consumers(self.name, GROUP)
        dead = [
            name
            for name in (_bytes(consumer["name"]) for consumer in consumers)
            if died_here(name.decode("utf-8", "replace"))
        ]
        taken = 0
        for name in dead:
            entries = await self._pending_of(name)
            if entries:
                await self._give_back(entries)
            taken += len(entries)
            await self._redis.xgroup_delconsumer(self.name, GROUP, name)
        if dead:
            log.info("queue.dead_consumers_taken_over", queue=self.name, consumers=len(dead), entries=taken)

    async def _pending_of(self, consumer: bytes | str) -> list[bytes]:
        found: list[bytes] = []
        start: bytes | str = "-"
        while True:
            rows = await self._redis.xpending_range(
                self.name, GROUP, min=start, max="+", count=self.PAGE, consumername=consumer
            )
            found += [_bytes(row["message_id"]) for row in rows]
            if len(rows) < self.PAGE:
                return found
            start = b"(" + found[-1]

    # -- the group and the connection ----------------------------------------------------------

    async def _with_group(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` with the group in place, created again if a restart lost it."""
        await self._ensure_group()
        try:
            return await call()
        except ResponseError as exc:
            if not _group_missing(exc):
                raise
        self._group_ready = False
        await self._ensure_group()
        return await call()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        async with self._group_lock:
            if self._group_ready:
                return
            try:
                await self._redis.xgroup_create(self.name, GROUP, id="0", mkstream=True)
                # The first start on this stream, or Redis lost it (a restart without persistence).
                log.info("queue.group_created", queue=self.name, group=GROUP)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            await self._take_over_dead()
            self._group_ready = True

    def _went_down(self, exc: Exception) -> None:
        now = self._clock.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._backoff = self.FIRST_BACKOFF
            log.warning("queue.disconnected", queue=self.name, broker=masked(self.url), error=str(exc))
        else:
            self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)
        self._retry_at = now + self._backoff
        # The server may come back empty (no persistence): check the group when it answers.
        self._group_ready = False

    def _came_back(self) -> None:
        if self._down_since is None:
            return
        down = self._clock.monotonic() - self._down_since
        self._down_since = None
        self._retry_at = 0.0
        log.info("queue.reconnected", queue=self.name, broker=masked(self.url), down_seconds=round(down, 1))

    @property
    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise RuntimeError("the queue is not open")
        return self._client


def masked(url: str) -> str:
    """`url` with its password replaced by `***`, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREADGROUP reply (RESP2: `[[stream, [(id, fields), ...]]]`), deleted ones
    (no fields) left out."""
    return [
        (entry_id, fields)
        for _stream, entries in response or []
        for entry_id, fields in entries
        if fields is not None
    ]


def _group_missing(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith("NOGROUP") or "no such key" in text.lower()


def _bytes(value: bytes | str | int) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _entry(delivery: Delivery) -> _Entry:
    if not isinstance(delivery.handle, _Entry):
        raise TypeError("not a delivery of the Redis adapter")
    return delivery.handle
