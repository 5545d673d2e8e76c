"""The limit shared across replicas, on the manual clock: several `Limiter`s share a `FakeWindow`
(what the Redis script keeps, kept here on the same clock), so every wait is decided by the clock
the test moves, never by how fast the machine is. The script itself runs against the real Redis in
tests/integration/test_shared_limit_redis.py."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Sequence

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from orchestrator.clock import ManualClock
from orchestrator.pipeline.limiter import BETA, PROBE_INTERVAL, Limiter, open_limiter, window_params
from orchestrator.pipeline.shared_limit import CENSUS_INTERVAL, Hit, Pause, ReplicaCensus, SharedUnavailable
from orchestrator.settings import LimitSettings, Settings
from tests.unit.fakes import aep_settings
from tests.unit.test_limiter import run_until_done, starts_on, until


class SharedState:
    """What the shared store keeps (as the Lua scripts in shared_limit.py do), on `clock`."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.starts: list[float] = []  # newest first
        self.pause_end = -math.inf
        self.signal = 0
        self.seen: dict[str, float] = {}
        self.down = False
        self.hits = 0
        self.backfilled = 0

    def check(self) -> None:
        if self.down:
            raise SharedUnavailable("ConnectionError: refused")


class FakeWindow:
    """One replica's `SharedWindow` on `state`."""

    def __init__(self, state: SharedState, member: str, keep: int) -> None:
        self.state = state
        self.member = member
        self.keep = keep
        self.closed = False
        self.reply_delay = 0.0  # seconds each hit's answer takes to reach this replica
        self.restamped: list[float] = []  # the stamps this replica moved

    async def ping(self) -> None:
        await asyncio.sleep(0)
        self.state.check()

    async def hit(self, limit: int, window: float, backfill: int = 0) -> Hit:
        await asyncio.sleep(0)  # the round trip: other replicas' calls run meanwhile
        state = self.state
        state.check()
        state.hits += 1
        now = state.clock.monotonic()
        state.seen[self.member] = now
        replicas = sum(1 for at in state.seen.values() if now - at <= 30)
        state.starts[:0] = [now] * backfill
        state.backfilled += backfill
        if state.pause_end > now:
            return Hit(False, paused=state.pause_end - now, signal=state.signal, replicas=replicas)
        if len(state.starts) >= limit and now - state.starts[limit - 1] < window:
            return Hit(False, wait=state.starts[limit - 1] + window - now, replicas=replicas)
        state.starts.insert(0, now)
        del state.starts[max(self.keep, limit) :]
        if self.reply_delay:
            await state.clock.sleep(self.reply_delay)
        return Hit(True, replicas=replicas, stamp=repr(now))

    async def restamp(self, stamp: str, window: float) -> None:
        await asyncio.sleep(0)
        state = self.state
        state.check()
        if float(stamp) in state.starts:
            state.starts.remove(float(stamp))
        state.starts.insert(0, state.clock.monotonic())
        del state.starts[self.keep :]
        self.restamped.append(float(stamp))

    async def pause(self, seconds: float) -> Pause:
        await asyncio.sleep(0)
        state = self.state
        state.check()
        now = state.clock.monotonic()
        seconds = max(0.001, seconds)  # the script's PX: a whole number of ms, at least 1
        if state.pause_end - now < seconds:
            state.pause_end = now + seconds
            state.signal = round(now * 1000)
        return Pause(state.pause_end - now, state.signal)

    async def close(self) -> None:
        self.closed = True


def replicas(
    clock: ManualClock, count: int, rate: int = 20, period: float = 1.0, concurrency: int = 100
) -> tuple[SharedState, list[Limiter]]:
    state = SharedState(clock)
    settings = LimitSettings(rate=rate, period=period, concurrency=concurrency)
    made = [Limiter(settings, clock, shared=FakeWindow(state, f"host/{i}/x", rate)) for i in range(count)]
    return state, made


def most_in_a_window(starts: Sequence[float], window: float) -> int:
    ordered = sorted(starts)
    return max(
        (sum(1 for other in ordered[i:] if other - start < window) for i, start in enumerate(ordered)),
        default=0,
    )


async def settle(clock: ManualClock) -> None:
    """Let tasks that need no clock (a pause being shared) run."""
    await until(lambda: True)
    for _ in range(20):
        await asyncio.sleep(0)


# --- the shared window ------------------------------------------------------------------------------


