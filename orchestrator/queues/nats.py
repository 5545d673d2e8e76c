"""NATS JetStream: requests are messages on the subject NAME, read through the durable pull consumer
`orchestrator`; one class is both the `Consumer` (intake) and the `Publisher` (`enqueue`, events).

Stream. `open` finds the stream that holds NAME, or creates one named after NAME with every `.`
made `_` (`aep.batch-requests` -> `aep_batch-requests`) holding the subjects NAME and `NAME.dead`:
file storage (it survives a server restart) and work-queue retention, so the stream is the queue:
an acked or terminated message leaves it, and what it holds is the backlog and the dead letters,
with no age limit that could drop a request nobody read yet. The price of work-queue retention: a
subject has one consumer at most. Every replica of the service shares the one durable consumer;
whoever reads `NAME.dead` does so through one consumer filtered on it (or `nats stream get`, which
needs none; an unfiltered view such as `nats stream view` is refused once the service's consumer
exists). A stream that already holds NAME is used as it is, provided some stream holds `NAME.dead`.

Consumer. `orchestrator`, filtered on NAME, explicit ack, `ack_wait` 60 s (a delivery neither acked
nor given back within it is delivered again: the time a killed process's messages take to come
back) and `max_deliver` 10. Both can be set with URL parameters, `nats://host:4222?ack_wait=5&
max_deliver=6` (or constructor arguments), and are applied to an existing consumer. The consumer is
created at the first `receive` or `is_empty`, not at `open`: a publisher (`enqueue`, the event
relay) must never create one, since on a work-queue stream it would take the subject from whoever
reads it.

Messages. A message's identity is its `Nats-Msg-Id` header when the producer set one (`publish`
always does), else `STREAM:CREATED:SEQ`, its stream sequence (which redeliveries keep) with the
stream's creation time in microseconds, so that a stream deleted and made again, which restarts its
sequence, never reuses an identity. `attempt` is the delivery count.

Settling. Acks, naks and terms wait for the server's reply (`ack_sync` and its like), so that what
`is_empty` says next already counts them. `dead_letter` publishes the body to `NAME.dead` with
headers `reason` and `message-id` (and a `Nats-Msg-Id` of its own, so that a dead letter sent again
after a lost term is stored once), then terminates the message. A message delivered `max_deliver -
1` times (one that kills every process that reads it) is dead-lettered by the adapter with the
reason "delivered N times without being recorded", before the server would stop delivering it:
intake never saw it, so it is not in the store. `release` naks: delivered again at once. `close`
naks what was received and not settled.

Server restarts. The client reconnects by itself (forever, every second). A pull request that the
server held is lost with it (nats-io/nats.py#504): fetches are short (the caller's timeout) and no
fetch is sent while disconnected, and after a reconnect `receive` declares the stream and the
consumer again and makes a new pull subscription (`queue.reconnected`). An ack that cannot be sent
is logged (`queue.ack_failed`) and intake goes on: the message comes back after `ack_wait`, and the
store absorbs the duplicate. A message the server delivered to the old subscription but that was
not yet fetched also comes back after `ack_wait`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import uuid4

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from orchestrator import logs
from orchestrator.clock import Clock, SystemClock, sleep_until_set
from orchestrator.queues.base import Delivery
from orchestrator.settings import ConfigError

log = logs.get("queue")

CONSUMER = "orchestrator"
MSG_ID = "Nats-Msg-Id"
REASON = "reason"
MESSAGE_ID = "message-id"

# Errors of a connection that is down or of a server that is not ready (JetStream starting after a
# restart answers 503): worth trying again. A refused request (400, BadRequestError) is not.
_DOWN = (nats.errors.Error, OSError, TimeoutError)
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class _Received:
    """A delivery's handle: the message and its stream sequence."""

    msg: Msg
    seq: int


