"""SQL engines, made in one place so the store and the embedded queue get the same settings.

SQLite holds up under concurrency (this service's coroutines, the `enqueue` CLI writing while the
service runs, a second replica on the same file) only with these settings on every connection
(reference §3.1):

- WAL, so readers never block the writer and the writer never blocks readers;
- `busy_timeout`, so a writer waits for the lock instead of failing with "database is locked";
- every write transaction starts with `BEGIN IMMEDIATE`: a deferred transaction that reads and then
  writes cannot upgrade its lock once another connection has committed, and then fails at once,
  ignoring `busy_timeout`. Taking the write lock at BEGIN makes the wait happen where
  `busy_timeout` applies. Read-only work goes through `reader(engine)`, which begins deferred and
  so never waits for (or holds up) a writer.
- `synchronous=FULL` where a lost commit is expensive: WAL with NORMAL may roll back the last
  commits on power loss, and a lost `created` row means a second batch.

PostgreSQL needs none of this; its URLs only get the asyncpg driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

Synchronous = Literal["FULL", "NORMAL"]

# A connection execution option: transactions on connections that carry it begin deferred.
READ_ONLY = "orchestrator_read_only"

BUSY_TIMEOUT_MS = 5000


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
    busy handler. `busy_timeout` then only arbitrates between processes.
    """
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        return _sqlite_engine(target, synchronous, pool_size or 1)
    options: dict[str, Any] = {"pool_pre_ping": True}
    if pool_size is not None:
        options["pool_size"] = pool_size
    return create_async_engine(target, **options)


def reader(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (same pool), for read-only transactions: on SQLite they begin deferred."""
    return engine.execution_options(**{READ_ONLY: True})


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _is_file(url: URL) -> bool:
    database = url.database
    return bool(database) and database != ":memory:" and not url.query.get("uri")


def _sqlite_engine(url: URL, synchronous: Synchronous, pool_size: int) -> AsyncEngine:
    if _is_file(url):
        assert url.database is not None  # _is_file checked it
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, poolclass=AsyncAdaptedQueuePool, pool_size=pool_size, max_overflow=0, pool_timeout=120
        )
    else:
        # An in-memory database exists once per connection: share one (tests, experiments).
        engine = create_async_engine(url, poolclass=StaticPool)
    pragmas = (
        # busy_timeout first: switching to WAL on a new file takes a lock another process may hold.
        f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
    )

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
