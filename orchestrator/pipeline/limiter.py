"""The call gate: every Platform API call passes through `Limiter.slot()`.

Three limits, taken in this order:
1. a concurrency slot (`asyncio.Semaphore`): calls in flight;
2. the shared pause: after a 429 (or a 503 with Retry-After) *everyone* waits, not just the caller
   that got it: the server's limit is shared, so the calls behind it would only collect 429s too;
3. the rate (`SlidingLog`: never more than N starts in any window of one period), whose N adapts:
   cut by 30 % on a throttle signal, recovered linearly on success (AIMD).

Every wait is on the injected clock, so the limiter is tested on a manual clock without waiting.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from orchestrator import logs
from orchestrator.clock import Clock, SystemClock
from orchestrator.observe import NULL, Observer
from orchestrator.pipeline.retry import parse_retry_after
from orchestrator.settings import LimitSettings

log = logs.get("limiter")


@dataclass(frozen=True)
class RateChange:
    old_rate: float
    new_rate: float


@dataclass(frozen=True)
class ThrottleOutcome:
    """What one throttle signal changed: the rate (None when it was part of a burst already counted)
    and how many seconds the shared pause was extended by (0 when an earlier pause outlasts it)."""

    decreased: RateChange | None
    paused: float


# What a throttle signal multiplies the rate by, and the share of the configured rate regained per
# period of unpaused time after a decrease.
BETA = 0.7
RECOVERY = 0.2


class RateController:
    """Adaptive rate, in calls per `period`, between `min_rate` and the configured `rate`.

    - Multiplicative decrease (x`beta`) on a throttle signal, at most once per period: the calls
      already in flight were all sent at the old rate, so their burst of 429s is one signal, not ten
      (ten decreases would drop to the floor on a single overload). `beta` is 0.7, as in the AWS
      SDK's adaptive mode: a halving per signal left the rate far below the limit most of the time
      when an API answers a few per cent of calls with 429s it would send at any rate.
    - Additive increase on success: `recovery` (a fifth) of the configured rate per period of time
      since the last change, so a decreased rate is back in under 2 periods whatever the call
      volume. Time spent paused does not count: the pause is the server's, not evidence that it
      recovered.
    - A shared pause: `paused_until` (monotonic) only moves forward; Retry-After is capped at
      `pause_cap` so a bogus header cannot stop the service for hours; without one, one period.

    The floor defaults to 5% of the rate (eight or nine decreases in a row), and at least one call
    per minute, so a trickle keeps probing the server: without calls there are no successes to
    recover on.
    """

    def __init__(
        self,
        rate: float,
        period: float,
        clock: Clock,
        *,
        min_rate: float | None = None,
        pause_cap: float = 60.0,
        beta: float = BETA,
        recovery: float = RECOVERY,
    ) -> None:
        if rate <= 0 or period <= 0:
            raise ValueError("rate and period must be positive")
        if not 0 < beta < 1:
            raise ValueError("beta must be in (0, 1)")
        self.max_rate = float(rate)
        self.period = float(period)
        floor = min_rate if min_rate is not None else max(rate * 0.05, period / 60.0)
        self.min_rate = min(float(floor), self.max_rate)
        if self.min_rate <= 0:
            raise ValueError("min_rate must be positive")
        self.pause_cap = pause_cap
        self.beta = beta
        self.recovery = recovery
        self._clock = clock
        self._rate = self.max_rate
        self._paused_until = -math.inf
        self._last_decrease: float | None = None
        self._last_change = clock.monotonic()

    @property
    def effective_rate(self) -> float:
        return self._rate

    @property
    def paused_until(self) -> float:
        """Monotonic time before which no call may start (-inf: never paused)."""
        return self._paused_until

    def pause_remaining(self) -> float:
        return max(0.0, self._paused_until - self._clock.monotonic())

    def on_throttle(self, retry_after: float | None) -> ThrottleOutcome:
        now = self._clock.monotonic()
        pause = self.period if retry_after is None else retry_after
        pause = min(max(0.0, pause), self.pause_cap)
        extended = 0.0
        if now + pause > self._paused_until:
            extended = now + pause - max(now, self._paused_until)
            self._paused_until = now + pause
        decreased = None
        if self._last_decrease is None or now - self._last_decrease >= self.period:
            old = self._rate
            self._rate = max(self.min_rate, old * self.beta)
            self._last_decrease = now
            # Recovery counts from the end of this pause (see on_success).
            self._last_change = max(now, self._paused_until)
            if self._rate != old:
                decreased = RateChange(old, self._rate)
        return ThrottleOutcome(decreased, extended)

    def on_success(self) -> RateChange | None:
        """Recover toward the configured rate; the change, or None when already there."""
        now = self._clock.monotonic()
        # Only unpaused time since the last change earns recovery.
        start = max(self._last_change, self._paused_until)
        if now <= start:
            return None
        self._last_change = now
        if self._rate >= self.max_rate:
            return None
        old = self._rate
        self._rate = min(self.max_rate, old + self.max_rate * self.recovery * (now - start) / self.period)
        return RateChange(old, self._rate)


# How much wider than the configured period the client's window is: 2 % plus 10 ms.
WINDOW_MARGIN = 0.02
WINDOW_SLACK = 0.01


def throttler_params(rate: float, period: float) -> tuple[int, float]:
    """Express `rate` calls per `period` (rate may be fractional) as the integer `rate_limit` per
    stretched `period` a sliding log needs: 2.5 per 1 s becomes 2 per 0.8 s (the same average, and
    never more than 2 at once, so a lowered rate also means smaller bursts)."""
    rate_limit = max(1, math.floor(rate))
    return rate_limit, period * rate_limit / rate


class SlidingLog:
    """At most `rate_limit` starts in any window of `period` seconds, waited for by polling every
    `retry_interval` seconds.

    The algorithm of `asyncio_throttle.Throttler`, which this replaces only to take its time from the
    injected clock (the library reads `time.monotonic()` and sleeps with `asyncio.sleep`, so tests of
    the rate had to wait in real time and failed on a loaded machine). The attributes are read on
    every loop of `acquire`, so changing them takes effect at once.
    """

    def __init__(self, rate_limit: int, period: float, clock: Clock, retry_interval: float = 0.01) -> None:
        self.rate_limit = rate_limit
        self.period = period
        self.retry_interval = retry_interval
        self._clock = clock
        self._starts: deque[float] = deque()

    async def acquire(self) -> None:
        while True:
            now = self._clock.monotonic()
            while self._starts and now - self._starts[0] > self.period:
                self._starts.popleft()
            if len(self._starts) < self.rate_limit:
                break
            await self._clock.sleep(self.retry_interval)
        self._starts.append(self._clock.monotonic())


class Limiter:
    """The `CallGate`: a concurrency slot, the shared pause, then the adaptive rate."""

    def __init__(
        self,
        settings: LimitSettings,
        clock: Clock | None = None,
        *,
        pause_cap: float = 60.0,
        observer: Observer = NULL,
    ) -> None:
        self._clock = clock or SystemClock()
        self._observer = observer
        self._controller = RateController(settings.rate, settings.period, self._clock, pause_cap=pause_cap)
        self._throttler = SlidingLog(settings.rate, settings.period, self._clock)
        self._apply_rate()
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._turn = asyncio.Lock()
        self._in_flight = 0
        self._throttle_signals = 0
        # Recovery is logged when the max is reached again, otherwise at most once a second.
        self._recovery_logged_at = -math.inf
        self._recovery_logged_rate = self._controller.effective_rate

    @property
    def effective_rate(self) -> float:
        """Calls per configured period allowed right now."""
        return self._controller.effective_rate

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def throttle_signals(self) -> int:
        """429s, and 503s with Retry-After, seen since start."""
        return self._throttle_signals

    def paused_for(self) -> float:
        """Seconds left of the shared pause (0 when not paused)."""
        return self._controller.pause_remaining()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        # Semaphore FIRST: a call takes its rate token only once it can actually start. Taking the
        # token first would let calls queue on the semaphore holding tokens that were "spent" earlier,
        # then start in a bunch when slots free up: more starts per window at the server than the rate.
        asked = self._clock.monotonic()
        async with self._semaphore:
            while True:
                remaining = self._controller.pause_remaining()
                if remaining > 0:
                    await self._clock.sleep(remaining)
                    continue
                # One waiter at a time polls the sliding log (it polls on a timer):
                # N polling waiters cost N times the wake-ups, and the lock makes the order FIFO.
                async with self._turn:
                    await self._throttler.acquire()
                # A pause may have begun while we waited for the rate token: honour it. The token
                # stays spent, which only errs on the slow side.
                if self._controller.pause_remaining() <= 0:
                    break
            self._observer.limiter_waited(self._clock.monotonic() - asked)
            self._in_flight += 1
            try:
                yield
            finally:
                self._in_flight -= 1

    def record(self, status: int | None, retry_after: str | None) -> None:
        """How a call ended: a 429 (or a 503 with Retry-After) pauses everyone and lowers the rate, a
        2xx lets it recover, anything else (other errors, no answer) says nothing about the rate."""
        has_header = retry_after is not None and retry_after.strip() != ""
        if status == 429 or (status == 503 and has_header):
            self._throttled(status, parse_retry_after(retry_after, self._clock.now()))
        elif status is not None and 200 <= status < 300:
            self._succeeded()

    def _throttled(self, status: int, retry_after: float | None) -> None:
        self._throttle_signals += 1
        outcome = self._controller.on_throttle(retry_after)
        if outcome.paused > 0:
            self._observer.limiter_paused(outcome.paused)
            log.warning(
                "limiter.paused",
                seconds=round(self._controller.pause_remaining(), 3),
                status=status,
                retry_after=retry_after,
            )
        if outcome.decreased is not None:
            self._apply_rate()
            self._recovery_logged_rate = outcome.decreased.new_rate
            log.warning(
                "limiter.rate_decreased",
                old_rate=round(outcome.decreased.old_rate, 3),
                new_rate=round(outcome.decreased.new_rate, 3),
                period=self._controller.period,
            )

    def _succeeded(self) -> None:
        change = self._controller.on_success()
        if change is None:
            return
        self._apply_rate()
        now = self._clock.monotonic()
        at_max = change.new_rate >= self._controller.max_rate
        if at_max or now - self._recovery_logged_at >= 1.0:
            self._recovery_logged_at = now
            log.info(
                "limiter.rate_recovered",
                old_rate=round(self._recovery_logged_rate, 3),
                new_rate=round(change.new_rate, 3),
                period=self._controller.period,
            )
            self._recovery_logged_rate = change.new_rate

    def _apply_rate(self) -> None:
        self._observer.rate_changed(self._controller.effective_rate)
        rate_limit, period = throttler_params(self._controller.effective_rate, self._controller.period)
        self._throttler.rate_limit = rate_limit
        # The log counts starts as this process sees them; AEP counts arrivals, which a busy event
        # loop or a new connection can delay by some milliseconds. A window slightly wider than the
        # period keeps those late starts out of the server's next window (measured in bench/).
        self._throttler.period = period * (1 + WINDOW_MARGIN) + WINDOW_SLACK
        # Poll well inside the spacing between starts, so the achieved rate stays close to the limit.
        self._throttler.retry_interval = min(0.01, period / rate_limit / 4)