class NatsQueue:
    """`Consumer` and `Publisher` on a JetStream stream. `url` is `nats://[user:password@]host[:port]`
    or `tls://…` (several servers: comma-separated), with the optional parameters `ack_wait`
    (seconds) and `max_deliver`."""

    ACK_WAIT = 60.0
    MAX_DELIVER = 10
    REQUEST_TIMEOUT = 5.0  # a JetStream API call, a publish's confirm, an ack's reply
    OPEN_TIMEOUT = 10.0  # `open` gives up when no server answers within it
    RECONNECT_WAIT = 1  # seconds
    FIRST_BACKOFF = 0.25
    MAX_BACKOFF = 5.0
    PUBLISH_WINDOW = 256  # publishes awaiting their confirm at once
    PUBLISH_ATTEMPTS = 3

    def __init__(
        self,
        url: str,
        name: str = "aep.batch-requests",
        *,
        ack_wait: float | None = None,
        max_deliver: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        base, _, query = url.partition("?")
        self._servers = [server.strip() for server in base.split(",") if server.strip()]
        if not self._servers or any(
            urlsplit(server).scheme.lower() not in ("nats", "tls") for server in self._servers
        ):
            raise ValueError("the NATS adapter needs a nats:// or tls:// URL")
        if not _SUBJECT.fullmatch(name):
            raise ConfigError([f"{name!r}: not a NATS subject (letters, digits, - and _ between dots)"])
        url_ack_wait, url_max_deliver = _parameters(query)
        self.url = url
        self.name = name
        self.dead_subject = f"{name}.dead"
        self.stream = name.replace(".", "_")  # the stream's name when this adapter creates it
        # The constructor's arguments, else the URL's parameters, else the defaults.
        self.ack_wait = ack_wait if ack_wait is not None else url_ack_wait or self.ACK_WAIT
        self.max_deliver = max_deliver if max_deliver is not None else url_max_deliver or self.MAX_DELIVER
        self._clock = clock or SystemClock()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream = self.stream  # the stream holding NAME: this one, or one that existed
        self._created_us = 0  # the stream's creation time, part of sequence identities
        self._stream_ready = False
        self._consumer_ready = False
        self._give_up_at: int | None = None  # dead-letter at this delivery count
        self._sub: JetStreamContext.PullSubscription | None = None
        self._resubscribe = False  # the connection came back: make a new pull subscription
        self._recovering = False
        self._connected = asyncio.Event()
        self._closing = False
        self._prepare_lock = asyncio.Lock()
        self._unsettled: dict[int, Msg] = {}  # by stream sequence
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error = ""

    # -- connection ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._nc is not None:
            return
        nc = Client()
        try:
            # Connecting retries forever (so does reconnecting); `open` bounds the first connection.
            await asyncio.wait_for(
                nc.connect(
                    self._servers,
                    name="orchestrator",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.RECONNECT_WAIT,
                    connect_timeout=5,
                    # A server gone without closing the socket is noticed within two missed pings.
                    ping_interval=20,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                self.OPEN_TIMEOUT,
            )
        except (*_DOWN, asyncio.CancelledError) as exc:
            await nc.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ConnectionError(
                f"NATS at {self._where()} did not answer within {self.OPEN_TIMEOUT:g} s"
                + (f" ({self._last_error})" if self._last_error else "")
            ) from None
        self._nc = nc
        self._js = nc.jetstream(timeout=self.REQUEST_TIMEOUT)
        self._closing = False
        self._connected.set()
        try:
            await self._declare_stream()
        except nats.js.errors.ServiceUnavailableError:
            await self.close()
            raise ConnectionError(
                f"NATS at {self._where()} has no JetStream (start nats-server with -js)"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        self._closing = True
        unsettled, self._unsettled = list(self._unsettled.values()), {}
        try:
            if nc.is_connected:
                # Given back now rather than after ack_wait; when disconnected they come back then.
                await asyncio.gather(*(self._acknowledge(nc, msg, Msg.Ack.Nak) for msg in unsettled))
                if self._sub is not None:
                    await self._sub.unsubscribe()
        except _DOWN as exc:
            log.warning("queue.close_failed", error=_describe(exc))
        finally:
            self._sub = None
            # Not `drain()`: it waits for the pull subscription's buffer, which nobody reads now.
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        # Every failed reconnection attempt lands here: `queue.disconnected` said it once already.
        self._last_error = _describe(exc)
        log.debug("queue.connection_error", error=self._last_error)

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("queue.disconnected", server=self._where(), hint="reconnecting every second")

    async def _on_reconnected(self) -> None:
        self._resubscribe = True
        self._connected.set()

    # -- Consumer ------------------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages <= 0:
            return []
        if self._nc is None:
            raise RuntimeError("the queue is not open")
        deadline = self._clock.monotonic() + max(0.0, timeout)
        sub = await self._subscription(deadline)
        if sub is None:
            return []
        try:
            # fetch() needs a positive timeout; the server holds the pull request that long at most.
            msgs = await sub.fetch(max_messages, timeout=max(0.05, deadline - self._clock.monotonic()))
        except TimeoutError:
            # No message: nats.py raises (its own TimeoutError, or asyncio's when the time ran out
            # between its two pull requests) rather than return an empty list.
            return []
        except nats.js.errors.BadRequestError:
            raise
        except _DOWN as exc:
            self._failed("fetch", exc)
            return []
        self._succeeded()
        deliveries: list[Delivery] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            self._unsettled[seq] = msg
            delivery = Delivery(
                body=msg.data,
                message_id=self._identity(msg, seq),
                attempt=msg.metadata.num_delivered,
                handle=_Received(msg, seq),
            )
            if self._give_up_at is not None and msg.metadata.num_delivered >= self._give_up_at:
                reason = f"delivered {msg.metadata.num_delivered} times without being recorded"
                log.warning("queue.dead_lettered", message_id=delivery.message_id, reason=reason)
                await self.dead_letter(delivery, reason)
                continue
            deliveries.append(delivery)
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, Msg.Ack.Ack)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        # JetStream acks one message at a time (AckAll would also ack what other pulls hold).
        for delivery in deliveries:
            await self.ack(delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        received = _received(delivery)
        headers = {
            # One line, no control characters: a header value ends at the line break.
            REASON: logs.escape_controls(reason)[:1000],
            MESSAGE_ID: delivery.message_id,
            MSG_ID: f"dead:{delivery.message_id}",
        }
        try:
            await self._jetstream.publish(self.dead_subject, received.msg.data, headers=headers)
        except nats.js.errors.BadRequestError:
            raise
        except _DOWN as exc:
            # Not terminated: it comes back after ack_wait (or at once, given back by `close`).
            log.warning(
                "queue.dead_letter_failed",
                message_id=delivery.message_id,
                error=_describe(exc),
                hint="delivered again after ack_wait, and dead-lettered then",
            )
            return
        await self._settle(delivery, Msg.Ack.Term)

    async def release(self, delivery: Delivery) -> None:
        await self._settle(delivery, Msg.Ack.Nak)

    async def is_empty(self) -> bool:
        try:
            await self._prepare(subscribe=False)
            info = await self._jetstream.consumer_info(self._stream, CONSUMER)
        except nats.js.errors.BadRequestError:
            raise
        except _DOWN:
            return False  # cannot tell: not empty, so `--until-idle` waits for the server
        waiting: int = info.num_pending or 0
        unacked: int = info.num_ack_pending or 0
        return waiting == 0 and unacked == 0

    # -- Publisher -----------------------------------------------------------------------------

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        """Publish with JetStream's confirm; returns how many of the first bodies were confirmed, in
        order (all, unless the server stayed away through the retries: `queue.publish_failed`).

        Every message carries a `Nats-Msg-Id` (a random one without `message_ids`), so a publish
        retried after a lost confirm is stored once (JetStream's duplicate window, 2 minutes)."""
        if message_ids is not None and len(message_ids) != len(bodies):
            raise ValueError("one message id per body")
        ids = list(message_ids) if message_ids is not None else [uuid4().hex for _ in bodies]
        confirmed = 0
        for start in range(0, len(bodies), self.PUBLISH_WINDOW):
            window = range(start, min(start + self.PUBLISH_WINDOW, len(bodies)))
            results = await asyncio.gather(*(self._publish_one(bodies[i], ids[i]) for i in window))
            for error in results:
                if error is not None:
                    log.error(
                        "queue.publish_failed",
                        subject=self.name,
                        confirmed=confirmed,
                        total=len(bodies),
                        error=error,
                    )
                    return confirmed
                confirmed += 1
        return confirmed

    async def _publish_one(self, body: bytes, message_id: str) -> str | None:
        """None once confirmed, else why not."""
        delay = self.FIRST_BACKOFF
        for attempt in range(1, self.PUBLISH_ATTEMPTS + 1):
            try:
                await self._jetstream.publish(
                    self.name, bytes(body), headers={MSG_ID: message_id}, stream=self._stream
                )
                return None
            except nats.js.errors.BadRequestError:
                raise
            except _DOWN as exc:
                if attempt == self.PUBLISH_ATTEMPTS:
                    return _describe(exc)
                await self._clock.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # -- internals -----------------------------------------------------------------------------

    async def _subscription(self, deadline: float) -> JetStreamContext.PullSubscription | None:
        """The pull subscription, made (again) when needed; None when the server is not there or a
        failure's backoff has not passed before `deadline`."""
        if not self._connected.is_set():
            await sleep_until_set(self._clock, deadline - self._clock.monotonic(), self._connected)
            if not self._connected.is_set():
                return None
        if self._clock.monotonic() < self._retry_at:
            await self._clock.sleep(min(self._retry_at, deadline) - self._clock.monotonic())
            if self._clock.monotonic() < self._retry_at:
                return None
        try:
            return await self._prepare(subscribe=True)
        except nats.js.errors.BadRequestError:
            raise
        except _DOWN as exc:
            self._failed("subscribe", exc)
            return None

    async def _prepare(self, *, subscribe: bool) -> JetStreamContext.PullSubscription | None:
        """Declare what the connection lost or a failure may have removed (the stream, the consumer),
        and with `subscribe` make the pull subscription. Each step is done once and stays done until
        the next reconnection or failure, so a step that fails is tried again at the next call."""
        async with self._prepare_lock:
            if self._resubscribe:
                self._resubscribe = False
                self._recovering = True  # said (`queue.reconnected`) once reading works again
                self._stream_ready = self._consumer_ready = False
                old, self._sub = self._sub, None
                if old is not None:
                    try:
                        await old.unsubscribe()
                    except _DOWN as exc:
                        log.debug("queue.unsubscribe_failed", error=_describe(exc))
            if not self._stream_ready:
                await self._declare_stream()  # a server that lost its storage lost the stream
            if not self._consumer_ready:
                await self._declare_consumer()
                self._consumer_ready = True
            if subscribe and self._sub is None:
                self._sub = await self._jetstream.pull_subscribe_bind(durable=CONSUMER, stream=self._stream)
                if self._recovering:
                    self._recovering = False
                    log.info("queue.reconnected", server=self._where(), subject=self.name)
            return self._sub

    async def _declare_stream(self) -> None:
        js = self._jetstream
        try:
            stream = await js.find_stream_name_by_subject(self.name)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=self.stream,
                subjects=[self.name, self.dead_subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
            try:
                info = await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Another process made it at the same time (same config: no error), or a stream of
                # that name holds other subjects.
                raise ConfigError(
                    [f"NATS stream {self.stream!r} exists without the subject {self.name!r}"]
                ) from None
            log.info("queue.stream_created", stream=self.stream, subjects=[self.name, self.dead_subject])
        else:
            try:
                await js.find_stream_name_by_subject(self.dead_subject)
            except nats.js.errors.NotFoundError:
                raise ConfigError(
                    [f"NATS stream {stream!r} holds {self.name!r} but no stream holds {self.dead_subject!r}"]
                ) from None
            info = await js.stream_info(stream)
        self._stream = info.config.name or self.stream
        self._created_us = int(info.created.timestamp() * 1_000_000) if info.created else 0
        self._stream_ready = True

    async def _declare_consumer(self) -> None:
        js = self._jetstream
        config = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subject=self.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
        )
        try:
            existing = await js.consumer_info(self._stream, CONSUMER)
        except nats.js.errors.NotFoundError:
            existing = None
        if existing is not None and existing.config.filter_subject != self.name:
            raise ConfigError(
                [
                    f"NATS consumer {CONSUMER!r} of stream {self._stream!r} reads"
                    f" {existing.config.filter_subject!r}, not {self.name!r}"
                ]
            )
        if (
            existing is None
            or existing.config.ack_wait != self.ack_wait
            or existing.config.max_deliver != self.max_deliver
        ):
            # Creates it, or updates ack_wait and max_deliver (the server allows both to change).
            try:
                existing = await js.add_consumer(self._stream, config)
            except nats.js.errors.BadRequestError as exc:
                # On a work-queue stream: another consumer already reads NAME.
                raise ConfigError(
                    [f"NATS stream {self._stream!r} refused the consumer {CONSUMER!r}: {exc.description}"]
                ) from None
        max_deliver = existing.config.max_deliver
        self._give_up_at = max_deliver - 1 if max_deliver is not None and max_deliver > 1 else None

    async def _settle(self, delivery: Delivery, kind: bytes) -> None:
        received = _received(delivery)
        self._unsettled.pop(received.seq, None)
        nc = self._nc
        if nc is None:
            raise RuntimeError("the queue is not open")
        await self._acknowledge(nc, received.msg, kind, message_id=delivery.message_id)

    async def _acknowledge(self, nc: Client, msg: Msg, kind: bytes, message_id: str | None = None) -> None:
        """Send an ack, nak or term and wait for the server's reply (what `Msg.ack_sync` does for
        acks). A failure is logged, not raised: the message is then delivered again after ack_wait,
        which the store absorbs, and intake goes on."""
        try:
            await nc.request(msg.reply, kind, timeout=self.REQUEST_TIMEOUT)
        except _DOWN as exc:
            log.warning(
                "queue.ack_failed",
                ack=kind.decode(),
                message_id=message_id,
                error=_describe(exc),
                hint="delivered again after ack_wait unless the ack still reaches the server",
            )

    def _identity(self, msg: Msg, seq: int) -> str:
        headers = msg.headers or {}
        producer_id = next((v for k, v in headers.items() if k.lower() == MSG_ID.lower() and v), None)
        return producer_id or f"{self._stream}:{self._created_us}:{seq}"

    def _failed(self, what: str, exc: BaseException) -> None:
        self._backoff = min(self.MAX_BACKOFF, max(self.FIRST_BACKOFF, self._backoff * 2))
        self._retry_at = self._clock.monotonic() + self._backoff
        # Made again at the next receive: a subscription or consumer that failed may be gone.
        self._resubscribe = True
        log.warning("queue.receive_failed", step=what, error=_describe(exc), retry_in=self._backoff)

    def _succeeded(self) -> None:
        self._backoff = 0.0
        self._retry_at = 0.0

    def _where(self) -> str:
        """The servers, without credentials."""
        return ",".join(f"{parts.hostname}:{parts.port or 4222}" for parts in map(urlsplit, self._servers))

    @property
    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the queue is not open")
        return self._js


def _received(delivery: Delivery) -> _Received:
    if not isinstance(delivery.handle, _Received):
        raise TypeError("not a delivery of the NATS queue")
    return delivery.handle


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parameters(query: str) -> tuple[float | None, int | None]:
    """`ack_wait` (seconds, above 0, at most a day) and `max_deliver` (at least 2) from the URL."""
    ack_wait: float | None = None
    max_deliver: int | None = None
    problems = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "ack_wait":
            ack_wait = _number(value, float)
            if ack_wait is None or not 0 < ack_wait <= 86400:
                problems.append("NATS URL: ack_wait must be seconds above 0 and at most 86400")
        elif key == "max_deliver":
            max_deliver = _number(value, int)
            if max_deliver is None or max_deliver < 2:
                problems.append("NATS URL: max_deliver must be a whole number of at least 2")
        else:
            # The key only: an unknown parameter may be a misplaced secret.
            problems.append(f"NATS URL: unknown parameter {key[:40]!r} (known: ack_wait, max_deliver)")
    if problems:
        raise ConfigError(problems)
    return ack_wait, max_deliver


def _number(text: str, kind: type[float] | type[int]) -> Any:
    try:
        return kind(text)
    except ValueError:
        return None
