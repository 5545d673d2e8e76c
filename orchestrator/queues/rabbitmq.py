"""RabbitMQ (aio-pika): requests from the durable quorum queue NAME, dead letters to `NAME.dead`.

The service declares NAME (durable, `x-queue-type: quorum`) whenever it connects, as consumer and as
publisher alike, so messages are kept even before any consumer exists; a consumer also declares
`NAME.dead` (durable). Producers publish to the default exchange with routing key NAME.

Consuming. The first `receive` starts a consumer; the broker pushes up to `prefetch` unacked messages,
which wait in a buffer until intake asks for them. The prefetch is twice what intake asks for (intake
asks for at most its batch size, and never more than the room left under ORCH_LIMITS__MAX_BACKLOG):
the next batch is on its way while one is being recorded, and what a process holds unrecorded stays
bounded by what it may take on; the rest of a deep backlog stays in the broker, where other replicas
can take it. Per-consumer QoS applies when a consumer starts, so a receive asking for more than half
the prefetch starts a new consumer with the larger one and cancels the old (only ever upwards).

Intake acks a message only after the store has committed its request. `release` is a nack with
requeue. A dead letter is a copy of the message (body, id, content type, the producer's own headers)
published to `NAME.dead` with its reason in the header `reason`, confirmed by the broker, and only then
is the original acked: a crash in between leaves both, and the redelivery is dead-lettered again.

Identity: the AMQP `message_id` when the producer set one, else `body_identity(body)` (a SHA-256 of
the body, so two identical bodies without `message_id` or `requestId` are one request). aio-pika and
aiormq set a random `message_id` on every message whose producer gave none; `publish` here sets a new
UUID per message unless given ids, so every message `orchestrator enqueue` sends is its own request, as
on the embedded queue. `attempt`: quorum queues count returns in `x-delivery-count` (absent on a first
delivery), so it is that count + 1; 1 for a first delivery; None when neither tells (a redelivery from
a queue that does not count).

Broker restarts. aio-pika's robust connection is known to lose consumers across broker restarts
(mosquito/aio-pika#231, #563, #334), so this adapter does not use it: it supervises one plain
connection itself. A connection with its channel, queue and consumers is a `_Session`; once it is lost
(the connection or channel closed, or the broker cancelled the consumer because the queue was deleted),
the next `receive`, `is_empty` or `publish` opens a new one (connect, declare, consume again), with a
backoff of 0.5 s doubling to 5 s between failed attempts (`queue.connection_lost`,
`queue.connect_failed`, `queue.reconnected`). The broker requeues every unacked message of a closed
channel, so a delivery of a lost session is the broker's again: acking, releasing or dead-lettering it
is a no-op with a warning (`queue.ack_failed`, `queue.release_failed`, `queue.dead_letter_failed`);
it comes back, and the store absorbs the duplicate (delivery tags are per channel: an ack on the new
channel would ack another message or close the channel).

`is_empty`: no message ready in NAME (the declare's message count, which counts ready messages only)
and none delivered to this process and not yet settled. Messages another consumer holds unacked are
that consumer's. While the broker cannot be reached it is not empty: nobody can tell.

`close` cancels the consumer and closes the channel: the broker requeues what was prefetched and not
handed out and what intake received and did not settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any
from uuid import uuid4

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, DeliveryMode
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError
from aiormq.tools import censor_url
from yarl import URL

from orchestrator import logs
from orchestrator.clock import Clock, SystemClock, sleep_until_set
from orchestrator.owners import process_owner
from orchestrator.queues.base import Delivery, body_identity

log = logs.get("queue")

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
MAX_PREFETCH = 65535  # basic.qos carries the count in 16 bits

# What a lost connection or channel raises: aiormq's errors, the socket's, a closed channel's (a
# RuntimeError) and our own timeouts on broker round trips.
_FAILURES = (AMQPError, ConnectionError, ChannelInvalidStateError, TimeoutError)


class _Session:
    """One connection, its channel (publisher confirms on), the queue and this process's consumer of
    it, and the messages delivered on that channel. Replaced whole when any of it is lost.

    Deliveries are consumed and settled on aiormq's channel under aio-pika's (`underlay`): aio-pika
    wraps each delivery in a message object of its own and a second task, which cost a twentieth
    of the brokered path's CPU for nothing this adapter uses. Publishing stays aio-pika's."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        underlay: aiormq.Channel,
        queue: AbstractQueue,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.underlay = underlay
        self.queue = queue
        self.prefetch = 0  # 0: not consuming
        self.consumer_tags: list[str] = []
        self.buffer: deque[DeliveredMessage] = deque()  # delivered, not yet handed out
        self.held: set[int] = set()  # the delivery tags of those delivered, not yet settled
        self.arrived = asyncio.Event()
        self.lost = asyncio.Event()
        self.why = ""

    @property
    def alive(self) -> bool:
        return not (self.lost.is_set() or self.connection.is_closed or self.channel.is_closed)

    def lose(self, why: object) -> None:
        if not self.lost.is_set():
            self.why = str(why) or type(why).__name__
            self.lost.set()

    def on_closed(self, _sender: object, exc: BaseException | None = None, *_: object) -> None:
        self.lose(exc if exc is not None else "closed")

    async def on_message(self, message: DeliveredMessage) -> None:
        self.held.add(_tag(message))
        self.buffer.append(message)
        self.arrived.set()

    def take(self, count: int) -> list[DeliveredMessage]:
        taken = [self.buffer.popleft() for _ in range(min(count, len(self.buffer)))]
        if not self.buffer:
            self.arrived.clear()
        return taken

    async def consume(self, prefetch: int, dead_queue: str) -> None:
        if not self.consumer_tags:
            await self.channel.declare_queue(dead_queue, durable=True)
        await self.channel.set_qos(prefetch_count=prefetch)
        consuming = await self.underlay.basic_consume(self.queue.name, self.on_message)
        assert consuming.consumer_tag is not None  # the broker's consume-ok always names it
        old, self.consumer_tags = self.consumer_tags, [consuming.consumer_tag]
        for stale in old:
            # Deliveries to it up to the cancel-ok still land in the buffer, on this same channel.
            await self.underlay.basic_cancel(stale)
        self.prefetch = prefetch

    async def consumer_cancelled(self) -> bool:
        """Whether the broker cancelled our consumer (the queue was deleted) on a channel still open:
        no close tells of it, and nothing would be delivered again (mosquito/aio-pika#334)."""
        return any(tag not in self.underlay.consumers for tag in self.consumer_tags)


