"""A dispatcher on a manual clock, over a real SQLite store and a scripted AEP: the harness of the
dispatcher tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from orchestrator.aep.errors import AepHttpError
from orchestrator.clock import ManualClock
from orchestrator.messages import BatchRequest, external_id_for
from orchestrator.pipeline.dispatcher import Dispatcher
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.settings import RetrySettings
from orchestrator.store.base import BatchRecord, Claim
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import FakeApi, until

DS = "5c8c3c555033b814b69f947f"
EXT = external_id_for("r1")
POLL_INTERVAL = 0.5
SETTLE = 30.0  # the catalog's settle window the tests' dispatchers assume


def http(status: int, retry_after: str | None = None, detail: str = "boom") -> AepHttpError:
    return AepHttpError(
        f"HTTP {status}", endpoint="batches.create", status=status, detail=detail, retry_after=retry_after
    )


class Running:
    """A dispatcher running on a manual clock; stopped and drained on exit."""

    def __init__(
        self,
        store: SqlBatchStore,
        api: FakeApi,
        clock: ManualClock,
        *,
        max_attempts: int = 5,
        concurrency: int = 4,
        grace: float = 0.1,
        settle: float = SETTLE,
        lease: float = 60,
    ) -> None:
        self.store, self.api, self.clock, self.grace = store, api, clock, grace
        policy = RetryPolicy(
            RetrySettings(max_attempts=max_attempts, base_delay=0.5, max_delay=4),
            random.Random(0),
            RetryBudget(),
        )
        self.wake = asyncio.Event()
        self.dispatcher = Dispatcher(
            store,
            api,
            policy,
            clock,
            owner="test",
            concurrency=concurrency,
            lease_seconds=lease,
            default_format="json",
            catalog_settle=settle,
            poll_interval=POLL_INTERVAL,
            wake=self.wake,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.dispatcher.run(self.stop))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def shutdown(self, grace: float | None = None) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 1.0)
        await self.dispatcher.drain(self.grace if grace is None else grace)

    async def outcome(self, request_id: str = "r1", outcomes: int = 1) -> BatchRecord:
        """Wait until `outcomes` attempt outcomes are in the request's trail; return the record."""
        await until(lambda: self._trail_has(request_id, outcomes + 1))
        record = await self.store.get(request_id)
        assert record is not None
        return record

    async def _trail_has(self, request_id: str, length: int) -> bool:
        return len(await self.store.history(request_id)) >= length

    async def get(self, request_id: str = "r1") -> BatchRecord:
        record = await self.store.get(request_id)
        assert record is not None
        return record

    async def asleep(self) -> None:
        """Wait until the claim loop and the lease renewer both sleep on the (manual) clock, so that
        moving it next wakes them: a sleep begun after a move would wait for the one after."""
        await until(lambda: self.clock.sleepers >= 2)

    async def quiet(self) -> None:
        """Wait until the dispatcher has nothing in flight and sleeps on the (manual) clock, as does
        its lease renewer: whatever the last clock move made due has been done."""
        await until(lambda: self.dispatcher.in_flight == 0 and self.clock.sleepers >= 2)

    async def until_due(self, request_id: str = "r1", *, finish: bool = True) -> None:
        """Move the clock to the request's next attempt and (with `finish`) let the dispatcher act
        on it."""
        await self.quiet()
        record = await self.store.get(request_id)
        assert record is not None
        assert record.next_attempt_at is not None
        self.clock.advance(max(0.0, (record.next_attempt_at - self.clock.now()).total_seconds()) + 0.001)
        if finish:
            await self.quiet()

    async def until_final(self, request_id: str = "r1", limit: int = 100) -> BatchRecord:
        """Step the clock from one due time to the next until the request is final."""
        for _ in range(limit):
            record = await self.store.get(request_id)
            assert record is not None
            if record.state.final:
                return record
            await self.until_due(request_id)
        raise AssertionError(f"{request_id} did not finish in {limit} steps")

    async def step(self) -> None:
        """Move the clock to whatever is due next in the store (or a poll interval) and let the
        dispatcher act on it."""
        await self.quiet()
        due = await self.store.next_due()
        wait = POLL_INTERVAL if due is None else (due - self.clock.now()).total_seconds()
        self.clock.advance(max(0.0, wait) + 0.001)
        await self.quiet()


async def add(store: SqlBatchStore, clock: ManualClock, *request_ids: str, **fields: object) -> None:
    for request_id in request_ids:
        request = BatchRequest(request_id=request_id, dataset_id=DS, **fields)  # type: ignore[arg-type]
        await store.add(request, clock.now())


class CountingStore(SqlBatchStore):
    """The real store, counting lease renewals and failing the next `fail_renewals` of them."""

    def __init__(self, store: SqlBatchStore) -> None:
        self.__dict__.update(store.__dict__)
        self.renewals = 0
        self.fail_renewals = 0

    async def renew(self, claims: Sequence[Claim], lease_seconds: float, now: datetime) -> set[str]:
        self.renewals += 1
        if self.fail_renewals:
            self.fail_renewals -= 1
            raise OSError("disk I/O error")
        return await super().renew(claims, lease_seconds, now)


class GatedStore(SqlBatchStore):
    """The real store, whose `created` outcomes wait for `gate` (an outcome writer slow to commit)."""

    def __init__(self, store: SqlBatchStore) -> None:
        self.__dict__.update(store.__dict__)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def mark_created(self, claim: Claim, *args: Any, **kwargs: Any) -> bool:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().mark_created(claim, *args, **kwargs)
