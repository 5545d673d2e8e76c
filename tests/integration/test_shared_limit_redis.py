"""The limit shared across replicas on the machine's Redis: two `Limiter`s, as two replicas would
hold them, share one window through the real script, in real time (the script stamps starts on the
Redis server's clock). The checks are counts of start times within sliding windows; the one bound on
how fast the machine is, the 80 % of a 20/s limit reached, is far below what one core does.

Every test has keys of its own (a prefix), deleted afterwards. The restart test stops the Redis
server by its pid and starts it again with ../shared/scripts/services-up, always, even when it
fails; this Redis keeps nothing across a restart, as a restarted Redis without persistence would.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import uuid4

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from orchestrator.clock import SystemClock
from orchestrator.pipeline.limiter import BETA, Limiter, open_limiter
from orchestrator.pipeline.shared_limit import RedisWindow, limit_key
from orchestrator.settings import LimitSettings, Settings
from tests.e2e.cli import until
from tests.integration import test_redis
from tests.integration.test_redis import URL, redis_stopped
from tests.unit.fakes import aep_settings

pytestmark = pytest.mark.integration

RATE = 20
CALL = 0.05  # seconds a call takes once started

client = test_redis.client  # the machine's Redis (skips, or fails in CI, when it does not answer)


@pytest.fixture
async def key(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    prefix = f"it-limit-{uuid4().hex[:10]}"
    try:
        yield limit_key("org@AdobeOrg", "prod", prefix)
    finally:
        stale = [name async for name in client.scan_iter(match=f"{prefix}:*")]
        if stale:
            await client.delete(*stale)


@asynccontextmanager
async def replicas(key: str, count: int = 2) -> AsyncIterator[list[Limiter]]:
    settings = LimitSettings(rate=RATE, period=1.0, concurrency=8)
    made = [Limiter(settings, shared=RedisWindow(URL, key, f"host/{i}/it", RATE)) for i in range(count)]
    try:
        for limiter in made:
            await limiter.start()
        yield made
    finally:
        for limiter in made:
            await limiter.aclose()


async def calling(limiter: Limiter, starts: list[float], stop: asyncio.Event) -> None:
    """Calls through `limiter` from 8 tasks (its concurrency) until `stop`; each start's time."""

    async def worker() -> None:
        while not stop.is_set():
            async with limiter.slot():
                starts.append(time.monotonic())
                await asyncio.sleep(CALL)

    await asyncio.gather(*(worker() for _ in range(8)))


def most_in_a_second(starts: list[float]) -> int:
    ordered = sorted(starts)
    return max((bisect.bisect_left(ordered, start + 1.0) - i for i, start in enumerate(ordered)), default=0)


async def holds_now(condition: bool) -> bool:
    """`until` polls a coroutine; the limiters' state needs none."""
    return condition


async def test_two_replicas_never_start_more_than_the_limit_in_any_second_together(key: str) -> None:
    async with replicas(key) as (a, b):
        starts_a: list[float] = []
        starts_b: list[float] = []
        stop = asyncio.Event()
        began = time.monotonic()
        running = [
            asyncio.create_task(calling(a, starts_a, stop)),
            asyncio.create_task(calling(b, starts_b, stop)),
        ]
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*running)

    together = [start for start in starts_a + starts_b if start < began + 3.0]
    print(f"3 s: {len(starts_a)} + {len(starts_b)} starts, at most {most_in_a_second(together)} in a second")
    assert starts_a  # both took starts from the one window
    assert starts_b
    assert most_in_a_second(starts_a + starts_b) <= RATE
    # At least 80 % of the limit together: 48 of 60 in the first 3 s (a window's worth at once,
    # then one every window of 1.03 s).
    assert len(together) >= 0.8 * RATE * 3


async def test_a_429_at_one_replica_pauses_the_other(key: str, client: redis.asyncio.Redis) -> None:
    async with replicas(key) as (a, b):
        throttled = time.monotonic()
        a.record(429, "1")
        pause = f"{key}:pause"
        await until(lambda: holds_now(not a._sharing), "the pause to be shared", timeout=5)
        assert 0 < await client.pttl(pause) <= 1000

        async with b.slot():
            started = time.monotonic()

        # b saw no 429 itself: the pause and the rate cut came through Redis.
        assert started - throttled >= 0.99
        assert b.throttle_signals == 0
        assert b.effective_rate == pytest.approx(RATE * BETA)


