"""The call gate: every Platform API call passes through `Limiter.slot()`.

Three limits, taken in this order:
1. a concurrency slot (`asyncio.Semaphore`): calls in flight;
2. the shared pause: after a 429 (or a 503 with Retry-After) *everyone* waits, not just the caller
   that got it: the server's limit is shared, so the calls behind it would only collect 429s too;
3. the rate (`SlidingLog`: never more than N starts in any window of one period), whose N adapts:
   cut by 30 % on a throttle signal, recovered linearly on success (AIMD).

With a `SharedWindow` (ORCH_LIMITS__REDIS_URL, see shared_limit.py) the rate and the pause are those
of every replica of the org and sandbox: the window is taken there instead of in the process, and
a throttle signal pauses every replica. Should that store stop answering, each replica keeps to its
share of the rate (RATE / replicas seen) in the process until it answers again.

When the service stops, the gate closes (`Limiter.close`): the calls in flight run on, and those still
waiting for their turn raise `CallNotSent`, so their work is given back rather than sent then.

Every wait is on the injected clock, so the limiter is tested on a manual clock without waiting.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator import logs
from orchestrator.aep.errors import CallNotSent
from orchestrator.clock import Clock, SystemClock
from orchestrator.observe import NULL, Observer
from orchestrator.pipeline.retry import parse_retry_after
from orchestrator.pipeline.shared_limit import (
    LeaseOwners,
    RedisWindow,
    ReplicaCensus,
    SharedUnavailable,
    SharedWindow,
    limit_key,
)
from orchestrator.settings import LimitSettings, Settings

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

    def extend_pause(self, seconds: float) -> float:
        """Pause at least `seconds` (capped) from now; how many seconds that added to the pause."""
        now = self._clock.monotonic()
        end = now + min(max(0.0, seconds), self.pause_cap)
        if end <= self._paused_until:
            return 0.0
        extended = end - max(now, self._paused_until)
        self._paused_until = end
        return extended

    def on_throttle(self, retry_after: float | None) -> ThrottleOutcome:
        now = self._clock.monotonic()
        extended = self.extend_pause(self.period if retry_after is None else retry_after)
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
# And the shared window some more: its starts are stamped on Redis's clock, and each replica's call
# then leaves after its own round trip and event loop, tens of milliseconds apart under load (three
# replicas on two cores put a 31st call into one of AEP's seconds at 10 ms alone).
SHARED_SLACK = 0.05


def throttler_params(rate: float, period: float) -> tuple[int, float]:
    """Express `rate` calls per `period` (rate may be fractional) as the integer `rate_limit` per
    stretched `period` a sliding log needs: 2.5 per 1 s becomes 2 per 0.8 s (the same average, and
    never more than 2 at once, so a lowered rate also means smaller bursts)."""
    rate_limit = max(1, math.floor(rate))
    return rate_limit, period * rate_limit / rate


def window_params(rate: float, period: float, *, shared: bool = False) -> tuple[int, float]:
    """The sliding window, in the process or shared, for `rate` calls per `period`: at most `limit`
    starts in any `window` seconds."""
    rate_limit, stretched = throttler_params(rate, period)
    if shared:
        stretched += SHARED_SLACK
    # The window counts starts as the client sees them; AEP counts arrivals, which a busy event
    # loop or a new connection can delay by some milliseconds. A window slightly wider than the
    # period keeps those late starts out of the server's next window (measured in bench/; for the
    # shared window, in shared_limit.py).
    return rate_limit, stretched * (1 + WINDOW_MARGIN) + WINDOW_SLACK


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
        await self.wait()
        self.note()

    async def wait(self) -> None:
        """Until one more start would keep within the limit (without taking it)."""
        while True:
            now = self._clock.monotonic()
            while self._starts and now - self._starts[0] > self.period:
                self._starts.popleft()
            if len(self._starts) < self.rate_limit:
                return
            await self._clock.sleep(self.retry_interval)

    def note(self) -> None:
        """Count a start made now."""
        self._starts.append(self._clock.monotonic())

    def fill(self) -> None:
        """Count the window as full from now on: the next start waits a whole window."""
        self._starts = deque([self._clock.monotonic()] * self.rate_limit)

    def recent(self) -> int:
        """Starts counted in the window that ends now."""
        now = self._clock.monotonic()
        return sum(1 for start in self._starts if now - start <= self.period)


# Seconds between two tries of a shared window that stopped answering. A try costs at most
# shared_limit.TIMEOUT of one start's wait (nothing when the connection is refused).
PROBE_INTERVAL = 1.0
# The shortest wait before asking a full shared window again, so that a wait the server rounded
# down to nothing cannot turn into a burst of round trips.
MIN_WAIT = 0.001
# Seconds from asking the shared window to the start beyond which the start's place is moved to when
# it goes out (`SharedWindow.restamp`). The window is stamped when Redis runs the script; a replica
# whose event loop or process was held up (a busy host, a long callback) sends later, and AEP counts
# it then: a late start moved keeps its window from ending early for the other replicas.
LATE_START = 0.01


class Limiter:
    """The `CallGate`: a concurrency slot, the shared pause, then the adaptive rate; the rate and the
    pause shared with other replicas through `shared` when given (see the module's docstring)."""

    def __init__(
        self,
        settings: LimitSettings,
        clock: Clock | None = None,
        *,
        pause_cap: float = 60.0,
        observer: Observer = NULL,
        shared: SharedWindow | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._observer = observer
        self._controller = RateController(settings.rate, settings.period, self._clock, pause_cap=pause_cap)
        self._throttler = SlidingLog(settings.rate, settings.period, self._clock)
        self._shared = shared
        self._shared_limit, self._shared_window = window_params(settings.rate, settings.period, shared=True)
        # Replicas seen: in the store's leases (the census) and by the shared window (recent starts).
        self._replicas_in_store = 1
        self._replicas_sharing = 1
        self._lost_at: float | None = None  # since when the shared window does not answer
        self._probe_at = -math.inf
        self._share_also_until = -math.inf
        # The last throttle signal (its time on the shared store's clock) counted here.
        self._counted_signal: int | None = None
        self._sharing: set[asyncio.Task[None]] = set()
        self._apply_rate()
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._turn = asyncio.Lock()
        self._in_flight = 0
        # Calls waiting for their turn, and those of them `close` cancelled (see `_enter`).
        self._closed = False
        self._waiting: set[asyncio.Task[Any]] = set()
        self._shut_out: set[asyncio.Task[Any]] = set()
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

    @property
    def replicas(self) -> int:
        """Replicas seen working (this one included): the divisor of the per-replica share."""
        return max(self._replicas_in_store, self._replicas_sharing)

    @property
    def shared_lost(self) -> bool:
        """The limit is shared, and its store does not answer: the per-replica share applies."""
        return self._lost_at is not None

    def set_replicas(self, count: int) -> None:
        """The census: `count` replicas work on the store."""
        self._replicas_in_store = max(1, count)
        self._configure()

    async def start(self) -> None:
        """Ask the shared window once before the first call, so that a Redis that does not answer
        is said at start (and the share applies) rather than at the first call."""
        if self._shared is None:
            return
        try:
            await self._shared.ping()
        except SharedUnavailable as exc:
            self._lose(str(exc))

    async def aclose(self) -> None:
        # Pauses still being shared go out first: the other replicas need them (each is bounded
        # by the shared window's timeout).
        await asyncio.gather(*self._sharing, return_exceptions=True)
        if self._shared is not None:
            await self._shared.close()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a call's turn, then hold a slot while it runs. Raises `CallNotSent` once the
        gate is closed (`close`), also to a call that was waiting for its turn then."""
        asked = self._clock.monotonic()
        await self._enter()
        self._observer.limiter_waited(self._clock.monotonic() - asked)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._semaphore.release()

    def close(self) -> None:
        """No call starts from now on: the service is stopping. The calls in flight go on; those
        waiting for their turn, and any asked for later, raise `CallNotSent`, so their work is given
        back for the next run at once rather than started within the shutdown's grace."""
        if self._closed:
            return
        self._closed = True
        for task in self._waiting:
            self._shut_out.add(task)
            task.cancel()
        log.info("limiter.closed", waiting=len(self._waiting))

    async def _enter(self) -> None:
        """Take a slot, then a start (`_turn_to_start`); `CallNotSent` when the gate closes first."""
        if self._closed:
            raise CallNotSent
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            # Semaphore FIRST: a call takes its rate token only once it can actually start. Taking
            # the token first would let calls queue on the semaphore holding tokens that were
            # "spent" earlier, then start in a bunch when slots free up: more starts per window at
            # the server than the rate.
            await self._semaphore.acquire()
            try:
                await self._turn_to_start()
            except BaseException:
                self._semaphore.release()
                raise
        except (asyncio.CancelledError, CallNotSent):
            # `close` cancelled this wait: that cancellation is the gate's, not the caller's (which
            # may have cancelled too, and then gets its CancelledError).
            if task in self._shut_out and task.uncancel() == 0:
                raise CallNotSent from None
            raise
        finally:
            self._waiting.discard(task)
            self._shut_out.discard(task)

    async def _turn_to_start(self) -> None:
        """Wait out the shared pause and the rate; the caller holds a concurrency slot."""
        while True:
            if self._closed:  # at each turn: a wait below may have swallowed `close`'s cancellation
                raise CallNotSent
            remaining = self._controller.pause_remaining()
            if remaining > 0:
                await self._clock.sleep(remaining)
                continue
            # One waiter at a time polls the sliding log (it polls on a timer) or the shared
            # window: N polling waiters cost N times the wake-ups, and the lock makes the order
            # FIFO.
            async with self._turn:
                took = await self._take()
            # A pause may have begun while we waited for the rate token: honour it. The token
            # stays spent, which only errs on the slow side.
            if took and self._controller.pause_remaining() <= 0:
                return

    def record(self, status: int | None, retry_after: str | None) -> None:
        """How a call ended: a 429 (or a 503 with Retry-After) pauses everyone and lowers the rate, a
        2xx lets it recover, anything else (other errors, no answer) says nothing about the rate."""
        has_header = retry_after is not None and retry_after.strip() != ""
        if status == 429 or (status == 503 and has_header):
            self._throttled(status, parse_retry_after(retry_after, self._clock.now()))
        elif status is not None and 200 <= status < 300:
            self._succeeded()

    async def _take(self) -> bool:
        """Take a start in the rate's window; False when the shared window said that a pause stands
        in the way (it is then this replica's pause too)."""
        if self._shared is None:
            await self._throttler.acquire()
            return True
        lost = self._lost_at is not None
        if lost and self._clock.monotonic() < self._probe_at:
            await self._throttler.acquire()  # the per-replica share
            return True
        if lost or self._clock.monotonic() < self._share_also_until:
            await self._throttler.wait()  # the share holds until all are back (see _restored)
        while True:
            # Asked after a loss, the window is also told of the starts made on the share since
            # (see _restored).
            backfill = self._throttler.recent() if self._lost_at is not None else 0
            asked = self._clock.monotonic()
            try:
                hit = await self._shared.hit(self._shared_limit, self._shared_window, backfill)
            except SharedUnavailable as exc:
                self._lose(str(exc))
                await self._throttler.acquire()
                return True
            if self._lost_at is not None:
                self._restored()
            if hit.replicas != self._replicas_sharing:
                self._replicas_sharing = hit.replicas
                self._configure()
            if hit.admitted:
                # This replica's own starts stay in its log too: should the shared window be lost,
                # the share counts those of the last window.
                self._throttler.note()
                late = self._clock.monotonic() - asked
                if late > LATE_START and hit.stamp is not None:
                    self._in_background(self._restamp(hit.stamp, late))
                return True
            if hit.signal is not None:
                self._paused_elsewhere(hit.paused, hit.signal)
                return False
            # A server clock that jumped cannot make a wait longer than the window.
            await self._clock.sleep(min(max(hit.wait, MIN_WAIT), self._shared_window))

    def _lose(self, error: str) -> None:
        now = self._clock.monotonic()
        self._probe_at = now + PROBE_INTERVAL
        if self._lost_at is not None:
            return
        self._lost_at = now
        # The other replicas' starts in the window that ends now are unknown here: up to the whole
        # rate. Waiting one window before the first start on the share keeps the loss inside it.
        self._throttler.fill()
        log.warning(
            "limiter.shared_lost",
            error=error,
            replicas=self.replicas,
            rate=round(self._controller.effective_rate / self.replicas, 3),
            period=self._controller.period,
            hint=(
                "the shared limit's Redis does not answer: after one window without a start, each "
                "replica keeps to RATE / replicas seen on its own, and tries Redis again every "
                f"{PROBE_INTERVAL:g} s"
            ),
        )

    def _restored(self) -> None:
        """Back on the shared window. The starts this replica made on its share in the last window
        went into the window with the ask that found it back (stamped now: later than they were,
        which only errs on the slow side). The other replicas' starts on their share get there
        when each asks again: within PROBE_INTERVAL, or a window when its share is spent. Until
        then this one keeps to its share too, so that the window is never the only limit while it
        misses some of the starts."""
        now = self._clock.monotonic()
        log.info("limiter.shared_restored", lost_for=round(now - (self._lost_at or now), 3))
        self._lost_at = None
        self._share_also_until = now + PROBE_INTERVAL + self._throttler.period

    def _paused_elsewhere(self, seconds: float, signal: int) -> None:
        """The shared window is paused by `signal`, seen here. The limit is shared, so another
        replica's throttle signal is this one's too: it pauses and cuts the rate, once per signal.
        Signals within one period of the last one counted are the same burst (as in the
        controller's once-per-period rule, but on the shared store's clock: a replica that slept
        through a long pause sees the burst's later signals late)."""
        new = self._counted_signal is None or signal - self._counted_signal >= self._controller.period * 1000
        if not new:
            self._controller.extend_pause(seconds)
            return
        self._counted_signal = signal
        self._report(self._controller.on_throttle(seconds), status=None, retry_after=None, origin="replica")

    def _throttled(self, status: int, retry_after: float | None) -> None:
        self._throttle_signals += 1
        self._report(self._controller.on_throttle(retry_after), status=status, retry_after=retry_after)
        if self._shared is not None and self._lost_at is None:
            self._in_background(self._share_pause(self._controller.pause_remaining()))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Tell the shared window something without holding up the call (awaited at `aclose`)."""
        task = asyncio.create_task(work)
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    async def _restamp(self, stamp: str, late: float) -> None:
        """Runs once the late call's task has yielded, that is once it went out (or is about to)."""
        assert self._shared is not None
        log.debug("limiter.start_late", late=round(late, 4))
        try:
            await self._shared.restamp(stamp, self._shared_window)
        except SharedUnavailable as exc:
            self._lose(str(exc))

    async def _share_pause(self, seconds: float) -> None:
        assert self._shared is not None
        try:
            pause = await self._shared.pause(seconds)
        except SharedUnavailable as exc:
            self._lose(str(exc))
            return
        # Counted here already (by the caller): the others of its burst are the same signal.
        self._counted_signal = max(pause.signal, self._counted_signal or pause.signal)

    def _report(
        self,
        outcome: ThrottleOutcome,
        *,
        status: int | None,
        retry_after: float | None,
        origin: str = "here",
    ) -> None:
        if outcome.paused > 0:
            self._observer.limiter_paused(outcome.paused)
            log.warning(
                "limiter.paused",
                seconds=round(self._controller.pause_remaining(), 3),
                status=status,
                retry_after=retry_after,
                origin=origin,
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
        self._configure()

    def _configure(self) -> None:
        """The windows for the effective rate: the shared one's, and the log's (the whole rate, or
        with a shared window this replica's share of it, for when that window is lost)."""
        rate, period = self._controller.effective_rate, self._controller.period
        self._shared_limit, self._shared_window = window_params(rate, period, shared=True)
        share = rate if self._shared is None else rate / self.replicas
        rate_limit, window = window_params(share, period)
        self._throttler.rate_limit = rate_limit
        self._throttler.period = window
        # Poll well inside the spacing between starts, so the achieved rate stays close to the limit.
        self._throttler.retry_interval = min(0.01, window / rate_limit / 4)


@asynccontextmanager
async def open_limiter(
    settings: Settings,
    clock: Clock,
    store: LeaseOwners,
    owner: str,
    *,
    pause_cap: float,
    observer: Observer = NULL,
) -> AsyncIterator[Limiter]:
    """The service's limiter: shared through Redis when ORCH_LIMITS__REDIS_URL is set (keyed by org
    and sandbox), with the census of replicas (`owner` is this process's lease owner) beside it."""
    limits = settings.limits
    shared = None
    key = limit_key(settings.aep.org_id, settings.aep.sandbox)
    if limits.redis_url is not None:
        shared = RedisWindow(limits.redis_url, key, owner, limits.rate)
    limiter = Limiter(limits, clock, pause_cap=pause_cap, observer=observer, shared=shared)
    census = ReplicaCensus(
        store,
        owner,
        clock,
        limiter.set_replicas,
        shared=shared is not None,
        rate=limits.rate,
        period=limits.period,
    )
    try:
        await limiter.start()
        if shared is not None and not limiter.shared_lost:
            log.info("limiter.shared", key=key)
        task = asyncio.create_task(census.run(), name="replica-census")
        try:
            yield limiter
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await limiter.aclose()