async def test_replicas_together_never_start_more_than_the_limit_in_any_window(clock: ManualClock) -> None:
    _, (a, b) = replicas(clock, 2)
    starts_a, tasks_a = starts_on(clock, a, 50)
    starts_b, tasks_b = starts_on(clock, b, 50)

    # The first window's worth starts at once, split between the two; the rest wait on the clock
    # (one waiter per replica asks the window, the others queue behind it).
    await until(lambda: len(starts_a) + len(starts_b) == 20 and clock.sleepers == 2)
    assert starts_a
    assert starts_b
    await run_until_done(clock, [*tasks_a, *tasks_b])

    together = sorted(starts_a + starts_b)
    assert most_in_a_window(together, 1.0) == 20
    # The window is the in-process limiter's (2 % + 10 ms wider than the period) plus the shared
    # slack, and each window's worth starts as soon as the last one has passed: the limit is
    # reached, not just respected.
    _, window = window_params(20, 1.0, shared=True)
    assert together[:20] == [0.0] * 20
    assert window <= together[20] < window + 0.01
    assert together[-1] < 4 * window + 0.01


@pytest.mark.parametrize(("reply_delay", "moved"), [(0.05, True), (0.005, False)])
async def test_a_start_that_goes_out_late_counts_from_when_it_goes(
    clock: ManualClock, reply_delay: float, moved: bool
) -> None:
    """Replica a's answer from the window comes 50 ms after its place was taken (its process was held
    up): its call goes out then, so its place moves there, and b's next start waits a window from
    then, as AEP, counting arrivals, needs. An answer within LATE_START leaves the place alone."""
    _, (a, b) = replicas(clock, 2, rate=1)
    window: FakeWindow = a._shared  # type: ignore[assignment]
    window.reply_delay = reply_delay
    starts_a, tasks_a = starts_on(clock, a, 1)
    await until(lambda: clock.sleepers == 1)
    clock.advance(reply_delay)
    await until(lambda: len(starts_a) == 1 and len(window.restamped) == int(moved))
    await settle(clock)
    assert window.restamped == ([0.0] if moved else [])
    starts_b, tasks_b = starts_on(clock, b, 1)
    await run_until_done(clock, [*tasks_a, *tasks_b])
    _, width = window_params(1, 1.0, shared=True)
    went_out = reply_delay if moved else 0.0
    assert went_out + width <= starts_b[0] < went_out + width + 0.01


async def test_replicas_at_different_rates_count_in_one_window(clock: ManualClock) -> None:
    """A replica whose rate was cut counts the starts of one at the full rate (one window, one list,
    kept at the configured rate), so the cut one is held to its lower limit by the others' starts."""
    _, (full, cut) = replicas(clock, 2)
    # Cut to 14 without a signal the other would see (as when it has not yet asked the window).
    cut._controller.on_throttle(0)
    cut._apply_rate()
    _, tasks_full = starts_on(clock, full, 14)
    await run_until_done(clock, tasks_full)
    starts_cut, tasks_cut = starts_on(clock, cut, 1)

    await until(lambda: clock.sleepers == 1)  # 14 in the window: the cut replica waits...
    assert starts_cut == []
    await run_until_done(clock, tasks_cut)
    assert starts_cut[0] >= window_params(14, 1.0)[1]  # ...for its own, smaller, window to pass


async def test_a_429_at_one_replica_pauses_the_others_and_cuts_their_rate(clock: ManualClock) -> None:
    _, (a, b) = replicas(clock, 2, rate=1000)
    with capture_logs() as logs:
        a.record(429, "2")
        await settle(clock)  # the pause is shared
        starts, tasks = starts_on(clock, b, 3)
        await until(lambda: clock.sleepers == 3)  # each asked the window, and waits out the pause
        assert b.paused_for() == pytest.approx(2.0)
        clock.advance(1.99)
        await until(lambda: clock.sleepers == 3)
        assert starts == []
        await run_until_done(clock, tasks)

    assert starts == [pytest.approx(2.0, abs=0.002)] * 3
    assert a.effective_rate == b.effective_rate == pytest.approx(1000 * BETA)
    assert a.throttle_signals == 1
    assert b.throttle_signals == 0  # b saw no 429 of its own
    paused = [entry for entry in logs if entry["event"] == "limiter.paused"]
    assert [(entry["origin"], entry["status"]) for entry in paused] == [("here", 429), ("replica", None)]
    assert len([entry for entry in logs if entry["event"] == "limiter.rate_decreased"]) == 2


async def test_a_burst_of_429s_across_replicas_cuts_each_rate_once(clock: ManualClock) -> None:
    """The calls in flight everywhere were sent at the old rate: their 429s are one signal, even seen
    by a replica that slept through a pause longer than the period."""
    _, (a, b) = replicas(clock, 2, rate=100)
    a.record(429, "3")
    await settle(clock)
    clock.advance(0.1)
    b.record(429, "3")  # b's own, in the same burst: the pause is extended
    await settle(clock)

    starts, tasks = starts_on(clock, a, 2)
    await run_until_done(clock, tasks)

    assert starts[0] >= 3.1 - 0.002  # a waited for b's extension too
    assert a.effective_rate == b.effective_rate == pytest.approx(100 * BETA)


