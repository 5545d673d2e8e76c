"""The upload stage: after `created`, upload a request's files, complete its batch, and follow AEP's
status to its final word.

It claims requests from the store as the dispatcher does (its own claims, leases, attempts and
fencing: `store/lifecycle.py`), and its calls share the dispatcher's limiter, retry table and token.
Order is what keeps a batch whole: COMPLETE is sent only once the store records every file as done,
and once AEP accepted COMPLETE the request is `processing` and no file is ever sent again. A crash
anywhere in between resumes from the store: files done stay done, a large file resumes where AEP
says it stands, and COMPLETE is safe to send again (reference §3.1).

Requests without files are left alone unless ORCH_TRACK__WITHOUT_FILES (follow the batch once someone
else completes it) or ORCH_TRACK__ABORT_LOADING_AFTER (abort a batch nobody completed) asks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from orchestrator import logs
from orchestrator.aep.api import BatchState, UploadApi
from orchestrator.aep.client import error_text
from orchestrator.aep.errors import AepError, AuthError, CallNotSent
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.files import FileSources, SourceError
from orchestrator.observe import NULL, Observer
from orchestrator.pipeline.leases import LeaseKeeper
from orchestrator.pipeline.retry import RetryPolicy
from orchestrator.pipeline.transfer import FileRestart, LeaseLost, Progress, Transfer, batch_of, written
from orchestrator.settings import TrackSettings, UploadSettings
from orchestrator.store.base import Stage, StageStore, State, Step
from orchestrator.store.outage import StoreOutage, describe

log = logs.get("stage")


@dataclass
class StageStats:
    completed: int = 0  # batches completed
    succeeded: int = 0
    failed: int = 0
    retries: int = 0


class UploadStage:
    def __init__(
        self,
        store: StageStore,
        api: UploadApi,
        sources: FileSources,
        policy: RetryPolicy,
        clock: Clock,
        *,
        owner: str,
        lease_seconds: float,
        upload: UploadSettings,
        track: TrackSettings,
        poll_interval: float = 0.5,
        observer: Observer = NULL,
    ) -> None:
        self._store = store
        self._api = api
        self._policy = policy
        self._clock = clock
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._concurrency = upload.concurrency
        self._track = track
        self._poll_interval = poll_interval
        self._observer = observer
        self._transfer = Transfer(
            store,
            api,
            sources,
            clock,
            large_file_threshold=upload.large_file_threshold,
            part_size=upload.part_size,
        )
        self._leases: LeaseKeeper[Stage] = LeaseKeeper(
            "stage", clock, lease_seconds, store.renew_stages, _request_id, observer
        )
        self._slot_freed = asyncio.Event()
        self._outage = StoreOutage(clock, "stage")
        self._renewer: asyncio.Task[None] | None = None
        self.stats = StageStats()

    @property
    def in_flight(self) -> int:
        return len(self._leases.tasks)

    @property
    def transferred(self) -> tuple[int, int]:
        """Files and bytes uploaded so far."""
        return self._transfer.stats.files, self._transfer.stats.bytes

    async def run(self, stop: asyncio.Event) -> None:
        self._renewer = self._renewer or asyncio.create_task(self._leases.run(), name="stage-leases")
        while not stop.is_set():
            if self._renewer.done():
                raise RuntimeError("the upload stage's lease renewer stopped")
            free = self._concurrency - self.in_flight
            if free <= 0:
                self._slot_freed.clear()
                await sleep_until_set(self._clock, self._poll_interval, stop, self._slot_freed)
                continue
            stages = await self._next(stop, free)
            now = self._clock.now()
            for stage in stages:
                task = asyncio.create_task(self._handle(stage), name="stage")
                self._leases.hold(task, stage, now)
                task.add_done_callback(self._finished)

    async def drain(self, grace: float) -> None:
        """Let steps in flight finish within `grace` seconds; cancel the rest (their requests are
        due again at once, for whoever runs next)."""
        try:
            tasks = set(self._leases.tasks)
            if tasks:
                log.info("stage.draining", in_flight=len(tasks), grace=grace)
                _, pending = await asyncio.wait(tasks, timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                    log.warning("stage.drain_cancelled", cancelled=len(pending))
        finally:
            if self._renewer is not None:
                self._renewer.cancel()
                await asyncio.gather(self._renewer, return_exceptions=True)
                self._renewer = None

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._leases.drop(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("stage.task_crashed", exc_info=task.exception())

    async def _next(self, stop: asyncio.Event, limit: int) -> list[Stage]:
        """Up to `limit` due steps, waiting for some; [] once `stop` is set."""
        while not stop.is_set():
            try:
                await self._api.ensure_token()
            except AuthError:
                # The dispatcher reports the credentials; nothing is claimed without a token.
                await sleep_until_set(self._clock, 2.0, stop)
                continue
            now = self._clock.now()
            # A step finishing may have scheduled a retry sooner than the wait below: it wakes us.
            self._slot_freed.clear()
            try:
                stages = await self._store.claim_stages(self._owner, limit, self._lease_seconds, now)
                due = None if stages else await self._store.next_stage_due()
            except Exception as exc:  # noqa: BLE001 - the store is unavailable: wait for it
                await self._outage.wait(exc, stop)
                continue
            self._outage.answered()
            if stages:
                return stages
            wait = self._poll_interval
            if due is not None:
                # From the time now, not the claim's: the queries took some of it.
                wait = max(0.0, min(wait, (due - self._clock.now()).total_seconds()))
            await sleep_until_set(self._clock, wait, stop, self._slot_freed)
        return []

    # --- one step of one request ----------------------------------------------------------------

    async def _handle(self, stage: Stage) -> None:
        record = stage.record
        with structlog.contextvars.bound_contextvars(
            request_id=record.request_id,
            dataset_id=record.dataset_id,
            batch_id=record.batch_id,
            step=stage.step.value,
            attempt=stage.attempts + 1,
        ):
            if stage.taken_over:
                log.warning("stage.lease_taken_over")
            progress = Progress()
            try:
                if stage.step is Step.UPLOAD:
                    await self._upload(stage, progress)
                else:
                    await self._poll(stage)
            except asyncio.CancelledError:
                # Shutdown or a lost lease: due again at once for whoever runs next (files done
                # stay done; an upload cut short is sent again, which PUT and parts allow).
                await asyncio.shield(self._put_back(stage))
                raise
            except CallNotSent:  # stopping: the call gate closed before this step's next call
                await asyncio.shield(self._put_back(stage))
            except LeaseLost:
                log.warning("stage.lease_lost")
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                # Failures in a row: counted from this one when the step got somewhere first (a
                # file AEP would not complete is no progress, whatever its parts did).
                restarted = isinstance(exc, FileRestart)
                attempt = 1 if progress.made and not restarted else stage.attempts + 1
                await asyncio.shield(self._failed(stage, exc, attempt))

    async def _upload(self, stage: Stage, progress: Progress) -> None:
        await self._transfer.send_all(stage, progress)
        batch_id = batch_of(stage)
        await self._api.complete_batch(batch_id)
        now = self._clock.now()
        await written(self._store.batch_completed(stage, now, now + self._poll_delay(0)))
        self.stats.completed += 1
        log.info("batch.completed", files=len(stage.files))

    async def _poll(self, stage: Stage) -> None:
        record = stage.record
        state = await self._api.batch_state(batch_of(stage))
        now = self._clock.now()
        if state.final:
            await self._final(stage, state, now)
            return
        status = state.status.lower()
        watched_only = not record.files and not self._track.without_files
        if not record.files and status == "loading" and self._overdue(stage, now):
            await self._abort_loading(stage, now)
            return
        if watched_only and status != "loading":
            # Someone completed it: only ABORT_LOADING_AFTER brought it here, so let it go.
            await written(
                self._store.stage_finished(stage, now, to_state=None, batch_status=state.status, error=None)
            )
            log.info("stage.unwatched", batch_status=state.status)
            return
        next_at = self._next_poll(stage, now, watched_only)
        processing = not record.files and status != "loading"
        await written(self._store.stage_polled(stage, state.status, now, next_at, processing=processing))
        log.debug("stage.polled", batch_status=state.status, next_poll_in=(next_at - now).total_seconds())

    async def _final(self, stage: Stage, state: BatchState, now: datetime) -> None:
        to_state = State.SUCCEEDED if state.succeeded else State.FAILED
        error = (
            None if state.succeeded else (error_text(state.errors) or f"AEP ended the batch {state.status}")
        )
        await written(
            self._store.stage_finished(
                stage,
                now,
                to_state=to_state,
                batch_status=state.status,
                error=error,
                errors=state.errors,
                record_count=state.record_count,
                failed_record_count=state.failed_record_count,
            )
        )
        if state.succeeded:
            self.stats.succeeded += 1
            self._observer.request_finished("succeeded")
            log.info("batch.succeeded", batch_status=state.status, records=state.record_count)
        else:
            self.stats.failed += 1
            self._observer.request_finished("batch_failed")
            log.error("batch.failed", batch_status=state.status, error=error, errors=len(state.errors))

    def _overdue(self, stage: Stage, now: datetime) -> bool:
        after = self._track.abort_loading_after
        return after is not None and now - stage.started_at >= timedelta(seconds=after)

    async def _abort_loading(self, stage: Stage, now: datetime) -> None:
        await self._api.abort_batch(batch_of(stage))
        after = self._track.abort_loading_after
        error = f"aborted: still loading {after:g} s after it was created (ORCH_TRACK__ABORT_LOADING_AFTER)"
        await written(
            self._store.stage_finished(stage, now, to_state=State.FAILED, batch_status="aborted", error=error)
        )
        self.stats.failed += 1
        log.warning("batch.abandoned_aborted", error=error)

    def _next_poll(self, stage: Stage, now: datetime, watched_only: bool) -> datetime:
        after = self._track.abort_loading_after
        if watched_only and after is not None:
            # Only the abort watch: one look when the batch would be overdue.
            return max(now, stage.started_at + timedelta(seconds=after))
        next_at = now + self._poll_delay(stage.polls + 1)
        if after is not None and not stage.record.files:
            next_at = min(next_at, max(now, stage.started_at + timedelta(seconds=after)))
        return next_at

    def _poll_delay(self, polls: int) -> timedelta:
        """POLL_MIN, doubling with every poll up to POLL_MAX."""
        track = self._track
        return timedelta(seconds=min(track.poll_max, track.poll_min * 2 ** min(polls, 30)))

    # --- failures ---------------------------------------------------------------------------------

    async def _failed(self, stage: Stage, exc: Exception, attempt: int) -> None:
        try:
            await self._record_failure(stage, exc, attempt)
        except LeaseLost:
            log.warning("stage.lease_lost")
        except Exception as error:  # noqa: BLE001 - the lease then runs out and the step is taken over
            log.error("stage.outcome_not_recorded", error=describe(error))

    async def _record_failure(self, stage: Stage, exc: Exception, attempt: int) -> None:
        now = self._clock.now()
        if isinstance(exc, SourceError):
            await self._give_up(stage, f"file: {exc}", now)
            return
        if not isinstance(exc, AepError | FileRestart):
            log.error("stage.unexpected_error", exc_info=exc)
        # A file AEP would not complete is retried like any other failure, up to the same bound.
        decision = self._policy.decide(exc, attempt, now, creating=False)
        error = exc.summary() if isinstance(exc, AepError) else f"{type(exc).__name__}: {exc}"[:500]
        if decision.kind == "fail":
            await self._give_up(stage, decision.reason, now)
            return
        counted = decision.kind != "release"
        next_at = now + timedelta(seconds=decision.delay)
        retry = self._store.stage_retry(stage, error, next_at, now, attempts=attempt if counted else None)
        await written(retry)
        if counted:
            self.stats.retries += 1
            self._observer.retry_scheduled(decision.reason.split(":", 1)[0])
            log.warning("stage.retry_scheduled", error=error, delay=round(decision.delay, 3))

    async def _give_up(self, stage: Stage, reason: str, now: datetime) -> None:
        """The step failed for good. A batch whose upload failed is aborted, so it does not linger in
        `loading` until AEP abandons it; a batch being polled is left as it is."""
        status = None
        if stage.step is Step.UPLOAD:
            try:
                await self._api.abort_batch(batch_of(stage))
                status = "aborted"
            except Exception as exc:  # noqa: BLE001 - best effort: AEP abandons it in time anyway
                log.warning("stage.abort_failed", error=describe(exc))
        await written(
            self._store.stage_finished(stage, now, to_state=State.FAILED, batch_status=status, error=reason)
        )
        self.stats.failed += 1
        self._observer.request_finished("batch_failed")
        log.error("batch.failed", error=reason, batch_status=status)

    async def _put_back(self, stage: Stage) -> None:
        now = self._clock.now()
        try:
            await self._store.stage_retry(stage, None, now, now, attempts=None)
        except Exception as error:  # noqa: BLE001 - the lease then runs out and the step is taken over
            log.error("stage.outcome_not_recorded", error=describe(error))
        log.warning("stage.interrupted")


def _request_id(stage: Stage) -> str:
    return stage.record.request_id
