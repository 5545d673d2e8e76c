"""Dispatcher: claim due requests from the store, create their batches, record the outcome.

Claim before call: a request is leased (attempts + 1) in the store before its call starts, and its
outcome is written fenced by that lease. A request whose earlier outcome is unknown (a timeout, a
dropped connection, a 5xx, a crash mid-call) is looked up by its externalId before any new create,
and a batch found there is adopted: that is what keeps one batch per request over an API that
creates a new batch on every POST.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import structlog

from orchestrator import logs
from orchestrator.aep.api import Batch, BatchApi
from orchestrator.aep.errors import AepError, AuthError
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.store.base import BatchStore, Claim

log = logs.get("dispatcher")


@dataclass
class DispatchStats:
    created: int = 0
    adopted: int = 0
    failed: int = 0
    retries: int = 0
    released: int = 0


class Dispatcher:
    def __init__(
        self,
        store: BatchStore,
        api: BatchApi,
        policy: RetryPolicy,
        clock: Clock,
        *,
        owner: str,
        concurrency: int,
        lease_seconds: float,
        default_format: str,
        poll_interval: float = 0.5,
        wake: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._api = api
        self._policy = policy
        self._clock = clock
        self._owner = owner
        self._concurrency = concurrency
        self._slot_freed = asyncio.Event()
        self._lease_seconds = lease_seconds
        self._default_format = default_format
        self._poll_interval = poll_interval
        self._wake = wake or asyncio.Event()
        self._tasks: dict[asyncio.Task[None], Claim] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._credentials_problem: str | None = None
        self._busy = True  # whether the last claim found work (see `_next_claims`)
        self.stats = DispatchStats()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def credentials_problem(self) -> str | None:
        return self._credentials_problem

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop` is set; then return, leaving calls in flight to `drain`.

        Every free call slot is filled from one claim (one store transaction for many requests):
        a transaction per request would cap the rate at what the disk commits per second."""
        self._renewer = self._renewer or asyncio.create_task(self._renew_leases(), name="lease-renewer")
        # Refill in chunks: a claim per finished request would cost a store transaction each.
        refill_at = max(1, self._concurrency // 4)
        while not stop.is_set():
            free = self._concurrency - len(self._tasks)
            if free < refill_at:
                # Woken by a finished call, or by `stop` even while every call hangs to its timeout.
                self._slot_freed.clear()
                await sleep_until_set(self._clock, self._poll_interval, stop, self._slot_freed)
                continue
            for claim in await self._next_claims(stop, free):
                task = asyncio.create_task(self._handle(claim))
                self._tasks[task] = claim
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatcher.task_crashed", exc_info=task.exception())

    async def _renew_leases(self) -> None:
        """Keep the leases of requests in flight alive. A call can wait in the limiter through
        several throttling pauses; were its lease to run out meanwhile, another dispatcher could
        claim the request and both would create a batch. A call whose lease was lost anyway (this
        process stalled past it) is cancelled before it can create a second batch."""
        interval = self._lease_seconds / 3
        while True:
            await self._clock.sleep(interval)
            held = dict(self._tasks)
            if not held:
                continue
            renewed = await self._store.renew(list(held.values()), self._lease_seconds, self._clock.now())
            for task, claim in held.items():
                if claim.record.request_id not in renewed and not task.done():
                    log.error("dispatcher.lease_lost", request_id=claim.record.request_id)
                    task.cancel()

    async def drain(self, grace: float) -> None:
        """Let calls in flight finish within `grace` seconds; cancel the rest. A cancelled call's
        outcome is unknown, so its request is marked for a lookup before the next create."""
        try:
            if not self._tasks:
                return
            log.info("dispatcher.draining", in_flight=len(self._tasks), grace=grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("dispatcher.drain_cancelled", cancelled=len(pending))
        finally:
            if self._renewer is not None:
                self._renewer.cancel()
                await asyncio.gather(self._renewer, return_exceptions=True)
                self._renewer = None

    async def _next_claims(self, stop: asyncio.Event, limit: int) -> list[Claim]:
        """Up to `limit` due requests, waiting for some to become due; [] once `stop` is set."""
        while not stop.is_set():
            if not await self._credentials_ok():
                await sleep_until_set(self._clock, min(self._poll_interval * 4, 2.0), stop)
                continue
            now = self._clock.now()
            self._wake.clear()
            wait = self._poll_interval
            if self._busy:
                # Work was there last time: claim straight away.
                claims = await self._store.claim(self._owner, limit, self._lease_seconds, now)
                if claims:
                    return claims
                self._busy = False
                due = await self._store.next_due()
            else:
                # Idle: a read first, so that waiting costs a cheap query per poll rather than a
                # write transaction (a claim takes SQLite's write lock, PostgreSQL's row locks).
                due = await self._store.next_due()
                if due is not None and due <= now:
                    self._busy = True
                    continue
            if due is not None and due > now:
                wait = min(wait, (due - now).total_seconds())
            await sleep_until_set(self._clock, wait, stop, self._wake)
        return []

    async def _credentials_ok(self) -> bool:
        """No request is claimed while there is no token: a credential problem fails nothing."""
        try:
            await self._api.ensure_token()
        except AuthError as exc:
            if self._credentials_problem is None:
                log.error("dispatcher.waiting_for_credentials", error=exc.summary())
            self._credentials_problem = exc.summary()
            return False
        if self._credentials_problem is not None:
            log.info("dispatcher.credentials_restored")
            self._credentials_problem = None
        return True

    async def _handle(self, claim: Claim) -> None:
        record = claim.record
        with structlog.contextvars.bound_contextvars(
            request_id=record.request_id, dataset_id=record.dataset_id, attempt=claim.attempt
        ):
            creating = False
            try:
                if claim.needs_lookup:
                    found = await self._api.find_batches(record.request().external_id)
                    if found:
                        await self._created(claim, found, adopted=True)
                        return
                    log.info("batch.lookup_empty")
                creating = True
                batch = await self._api.create_batch(record.request(), self._default_format)
                await self._created(claim, [batch], adopted=False)
            except asyncio.CancelledError:
                # Shutdown ran out of grace mid-call: if the create was sent, it may have happened.
                await asyncio.shield(self._cancelled(claim, creating))
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                await asyncio.shield(self._failed(claim, exc, creating))

    async def _created(self, claim: Claim, batches: list[Batch], *, adopted: bool) -> None:
        batch = batches[0]
        kept = await asyncio.shield(
            self._store.mark_created(claim, batch.id, batch.status, self._clock.now(), adopted=adopted)
        )
        self._policy.succeeded(claim.attempt)
        if not kept:
            log.warning("dispatcher.lease_lost", batch_id=batch.id)
            return
        if adopted:
            self.stats.adopted += 1
            log.info("batch.adopted", batch_id=batch.id, batch_status=batch.status, found=len(batches))
        else:
            self.stats.created += 1
            log.info("batch.created", batch_id=batch.id, batch_status=batch.status)

    async def _failed(self, claim: Claim, exc: Exception, creating: bool) -> None:
        now = self._clock.now()
        if not isinstance(exc, AepError):
            log.error("dispatcher.unexpected_error", exc_info=exc)
        decision = self._policy.decide(exc, claim.attempt, now, creating=creating)
        error = exc.summary() if isinstance(exc, AepError) else f"{type(exc).__name__}: {exc}"[:500]
        if decision.kind == "release":
            self.stats.released += 1
            await self._store.release(claim, now)
            self._wake.set()  # due again at once: the claim loop checks the credentials first
            log.warning("batch.released", reason=decision.reason)
        elif decision.kind == "fail":
            if (decision.ambiguous or claim.needs_lookup) and await self._adopt_before_failing(claim):
                return
            self.stats.failed += 1
            if await self._store.mark_failed(claim, decision.reason, now):
                log.error("batch.failed", error=decision.reason)
        else:
            self.stats.retries += 1
            next_at = now + timedelta(seconds=decision.delay)
            ambiguous = decision.ambiguous or claim.needs_lookup
            if await self._store.mark_retry(claim, error, next_at, ambiguous=ambiguous, now=now):
                self._wake.set()  # the claim loop may be sleeping past this retry's due time
                log.warning(
                    "retry.scheduled",
                    error=error,
                    delay=round(decision.delay, 3),
                    ambiguous=ambiguous,
                )

    async def _adopt_before_failing(self, claim: Claim) -> bool:
        """The last attempt's create may have happened: one lookup before giving up, so a batch
        that exists is recorded rather than orphaned."""
        try:
            found = await self._api.find_batches(claim.record.request().external_id)
        except Exception as exc:  # noqa: BLE001 - failing the request is the fallback either way
            log.warning("batch.final_lookup_failed", error=str(exc)[:200])
            return False
        if found:
            await self._created(claim, found, adopted=True)
        return bool(found)

    async def _cancelled(self, claim: Claim, creating: bool) -> None:
        now = self._clock.now()
        if creating:
            await self._store.mark_retry(
                claim, "interrupted by shutdown during the call", now, ambiguous=True, now=now
            )
        else:
            await self._store.release(claim, now)
        log.warning("batch.interrupted", call_sent=creating)