async def test_a_later_signal_elsewhere_cuts_again(clock: ManualClock) -> None:
    _, (a, b) = replicas(clock, 2, rate=100)
    a.record(429, "0.5")
    await settle(clock)
    clock.advance(1.5)  # more than a period later: a new signal
    b.record(429, "0.5")
    await settle(clock)

    starts, tasks = starts_on(clock, a, 1)
    await run_until_done(clock, tasks)

    assert starts[0] >= 2.0 - 0.002
    assert a.effective_rate == pytest.approx(100 * BETA * BETA)


async def test_the_shared_window_follows_the_effective_rate(clock: ManualClock) -> None:
    _, (a, b) = replicas(clock, 2, rate=20)
    a.record(429, "0")  # both cut to 14 (b once it sees the signal)
    await settle(clock)
    starts_a, tasks_a = starts_on(clock, a, 30)
    starts_b, tasks_b = starts_on(clock, b, 30)
    await until(lambda: b.effective_rate < 20)  # b's first ask, inside the signal's 1 ms pause

    await run_until_done(clock, [*tasks_a, *tasks_b])

    assert b.effective_rate == pytest.approx(14)
    assert most_in_a_window(starts_a + starts_b, 1.0) == 14


# --- losing the shared window -------------------------------------------------------------------------


async def test_a_lost_window_falls_back_to_the_share_and_comes_back(clock: ManualClock) -> None:
    state, (a, b) = replicas(clock, 2)
    for limiter in (b, a):  # each has started a call: the shared window counts two replicas
        async with limiter.slot():
            pass
    clock.advance(5)
    state.down = True
    _, share_window = window_params(10, 1.0)

    with capture_logs() as logs:
        starts, tasks = starts_on(clock, a, 25)
        await run_until_done(clock, tasks)
    assert a.shared_lost
    assert a.replicas == 2
    # No start for a window (the other replica's starts in it are unknown), then half the rate in
    # this process; no start waited on the dead store.
    assert 5 + share_window < starts[0] == starts[9] < 5 + share_window + 0.011
    assert most_in_a_window(starts, 1.0) == 10
    [lost] = [entry for entry in logs if entry["event"] == "limiter.shared_lost"]
    assert lost["log_level"] == "warning"
    assert (lost["replicas"], lost["rate"]) == (2, 10)
    assert "ConnectionError" in lost["error"]
    hits = state.hits

    state.down = False
    clock.advance(0.5)  # the last 5 starts are in the window that ends now
    back = clock.monotonic()
    with capture_logs() as logs:
        more, tasks = starts_on(clock, a, 45)
        await run_until_done(clock, tasks)
    assert not a.shared_lost
    assert state.hits > hits  # taken in the shared window again...
    assert 0 < state.backfilled <= 10  # ...told of the starts made on the share
    assert [entry["event"] for entry in logs if entry["event"].startswith("limiter.shared")] == [
        "limiter.shared_restored"
    ]
    # The share holds for PROBE_INTERVAL and a window more (the other replicas may not be back
    # yet); then the whole rate is this replica's again while the other one is idle.
    on_share = [start for start in more if start < back + PROBE_INTERVAL + share_window]
    assert most_in_a_window(starts + on_share, 1.0) == 10
    assert most_in_a_window(more, 1.0) == 20


async def test_the_ask_that_finds_the_window_back_tells_it_of_the_starts_on_the_share(
    clock: ManualClock,
) -> None:
    state, (a,) = replicas(clock, 1)
    state.down = True
    await a.start()
    _, tasks = starts_on(clock, a, 5)
    await run_until_done(clock, tasks)  # after the window's hold, on the share: asked once more
    state.down = False
    clock.advance(PROBE_INTERVAL + 0.005)  # the next ask asks the window; the 5 are in the last window
    assert state.starts == []

    more, tasks = starts_on(clock, a, 1)
    await run_until_done(clock, tasks)

    assert state.backfilled == 5
    assert state.starts == [more[0]] * 6  # stamped when told: later than made, erring on the slow side


async def test_a_loss_holds_the_starts_for_a_window(clock: ManualClock) -> None:
    """The other replicas may have filled the window just before the loss."""
    state, (a, b) = replicas(clock, 2)
    starts_b, _ = starts_on(clock, b, 20)
    await until(lambda: len(starts_b) == 20)
    clock.advance(0.5)
    state.down = True

    starts, tasks = starts_on(clock, a, 1)
    await run_until_done(clock, tasks)

    assert starts[0] > 0.5 + window_params(20, 1.0)[1]  # one window after the loss was seen


