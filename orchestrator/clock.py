"""Time as a dependency: wherever time decides behaviour (backoff, rate, leases, token expiry) it
comes from a `Clock`, so tests move it by hand instead of sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (what records and HTTP dates use)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (what intervals use)."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when told to. `sleep` parks the caller until `advance` passes its
    deadline, so a test can step through minutes of backoff in microseconds."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
        self._elapsed = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._elapsed + seconds, next(self._order), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._elapsed += seconds
        while self._sleepers and self._sleepers[0][0] <= self._elapsed:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, future in self._sleepers if not future.done())


async def sleep_until_set(clock: Clock, seconds: float, *events: asyncio.Event) -> None:
    """Sleep `seconds` on `clock`, or less if any of `events` is set first."""
    if any(event.is_set() for event in events):
        return
    tasks: list[asyncio.Future[object]] = [asyncio.ensure_future(clock.sleep(seconds))]
    tasks += [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
