from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from datetime import timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator.aep.errors import CallNotSent
from orchestrator.clock import ManualClock
from orchestrator.pipeline.limiter import (
    BETA,
    WINDOW_MARGIN,
    WINDOW_SLACK,
    Limiter,
    RateController,
    throttler_params,
    window_params,
)
from orchestrator.settings import LimitSettings

# --- RateController (pure, manual clock) ----------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 5)),
        st.tuples(st.just("throttle"), st.one_of(st.none(), st.floats(0, 200))),
        st.tuples(st.just("success"), st.none()),
    ),
    max_size=80,
)


@given(
    rate=st.floats(1, 5000),
    period=st.floats(0.05, 60),
    cap=st.floats(0.1, 120),
    ops=OPS,
)
def test_controller_invariants(rate: float, period: float, cap: float, ops: list[tuple[str, object]]) -> None:
    clock = ManualClock()
    ctl = RateController(rate, period, clock, pause_cap=cap, beta=0.5, recovery=0.1)
    last_decrease: float | None = None
    earned_since = 0.0  # recovery can only be earned from the later of the last success and decrease
    for op, arg in ops:
        now = clock.monotonic()
        before_rate, before_until = ctl.effective_rate, ctl.paused_until
        if op == "advance":
            assert isinstance(arg, float)
            clock.advance(arg)
        elif op == "throttle":
            assert arg is None or isinstance(arg, float)
            outcome = ctl.on_throttle(arg)
            asked = period if arg is None else arg
            assert ctl.paused_until >= now + min(asked, cap) - 1e-9  # pause >= min(retry_after, cap)
            assert ctl.paused_until <= max(before_until, now + cap) + 1e-9
            if outcome.decreased is not None:
                assert last_decrease is None or now - last_decrease >= period  # once per period
                assert ctl.effective_rate == pytest.approx(max(ctl.min_rate, before_rate * 0.5))
                last_decrease = now
                earned_since = now
            else:
                assert ctl.effective_rate == before_rate
        else:
            change = ctl.on_success()
            gain = ctl.effective_rate - before_rate
            assert gain >= 0  # recovery only goes up
            unpaused = max(0.0, now - max(earned_since, before_until))
            assert gain <= rate / 10 * unpaused / period + 1e-6  # additive, time-based
            assert (change is not None) == (gain > 0)
            earned_since = now
        assert ctl.paused_until >= before_until  # the pause never moves back
        assert ctl.min_rate - 1e-9 <= ctl.effective_rate <= rate  # within [floor, configured]


def test_a_burst_of_429s_is_one_signal() -> None:
    clock = ManualClock()
    ctl = RateController(32, 1.0, clock, beta=0.5, recovery=0.1)
    assert ctl.on_throttle(None).decreased is not None
    for _ in range(10):
        clock.advance(0.05)
        assert ctl.on_throttle(None).decreased is None
    assert ctl.effective_rate == 16
    clock.advance(1.0)
    assert ctl.on_throttle(None).decreased is not None
    assert ctl.effective_rate == 8


def test_rate_never_drops_below_the_floor() -> None:
    clock = ManualClock()
    ctl = RateController(33, 1.0, clock, beta=0.5, recovery=0.1)
    assert ctl.min_rate == pytest.approx(1.65)  # 5% of the rate
    for _ in range(20):
        ctl.on_throttle(0)
        clock.advance(1.0)
    assert ctl.effective_rate == pytest.approx(1.65)
    assert ctl.on_throttle(0).decreased is None  # at the floor: nothing changes


@pytest.mark.parametrize(
    ("rate", "period", "floor"),
    [(33, 1.0, 1.65), (1, 1.0, 0.05), (2000, 60.0, 100.0), (1, 120.0, 2.0)],  # last: 1 a minute
)
def test_default_floor(rate: int, period: float, floor: float) -> None:
    assert RateController(rate, period, ManualClock()).min_rate == pytest.approx(min(floor, rate))


def test_pause_without_retry_after_lasts_one_period_and_is_capped() -> None:
    clock = ManualClock()
    ctl = RateController(10, 2.0, clock, pause_cap=60)
    assert ctl.on_throttle(None).paused == 2.0
    assert ctl.pause_remaining() == 2.0
    assert ctl.on_throttle(3600).paused == 58.0  # extended to the cap, not by an hour
    assert ctl.pause_remaining() == 60.0
    assert ctl.on_throttle(5).paused == 0.0  # a shorter pause never shortens a longer one
    clock.advance(61)
    assert ctl.pause_remaining() == 0.0