async def test_a_dead_store_at_start_is_said_at_start_and_calls_go_on(clock: ManualClock) -> None:
    state, (a,) = replicas(clock, 1)
    state.down = True
    with capture_logs() as logs:
        await a.start()
        starts, tasks = starts_on(clock, a, 5)
        await run_until_done(clock, tasks)

    # After one window (the other replicas' starts in it are unknown), at the whole rate: alone.
    _, window = window_params(20, 1.0)
    assert window < starts[0] == starts[4] < window + 0.011
    assert [entry["event"] for entry in logs] == ["limiter.shared_lost"]  # once per outage
    assert state.hits == 0  # not asked again before PROBE_INTERVAL


async def test_the_share_follows_the_replicas_the_census_sees(clock: ManualClock) -> None:
    state, (a,) = replicas(clock, 1, rate=30)
    state.down = True
    await a.start()
    a.set_replicas(3)  # seen in the store's leases, though never in the shared window
    starts, tasks = starts_on(clock, a, 20)

    await run_until_done(clock, tasks)

    assert a.replicas == 3
    assert most_in_a_window(starts, 1.0) == 10


async def test_close_sends_the_pauses_still_being_shared(clock: ManualClock) -> None:
    state, (a,) = replicas(clock, 1)
    a.record(429, "5")
    await a.aclose()

    assert state.pause_end == pytest.approx(5.0)
    assert isinstance(a._shared, FakeWindow)
    assert a._shared.closed


# --- the census of replicas ---------------------------------------------------------------------------

HERE = socket.gethostname()
ME = f"{HERE}/{1}/me"


class Leases:
    def __init__(self, *owners: str) -> None:
        self.owners = set(owners)
        self.fail = False
        self.looks = 0

    async def lease_owners(self) -> set[str]:
        self.looks += 1
        if self.fail:
            raise OSError("the database is gone")
        return set(self.owners)


def census(clock: ManualClock, store: Leases, *, shared: bool) -> tuple[ReplicaCensus, list[int]]:
    counts: list[int] = []
    made = ReplicaCensus(store, ME, clock, counts.append, shared=shared, rate=33, period=1.0)
    return made, counts


async def test_another_live_replica_unshared_is_warned_of_once(clock: ManualClock) -> None:
    store = Leases(ME, "other-host/77/abc", f"{HERE}/4194305/dead")  # above any pid_max: gone
    watch, counts = census(clock, store, shared=False)
    with capture_logs() as logs:
        task = asyncio.create_task(watch.run())
        await until(lambda: clock.sleepers == 1)
        clock.advance(CENSUS_INTERVAL)
        await until(lambda: store.looks == 2 and clock.sleepers == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert counts == [2, 2]  # this one and other-host's; not the dead local process
    [warned] = logs
    assert (warned["event"], warned["log_level"], warned["replicas"]) == ("limiter.not_shared", "warning", 2)
    assert "ORCH_LIMITS__REDIS_URL" in warned["hint"]
    assert "2 x 33" in warned["hint"]


async def test_alone_or_shared_nothing_is_warned(clock: ManualClock) -> None:
    with capture_logs() as logs:
        alone, counts = census(clock, Leases(ME), shared=False)
        assert await alone.look() == 1
        shared, _ = census(clock, Leases(ME, "other-host/77/abc"), shared=True)
        assert await shared.look() == 2
    assert counts == [1]
    assert logs == []


async def test_a_replica_seen_later_is_warned_of_then(clock: ManualClock) -> None:
    store = Leases()
    watch, counts = census(clock, store, shared=False)
    store.fail = True
    with capture_logs() as logs:
        assert await watch.look() is None  # the store's users say it is down; counted next time
        store.fail = False
        assert await watch.look() == 1
        store.owners.add("other-host/77/abc")
        assert await watch.look() == 2
    assert counts == [1, 2]
    assert [entry["event"] for entry in logs] == ["limiter.census_failed", "limiter.not_shared"]


async def test_open_limiter_without_redis_runs_the_census(clock: ManualClock) -> None:
    store = Leases(ME, "other-host/77/abc")
    settings = Settings(aep=aep_settings())
    with capture_logs() as logs:
        async with open_limiter(settings, clock, store, ME, pause_cap=60) as limiter:
            await until(lambda: store.looks == 1 and clock.sleepers == 1)
            assert limiter.replicas == 2
            assert not limiter.shared_lost
    assert [entry["event"] for entry in logs] == ["limiter.not_shared"]


def test_the_redis_url_must_be_one() -> None:
    assert LimitSettings(redis_url="rediss://:pw@redis:6380/1").redis_url == "rediss://:pw@redis:6380/1"
    with pytest.raises(ValidationError, match=r"redis://, rediss:// or unix://"):
        LimitSettings(redis_url="http://redis:6379")