class _Receipt:
    """A delivery's handle: the message, the session (channel) it came on, its delivery tag there,
    and whether it was settled (acked, released or dead-lettered)."""

    def __init__(self, session: _Session, message: DeliveredMessage) -> None:
        self.session = session
        self.message = message
        self.tag = _tag(message)
        self.settled = False


class RabbitQueue:
    """`Consumer` and `Publisher` on a RabbitMQ queue. `url` is `amqp://user:password@host:port/vhost`
    (or `amqps://`); aio-pika's URL options (`heartbeat`, `connection_timeout`, …) apply."""

    RECONNECT_MIN = 0.5
    RECONNECT_MAX = 5.0
    # Broker round trips that must not hang the caller (a half-open socket drains forever).
    ROUND_TRIP_TIMEOUT = 30.0
    CONNECT_TIMEOUT = 10.0
    PUBLISH_WINDOW = 500  # publishes awaiting their confirms at once

    def __init__(self, url: str, name: str = "aep.batch-requests", *, clock: Clock | None = None) -> None:
        if not url.lower().startswith("amqp"):
            raise ValueError("the RabbitMQ adapter needs an amqp:// or amqps:// URL")
        self.url = url
        self.name = name
        self.dead_name = f"{name}.dead"
        self._safe_url = str(censor_url(URL(url)))
        self._clock = clock or SystemClock()
        self._connection_name = f"orchestrator {name} {process_owner()}"
        self._session: _Session | None = None
        self._opened = False
        self._prefetch = 0  # what sessions consume with; 0 until the first receive
        self._failures = 0  # connection attempts failed in a row
        self._retry_at = 0.0  # clock.monotonic() before which no new attempt is made
        self._lock = asyncio.Lock()  # one (re)connection at a time (intake and the idle watcher)
        # aiormq logs a broker restart as errors with tracebacks, once per reconnection attempt;
        # queue.connection_lost and queue.connect_failed say the same once, as warnings.
        logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)

    async def open(self) -> None:
        if self._opened:
            return
        async with self._lock:
            self._session = await self._connect()
        self._opened = True
        log.info("queue.connected", queue=self.name, url=self._safe_url)

    async def close(self) -> None:
        self._opened = False
        session, self._session = self._session, None
        if session is None:
            return
        returned = len(session.held)
        if session.alive:
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(self.ROUND_TRIP_TIMEOUT):
                    for tag in session.consumer_tags:
                        await session.underlay.basic_cancel(tag)
                    # Closing the channel requeues every unacked message delivered on it.
                    await session.channel.close()
        await self._disconnect(session)
        if session.prefetch:
            log.info("queue.closed", queue=self.name, returned=returned)

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (what a readiness probe asks). A lost one is opened
        again by the next `receive`, `is_empty` or `publish`."""
        return self._session is not None and self._session.alive

    # -- Consumer -------------------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        self._prefetch = max(self._prefetch, min(MAX_PREFETCH, 2 * max_messages))
        deadline = self._clock.monotonic() + max(0.0, timeout)
        while True:
            session = await self._live()
            if session is not None:
                taken = session.take(max_messages)
                if taken:
                    return [_delivery(session, message) for message in taken]
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return []
            if session is None:
                await self._clock.sleep(min(remaining, max(0.0, self._retry_at - self._clock.monotonic())))
            else:
                await sleep_until_set(self._clock, remaining, session.arrived, session.lost)

    async def ack(self, delivery: Delivery) -> None:
        await self._ack(_receipt(delivery))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """One `basic.ack` with `multiple` for the lot when that settles exactly them: every
        delivery the channel holds unsettled up to the last of them is among them (a frame per
        message was a twentieth of the brokered path's CPU). Otherwise, one ack each."""
        receipts = [_receipt(delivery) for delivery in deliveries]
        if not receipts:
            return
        session = receipts[0].session
        tags = {receipt.tag for receipt in receipts}
        last = max(receipts, key=lambda receipt: receipt.tag)
        alone = (
            len(receipts) == 1
            or len(tags) < len(receipts)  # one delivery twice: settled twice, which `_settle` refuses
            or any(receipt.session is not session or receipt.settled for receipt in receipts)
            # Delivered before the last of them and not among them: another batch's, still held.
            or any(tag not in tags and tag <= last.tag for tag in session.held)
        )
        if alone:
            for receipt in receipts:
                await self._ack(receipt)
            return
        for receipt in receipts:
            if receipt is not last:
                receipt.settled = True
                session.held.discard(receipt.tag)
        ack = partial(session.underlay.basic_ack, last.tag, multiple=True)
        await self._settle(last, ack, "queue.ack_failed")

    async def release(self, delivery: Delivery) -> None:
        receipt = _receipt(delivery)
        nack = partial(receipt.session.underlay.basic_nack, receipt.tag, requeue=True)
        await self._settle(receipt, nack, "queue.release_failed")

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        receipt = _receipt(delivery)
        session, message = receipt.session, receipt.message
        properties = message.header.properties
        if receipt.settled:
            raise RuntimeError("a delivery settled twice")
        copy = aio_pika.Message(
            message.body,
            headers={**_own_headers(properties.headers or {}), "reason": reason},
            content_type=properties.content_type,
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        if session.alive:
            try:
                await session.channel.default_exchange.publish(
                    copy, routing_key=self.dead_name, timeout=self.ROUND_TRIP_TIMEOUT
                )
            except DeliveryError as exc:
                # The broker refused it (nack) or could not route it (NAME.dead deleted): keeping the
                # message unsettled or requeueing it would hide that; stop and say so.
                raise RuntimeError(f"RabbitMQ refused the dead letter to {self.dead_name}: {exc}") from exc
            except _FAILURES as exc:
                session.lose(exc)
        if not session.alive:
            receipt.settled = True
            session.held.discard(receipt.tag)
            log.warning(
                "queue.dead_letter_failed",
                queue=self.name,
                why=session.why,
                hint="its channel is gone: the broker delivers it again and it is dead-lettered then",
            )
            return
        await self._ack(receipt)

    async def is_empty(self) -> bool:
        session = await self._live()
        if session is None or session.held:
            return False
        try:
            # The declare it was made with, not a passive one: a passive declare of a deleted queue
            # closes the channel, and with it the consumer. Its count is of ready messages only.
            declared = await session.queue.declare(timeout=self.ROUND_TRIP_TIMEOUT)
        except _FAILURES as exc:
            session.lose(exc)
            return False
        return declared.message_count == 0

    # -- Publisher ------------------------------------------------------------------------------

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        if not bodies:
            return 0
        if message_ids is not None and len(message_ids) != len(bodies):
            raise ValueError("one message id per body")
        session = await self._live()
        if session is None:
            raise ConnectionError(f"RabbitMQ at {self._safe_url} cannot be reached")
        ids = list(message_ids) if message_ids is not None else [uuid4().hex for _ in bodies]
        exchange = session.channel.default_exchange
        confirmed = 0
        failures: list[BaseException] = []
        for start in range(0, len(bodies), self.PUBLISH_WINDOW):
            window = zip(bodies[start : start + self.PUBLISH_WINDOW], ids[start:], strict=False)
            results = await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            bytes(body),
                            message_id=message_id,
                            content_type="application/json",
                            delivery_mode=DeliveryMode.PERSISTENT,
                        ),
                        routing_key=self.name,
                        timeout=self.ROUND_TRIP_TIMEOUT,
                    )
                    for body, message_id in window
                ),
                return_exceptions=True,
            )
            confirmed += sum(isinstance(result, aiormq.spec.Basic.Ack) for result in results)
            failures += [result for result in results if isinstance(result, BaseException)]
            if failures and not session.alive:
                break  # the rest would fail the same way
        if confirmed < len(bodies):
            log.warning(
                "queue.publish_unconfirmed",
                queue=self.name,
                confirmed=confirmed,
                unconfirmed=len(bodies) - confirmed,
                error=str(failures[0]) if failures else None,
            )
        return confirmed

    # -- connection supervision -----------------------------------------------------------------

    async def _live(self) -> _Session | None:
        """The session to use: the current one, or a new one if it was lost (connected, declared,
        consuming if this instance consumes); None while the broker cannot be reached (logged; the
        next attempt waits for the backoff)."""
        if not self._opened:
            raise RuntimeError("the queue is not open")
        async with self._lock:
            session = self._session
            if session is not None and session.alive and await session.consumer_cancelled():
                session.lose("the broker cancelled the consumer (was the queue deleted?)")
            if session is not None and not session.alive:
                self._session = None
                log.warning(
                    "queue.connection_lost",
                    queue=self.name,
                    why=session.why,
                    requeued=len(session.held),  # the broker delivers them again
                )
                await self._disconnect(session)
                session = None
            try:
                if session is None:
                    if self._clock.monotonic() < self._retry_at:
                        return None
                    session = self._session = await self._connect()
                    if self._prefetch:
                        await session.consume(self._prefetch, self.dead_name)
                    log.info("queue.reconnected", queue=self.name, url=self._safe_url)
                elif session.prefetch < self._prefetch:
                    await session.consume(self._prefetch, self.dead_name)
            except _FAILURES as exc:
                if session is not None:
                    session.lose(exc)
                self._back_off(exc)
                return None
            self._failures = 0
            return session

    def _back_off(self, exc: BaseException) -> None:
        self._failures += 1
        delay = min(self.RECONNECT_MAX, self.RECONNECT_MIN * 2 ** (self._failures - 1))
        self._retry_at = self._clock.monotonic() + delay
        log.warning(
            "queue.connect_failed",
            queue=self.name,
            url=self._safe_url,
            error=str(exc) or type(exc).__name__,
            attempt=self._failures,
            retry_in=delay,
        )

    async def _connect(self) -> _Session:
        connection = await aio_pika.connect(
            self.url,
            timeout=self.CONNECT_TIMEOUT,
            client_properties={"connection_name": self._connection_name},
        )
        try:
            # on_return_raises: a message the broker cannot route is not confirmed, it fails.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            queue = await channel.declare_queue(self.name, durable=True, arguments=QUORUM)
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):  # aio-pika's own channel is always aiormq's
                raise TypeError(f"aio-pika gave an unexpected channel: {type(underlay).__name__}")
        except BaseException:
            with contextlib.suppress(*_FAILURES):
                await connection.close()
            raise
        session = _Session(connection, channel, underlay, queue)
        connection.close_callbacks.add(session.on_closed)
        channel.close_callbacks.add(session.on_closed)
        return session

    async def _disconnect(self, session: _Session) -> None:
        session.lose("closed by the service")
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self.ROUND_TRIP_TIMEOUT):
                await session.connection.close()

    async def _ack(self, receipt: _Receipt) -> None:
        ack = partial(receipt.session.underlay.basic_ack, receipt.tag)
        await self._settle(receipt, ack, "queue.ack_failed")

    async def _settle(
        self, receipt: _Receipt, settle: Callable[[], Awaitable[None]], failed_event: str
    ) -> None:
        session = receipt.session
        if receipt.settled:
            # A bug, not the broker: the broker would close the channel over the unknown tag.
            raise RuntimeError("a delivery settled twice")
        receipt.settled = True
        session.held.discard(receipt.tag)
        if session.alive:
            try:
                async with asyncio.timeout(self.ROUND_TRIP_TIMEOUT):
                    await settle()
                return
            except _FAILURES as exc:
                session.lose(exc)
        log.warning(
            failed_event,
            queue=self.name,
            why=session.why,
            hint="its channel is gone: the broker delivers it again, and the store absorbs the repeat",
        )


