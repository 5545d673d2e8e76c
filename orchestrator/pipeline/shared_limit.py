"""The rate limit shared by every replica (`ORCH_LIMITS__REDIS_URL`), and the census of replicas.

`RedisWindow` keeps, per org and sandbox, what the in-process `SlidingLog` keeps per process: the
start times of the latest calls (a moving window), plus the shared pause and which replicas are
taking calls. One Lua script per call start reads the pause and takes a place in the window in one
round trip.

Why a script of our own and not `limits`' `MovingWindowRateLimiter` (the same algorithm: a list of
timestamps per key, LINDEX limit-1, LPUSH, LTRIM), measured with two processes sharing 20/s through
the local Redis for 10 s (start times taken when the call would go out):

- `limits` stamps an entry with the client's `time.time()` before the round trip, and its windows
  are whole seconds (its script ends with EXPIRE, which refuses `1.03`). At 20 per 1 s, 16 to 27
  sliding seconds of start times held 21 or 22 starts, on an idle and on a loaded machine alike.
  Stamped with the Redis server's clock in the script, at 1 s: 3; at the in-process limiter's
  window (2 % + 10 ms wider than the period, see limiter.py): 0, in every run.
- The server's clock is also one clock for all replicas: with client stamps, replicas on hosts whose
  clocks differ by d let d's worth of extra calls into every window.
- `limits` puts the limit into the key: replicas whose adaptive rates differ (one just throttled)
  would each count in a window of its own, and share nothing.
- `limits` trims the list to the caller's limit: a replica at a cut rate would drop entries that a
  replica at the full rate still needs to count. Here the list keeps the configured RATE.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from orchestrator import logs
from orchestrator.clock import Clock
from orchestrator.owners import died_here
from orchestrator.settings import ConfigError

if TYPE_CHECKING:
    import redis.asyncio

log = logs.get("limiter")

T = TypeVar("T")

# Seconds one Redis operation may take, connecting included, before the limit falls back to the
# per-replica share: a start waits at most this long on a Redis that stopped answering.
TIMEOUT = 0.3
# Seconds during which a replica counts as live for the per-replica share after its last call start.
PRESENCE = 30.0


class SharedUnavailable(Exception):
    """The shared limit's store did not answer (in time, or at all)."""


@dataclass(frozen=True)
class Hit:
    """The answer to a start: `admitted`, or how long to wait (`wait`: the window is full, or
    `paused`: the shared pause runs that much longer, started by the throttle signal `signal`)."""

    admitted: bool
    wait: float = 0.0
    paused: float = 0.0
    # When the pause was last extended, in ms on the shared store's clock: tells one throttle
    # signal from another across replicas (see Limiter._paused_elsewhere).
    signal: int | None = None
    # Replicas that started a call within PRESENCE seconds, this one included.
    replicas: int = 1
    # An admitted start's entry in the window, for `SharedWindow.restamp`.
    stamp: str | None = None


@dataclass(frozen=True)
class Pause:
    """The shared pause after a throttle signal: seconds left, and its signal (as in `Hit`)."""

    remaining: float
    signal: int


class SharedWindow(Protocol):
    """A moving window and a pause that several limiters share. Every method raises
    `SharedUnavailable`, within `TIMEOUT`, when the store behind it does not answer."""

    async def ping(self) -> None: ...

    async def hit(self, limit: int, window: float, backfill: int = 0) -> Hit:
        """Take a place among at most `limit` starts in any `window` seconds, unless paused;
        first count `backfill` starts made now that the window did not see (made while it was
        out of reach)."""

    async def pause(self, seconds: float) -> Pause:
        """Make the pause last at least `seconds` from now (it is never shortened)."""

    async def restamp(self, stamp: str, window: float) -> None:
        """Move the start admitted as `stamp` to now: it went out later than it was admitted."""

    async def close(self) -> None: ...


# KEYS: the window (start times in ms, newest first), the pause, the replicas (a sorted set).
# ARGV: limit, window (ms), entries kept, this replica, presence (ms), starts to backfill.
# Replies {admitted, wait in ms (a string: Lua numbers become integers), pause signal or '', replicas,
# the admitted start's stamp or ''}.
HIT = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 7)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local presence = tonumber(ARGV[5])
redis.call('ZADD', KEYS[3], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - presence)
redis.call('PEXPIRE', KEYS[3], math.ceil(presence))
local replicas = redis.call('ZCARD', KEYS[3])
local stamp = string.format('%.3f', now)
local backfill = tonumber(ARGV[6])
if backfill > 0 then
  for _ = 1, backfill do redis.call('LPUSH', KEYS[1], stamp) end
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
end
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {0, tostring(paused), redis.call('GET', KEYS[2]) or '', replicas, ''}
end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local oldest = redis.call('LINDEX', KEYS[1], limit - 1)
if oldest then
  local wait = tonumber(oldest) + window - now
  if wait > 0 then
    return {0, string.format('%.3f', wait), '', replicas, ''}
  end
end
redis.call('LPUSH', KEYS[1], stamp)
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(window))
return {1, '0', '', replicas, stamp}
"""

# KEYS: the window. ARGV: the stamp to move, entries kept, window (ms). One entry of that stamp
# becomes one of now, at the head where the newest are. Pushed even when the entry is gone (trimmed
# by newer ones): the late start did go out now, and counting it once more only errs on the slow side.
RESTAMP = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LPUSH', KEYS[1], string.format('%.3f', now))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""

# KEYS: the pause. ARGV: ms. The value is the signal: when it was last extended (server ms).
# Replies {ms left, signal}.
PAUSE = """
if redis.replicate_commands then redis.replicate_commands() end
local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ms then
  local t = redis.call('TIME')
  local signal = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[1], signal, 'PX', ms)
  return {ms, signal}
