"""The store's most frequent writes on PostgreSQL, sent to asyncpg directly.

Every request passes through three writes on the create path: its add, its claim and its outcome,
each with its trail row. Through SQLAlchemy Core a statement costs its cache key, its parameter
processing (per row, for the many-row writes) and its result processing, and with RabbitMQ and
PostgreSQL those writes were a third of the service's CPU per request (`bench/ab.py --backend
brokered`). Here each is SQL text written once, sent with asyncpg's own statement cache, its rows
as arrays (`unnest`): one statement and one round trip for a claim, an add of many requests, the
trail rows of a transaction, or the lease check of many outcomes.

They run inside the transaction SQLAlchemy began (`run`): its commit and rollback, and the
pool's handling of a broken connection, stay SQLAlchemy's. Everything rarer (rejects, renewals,
releases, reconciliations, the upload stage) stays on SQLAlchemy Core, as on SQLite
(`sqlite_direct`). The array types are the table's own column types, so this cannot drift from the
schema; `tests/integration/test_store_postgres.py` runs the store's tests over this path.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.store.schema import (
    ADD_COLUMNS,
    NO_LEASE,
    OUTBOX_COLUMNS,
    OUTCOME,
    TRAIL_COLUMNS,
    aware,
    batch_event,
    batch_request,
    event_outbox,
)

T = TypeVar("T")

_COLUMNS = tuple(column.name for column in batch_request.c)
_OUTCOME = tuple(column.name for column in OUTCOME)
_UNLEASE = ", ".join(f"{name} = NULL" for name in NO_LEASE)


async def run(
    connection: AsyncConnection, work: Callable[[Any], Awaitable[T]], *, one_statement: bool = False
) -> T:
    """Run `work` with the asyncpg connection under `connection`, in the transaction SQLAlchemy
    began on it; with `one_statement` (`work` is a single statement, the transaction's only one),
    as that statement's own implicit transaction instead.

    `one_statement` saves the BEGIN's and the COMMIT's round trips, half of a claim's with the
    checkout's ping. Each waits for a turn of a loop that is busy with the calls, and the claim loop
    waits for the claim (10 ms instead of 11 at 2,500 requests a second). A statement is atomic on
    its own, and the commit SQLAlchemy then asks for has nothing to send.

    SQLAlchemy's asyncpg adapter starts its transaction at the first statement it executes, so
    before the first direct one it is started here, the adapter's way, and the adapter commits or
    rolls it back as usual. `_transaction`, `_start_transaction` and `_connection` are the
    adapter's own (SQLAlchemy's minor version is pinned in pyproject.toml;
    tests/integration/test_store_postgres.py fails should a release change them). Errors are raised
    as SQLAlchemy would raise them, so callers see one kind of error from the store whichever path
    the write took."""
    pooled = await connection.get_raw_connection()
    adapted: Any = pooled.dbapi_connection  # AsyncAdapt_asyncpg_connection
    driver = adapted.dbapi.asyncpg
    if one_statement and adapted._transaction is not None:
        # What ran before it on this transaction would be committed with it, not before it.
        raise RuntimeError(f"{_name(work)}: one statement, but the transaction has begun")
    try:
        if not one_statement and adapted._transaction is None:
            await adapted._start_transaction()
        return await work(adapted._connection)
    except adapted.dbapi.Error as exc:  # already translated (by `_start_transaction`)
        raise DBAPIError.instance(_name(work), None, exc, adapted.dbapi.Error) from exc
    except (driver.PostgresError, driver.InterfaceError, OSError) as exc:
        try:
            # The adapter's mapping of asyncpg's errors to DBAPI's (and it forgets a transaction
            # whose connection is gone), as for a statement sent through SQLAlchemy.
            adapted._handle_exception(exc)
        except adapted.dbapi.Error as translated:
            raise DBAPIError.instance(_name(work), None, translated, adapted.dbapi.Error) from exc
        raise  # pragma: no cover - `_handle_exception` always raises


def _name(work: Callable[..., Any]) -> str:
    return str(getattr(getattr(work, "func", work), "__name__", "postgres_direct"))


def bind(value: Any) -> Any:
    """A value as asyncpg takes it: times must be aware (the store's rule on every dialect)."""
    return aware(value) if isinstance(value, datetime) else value


# --- adds -------------------------------------------------------------------------------------------


async def add_requests(rows: Sequence[tuple[Any, ...]], db: Any) -> dict[str, int]:
    """Insert `rows` (values of ADD_COLUMNS) unless their request id is taken: the ids of those
    inserted, by request id. A request id given twice is inserted once."""
    if not rows:
        return {}
    found = await db.fetch(_INSERT, *_arrays(rows))
    return {request_id: pk for pk, request_id in found}


# --- claims -----------------------------------------------------------------------------------------

# A create attempt's claim, in one statement: the due rows without a live lease on the database's
# clock, in due order, locked (replicas claiming at once skip each other's rows), then leased with
# one token. SET reads the row as it was: a lease still set means the last attempt's holder died
# before recording its outcome, so the batch may exist (needs_lookup). RETURNING gives the rows as
# the lease left them, and whether a lease was taken over.
_CLAIM = (
    "WITH due AS ("  # noqa: S608 - names from the table; values bound
    "SELECT id, lease_expires_at IS NOT NULL AS leased FROM batch_request "
    "WHERE next_attempt_at <= $1 AND (lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp()) "
    "ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) "
    "UPDATE batch_request AS r SET lease_token = $3, lease_owner = $4, "
    "lease_expires_at = clock_timestamp() + make_interval(secs => $5), updated_at = $1, "
    "attempts = r.attempts + 1, needs_lookup = (r.needs_lookup OR r.lease_expires_at IS NOT NULL) "
    f"FROM due WHERE r.id = due.id RETURNING {', '.join(f'r.{name}' for name in _COLUMNS)}, due.leased"
)


async def lease_due(
    owner: str, token: str, limit: int, now: datetime, lease_seconds: float, db: Any
) -> tuple[list[Any], set[int]]:
    """Lease up to `limit` due rows for a create attempt (see `SqlBatchStore.claim`): the rows as
    the lease left them, in due order, and the ids of those whose earlier lease was taken over."""
    rows = await db.fetch(_CLAIM, aware(now), limit, token, owner, float(lease_seconds))
    # RETURNING keeps no order; the claim's is the due order, which the lease did not change.
    rows.sort(key=lambda row: (row["next_attempt_at"], row["id"]))
    return rows, {row["id"] for row in rows if row["leased"]}


# --- outcomes ---------------------------------------------------------------------------------------

_PAIRS = "unnest($1::text[], $2::text[]) AS p(request_id, lease_token)"
_MATCH = f"JOIN {_PAIRS} ON r.request_id = p.request_id AND r.lease_token = p.lease_token"
# The rows whose lease is still the outcome's, locked until the commit as the fenced UPDATE would
# lock them; a row another transaction holds is skipped (its outcome is then written alone).
_HELD = (
    f"SELECT {', '.join(f'r.{name}' for name in _OUTCOME)}, r.lease_token FROM batch_request AS r "  # noqa: S608 - names from the table; values bound
    f"{_MATCH} FOR UPDATE OF r SKIP LOCKED"
)
# Of the outcomes the lock skipped, those whose lease still holds (locked elsewhere, not gone).
_PRESENT = f"SELECT r.request_id, r.lease_token FROM batch_request AS r {_MATCH}"  # noqa: S608 - as above


async def write_outcomes(
    pairs: Sequence[tuple[str, str]],
    updates: Mapping[tuple[str, ...], Sequence[tuple[tuple[str, str], tuple[Any, ...]]]],
    db: Any,
) -> tuple[dict[tuple[str, str], tuple[Any, ...]], set[tuple[str, str]]]:
    """Outcomes written together, fenced by their leases. `pairs`: each outcome's (request id,
    lease token); `updates`: per set of columns, the outcomes' pairs and values (through `bind`
    already). Locks the rows whose lease still holds, then per set of columns one executemany over
    them, dropping their lease. Returns the OUTCOME columns of the rows written, by pair, and the
    pairs skipped because another transaction holds their row."""
    request_ids, tokens = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    held = {(row[1], row[-1]): tuple(row)[:-1] for row in await db.fetch(_HELD, request_ids, tokens)}
    locked: set[tuple[str, str]] = set()
    if len(held) < len(pairs):
        missing = [pair for pair in pairs if pair not in held]
        present = await db.fetch(_PRESENT, [pair[0] for pair in missing], [pair[1] for pair in missing])
        locked = {(request_id, token) for request_id, token in present}
    for columns, outcomes in updates.items():
        parameters = [(*values, held[pair][0]) for pair, values in outcomes if pair in held]
        if parameters:
            await db.executemany(_update_sql(columns), parameters)
    return held, locked


@functools.lru_cache(maxsize=32)
def _update_sql(columns: tuple[str, ...]) -> str:
    # Column names come from the store's code, never from input; checked against the table anyway.
    unknown = set(columns) - set(_COLUMNS)
    if unknown:
        raise ValueError(f"not columns of batch_request: {sorted(unknown)}")
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(columns, start=1))
    return f"UPDATE batch_request SET {assignments}, {_UNLEASE} WHERE id = ${len(columns) + 1}"  # noqa: S608 - names from the table; values bound


