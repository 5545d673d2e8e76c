"""The store's most frequent writes on SQLite, sent to the sqlite3 driver directly.

Every request passes through three writes on the create path: its add, its claim and its outcome,
each with its trail row. Through SQLAlchemy Core and aiosqlite a statement costs its parameter
processing and three or four hops to aiosqlite's thread (cursor, execute, fetchall, close), each
waking the event loop; with them these writes were the largest share of the service's CPU after
the HTTP calls themselves. Here each of those writes is one function run on aiosqlite's thread
(`engine.on_driver`), inside the transaction SQLAlchemy began on that connection (`BEGIN IMMEDIATE`, see
`engine`): one hop for all its statements, SQL text written once, values bound as sqlite3 takes
them. The transaction, its commit and rollback, stay SQLAlchemy's.

Everything rarer (rejects, renewals, releases, reconciliations, the upload stage) stays on
SQLAlchemy Core; PostgreSQL's own direct path is `postgres_direct`. Times are written and read in
`UtcDateTime`'s text (`schema`), so rows read back the same whichever way they were written;
`tests/unit/test_store.py` runs the same tests over both paths.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean

from orchestrator.store.schema import (
    ADD_COLUMNS,
    NO_LEASE,
    OUTCOME,
    UtcDateTime,
    batch_request,
    from_sqlite_text,
    sqlite_text,
)

# Rows per INSERT: 13 values each stays far under SQLite's limit of 32,766 bound values.
ROWS_PER_INSERT = 500

_COLUMNS = tuple(column.name for column in batch_request.c)
_TIMES = tuple(name for name in _COLUMNS if isinstance(batch_request.c[name].type, UtcDateTime))
_FLAGS = tuple(name for name in _COLUMNS if isinstance(batch_request.c[name].type, Boolean))
_OUTCOME = tuple(column.name for column in OUTCOME)
_REQUEST_ID = _OUTCOME.index("request_id")
_UNLEASE = ", ".join(f"{name} = NULL" for name in NO_LEASE)

# A create attempt's claim: the due rows without a live lease, in due order (the partial index
# ix_batch_request_due), then leased with the same conditions again, one token for them all.
_DUE = (
    "SELECT id, lease_expires_at IS NOT NULL FROM batch_request "
    "WHERE next_attempt_at <= :now AND (lease_expires_at IS NULL OR lease_expires_at <= :now) "
    "ORDER BY next_attempt_at, id LIMIT :limit"
)
# SET reads the row as it was before the update: a lease still set means the last attempt's
# holder died before recording its outcome, so the batch may exist (needs_lookup).
_LEASE = (
    "UPDATE batch_request SET lease_token = :token, lease_owner = :owner, lease_expires_at = :expires, "  # noqa: S608 - names from the table; values bound
    "updated_at = :now, attempts = attempts + 1, "
    "needs_lookup = (needs_lookup OR lease_expires_at IS NOT NULL) "
    "WHERE id IN (SELECT value FROM json_each(:ids)) "
    "AND next_attempt_at <= :now AND (lease_expires_at IS NULL OR lease_expires_at <= :now) "
    f"RETURNING {', '.join(_COLUMNS)}"
)
_HELD = (
    f"SELECT {', '.join(_OUTCOME)}, lease_token FROM batch_request "  # noqa: S608 - names from the table's definition; values are bound
    "WHERE request_id IN (SELECT value FROM json_each(?))"
)
_FINGERPRINTS = (
    "SELECT request_id, fingerprint FROM batch_request WHERE request_id IN (SELECT value FROM json_each(?))"
)
_TRAIL = (
    "INSERT INTO batch_event (batch_request_id, at, from_state, to_state, attempt, detail) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_OUTBOX = "INSERT INTO event_outbox (event_id, body, created_at) VALUES (?, ?, ?)"


def bind(value: Any) -> Any:
    """A value as the store's SQLite columns hold it (a time as `UtcDateTime`'s text)."""
    return sqlite_text(value) if isinstance(value, datetime) else value


def add_requests(rows: Sequence[tuple[Any, ...]], db: sqlite3.Connection) -> dict[str, int]:
    """Insert `rows` (values of ADD_COLUMNS, times already text) unless their request id is taken:
    the ids of those inserted, by request id. A request id given twice is inserted once."""
    inserted: dict[str, int] = {}
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        values = [value for row in chunk for value in row]
        for pk, request_id in db.execute(_insert_sql(len(chunk)), values):
            inserted[request_id] = pk
    return inserted


def fingerprints(request_ids: Sequence[str], db: sqlite3.Connection) -> dict[str, str]:
    found = db.execute(_FINGERPRINTS, (json.dumps(list(request_ids)),))
    return dict(found)


def lease_due(
    owner: str, token: str, limit: int, now: str, expires: str, db: sqlite3.Connection
) -> tuple[list[dict[str, Any]], set[int]]:
    """Lease up to `limit` due rows for a create attempt (see `SqlBatchStore.claim`): the rows as
    the lease left them, in due order, and the ids of those whose earlier lease was taken over."""
    found = db.execute(_DUE, {"now": now, "limit": limit}).fetchall()
    if not found:
        return [], set()
    ids = [pk for pk, _ in found]
    taken_over = {pk for pk, leased in found if leased}
    parameters = {"token": token, "owner": owner, "expires": expires, "now": now, "ids": json.dumps(ids)}
    rows = [_row(values) for values in db.execute(_LEASE, parameters)]
    position = {pk: index for index, pk in enumerate(ids)}
    rows.sort(key=lambda row: position[row["id"]])
    return rows, taken_over


def held(pairs: Sequence[tuple[str, str]], db: sqlite3.Connection) -> dict[tuple[str, str], tuple[Any, ...]]:
    """The OUTCOME columns (id first) of the rows whose lease is still the one in `pairs` (request
    id, token)."""
    wanted = set(pairs)
    request_ids = json.dumps(sorted({request_id for request_id, _ in pairs}))
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    for row in db.execute(_HELD, (request_ids,)):
        pair = (row[_REQUEST_ID], row[-1])
        if pair in wanted:
            found[pair] = row[:-1]
    return found


def write_outcomes(
    updates: Mapping[tuple[str, ...], Sequence[tuple[tuple[str, str], tuple[Any, ...]]]],
    db: sqlite3.Connection,
) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Outcomes written together, fenced by their leases. `updates`: per set of columns, each
    outcome's (request id, lease token) and values (times already text). Reads which leases still
    hold (`held`), then per set of columns one executemany over the rows that hold, dropping their
    lease. Returns what `held` found."""
    rows = held([pair for outcomes in updates.values() for pair, _ in outcomes], db)
    for columns, outcomes in updates.items():
        parameters = [(*values, rows[pair][0]) for pair, values in outcomes if pair in rows]
        if parameters:
            db.executemany(_update_sql(columns), parameters)
    return rows