async def test_redis_stopped_mid_run_falls_back_to_the_share_and_comes_back(
    key: str, client: redis.asyncio.Redis
) -> None:
    async with replicas(key) as (a, b):
        starts_a: list[float] = []
        starts_b: list[float] = []
        stop = asyncio.Event()
        with capture_logs() as logs:
            running = [
                asyncio.create_task(calling(a, starts_a, stop)),
                asyncio.create_task(calling(b, starts_b, stop)),
            ]
            try:
                await asyncio.sleep(1.0)
                async with redis_stopped(client):  # started again on the way out, whatever happens
                    stopped = time.monotonic()
                    await until(lambda: holds_now(a.shared_lost and b.shared_lost), "both to fall back", 5)
                    lost = time.monotonic()
                    await asyncio.sleep(2.5)
                back = time.monotonic()
                await until(
                    lambda: holds_now(not a.shared_lost and not b.shared_lost), "both to come back", 15
                )
                restored = time.monotonic()
                await asyncio.sleep(1.5)
            finally:
                stop.set()
                await asyncio.gather(*running)

    events = [entry["event"] for entry in logs]
    outage = [start for start in starts_a + starts_b if stopped < start < back]
    after = [start for start in starts_a + starts_b if start > restored]
    print(
        f"lost {lost - stopped:.3f} s after the stop, back {restored - back:.3f} s after the start; "
        f"{len(outage)} starts without Redis, {len(after)} after; "
        f"at most {most_in_a_second(starts_a + starts_b)} in a second"
    )
    assert events.count("limiter.shared_lost") == 2  # once each
    assert events.count("limiter.shared_restored") == 2
    # Calls went on without Redis, after a window's hold each on half the rate (the shared window
    # had seen both replicas), and never waited on the dead server for long.
    assert lost - stopped < 1.0
    assert len(outage) >= RATE
    for own in (starts_a, starts_b):
        assert most_in_a_second([start for start in own if lost < start < back]) <= RATE // 2
    assert after
    # The limit held all along: before, across the loss (the hold), without Redis (the shares), and
    # across the return (the starts made on the shares told to the window, the shares kept a while).
    assert most_in_a_second(starts_a + starts_b) <= RATE


async def test_a_late_start_is_moved_to_when_it_goes_out(key: str, client: redis.asyncio.Redis) -> None:
    """The script's side of a late start: its entry moves from where it was taken to the head, at
    Redis's now, and the window stays newest first; an entry already gone is counted anyway."""
    window = RedisWindow(URL, key, "host/1/it", 3)
    try:
        first = await window.hit(3, 1.0)
        second = await window.hit(3, 1.0)
        assert first.admitted
        assert second.admitted
        assert first.stamp is not None
        await asyncio.sleep(0.02)
        await window.restamp(first.stamp, 1.0)
        stamps = [float(entry) for entry in await client.lrange(f"{key}:window", 0, -1)]
        assert len(stamps) == 2
        assert stamps == sorted(stamps, reverse=True)
        assert stamps[1] == float(second.stamp or "nan")
        assert stamps[0] - float(first.stamp) >= 20  # ms
        await window.restamp("1.000", 1.0)  # no such entry: one more start is counted
        assert await client.llen(f"{key}:window") == 3
        assert 0 < await client.pttl(f"{key}:window") <= 1000
    finally:
        await window.close()


class NoLeases:
    async def lease_owners(self) -> set[str]:
        return set()


async def test_the_service_s_limiter_checks_redis_at_start(client: redis.asyncio.Redis) -> None:
    sandbox = f"it-{uuid4().hex[:10]}"  # keys of its own under the service's prefix
    key = limit_key(aep_settings().org_id, sandbox)
    settings = Settings(aep=aep_settings(sandbox=sandbox), limits=LimitSettings(rate=RATE, redis_url=URL))
    nowhere = Settings(
        aep=aep_settings(sandbox=sandbox), limits=LimitSettings(rate=RATE, redis_url="redis://127.0.0.1:1/0")
    )
    try:
        with capture_logs() as logs:
            async with (
                open_limiter(settings, SystemClock(), NoLeases(), "host/1/it", pause_cap=60) as limiter,
                limiter.slot(),
            ):
                pass
            assert await client.llen(f"{key}:window") == 1
            began = time.monotonic()
            async with open_limiter(nowhere, SystemClock(), NoLeases(), "host/1/it", pause_cap=60) as limiter:
                assert limiter.shared_lost  # said at start, not at the first call
        assert time.monotonic() - began < 1.0  # a refused connection costs no wait
        shared, lost = (
            [entry for entry in logs if entry["event"] == name]
            for name in ("limiter.shared", "limiter.shared_lost")
        )
        assert [entry["key"] for entry in shared] == [key]
        assert len(lost) == 1
    finally:
        stale = [name async for name in client.scan_iter(match=f"{key}:*")]
        if stale:
            await client.delete(*stale)
