from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator.clock import ManualClock
from orchestrator.pipeline.limiter import BETA, Limiter, RateController, throttler_params
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


# --- Limiter (real asyncio_throttle; short real-time checks) ---------------------------------------


async def test_never_more_starts_than_the_limit_in_any_window() -> None:
    limiter = Limiter(LimitSettings(rate=20, period=0.2, concurrency=100))
    starts: list[float] = []

    async def call() -> None:
        async with limiter.slot():
            starts.append(time.monotonic())

    began = time.monotonic()
    await asyncio.gather(*(call() for _ in range(60)))
    starts.sort()
    for i, start in enumerate(starts):
        # 5 ms of slack: we time the start a few instructions after the throttle logged it.
        in_window = sum(1 for other in starts[i:] if other - start < 0.2 - 0.005)
        assert in_window <= 20
    assert starts[19] - began < 0.05  # the first window's worth starts at once
    assert starts[-1] - began < 0.6  # and the limiter does not run far below the rate


async def test_a_429_with_retry_after_pauses_every_slot() -> None:
    limiter = Limiter(LimitSettings(rate=1000, period=1.0, concurrency=2))
    starts: list[float] = []

    async def call() -> None:
        async with limiter.slot():
            starts.append(time.monotonic())

    with capture_logs() as logs:
        signalled = time.monotonic()
        limiter.record(429, "0.3")
    assert 0.25 < limiter.paused_for() <= 0.3
    assert limiter.throttle_signals == 1
    assert limiter.effective_rate == pytest.approx(1000 * BETA)
    await asyncio.gather(*(call() for _ in range(6)))
    assert len(starts) == 6
    assert min(starts) >= signalled + 0.3
    assert max(starts) < signalled + 0.5
    events = [entry["event"] for entry in logs]
    assert events == ["limiter.paused", "limiter.rate_decreased"]
    assert logs[1]["old_rate"] == 1000
    assert logs[1]["new_rate"] == pytest.approx(1000 * BETA)


def test_only_throttle_signals_slow_down() -> None:
    limiter = Limiter(LimitSettings(rate=10, period=1.0, concurrency=2))
    for status, header in [(503, None), (503, " "), (500, "5"), (None, None), (400, None), (201, None)]:
        limiter.record(status, header)
    assert (limiter.throttle_signals, limiter.effective_rate, limiter.paused_for()) == (0, 10, 0)
    limiter.record(503, "1")
    assert limiter.throttle_signals == 1
    assert limiter.effective_rate == pytest.approx(10 * BETA)
    assert limiter.paused_for() > 0


async def until(condition: object, timeout: float = 1.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_pause_uses_the_injected_clock_and_http_dates() -> None:
    clock = ManualClock()
    limiter = Limiter(LimitSettings(rate=1000, period=1.0, concurrency=4), clock)
    limiter.record(429, format_datetime(clock.now() + timedelta(seconds=5), usegmt=True))
    assert limiter.paused_for() == 5.0
    entered = asyncio.Event()

    async def call() -> None:
        async with limiter.slot():
            entered.set()

    task = asyncio.create_task(call())
    await until(lambda: clock.sleepers == 1)
    clock.advance(4.9)
    await asyncio.sleep(0.01)
    assert not entered.is_set()
    clock.advance(0.2)
    await asyncio.wait_for(task, 1.0)
    assert entered.is_set()


async def test_a_pause_that_begins_while_waiting_for_the_rate_is_waited_out() -> None:
    clock = ManualClock()
    limiter = Limiter(LimitSettings(rate=2, period=0.2, concurrency=4), clock)
    for _ in range(2):  # spend the window's two tokens
        async with limiter.slot():
            pass
    entered = asyncio.Event()

    async def call() -> None:
        async with limiter.slot():
            entered.set()

    task = asyncio.create_task(call())
    await asyncio.sleep(0.02)  # now waiting on the rate, not paused
    limiter.record(429, "10")
    await until(lambda: clock.sleepers == 1)  # got its token, then saw the pause
    assert not entered.is_set()
    assert limiter.in_flight == 0
    clock.advance(10)
    await asyncio.wait_for(task, 1.0)
    assert entered.is_set()


async def test_a_call_waiting_for_a_slot_holds_no_rate_token() -> None:
    limiter = Limiter(LimitSettings(rate=2, period=5.0, concurrency=1))
    release = asyncio.Event()
    inside = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            inside.set()
            await release.wait()

    first = asyncio.create_task(holder())
    await inside.wait()
    assert limiter.in_flight == 1
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0.02)
    waiter.cancel()  # waited on the semaphore only: the second token must still be there
    release.set()
    await first
    assert limiter.in_flight == 0

    async def third() -> None:
        async with limiter.slot():
            pass

    await asyncio.wait_for(third(), 0.5)  # would wait ~5 s had the waiter spent the token


async def test_a_fractional_rate_spaces_the_starts() -> None:
    limiter = Limiter(LimitSettings(rate=2, period=0.1, concurrency=10))
    limiter.record(429, "0")  # 1.4 per 0.1 s: one start per 0.071 s
    assert limiter.effective_rate == pytest.approx(2 * BETA)
    starts: list[float] = []

    async def call() -> None:
        async with limiter.slot():
            starts.append(time.monotonic())

    await asyncio.gather(*(call() for _ in range(4)))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.1 / (2 * BETA) - 0.005 for gap in gaps)
    assert starts[-1] - starts[0] < 0.35


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
