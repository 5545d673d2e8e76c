"""Keeping the leases of work in flight alive, and giving up work whose lease is gone.

A call can take longer than a lease (a throttling pause, a large file); were the lease to run out
meanwhile, another worker could claim the same request and both would act on it. So the leases of
everything held are renewed every third of their length. A store error is logged and the renewal
tried at the next beat; a task whose lease would run out before then is abandoned (cancelled, its
outcome recorded as unknown if the store takes it) rather than left to race whoever claims its
request next; a task whose lease was lost (this process stalled past it) is cancelled the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from orchestrator import logs
from orchestrator.clock import Clock
from orchestrator.observe import NULL, Observer
from orchestrator.store.outage import describe

C = TypeVar("C")


class LeaseKeeper(Generic[C]):
    """The tasks a worker runs, each with the claim (`C`) it holds. `renew` extends the leases of
    the claims given and returns the request ids renewed; `request_id` names a claim's request."""

    def __init__(
        self,
        component: str,
        clock: Clock,
        lease_seconds: float,
        renew: Callable[[Sequence[C], float, datetime], Awaitable[set[str]]],
        request_id: Callable[[C], str],
        observer: Observer = NULL,
    ) -> None:
        self._log = logs.get(component)
        self._component = component
        self._clock = clock
        self._lease_seconds = lease_seconds
        self._renew = renew
        self._request_id = request_id
        self._observer = observer
        self.tasks: dict[asyncio.Task[None], C] = {}
        self._until: dict[asyncio.Task[None], datetime] = {}

    def hold(self, task: asyncio.Task[None], claim: C, now: datetime) -> None:
        self.tasks[task] = claim
        self._until[task] = now + timedelta(seconds=self._lease_seconds)

    def drop(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self._until.pop(task, None)

    async def run(self) -> None:
        """Renew until cancelled; never ends on a store error."""
        interval = self._lease_seconds / 3
        while True:
            await self._clock.sleep(interval)
            await self.beat(interval)

    async def beat(self, interval: float) -> None:
        held = dict(self.tasks)
        if not held:
            return
        now = self._clock.now()
        try:
            renewed = await self._renew(list(held.values()), self._lease_seconds, now)
        except Exception as exc:  # noqa: BLE001 - the renewer must outlive a store error
            self._log.error(f"{self._component}.lease_renewal_failed", error=describe(exc))
            self._abandon(held, now + timedelta(seconds=interval))
            return
        until = now + timedelta(seconds=self._lease_seconds)
        for task, claim in held.items():
            if self._request_id(claim) in renewed:
                if task in self._until:
                    self._until[task] = until
            elif not task.done():
                self._log.error(f"{self._component}.lease_lost", request_id=self._request_id(claim))
                self._observer.lease_lost()
                task.cancel()

    def _abandon(self, held: dict[asyncio.Task[None], C], next_try: datetime) -> None:
        for task, claim in held.items():
            expires = self._until.get(task)
            if expires is not None and expires <= next_try and not task.done():
                self._log.error(f"{self._component}.lease_abandoned", request_id=self._request_id(claim))
                self._observer.lease_lost()
                task.cancel()