end
return {left, redis.call('GET', KEYS[1])}
"""


def limit_key(org_id: str | None, sandbox: str, prefix: str = "orch:limit") -> str:
    """The keys' common part. The braces are a Redis Cluster hash tag: the script's keys must live
    on one node."""
    return f"{prefix}:{{{org_id or '-'}/{sandbox}}}"


class RedisWindow:
    """`SharedWindow` on Redis (or Valkey): `url` is `redis://`, `rediss://` or `unix://`; `key`
    from `limit_key`; `member` names this replica; `keep` is the configured RATE (entries kept).
    Made without connecting; raises ConfigError when the client is not installed (it comes with
    the `redis` extra, imported only here) or the URL is not one it takes."""

    def __init__(self, url: str, key: str, member: str, keep: int) -> None:
        try:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ModuleNotFoundError as exc:
            raise ConfigError(
                [
                    f"ORCH_LIMITS__REDIS_URL: the Redis client ({exc.name}) is not installed: "
                    "pip install 'aep-orchestrator[redis]'"
                ]
            ) from None
        try:
            self._client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
                url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                # One retry, at once, on a fresh connection: a pooled connection that a Redis
                # restart cut fails once and the next one works. A dead server fails both fast.
                retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
            )
        except ValueError:  # its message may hold the URL, password included
            raise ConfigError(["ORCH_LIMITS__REDIS_URL: not a Redis URL the client takes"]) from None
        self._errors = (redis.exceptions.RedisError, OSError, TimeoutError)
        self._window, self._pause, self._replicas = f"{key}:window", f"{key}:pause", f"{key}:replicas"
        self._member = member
        self._keep = keep
        self._hit = self._client.register_script(HIT)
        self._set_pause = self._client.register_script(PAUSE)
        self._restamp = self._client.register_script(RESTAMP)

    async def ping(self) -> None:
        await self._call(lambda: self._client.ping())

    async def hit(self, limit: int, window: float, backfill: int = 0) -> Hit:
        keys = [self._window, self._pause, self._replicas]
        keep = max(self._keep, limit)
        args: list[str | int | float] = [limit, window * 1000, keep, self._member, PRESENCE * 1000, backfill]
        admitted, wait, signal, replicas, stamp = await self._call(lambda: self._hit(keys=keys, args=args))
        if admitted:
            return Hit(True, replicas=int(replicas), stamp=stamp.decode())
        if signal:
            return Hit(False, paused=float(wait) / 1000, signal=int(signal), replicas=int(replicas))
        return Hit(False, wait=float(wait) / 1000, replicas=int(replicas))

    async def pause(self, seconds: float) -> Pause:
        ms = math.ceil(seconds * 1000)
        left, signal = await self._call(lambda: self._set_pause(keys=[self._pause], args=[max(1, ms)]))
        return Pause(int(left) / 1000, int(signal))

    async def restamp(self, stamp: str, window: float) -> None:
        args: list[str | int | float] = [stamp, self._keep, window * 1000]
        await self._call(lambda: self._restamp(keys=[self._window], args=args))

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(TIMEOUT):
                return await operation()
        except self._errors as exc:
            raise SharedUnavailable(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {TIMEOUT} s"
    return f"{type(exc).__name__}: {exc}"


class LeaseOwners(Protocol):
    async def lease_owners(self) -> set[str]: ...


# Seconds between two looks at the store for other replicas.
CENSUS_INTERVAL = 30.0


class ReplicaCensus:
    """Counts the replicas working on the store: this one, and every other owner of a lease there
    (the dispatcher's `host/pid/random`), except processes of this host that are gone. It looks at
    start and every CENSUS_INTERVAL seconds, reports the count (the per-replica share when the
    shared limit is lost), and, when the limit is not shared, warns once that it is per replica.

    The store keeps a lease until its request is recorded or taken over: a replica killed on
    another host counts until its leases are taken over (15 s after they run out when there is work),
    which errs on the side of a smaller share. An idle replica holds no lease and is not seen."""

    def __init__(
        self,
        store: LeaseOwners,
        owner: str,
        clock: Clock,
        on_count: Callable[[int], None],
        *,
        shared: bool,
        rate: float,
        period: float,
        interval: float = CENSUS_INTERVAL,
    ) -> None:
        self._store = store
        self._owner = owner
        self._clock = clock
        self._on_count = on_count
        self._shared = shared
        self._rate = rate
        self._period = period
        self._interval = interval
        self._warned = False

    async def run(self) -> None:
        while True:
            await self.look()
            await self._clock.sleep(self._interval)

    async def look(self) -> int | None:
        """Count now; None when the store did not answer (its users report that)."""
        try:
            owners = await self._store.lease_owners()
        except Exception as exc:  # noqa: BLE001 - counted again at the next look
            log.debug("limiter.census_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        others = {owner for owner in owners if owner != self._owner and not died_here(owner)}
        count = 1 + len(others)
        self._on_count(count)
        if others and not self._shared and not self._warned:
            self._warned = True
            log.warning(
                "limiter.not_shared",
                replicas=count,
                rate=self._rate,
                period=self._period,
                hint=(
                    f"the rate limit is per replica: the {count} replicas working on this store may "
                    f"together call AEP up to {count} x {self._rate:g} times per {self._period:g} s; "
                    "set ORCH_LIMITS__REDIS_URL on every replica to share one limit"
                ),
            )
        return count