# --- the trail and the outbox -----------------------------------------------------------------------


async def write_trail(trail: Sequence[tuple[Any, ...]], outbox: Sequence[tuple[Any, ...]], db: Any) -> None:
    """The trail rows (values of batch_event's `TRAIL_COLUMNS`) and outbox rows (event id, body,
    time) of a transaction, one statement each."""
    if trail:
        await db.execute(_TRAIL, *_arrays(trail))
    if outbox:
        await db.execute(_OUTBOX, *_arrays(outbox))


def _arrays(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one array per column (`unnest` takes them back apart)."""
    return [[bind(value) for value in column] for column in zip(*rows, strict=True)]


def _unnest(table: Table, columns: Sequence[str]) -> str:
    """`unnest($1::type[], …)` over `columns` of `table`, each array typed as its column."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # sqlalchemy types it loosely
    types = [table.c[name].type.compile(dialect=dialect) for name in columns]
    return f"unnest({', '.join(f'${index}::{kind}[]' for index, kind in enumerate(types, start=1))})"


_INSERT = (
    f"INSERT INTO batch_request ({', '.join(ADD_COLUMNS)}) "  # noqa: S608 - names from the table; values bound
    f"SELECT * FROM {_unnest(batch_request, ADD_COLUMNS)} "
    "ON CONFLICT (request_id) DO NOTHING RETURNING id, request_id"
)
_TRAIL = (
    f"INSERT INTO batch_event ({', '.join(TRAIL_COLUMNS)}) "  # noqa: S608 - names from the table; values bound
    f"SELECT * FROM {_unnest(batch_event, TRAIL_COLUMNS)}"
)
_OUTBOX = (
    f"INSERT INTO event_outbox ({', '.join(OUTBOX_COLUMNS)}) "  # noqa: S608 - names from the table; values bound
    f"SELECT * FROM {_unnest(event_outbox, OUTBOX_COLUMNS)}"
)