def test_recovery_is_linear_in_unpaused_time() -> None:
    clock = ManualClock()
    ctl = RateController(20, 1.0, clock, beta=0.5, recovery=0.1)
    ctl.on_throttle(30)  # halved to 10, paused 30 s
    clock.advance(30)
    assert ctl.on_success() is None  # the pause earned nothing
    assert ctl.effective_rate == 10
    clock.advance(1)
    change = ctl.on_success()
    assert change is not None
    assert change.old_rate == 10
    assert change.new_rate == pytest.approx(12)  # +rate/10 per period
    for _ in range(4):
        clock.advance(1)
        ctl.on_success()
    assert ctl.effective_rate == 20
    clock.advance(100)
    assert ctl.on_success() is None  # capped at the configured rate


def test_a_pause_extended_without_a_decrease_earns_no_recovery() -> None:
    clock = ManualClock()
    ctl = RateController(20, 1.0, clock, beta=0.5, recovery=0.1)
    ctl.on_throttle(None)  # halved, paused 1 s
    clock.advance(0.5)
    assert ctl.on_throttle(30).decreased is None  # same burst: no second halving, but a longer pause
    clock.advance(31)  # 1 s past the end of the pause
    ctl.on_success()
    assert ctl.effective_rate == pytest.approx(12)


@given(rate=st.floats(0.01, 10_000), period=st.floats(0.01, 100))
def test_throttler_params_keep_the_rate(rate: float, period: float) -> None:
    rate_limit, stretched = throttler_params(rate, period)
    assert rate_limit >= 1
    assert rate_limit <= max(1, rate)
    assert rate_limit / stretched == pytest.approx(rate / period)


# --- Limiter (manual clock: every wait is on it) --------------------------------------------------


async def until(condition: Callable[[], bool], turns: int = 10_000) -> None:
    """Let the other tasks run until `condition()` holds. Bounded in event-loop turns, not in real
    time: on the manual clock the tasks wait only for each other and for `clock.advance`, so what
    they can reach without the clock moving they reach in a few turns, however loaded the machine."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def run_until_done(
    clock: ManualClock, tasks: Sequence[asyncio.Task[None]], step: float = 0.001
) -> None:
    """Move the clock on a `step` at a time until `tasks` are done, letting them run after each step
    until they wait on the clock again (`advance` marks a woken sleeper done at once, so `sleepers`
    is 0 until it has run and slept again)."""

    def done() -> bool:
        return all(task.done() for task in tasks)

    for _ in range(100_000):
        if done():
            return
        clock.advance(step)
        await until(lambda: clock.sleepers > 0 or done())
    raise AssertionError("tasks not done")


def starts_on(
    clock: ManualClock, limiter: Limiter, count: int
) -> tuple[list[float], list[asyncio.Task[None]]]:
    """`count` calls through `limiter`, as tasks, and the clock time each one started at."""
    starts: list[float] = []

    async def call() -> None:
        async with limiter.slot():
            starts.append(clock.monotonic())

    return starts, [asyncio.create_task(call()) for _ in range(count)]


async def starts_when_the_clock_passes(
    end: float, clock: ManualClock, starts: list[float], task: asyncio.Task[None]
) -> None:
    """The one call in `task`, asleep on the clock, starts once the clock passes `end`, not before."""
    clock.advance(end - 0.01 - clock.monotonic())
    # Had that woken the call, it would have started or gone back to sleep by now (`advance` marks a
    # woken sleeper done at once, so `sleepers` does not hold by itself).
    await until(lambda: clock.sleepers == 1 or bool(starts))
    assert starts == []
    clock.advance(0.02)
    await until(task.done)
    assert starts == [pytest.approx(end + 0.01)]


def window(rate: float, period: float) -> float:
    """The limiter's sliding window for `rate` calls per `period` (its period stretched by the margin)."""
    return window_params(rate, period)[1]


def test_the_window_is_the_stretched_period_with_the_margin() -> None:
    assert window_params(2.5, 1.0) == (2, pytest.approx(0.8 * (1 + WINDOW_MARGIN) + WINDOW_SLACK))
    assert window_params(33, 1.0) == (33, pytest.approx(1.03))