def _delivery(session: _Session, message: DeliveredMessage) -> Delivery:
    properties = message.header.properties
    redelivered = bool(getattr(message.delivery, "redelivered", False))
    return Delivery(
        body=message.body,
        message_id=message_identity(properties.message_id, message.body),
        attempt=delivery_attempt(properties.headers or {}, redelivered=redelivered),
        handle=_Receipt(session, message),
    )


def _tag(message: DeliveredMessage) -> int:
    """A consumed message's delivery tag (a `basic.deliver` always carries one)."""
    tag = message.delivery_tag
    assert tag is not None
    return tag


def message_identity(message_id: str | None, body: bytes) -> str:
    """The producer's `message_id`, else a hash of the body (see the module's notes)."""
    return message_id or body_identity(body)


def delivery_attempt(headers: Mapping[str, Any], *, redelivered: bool) -> int | None:
    """Which delivery of the message this is, where the broker tells (see the module's notes)."""
    count = headers.get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count + 1
    return None if redelivered else 1


def _own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The producer's headers, without the broker's own (`x-delivery-count`, `x-death`, …)."""
    return {key: value for key, value in headers.items() if not key.startswith("x-")}


def _receipt(delivery: Delivery) -> _Receipt:
    if not isinstance(delivery.handle, _Receipt):
        raise TypeError("not a delivery of the RabbitMQ queue")
    return delivery.handle
