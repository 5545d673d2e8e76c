"""Dispatcher: claim due requests from the store, create their batches, record the outcome.

Claim before call: a request is leased (attempts + 1) in the store before its call starts, and its
outcome is written fenced by that lease. A request whose earlier outcome is unknown (a timeout, a
dropped connection, a 5xx, a crash mid-call) is looked up by its externalId before any new create,
and a live batch found there is adopted: that is what keeps one batch per request over an API that
creates a new batch on every POST.

AEP's catalog lists a new batch only some time after it was made, so one look-up that finds nothing
proves nothing. An ambiguous outcome therefore opens a settle window (ORCH_AEP__CATALOG_SETTLE, kept
in the store with the request): inside it the request is only looked up, again and again, and a new
create is made only once a look-up after the window still finds nothing. A request created after an
ambiguous history is looked up once more after the window (reconciliation), and any extra batch a
lost answer made is aborted, so AEP holds exactly one live batch per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import datetime, timedelta

import structlog

from orchestrator import logs
from orchestrator.aep.api import Batch, BatchApi
from orchestrator.aep.errors import AepError, AuthError, CallNotSent
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.observe import NULL, Observer
from orchestrator.owners import died_here
from orchestrator.pipeline.leases import LeaseKeeper
from orchestrator.pipeline.reconcile import Reconciler
from orchestrator.pipeline.retry import RetryPolicy, full_jitter
from orchestrator.pipeline.stats import DispatchStats
from orchestrator.store.base import BatchStore, Claim
from orchestrator.store.outage import NotRecorded, StoreOutage, describe

log = logs.get("dispatcher")

# How often a busy dispatcher also asks the store for due reconciliations (seconds): an idle one
# learns of them from `next_due`, a busy one would otherwise only get to them once the work runs out.
RECONCILE_CHECK = 2.0
# Tasks a dispatcher holds in all, as a multiple of its claim window: those beyond the window wait
# only for their outcomes to be written (`Dispatcher._free`). Their batches exist; after a kill -9
# they are taken over, looked up and adopted like any other request whose outcome was not recorded.
RECORDING_ROOM = 3
# Look-ups a request with spent attempts may still fail before it is failed for good.
FINAL_LOOKUP_TRIES = 5


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
        catalog_settle: float = 0.0,
        poll_interval: float = 0.5,
        wake: asyncio.Event | None = None,
        observer: Observer = NULL,
    ) -> None:
        self._store = store
        self._observer = observer
        self._api = api
        self._policy = policy
        self._clock = clock
        self._owner = owner
        self._concurrency = concurrency
        self._slot_freed = asyncio.Event()
        self._lease_seconds = lease_seconds
        self._settle = timedelta(seconds=catalog_settle)
        self._default_format = default_format
        self._poll_interval = poll_interval
        self._wake = wake or asyncio.Event()
        # The calls in flight and the claims they hold, whose leases it renews (pipeline/leases.py).
        self._leases: LeaseKeeper[Claim] = LeaseKeeper(
            "dispatcher", clock, lease_seconds, store.renew, _request_id, observer
        )
        self._tasks = self._leases.tasks
        # Tasks whose create call has answered and which only wait for its outcome to be written.
        # They leave the claim window (`_free`): an outcome waits for a commit of the outcome
        # writer, and on PostgreSQL a third to a half of a window of 64 sat there, so fewer
        # requests were ready to go when a call slot freed. Kept by the claim's identity (the task
        # holds its claim, and the claim is at hand where the running task would have to be asked
        # for).
        self._recording: set[int] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._credentials_problem: str | None = None
        self._waiting_for_credentials = False
        self._busy = True  # whether the last claim found work (see `_next_claims`)
        self._reconcile_check_at = clock.now()
        self._outage = StoreOutage(clock, "dispatcher")
        self.stats = DispatchStats()
        self._reconciler = Reconciler(store, api, policy, clock, self.stats, observer)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def credentials_problem(self) -> str | None:
        return self._credentials_problem

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop` is set; then return, leaving calls in flight to `drain`.

        Every free call slot is filled from one claim (one store transaction for many requests):
        a transaction per request would cap the rate at what the disk commits per second. The
        lease renewer runs beside the loop; should it ever end, this raises its error, so the
        service stops rather than run on with leases nobody renews."""
        self._renewer = self._renewer or asyncio.create_task(self._renew_leases(), name="lease-renewer")
        try:
            await self._take_back_leases_of_the_dead()
        except Exception as exc:  # noqa: BLE001 - the store is unavailable: those leases run out anyway
            await self._outage.wait(exc, stop)
        # Refill in chunks: a claim per finished request would cost a store transaction each.
        refill_at = max(1, self._concurrency // 4)
        while not stop.is_set():
            self._check_renewer()
            free = self._free()
            if free < refill_at:
                # Woken by a finished call, or by `stop` even while every call hangs to its timeout.
                self._slot_freed.clear()
                await sleep_until_set(self._clock, self._poll_interval, stop, self._slot_freed)
                continue
            now = self._clock.now()
            for claim in await self._next_claims(stop, free):
                task = asyncio.create_task(self._handle(claim))
                self._leases.hold(task, claim, now)
                task.add_done_callback(self._finished)

    async def _take_back_leases_of_the_dead(self) -> None:
        """A restart after kill -9 on the same host: the dead process's leases end now rather than
        when they run out. Its requests are then taken over (looked up first, as any take-over)."""
        dead = [owner for owner in await self._store.lease_owners() if died_here(owner)]
        if dead:
            ended = await self._store.expire_leases(dead, self._clock.now())
            if ended:
                self._wake.set()  # the claim loop may be asleep until those leases would have ended
                log.warning("dispatcher.dead_leases_taken_back", owners=len(dead), requests=ended)

    def _check_renewer(self) -> None:
        renewer = self._renewer
        if renewer is not None and renewer.done():
            self._renewer = None
            error = None if renewer.cancelled() else renewer.exception()
            raise RuntimeError("the lease renewer stopped") from error

    def _free(self) -> int:
        """Room in the claim window: `concurrency` requests before or in their call, and at most
        RECORDING_ROOM times that in all (the outcomes waiting for the store are bounded too)."""
        calling = len(self._tasks) - len(self._recording)
        return min(self._concurrency - calling, self._concurrency * RECORDING_ROOM - len(self._tasks))

    def _called(self, claim: Claim) -> None:
        """`claim`'s call answered: its task leaves the claim window (`_recording`)."""
        self._recording.add(id(claim))
        self._slot_freed.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        claim = self._tasks.get(task)
        if claim is not None:
            self._recording.discard(id(claim))
        self._leases.drop(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatcher.task_crashed", exc_info=task.exception())

    async def _renew_leases(self) -> None:
        """Keep the leases of requests in flight alive (`LeaseKeeper`: a call can wait in the limiter
        through several throttling pauses; were its lease to run out meanwhile, another dispatcher
        could claim the request and both would create a batch), and at each beat take back the
        leases of another replica on this host killed with -9, rather than wait for them to run out."""
        interval = self._lease_seconds / 3
        while True:
            await self._clock.sleep(interval)
            try:
                await self._take_back_leases_of_the_dead()
            except Exception as exc:  # noqa: BLE001 - a store error: tried again at the next beat
                log.warning("dispatcher.dead_leases_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await self._leases.beat(interval)

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
        """Up to `limit` due requests, waiting for some to become due; [] once `stop` is set.

        A store error (the database restarting, a dropped connection) does not end the service:
        the loop waits for the store, trying again with a growing pause (`StoreOutage`). The calls
        in flight meanwhile go on; their outcomes are written if the store is back by then, and
        otherwise their leases run out and the requests are looked up before any new create."""
        while not stop.is_set():
            if not await self._credentials_ok():
                await sleep_until_set(self._clock, min(self._poll_interval * 4, 2.0), stop)
                continue
            now = self._clock.now()
            self._wake.clear()
            try:
                claims, wait = await self._poll(limit, now)
            except Exception as exc:  # noqa: BLE001 - the store is unavailable: wait for it
                await self._outage.wait(exc, stop)
                continue
            self._outage.answered()
            if claims:
                return claims
            if wait > 0:
                await sleep_until_set(self._clock, wait, stop, self._wake)
        return []

    async def _poll(self, limit: int, now: datetime) -> tuple[list[Claim], float]:
        """Claims, or how long to wait before the next poll (0: at once)."""
        if self._busy:
            # Work was there last time: claim straight away.
            claims = await self._claim(limit, now)
            if claims:
                return claims, 0.0
            self._busy = False
            due = await self._store.next_due()
        else:
            # Idle: a read first, so that waiting costs a cheap query per poll rather than a
            # write transaction (a claim takes SQLite's write lock, PostgreSQL's row locks).
            due = await self._store.next_due()
            if due is not None and due <= now:
                self._busy = True
                self._reconcile_check_at = now
                return [], 0.0
        wait = self._poll_interval
        if due is not None and due > now:
            wait = min(wait, (due - now).total_seconds())
        return [], wait

    async def _claim(self, limit: int, now: datetime) -> list[Claim]:
        claims = await self._store.claim(self._owner, limit, self._lease_seconds, now)
        room = limit - len(claims)
        if room > 0 and now >= self._reconcile_check_at:
            more = await self._store.claim_reconciliations(self._owner, room, self._lease_seconds, now)
            if len(more) < room:
                self._reconcile_check_at = now + timedelta(seconds=RECONCILE_CHECK)
            claims += more
        return claims

    async def _credentials_ok(self) -> bool:
        """No request is claimed while there is no token: a credential problem fails nothing."""
        try:
            await self._api.ensure_token()
        except AuthError as exc:
            self._credentials_refused(exc)
            return False
        self._credentials_problem = None
        return True

    def _credentials_refused(self, exc: AuthError) -> None:
        # Logged once per outage: a fixed token is probed now and then and refused again, which
        # is not a recovery; `credentials_restored` waits for a call that worked.
        if not self._waiting_for_credentials:
            log.error("dispatcher.waiting_for_credentials", error=exc.summary())
            self._waiting_for_credentials = True
            self._observer.credentials(refused=True)
        self._credentials_problem = exc.summary()

    def _credentials_worked(self) -> None:
        if self._waiting_for_credentials:
            log.info("dispatcher.credentials_restored")
            self._waiting_for_credentials = False
            self._observer.credentials(refused=False)

    async def _handle(self, claim: Claim) -> None:
        """Runs as a task of its own (`run`): the keys bound here end with the task's context.
        (`bound_contextvars` would also copy and scan the whole context to restore it, twice per
        request, for a context no one uses afterwards.)"""
        record = claim.record
        structlog.contextvars.bind_contextvars(
            request_id=record.request_id, dataset_id=record.dataset_id, attempt=claim.attempt
        )
        if record.state.final:
            # Only a reconciliation claims a request that has its batch (created, or on in
            # the upload stage): one more look-up, never a create.
            await self._reconciler.reconcile(claim)
            return
        settle_until = record.settle_until
        if claim.taken_over:
            # The last holder died or stalled, perhaps mid-create: its batch may surface later.
            settle_until = _later(settle_until, self._clock.now() + self._settle)
            log.warning("dispatcher.lease_taken_over")
        creating = False
        try:
            looking = claim.needs_lookup or record.lookup_only
            if looking and await self._look_up(claim, settle_until):
                return
            creating = True
            batch = await self._api.create_batch(record.request(), self._default_format)
            self._called(claim)
            await self._created(claim, [batch], adopted=False)
        except asyncio.CancelledError:
            # Shutdown ran out of grace mid-call: if the create was sent, it may have happened.
            await asyncio.shield(self._interrupted(claim, creating, settle_until))
            raise
        except CallNotSent:
            # Stopping: the call gate closed before this call's turn, so nothing was sent.
            await asyncio.shield(self._interrupted(claim, False, settle_until))
        except NotRecorded:
            pass  # logged; the call's outcome is the store's to learn again (see `_record`)
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
            await asyncio.shield(self._failed(claim, exc, creating, settle_until))

    async def _record(self, write: Awaitable[bool]) -> bool:
        """Write an outcome (the store's answer: False when the lease was lost). A store error is
        not the call's failure, and is not retried here: it is logged and raised as `NotRecorded`.
        The lease then runs out, the request is taken over (here or by another replica) and looked
        up before any new create, so a batch this call made is adopted, not made twice."""
        try:
            return await write
        except Exception as error:
            log.error("dispatcher.outcome_not_recorded", error=describe(error))
            raise NotRecorded from error

    async def _look_up(self, claim: Claim, settle_until: datetime | None) -> bool:
        """Look the request's batch up before creating; True when that settled the attempt (a batch
        adopted, a look-up to repeat, or the request failed), False to go on and create."""
        record = claim.record
        found = await self._api.find_batches(record.request().external_id)
        live = [batch for batch in found if batch.live]
        if live:
            await self._created(claim, live, adopted=True)
            return True
        if found:
            log.warning("batch.lookup_found_dead", statuses=sorted({batch.status for batch in found}))
        now = self._clock.now()
        if settle_until is not None and now < settle_until:
            # Not listed yet proves nothing inside the window: look again, spacing look-ups out as
            # the window ages (1 s, 2 s, 4 s, ... and once more at its end).
            elapsed = (now - (settle_until - self._settle)).total_seconds()
            wait = min(max(1.0, elapsed), (settle_until - now).total_seconds())
            again = now + timedelta(seconds=wait)
            await self._record(self._store.release(claim, now, until=again, settle_until=settle_until))
            log.info("batch.lookup_empty", settling=True, next_lookup_in=round(wait, 3))
            return True
        if record.lookup_only:
            # Attempts spent and the window passed with no batch listed: none was made.
            error = record.last_error or "gave up: attempts spent and no batch found"
            await self._fail(claim, error, now, count_attempt=False)
            return True
        log.info("batch.lookup_empty", settling=False)
        return False

    async def _created(self, claim: Claim, batches: list[Batch], *, adopted: bool) -> None:
        batch = batches[0]  # oldest first: every replica adopts the same one
        now = self._clock.now()
        # A request that was ever unsure may have a second batch the catalog did not list yet.
        reconcile_at = now + self._settle if claim.needs_lookup else None
        self._policy.succeeded(claim.attempt)
        self._credentials_worked()
        # Not shielded here: the store's write, once asked for, happens even if this is cancelled.
        kept = await self._record(
            self._store.mark_created(
                claim,
                batch.id,
                batch.status,
                now,
                adopted=adopted,
                reconcile_at=reconcile_at,
                count_attempt=not claim.record.lookup_only,
            )
        )
        if not kept:
            log.warning("dispatcher.lease_lost", batch_id=batch.id)
            return
        self._observer.request_finished("adopted" if adopted else "created")
        if adopted:
            self.stats.adopted += 1
            log.info("batch.adopted", batch_id=batch.id, batch_status=batch.status, found=len(batches))
        else:
            self.stats.created += 1
            log.info("batch.created", batch_id=batch.id, batch_status=batch.status)

    async def _failed(
        self, claim: Claim, exc: Exception, creating: bool, settle_until: datetime | None
    ) -> None:
        try:
            await self._record_failure(claim, exc, creating, settle_until)
        except NotRecorded:
            pass  # logged
        except Exception as error:  # noqa: BLE001 - the lease then expires and a take-over looks up
            log.error("dispatcher.outcome_not_recorded", error=describe(error))

    async def _record_failure(
        self, claim: Claim, exc: Exception, creating: bool, settle_until: datetime | None
    ) -> None:
        now = self._clock.now()
        if not isinstance(exc, AepError):
            log.error("dispatcher.unexpected_error", exc_info=exc)
        decision = self._policy.decide(exc, claim.attempt, now, creating=creating)
        error = exc.summary() if isinstance(exc, AepError) else f"{type(exc).__name__}: {exc}"[:500]
        ambiguous = decision.ambiguous or claim.needs_lookup or claim.record.lookup_only
        if decision.ambiguous:
            # This call may have made a batch just now: the catalog may take the window to list it.
            settle_until = _later(settle_until, now + self._settle)
        if decision.kind == "release":
            if isinstance(exc, AuthError):
                self._credentials_refused(exc)
            await self._store.release(claim, now, settle_until=settle_until)
            self.stats.released += 1
            self._wake.set()  # due again at once: the claim loop checks the credentials first
            log.warning("batch.released", reason=decision.reason)
        elif decision.kind == "fail" and ambiguous:
            await self._final_lookup(claim, decision.reason, now, settle_until)
        elif decision.kind == "fail":
            await self._fail(claim, decision.reason, now)
        else:
            self.stats.retries += 1
            next_at = now + timedelta(seconds=decision.delay)
            if await self._store.mark_retry(
                claim, error, next_at, ambiguous=ambiguous, now=now, settle_until=settle_until
            ):
                self._wake.set()  # the claim loop may be sleeping past this retry's due time
                self._observer.retry_scheduled(decision.reason.split(":", 1)[0])
                log.warning(
                    "retry.scheduled",
                    error=error,
                    reason=decision.reason.split(":", 1)[0],
                    delay=round(decision.delay, 3),
                    ambiguous=ambiguous,
                )

    async def _fail(self, claim: Claim, error: str, now: datetime, *, count_attempt: bool = True) -> None:
        # Counted only when written: a lost lease means another dispatcher owns the outcome.
        if await self._record(self._store.mark_failed(claim, error, now, count_attempt=count_attempt)):
            self.stats.failed += 1
            self._observer.request_finished("failed")
            log.error("batch.failed", error=error)

    async def _final_lookup(
        self, claim: Claim, reason: str, now: datetime, settle_until: datetime | None
    ) -> None:
        """The request will not be created again, but its batch may exist: rather than failing it
        now (and orphaning that batch), it is looked up until the settle window has passed, and
        only then adopted or failed."""
        if claim.record.lookup_only:
            # A final look-up itself failed: try a few more times, then give up.
            tries = claim.attempt - self._policy.settings.max_attempts
            if tries >= FINAL_LOOKUP_TRIES:
                error = f"{claim.record.last_error or 'attempts spent'}; final look-ups failed: {reason}"
                await self._fail(claim, error[:500], now)
                return
            reason = claim.record.last_error or reason
        settings = self._policy.settings
        delay = max(
            self._policy.lookup_delay,
            full_jitter(1, settings.base_delay, settings.max_delay, self._policy.rng),
        )
        next_at = now + timedelta(seconds=delay)
        if await self._store.mark_retry(
            claim, reason, next_at, ambiguous=True, now=now, settle_until=settle_until, lookup_only=True
        ):
            self._wake.set()
            log.warning("batch.final_lookup_scheduled", error=reason, delay=round(delay, 3))

    async def _interrupted(self, claim: Claim, creating: bool, settle_until: datetime | None) -> None:
        """Shutdown stopped the attempt: a create that may have been sent is looked up next time,
        anything else is given back as it was."""
        now = self._clock.now()
        try:
            if creating:
                await self._store.mark_retry(
                    claim,
                    "interrupted during the call",
                    now,
                    ambiguous=True,
                    now=now,
                    settle_until=_later(settle_until, now + self._settle),
                    lookup_only=claim.record.lookup_only,
                )
            else:
                await self._store.release(claim, now, settle_until=settle_until)
        except Exception as error:  # noqa: BLE001 - the lease then expires and a take-over looks up
            log.error("dispatcher.outcome_not_recorded", error=describe(error))
        log.warning("batch.interrupted", call_sent=creating)


def _later(first: datetime | None, second: datetime) -> datetime:
    return second if first is None or second > first else first


def _request_id(claim: Claim) -> str:
    return claim.record.request_id
