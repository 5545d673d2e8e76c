"""SQL engines, made in one place so the store and the embedded queue get the same settings.

SQLite holds up under concurrency (this service's coroutines, the `enqueue` CLI writing while the
service runs, a second replica on the same file) only with these settings on every connection
(reference §3.1):

- WAL, so readers never block the writer and the writer never blocks readers. It is a setting of
  the file, made once per engine before its pool connects (`use_wal`), because making it is the one
  place where SQLite fails at once instead of waiting `busy_timeout` (see there);
- `busy_timeout`, so a writer waits for the lock instead of failing with "database is locked";
- every write transaction starts with `BEGIN IMMEDIATE`: a deferred transaction that reads and then
  writes cannot upgrade its lock once another connection has committed, and then fails at once,
  ignoring `busy_timeout`. Taking the write lock at BEGIN makes the wait happen where
  `busy_timeout` applies. Read-only work goes through `reader(engine)`, which begins deferred and
  so never waits for (or holds up) a writer.
- `synchronous=FULL` where a lost commit is expensive: WAL with NORMAL may roll back the last
  commits on power loss, and a lost `created` row means a second batch.

PostgreSQL needs none of this; its URLs get the asyncpg driver (an optional extra) and a pool:

- `POSTGRES_POOL_SIZE` connections kept, `POSTGRES_MAX_OVERFLOW` more for bursts. A replica's writes
  run concurrently there (see `SqlBatchStore`): the outcome writer and outcomes written alone (a
  row locked elsewhere), the claim loop, lease renewals, intake's records, the event relay, the
  monitor's and `--until-idle`'s reads. Each holds a connection for a few milliseconds, so 10
  (15 in a burst) serve the default 16 calls in flight with little waiting, and a write that finds
  none free waits for one (up to SQLAlchemy's `pool_timeout`, 30 s) rather than failing. Three
  replicas stay at 45 connections at most, inside PostgreSQL's default `max_connections` of 100;
- a pre-ping (`_ping`): every checkout tests the connection first, so the connections a database
  restart broke are replaced instead of failing the next statement (reference §4). A connection lost in
  the middle of a transaction still fails that transaction: the callers treat it as any store
  error (wait, then try again), and nothing half-written is committed;
- a connect timeout, so that a database that does not answer at all fails a checkout within
  `POSTGRES_CONNECT_TIMEOUT` seconds instead of asyncpg's 60.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool
from sqlalchemy.util import await_only

from orchestrator.settings import ConfigError

Synchronous = Literal["FULL", "NORMAL"]
T = TypeVar("T")

# A connection execution option: transactions on connections that carry it begin deferred.
READ_ONLY = "orchestrator_read_only"

BUSY_TIMEOUT_MS = 5000

# PostgreSQL's pool (see the module's docstring).
POSTGRES_POOL_SIZE = 10
POSTGRES_MAX_OVERFLOW = 5
POSTGRES_CONNECT_TIMEOUT = 10.0

# Retries of the switch to WAL (`use_wal`): full jitter, so openers started together spread out,
# over a window doubling from the first to the last value. The lock they wait for is held for one
# write of the file's first page, a few milliseconds.
_WAL_RETRY_FIRST = 0.002
_WAL_RETRY_LAST = 0.05


def async_url(url: str) -> URL:
    """The SQLAlchemy URL with its async driver: `sqlite:///var/x.db` -> `sqlite+aiosqlite:///…`,
    `postgresql://` (or `postgres://`) -> `postgresql+asyncpg://`.

    A relative SQLite path is relative to the working directory (SQLAlchemy's rule), resolved here
    once so a later `chdir` cannot move the database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("not a database URL (expected sqlite:///PATH or postgresql://…)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        if _is_file(parsed):
            assert parsed.database is not None  # _is_file checked it
            parsed = parsed.set(database=str(Path(parsed.database).absolute()))
        return parsed
    if backend in {"postgresql", "postgres"}:
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database {backend!r} (expected sqlite:///PATH or postgresql://…)")


def create_engine(
    url: str, *, synchronous: Synchronous = "FULL", pool_size: int | None = None
) -> AsyncEngine:
    """One engine per database; dispose it on close (an open aiosqlite thread hangs interpreter exit).

    SQLite defaults to a single pooled connection: SQLite has one writer at a time anyway, so
    coroutines queue on the pool (fair, no timeout to run out) instead of spinning in SQLite's
    busy handler. `busy_timeout` then only arbitrates between processes. PostgreSQL defaults to
    `POSTGRES_POOL_SIZE`.
    """
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        return _sqlite_engine(target, synchronous, pool_size or 1)
    _require_asyncpg()
    engine = create_async_engine(
        target,
        pool_size=pool_size or POSTGRES_POOL_SIZE,
        max_overflow=POSTGRES_MAX_OVERFLOW,
        connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT},
    )
    event.listen(engine.sync_engine, "checkout", _ping)
    return engine


def _ping(adapted: Any, _record: Any, _proxy: Any) -> None:
    """SQLAlchemy's `pool_pre_ping`, in one round trip where its asyncpg adapter takes three.

    The adapter pings inside a transaction of its own (BEGIN, `;`, ROLLBACK) for PgBouncer's
    transaction mode, which the store does not support anyway (asyncpg caches prepared statements
    per connection); and a claim or an outcome waits for every round trip on a loop that is busy
    with calls. A connection whose ping fails is replaced, and every pooled connection older than
    it too, as after a failed pre-ping (`InvalidatePoolError`): after a database restart none of
    them fails a statement."""
    try:
        await_only(adapted._connection.fetchrow(";"))
    except Exception as error:
        raise InvalidatePoolError(f"ping failed: {type(error).__name__}") from error


async def open_engine(
    url: str, *, synchronous: Synchronous = "FULL", pool_size: int | None = None
) -> AsyncEngine:
    """`create_engine` on a worker thread: on a new SQLite file it may wait for another process's
    lock (`use_wal`), and that wait must not stall the event loop."""
    return await asyncio.to_thread(create_engine, url, synchronous=synchronous, pool_size=pool_size)


def use_wal(
    database: str | Path,
    *,
    timeout: float = BUSY_TIMEOUT_MS / 1000,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    uniform: Callable[[float, float], float] = random.uniform,
) -> None:
    """Put the SQLite file `database` in WAL mode (creating it if need be), retrying while it is locked.

    Switching a new file to WAL reads its header, then writes it: a read lock upgraded to a write
    lock. When another connection holds the write lock meanwhile (another process or engine making
    the same switch), SQLite answers SQLITE_BUSY at once, without calling the busy handler, since
    waiting with a read lock held could deadlock. So `busy_timeout` cannot help, and openers
    started together on a new file (`enqueue` beside `run`, two replicas) failed with "database is
    locked". Each try is a new connection with no lock held, retried after a jittered pause until
    `timeout` (the busy timeout) has passed; other errors are raised at once. A file already in
    WAL mode only has its header read: no write lock, nothing to wait for.

    `sleep`, `monotonic` and `uniform` are there for tests.
    """
    deadline = monotonic() + timeout
    window = _WAL_RETRY_FIRST
    while True:
        remaining = deadline - monotonic()
        try:
            # The connection's own busy timeout covers the waits SQLite does allow (e.g. for the
            # commit, while other connections still read the old header).
            connection = sqlite3.connect(database, timeout=max(0.0, remaining), isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL").fetchall()
            finally:
                connection.close()
            return
        except sqlite3.OperationalError as exc:
            # Extended codes (SQLITE_BUSY_RECOVERY, …) carry SQLITE_BUSY in their low byte.
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or remaining <= 0:
                raise
        sleep(min(uniform(0.0, window), max(0.0, deadline - monotonic())))
        window = min(window * 2, _WAL_RETRY_LAST)


async def on_driver(connection: AsyncConnection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run `work` with the sqlite3 connection under `connection`, in its transaction, on the
    thread aiosqlite runs that connection's calls on, in order with them.

    For the hottest writes (`store.sqlite_direct`, the embedded queue's claim): one hop to that
    thread for all their statements, where SQLAlchemy's adapter makes three or four per statement
    (cursor, execute, fetchall, close), each waking the event loop."""
    pooled = await connection.get_raw_connection()
    driver: Any = pooled.driver_connection  # aiosqlite.Connection
    # `_execute` is how aiosqlite's own methods queue a call for its thread (pinned in
    # pyproject.toml; tests/unit/test_sqlite_direct.py fails should a release change it).
    try:
        result: T = await driver._execute(work, driver._conn)
    except sqlite3.Error as exc:
        # As SQLAlchemy would raise it (OperationalError, IntegrityError, ...): callers see one
        # kind of error from the store whichever path the write took.
        name = getattr(work, "func", work).__name__
        raise DBAPIError.instance(name, None, exc, sqlite3.Error) from exc
    return result


def reader(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (same pool), for read-only transactions: on SQLite they begin deferred."""
    return engine.execution_options(**{READ_ONLY: True})


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _is_file(url: URL) -> bool:
    database = url.database
    return bool(database) and database != ":memory:" and not url.query.get("uri")


def _require_asyncpg() -> None:
    # SQLAlchemy imports the driver when it makes the engine; without this, a plain install
    # (no extras) told to use PostgreSQL stops with a traceback ending in ModuleNotFoundError.
    # Only the store takes a PostgreSQL URL (the embedded queue is SQLite), hence the setting named.
    try:
        importlib.import_module("asyncpg")
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":  # asyncpg is there but broken: that is not a configuration problem
            raise
        raise ConfigError(
            ["ORCH_STORE__URL: PostgreSQL needs the asyncpg driver: pip install 'aep-orchestrator[postgres]'"]
        ) from None


def _sqlite_engine(url: URL, synchronous: Synchronous, pool_size: int) -> AsyncEngine:
    pragmas = [
        f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
    ]
    if _is_file(url):
        assert url.database is not None  # _is_file checked it
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # Before the pool connects, so no pooled connection ever has to make the switch.
        use_wal(url.database)
        engine = create_async_engine(
            url, poolclass=AsyncAdaptedQueuePool, pool_size=pool_size, max_overflow=0, pool_timeout=120
        )
    else:
        # An in-memory database exists once per connection: share one (tests, experiments).
        engine = create_async_engine(url, poolclass=StaticPool)
        # No file to switch ahead (a URI database's path is SQLite's to parse): per connection.
        pragmas.insert(1, "PRAGMA journal_mode=WAL")

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the driver from issuing its own (deferred) BEGIN; `_begin` below issues ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