def write_trail(
    trail: Sequence[tuple[Any, ...]], outbox: Sequence[tuple[Any, ...]], db: sqlite3.Connection
) -> None:
    if trail:
        db.executemany(_TRAIL, trail)
    if outbox:
        db.executemany(_OUTBOX, outbox)


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int) -> str:
    one = f"({', '.join('?' * len(ADD_COLUMNS))})"
    return (
        f"INSERT INTO batch_request ({', '.join(ADD_COLUMNS)}) VALUES {', '.join([one] * rows)} "  # noqa: S608 - names from the table's definition; values are bound
        "ON CONFLICT (request_id) DO NOTHING RETURNING id, request_id"
    )


@functools.lru_cache(maxsize=32)
def _update_sql(columns: tuple[str, ...]) -> str:
    # Column names come from the store's code, never from input; checked against the table anyway.
    unknown = set(columns) - set(_COLUMNS)
    if unknown:
        raise ValueError(f"not columns of batch_request: {sorted(unknown)}")
    assignments = ", ".join(f"{name} = ?" for name in columns)
    return f"UPDATE batch_request SET {assignments}, {_UNLEASE} WHERE id = ?"  # noqa: S608 - names from the table's definition; values are bound


def _row(values: Sequence[Any]) -> dict[str, Any]:
    """A whole batch_request row as SQLAlchemy would hand it back: aware times, booleans."""
    row = dict(zip(_COLUMNS, values, strict=True))
    for name in _TIMES:
        if row[name] is not None:
            row[name] = from_sqlite_text(row[name])
    for name in _FLAGS:
        if row[name] is not None:
            row[name] = bool(row[name])
    return row