async def test_never_more_starts_than_the_limit_in_any_window(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=20, period=0.2, concurrency=100), clock)
    starts, tasks = starts_on(clock, limiter, 60)

    await until(lambda: len(starts) == 20 and clock.sleepers == 1)
    assert starts == [0.0] * 20  # the first window's worth starts at once; the rest wait on the clock
    await run_until_done(clock, tasks)

    assert starts == sorted(starts)
    for i, start in enumerate(starts):
        assert sum(1 for other in starts[i:] if other - start < 0.2) <= 20
    # Each later window's worth starts as soon as the window has passed (within a poll and a step),
    # so the limiter does not run far below the rate.
    assert window(20, 0.2) < starts[20] == starts[39] < window(20, 0.2) + 0.005
    assert starts[-1] < 2 * window(20, 0.2) + 0.01


async def test_a_429_with_retry_after_pauses_every_slot(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=1000, period=1.0, concurrency=2), clock)

    with capture_logs() as logs:
        limiter.record(429, "0.3")
    assert limiter.paused_for() == pytest.approx(0.3)
    assert limiter.throttle_signals == 1
    assert limiter.effective_rate == pytest.approx(1000 * BETA)
    starts, tasks = starts_on(clock, limiter, 6)
    await until(lambda: clock.sleepers == 2)  # both slots wait out the pause
    clock.advance(0.299)
    await until(lambda: clock.sleepers == 2)  # (still asleep: advance would have woken them)
    assert starts == []
    await run_until_done(clock, tasks)
    assert starts == [pytest.approx(0.3)] * 6  # all at the end of the pause, none before
    events = [entry["event"] for entry in logs]
    assert events == ["limiter.paused", "limiter.rate_decreased"]
    assert logs[1]["old_rate"] == 1000
    assert logs[1]["new_rate"] == pytest.approx(1000 * BETA)


def test_only_throttle_signals_slow_down(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=10, period=1.0, concurrency=2), clock)
    for status, header in [(503, None), (503, " "), (500, "5"), (None, None), (400, None), (201, None)]:
        limiter.record(status, header)
    assert (limiter.throttle_signals, limiter.effective_rate, limiter.paused_for()) == (0, 10, 0)
    limiter.record(503, "1")
    assert limiter.throttle_signals == 1
    assert limiter.effective_rate == pytest.approx(10 * BETA)
    assert limiter.paused_for() == 1.0


async def test_pause_uses_the_injected_clock_and_http_dates(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=1000, period=1.0, concurrency=4), clock)
    limiter.record(429, format_datetime(clock.now() + timedelta(seconds=5), usegmt=True))
    assert limiter.paused_for() == 5.0
    starts, tasks = starts_on(clock, limiter, 1)

    await until(lambda: clock.sleepers == 1)
    await starts_when_the_clock_passes(5.0, clock, starts, tasks[0])


async def test_a_pause_that_begins_while_waiting_for_the_rate_is_waited_out(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=2, period=0.2, concurrency=4), clock)
    for _ in range(2):  # spend the window's two tokens
        async with limiter.slot():
            pass
    starts, tasks = starts_on(clock, limiter, 1)

    await until(lambda: clock.sleepers == 1)  # now waiting on the rate, not paused
    limiter.record(429, "10")
    clock.advance(window(2, 0.2) + 0.01)  # the rate has a token again: the call takes it...
    await until(lambda: clock.sleepers == 1)  # ...then sees the pause and waits it out
    assert starts == []
    assert limiter.in_flight == 0
    await starts_when_the_clock_passes(10.0, clock, starts, tasks[0])


async def test_a_call_waiting_for_a_slot_holds_no_rate_token(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=2, period=5.0, concurrency=1), clock)
    release = asyncio.Event()
    inside = asyncio.Event()
    calling = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            inside.set()
            await release.wait()

    async def waiter() -> None:
        calling.set()  # the slot() below runs on to the semaphore before this task yields
        async with limiter.slot():
            pass

    first = asyncio.create_task(holder())
    await inside.wait()
    assert limiter.in_flight == 1
    second = asyncio.create_task(waiter())
    await calling.wait()
    second.cancel()  # waited on the semaphore only: the second token must still be there
    release.set()
    await first
    assert limiter.in_flight == 0
    starts, tasks = starts_on(clock, limiter, 1)
    # Starts at once; had the cancelled waiter spent the token, it would wait on the clock for 5 s.
    await until(lambda: tasks[0].done() or clock.sleepers > 0)
    assert starts == [0.0]
    assert second.cancelled()


