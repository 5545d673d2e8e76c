"""Reconciliation: one more look-up for a created request whose history was ambiguous, once the
catalog's settle window has passed. Every batch a lost answer made is listed by then; extras still
`loading` are aborted, so AEP holds exactly one live batch per request. The recorded batch is never
touched."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from orchestrator import logs
from orchestrator.aep.api import BatchApi
from orchestrator.aep.errors import AepError, CallNotSent
from orchestrator.clock import Clock
from orchestrator.observe import NULL, Observer
from orchestrator.pipeline.retry import RetryPolicy, full_jitter
from orchestrator.pipeline.stats import DispatchStats
from orchestrator.store.base import BatchStore, Claim

log = logs.get("dispatcher")

# A batch that can still be aborted: only one still being loaded (reference §3.4).
ABORTABLE = "loading"


class CatalogBehind(Exception):
    """A reconciliation look-up that does not list the request's own batch: too early to judge."""


class Reconciler:
    def __init__(
        self,
        store: BatchStore,
        api: BatchApi,
        policy: RetryPolicy,
        clock: Clock,
        stats: DispatchStats,
        observer: Observer = NULL,
    ) -> None:
        self._observer = observer
        self._store = store
        self._api = api
        self._policy = policy
        self._clock = clock
        self._stats = stats

    async def reconcile(self, claim: Claim) -> None:
        """One more look-up for a created request whose history was ambiguous, once the window has
        passed: every batch a lost answer made is listed by now. Extras still `loading` are
        aborted; the recorded batch is never touched."""
        record = claim.record
        try:
            found = await self._api.find_batches(record.request().external_id)
            if record.batch_id not in {batch.id for batch in found}:
                # The catalog does not list even the recorded batch yet: it lags more than the
                # window, and extras made about the same time may not be listed either. Later.
                raise CatalogBehind(f"the catalog does not list batch {record.batch_id} yet")
            aborted = []
            for batch in found:
                if batch.id == record.batch_id or not batch.live:
                    continue
                if batch.status.lower() != ABORTABLE:
                    log.error(
                        "batch.duplicate_kept",
                        batch_id=record.batch_id,
                        duplicate_id=batch.id,
                        duplicate_status=batch.status,
                    )
                    continue
                await self._api.abort_batch(batch.id)
                aborted.append(batch.id)
                self._stats.duplicates_aborted += 1
                self._observer.duplicate_aborted()
                log.warning("batch.duplicate_aborted", batch_id=record.batch_id, duplicate_id=batch.id)
            detail = f"reconciled: aborted duplicate batches {', '.join(aborted)}" if aborted else None
            await self._store.finish_reconciliation(claim, self._clock.now(), detail=detail)
        except asyncio.CancelledError:
            await asyncio.shield(self._reconcile_later(claim, None))
            raise
        except CallNotSent:  # stopping: the call gate closed before this look-up's or abort's turn
            await asyncio.shield(self._reconcile_later(claim, None))
        except Exception as exc:  # noqa: BLE001 - retried later, and given up after a few tries
            await asyncio.shield(self._reconcile_later(claim, exc))

    async def _reconcile_later(self, claim: Claim, exc: Exception | None) -> None:
        now = self._clock.now()
        try:
            if exc is None:  # interrupted: due again as it was
                await self._store.finish_reconciliation(claim, now, retry_at=now)
                return
            error = exc.summary() if isinstance(exc, AepError) else f"{type(exc).__name__}: {exc}"[:300]
            tries = claim.record.reconcile_tries + 1
            if tries >= self._policy.settings.max_attempts:
                log.error("batch.reconcile_failed", error=error, tries=tries)
                await self._store.finish_reconciliation(
                    claim, now, detail=f"reconciliation gave up after {tries} tries: {error}"
                )
                return
            settings = self._policy.settings
            delay = max(1.0, full_jitter(tries, settings.base_delay, settings.max_delay, self._policy.rng))
            log.warning("batch.reconcile_retry", error=error, delay=round(delay, 3))
            await self._store.finish_reconciliation(
                claim, now, retry_at=now + timedelta(seconds=delay), failed=True
            )
        except Exception as error:  # noqa: BLE001 - the lease then expires and it is claimed again
            log.error("dispatcher.outcome_not_recorded", error=f"{type(error).__name__}: {error}"[:300])
