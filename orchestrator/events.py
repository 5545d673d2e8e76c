"""The event relay: publishes the store's outbox of batch events to ORCH_EVENTS__URL.

The store writes a request's `batch.created` or `batch.failed` event into its outbox in the
transaction that records the state change (reference §3.5), so an event exists exactly when its state
change does. This relay publishes the outbox oldest first, in batches, each event with its `eventId`
as the message id, and deletes the rows only once the publisher has returned (the broker confirmed).
Whatever happens in between (a crash, a broker that refuses, a kill -9) leaves the rows where they
were, to be published again: delivery is at least once, and a repeat carries the same `eventId`
(brokers that de-duplicate by message id drop it; consumers can too).

A broker error never stops the service: the relay logs it, closes the publisher, and tries again
after a jittered exponential backoff, reconnecting. It is woken when a commit wrote outbox rows
(`BatchStore.events_written`) and otherwise polls, so rows written by another process on the same
store (a replica, a run killed before publishing) go out too.
"""

from __future__ import annotations

import asyncio
import random
import re

from orchestrator import logs
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.pipeline.retry import full_jitter
from orchestrator.queues.base import Publisher
from orchestrator.store.base import BatchStore

log = logs.get("events")

# Events per publish (and per delete): one broker round trip and one store commit for many events.
BATCH_SIZE = 100
# Rows written by another process wake nobody here; they wait at most this long (seconds).
POLL_INTERVAL = 1.0
# Backoff after a failed publish (seconds): full jitter, never sooner than BASE_DELAY.
BASE_DELAY = 0.5
MAX_DELAY = 30.0
# Seconds a stopping service gives the relay to publish the events its last calls recorded; what is
# left then waits in the outbox for the next run.
FLUSH_GRACE = 5.0

_USERINFO = re.compile(r"(://)[^/@\s]*@")


class PublishIncomplete(Exception):
    """The broker accepted fewer events than were sent: the batch is published again."""


class EventRelay:
    """Publishes the outbox of `store` through `publisher` until stopped. `start()` runs it as a
    task; `stop(grace)` ends it after a last flush bounded by `grace`."""

    def __init__(
        self,
        store: BatchStore,
        publisher: Publisher,
        clock: Clock,
        *,
        batch_size: int = BATCH_SIZE,
        poll_interval: float = POLL_INTERVAL,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        rng: random.Random | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._store = store
        self._publisher = publisher
        self._clock = clock
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._rng = rng or random.Random()
        self._open = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0  # events published (and deleted) by this relay

    @property
    def task(self) -> asyncio.Task[None]:
        """The running relay (`start()`), for its supervisor to watch."""
        if self._task is None:
            raise RuntimeError("the relay was not started")
        return self._task

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(self._stop), name="events")
        return self._task

    async def stop(self, grace: float) -> None:
        """End the relay: it publishes what still waits (the outcomes of the last calls) for at most
        `grace` seconds on the clock, then is cancelled; events left over wait in the outbox."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        timer = asyncio.ensure_future(self._clock.sleep(grace))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not task.done():
            # A publish cut short is published again by the next run: at least once, same eventId.
            task.cancel()
        await asyncio.gather(task, timer, return_exceptions=True)
        try:
            waiting = await self._store.events_waiting()
        except Exception:  # noqa: BLE001 - the store may be gone (that is why we stopped); nothing to add
            return
        if waiting:
            log.warning("events.left_in_outbox", waiting=waiting, hint="the next run publishes them")

    async def close(self) -> None:
        """Disconnect from the broker (after `stop`)."""
        await self._disconnect()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish the outbox until `stop` is set, then once more until it is empty (or a publish
        fails): the outcomes the last calls recorded go out with this run when the broker allows."""
        wake = self._store.events_written
        failures = 0
        while not stop.is_set():
            # Cleared before reading the outbox: a commit after the read sets it again, so no
            # row written meanwhile waits for the poll.
            wake.clear()
            try:
                sent = await self._publish_batch()
            except Exception as exc:  # noqa: BLE001 - a broker or store error is retried, never fatal
                failures += 1
                delay = max(
                    self._base_delay, full_jitter(failures, self._base_delay, self._max_delay, self._rng)
                )
                log.warning(
                    "events.publish_failed", error=_describe(exc), failures=failures, retry_in=round(delay, 3)
                )
                await self._disconnect()  # the next try reconnects
                await sleep_until_set(self._clock, delay, stop)
                continue
            if failures:
                log.info("events.publish_restored", failures=failures)
                failures = 0
            if sent < self._batch_size:  # the outbox is empty (a full batch: more may wait)
                await sleep_until_set(self._clock, self._poll_interval, stop, wake)
        try:
            while await self._publish_batch() == self._batch_size:
                pass
        except Exception as exc:  # noqa: BLE001 - stopping anyway: the rows wait for the next run
            log.warning("events.publish_failed", error=_describe(exc), stopping=True)

    async def _publish_batch(self) -> int:
        """Publish the oldest waiting events and delete them once confirmed; how many there were."""
        if not self._open:
            # Opened before the outbox is read, so the destination is declared (a RabbitMQ queue,
            # a NATS stream) from the start, for consumers that come before the first event.
            await self._publisher.open()
            self._open = True
        events = await self._store.outbox(self._batch_size)
        if not events:
            return 0
        accepted = await self._publisher.publish(
            [event.body for event in events], [event.event_id for event in events]
        )
        if accepted != len(events):
            # Which ones were taken is not known: all of them go again (repeats keep their eventId).
            raise PublishIncomplete(f"the broker accepted {accepted} of {len(events)} events")
        await self._store.events_sent([event.position for event in events])
        self.published += len(events)
        log.debug("events.published", count=len(events))
        return len(events)

    async def _disconnect(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            await self._publisher.close()
        except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close; it is dropped
            log.debug("events.close_failed", error=_describe(exc))


def _describe(exc: BaseException) -> str:
    """The error for a log line: its type and message, without any `user:password@` of a URL."""
    return _USERINFO.sub(r"\1***@", f"{type(exc).__name__}: {exc}")[:300]