async def test_closing_lets_calls_in_flight_run_and_starts_no_other(clock: ManualClock) -> None:
    """Stopping: the call in its slot runs on; those waiting for a slot, for the rate or out a
    pause, and any asked for later, raise CallNotSent and leave nothing held."""
    limiter = Limiter(LimitSettings(rate=1, period=5.0, concurrency=2), clock)
    release, inside = asyncio.Event(), asyncio.Event()

    async def holder() -> str:
        async with limiter.slot():
            inside.set()
            await release.wait()
        return "ran"

    first = asyncio.create_task(holder())
    await inside.wait()
    starts, waiting = starts_on(clock, limiter, 3)  # one waits for the rate, two for a slot
    await until(lambda: clock.sleepers == 1)
    with capture_logs() as logs:
        limiter.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(result) for result in results] == [CallNotSent] * 3
    assert starts == []
    assert [(entry["event"], entry["waiting"]) for entry in logs] == [("limiter.closed", 3)]
    assert limiter.in_flight == 1
    assert not first.done()
    with pytest.raises(CallNotSent):
        async with limiter.slot():
            raise AssertionError("a call started after the gate closed")
    release.set()
    assert await first == "ran"
    assert limiter.in_flight == 0


async def test_a_caller_s_own_cancellation_is_kept_when_the_gate_closes(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=1, period=5.0, concurrency=1), clock)
    async with limiter.slot():  # the window's one start is spent
        pass
    starts, [waiting] = starts_on(clock, limiter, 1)
    await until(lambda: clock.sleepers == 1)
    waiting.cancel()  # the caller's (the drain's grace ran out) ...
    limiter.close()  # ... and the gate's, before the waiter ran again
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert starts == []


async def test_a_wait_that_swallows_the_close_still_starts_no_call(clock: ManualClock) -> None:
    """Should a wait inside the gate (a Redis client, say) eat the close's cancellation, the call
    is refused all the same once its wait ends."""
    limiter = Limiter(LimitSettings(rate=1, period=5.0, concurrency=1), clock)
    asleep, waited = asyncio.Event(), asyncio.Event()

    async def deaf_sleep(seconds: float) -> None:
        asleep.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            waited.set()  # swallowed: returns as if the time had passed

    limiter.record(429, "30")  # a pause: the call sleeps on the clock
    clock.sleep = deaf_sleep  # type: ignore[method-assign]
    starts, [waiting] = starts_on(clock, limiter, 1)
    await asleep.wait()
    limiter.close()
    with pytest.raises(CallNotSent):
        async with asyncio.timeout(5):  # a gate that let it wait again would hang here
            await waiting
    assert waited.is_set()
    assert starts == []
    assert waiting.cancelling() == 0  # the gate's cancellation taken back
    assert limiter.in_flight == 0


async def test_a_fractional_rate_spaces_the_starts(clock: ManualClock) -> None:
    limiter = Limiter(LimitSettings(rate=2, period=0.1, concurrency=10), clock)
    limiter.record(429, "0")  # 1.4 per 0.1 s: one start per 0.071 s
    assert limiter.effective_rate == pytest.approx(2 * BETA)
    starts, tasks = starts_on(clock, limiter, 4)

    await run_until_done(clock, tasks)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    spacing = window(2 * BETA, 0.1)  # 0.1 / 1.4 s, stretched by the margin
    assert spacing > 0.1 / (2 * BETA)
    # Each start waits out the window after the one before, and no more than a poll (10 ms) and a step.
    assert all(spacing < gap < spacing + 0.011 for gap in gaps)


def test_recovery_is_logged_at_most_once_a_second_and_at_the_max() -> None:
    clock = ManualClock()
    limiter = Limiter(LimitSettings(rate=20, period=1.0, concurrency=4), clock)
    limiter.record(429, "0")
    assert limiter.effective_rate == pytest.approx(14)  # 20 x 0.7
    with capture_logs() as logs:
        for _ in range(60):  # 6 s of successes, ten a second (back to 20 after 1.5 s at +4/s)
            clock.advance(0.1)
            limiter.record(200, None)
    assert limiter.effective_rate == 20
    recovered = [entry for entry in logs if entry["event"] == "limiter.rate_recovered"]
    # Logged at 0.1 s, then once a second, then on reaching 20 at 1.5 s; nothing once at the max.
    assert len(recovered) == 3
    assert recovered[0]["old_rate"] == pytest.approx(14)
    assert recovered[-1]["new_rate"] == 20
    assert all(a["new_rate"] == b["old_rate"] for a, b in itertools.pairwise(recovered))
