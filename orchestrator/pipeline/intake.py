"""Intake: broker message -> validated request -> recorded in the store -> acked.

Record first, ack second: a crash in between redelivers the message, and the store's unique request
key makes the redelivery a no-op. An invalid message goes to the dead-letter destination with its
reason and never reaches AEP. When too many requests are unfinished, intake stops reading, so a deep
backlog stays in the broker rather than in memory or in the store. When the store does not answer (the
database restarting, a dropped connection), what was received goes back to the broker unacked, and
intake waits for the store (`StoreOutage`) before it reads again: nothing is lost, and the service
goes on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from orchestrator import logs
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.files import FileSources
from orchestrator.messages import BatchRequest, InvalidMessage, parse_message
from orchestrator.observe import NULL, Observer
from orchestrator.queues.base import Delivery, Queue
from orchestrator.store.base import AddResult, BatchStore
from orchestrator.store.outage import NotRecorded, StoreOutage

log = logs.get("intake")

T = TypeVar("T")

# How long intake trusts its own count of the room under the backlog bound (seconds): the store is
# asked again once that much time has passed, or as soon as the room counted falls below a batch.
ROOM_CHECK = 1.0

# Messages asked for per receive, recorded in one write and acked together. A receive's write, its
# ack and its turn of the loop cost about as much for 256 messages as for 64, and a receive returns
# with what has arrived, without waiting for a full batch: 256 took 0.94 x the CPU per request of 64
# on RabbitMQ + PostgreSQL, for 1.09 x the rate (`bench/ab.py --backend brokered`).
BATCH_SIZE = 256

_RESULTS = {AddResult.ADDED: "accepted", AddResult.DUPLICATE: "duplicate", AddResult.CONFLICT: "conflict"}


@dataclass
class IntakeStats:
    added: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0


class Intake:
    def __init__(
        self,
        queue: Queue,
        store: BatchStore,
        clock: Clock,
        *,
        max_backlog: int,
        batch_size: int = BATCH_SIZE,
        poll_timeout: float = 0.5,
        on_added: asyncio.Event | None = None,
        observer: Observer = NULL,
        sources: FileSources | None = None,
    ) -> None:
        self._observer = observer
        # Where a message's files must lie (ORCH_UPLOAD__ROOT, ORCH_UPLOAD__PROTOCOLS); without, a
        # message naming files is refused.
        self._sources = sources
        self._queue = queue
        self._store = store
        self._clock = clock
        self._max_backlog = max_backlog
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._on_added = on_added
        self.stats = IntakeStats()
        self._throttled = False
        self._outage = StoreOutage(clock, "intake")
        # The room under `max_backlog` as last counted, less what was added since (see `_room`).
        self._room_left = 0
        self._room_counted_at = clock.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                room = await self._room()
            except Exception as exc:  # noqa: BLE001 - the store is unavailable: wait for it
                await self._outage.wait(exc, stop)
                continue
            if room <= 0:
                self._note_backpressure(True)
                await sleep_until_set(self._clock, self._poll_timeout, stop)
                continue
            self._note_backpressure(False)
            deliveries = await self._queue.receive(min(self._batch_size, room), self._poll_timeout)
            if stop.is_set():
                # Shutting down: what was received but not recorded goes back to the broker.
                for delivery in deliveries:
                    await self._queue.release(delivery)
                return
            try:
                await self.handle_all(deliveries)
            except NotRecorded as failure:
                await self._outage.wait(failure.__cause__ or failure, stop)
            else:
                self._outage.answered()

    async def _room(self) -> int:
        """How many more requests may be recorded before the backlog bound is reached.

        Counting the unfinished requests is a query; asking it before every receive cost a read per
        batch. Only this intake's own adds shrink the room between counts (the dispatcher's work
        only grows it), so the count is kept and reduced by each add, and the store asked again
        when the room left is under a batch, or after ROOM_CHECK seconds (another replica's intake
        on the same store adds too)."""
        now = self._clock.monotonic()
        if self._room_left < self._batch_size or now - self._room_counted_at >= ROOM_CHECK:
            self._room_left = self._max_backlog - await self._store.unfinished()
            self._room_counted_at = now
        return self._room_left

    async def handle(self, delivery: Delivery) -> None:
        """Record `delivery` in the store, then ack it (`handle_all` of one)."""
        await self.handle_all([delivery])

    async def handle_all(self, deliveries: Sequence[Delivery]) -> None:
        """Record what was received in the store, then ack it: the valid requests in one write (one
        disk sync and one multi-row INSERT for the whole batch), each invalid message as `rejected`.
        When the store fails, what it did not take goes back to the broker (redelivered later) and
        `NotRecorded` is raised once the rest is done."""
        failure: NotRecorded | None = None
        valid: list[tuple[Delivery, BatchRequest]] = []
        for delivery in deliveries:
            try:
                valid.append((delivery, self._parse(delivery)))
            except InvalidMessage as exc:
                try:
                    with structlog.contextvars.bound_contextvars(message_id=delivery.message_id):
                        await self._reject(delivery, str(exc))
                except NotRecorded as error:
                    failure = failure or error
        if valid:
            try:
                results = await self._store.add_many([request for _, request in valid], self._clock.now())
            except Exception as exc:
                for delivery, _ in valid:
                    await self._queue.release(delivery)
                raise NotRecorded from exc
            self._room_left -= results.count(AddResult.ADDED)
            await self._queue.ack_many([delivery for delivery, _ in valid])
            for (delivery, request), result in zip(valid, results, strict=True):
                self._accepted(delivery, request, result)
        if failure is not None:
            raise failure

    def _parse(self, delivery: Delivery) -> BatchRequest:
        request = parse_message(delivery.body, delivery.message_id)
        if request.files:
            if self._sources is None:
                raise InvalidMessage("files: this service does not upload files")
            self._sources.check(request.files)
        return request

    def _accepted(self, delivery: Delivery, request: BatchRequest, result: AddResult) -> None:
        self._observer.message(_RESULTS[result])
        # The request's keys given in the call: binding them in the context per message cost more
        # than the line itself.
        keys = {
            "message_id": delivery.message_id,
            "request_id": request.request_id,
            "dataset_id": request.dataset_id,
        }
        if result is AddResult.ADDED:
            self.stats.added += 1
            log.info("intake.accepted", delivery_attempt=delivery.attempt, **keys)
            if self._on_added is not None:
                self._on_added.set()
        elif result is AddResult.DUPLICATE:
            self.stats.duplicates += 1
            log.info("intake.duplicate", **keys)
        else:
            self.stats.conflicts += 1
            log.warning(
                "intake.conflict",
                reason="requestId known with another dataset, format or tags: kept the first",
                **keys,
            )

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        # Recorded on every broker, so `batches --state rejected` tells the same story everywhere;
        # recorded first, so a crash before the dead letter redelivers rather than loses it.
        await self._recorded(
            delivery,
            self._store.reject(
                f"msg:{delivery.message_id}", _dataset_hint(delivery.body), reason, self._clock.now()
            ),
        )
        # Counted once recorded: a message the store failed to take comes back, and counts then.
        self.stats.rejected += 1
        self._observer.message("rejected")
        log.warning("intake.rejected", reason=reason)
        await self._queue.dead_letter(delivery, reason)

    async def _recorded(self, delivery: Delivery, write: Awaitable[T]) -> T:
        """`write`'s result; when the store fails, `delivery` is released to the broker and
        `NotRecorded` raised. (A write that committed although its answer was lost is found again
        when the delivery comes back: a duplicate, acked then.)"""
        try:
            return await write
        except Exception as exc:
            await self._queue.release(delivery)
            raise NotRecorded from exc

    def _note_backpressure(self, on: bool) -> None:
        if on != self._throttled:
            self._throttled = on
            log.info("intake.paused" if on else "intake.resumed", max_backlog=self._max_backlog)


def _dataset_hint(body: bytes) -> str | None:
    """The dataset id of an invalid message, when one can be read, so `batches --dataset` finds it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        return None
    value = data.get("datasetId") if isinstance(data, dict) else None
    if not isinstance(value, str):
        return None
    # It is stored and logged: no control characters (PostgreSQL text holds no NUL), no lone surrogates.
    return value[:128] if value[:128].isprintable() else None
