"""The store on SQLAlchemy Core (async): SQLite through aiosqlite by default, PostgreSQL through asyncpg.

One code path for both, except where they differ, which is said in place: the dialect's `INSERT … ON
CONFLICT DO NOTHING`, `FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite needs none: `BEGIN IMMEDIATE`
makes each write transaction the only writer), timestamps (SQLite keeps naive text; `UtcDateTime`
stores UTC and hands back aware datetimes on both), the clock leases run on (`_lease_clock`), how
writes reach the database (one group-committing writer on SQLite, concurrent pooled transactions on
PostgreSQL: see `SqlBatchStore`), and the create path's writes (adds, claims, outcomes of plain
values, trail and outbox rows), which go to the driver directly, inside SQLAlchemy's transaction
(`sqlite_direct`, `postgres_direct`).

The schema belongs to the Alembic migrations in `migrations/`, applied at `open()`. The tables below
describe it for the queries; `tests/unit/test_store.py` checks the two agree.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    DateTime,
    RowMapping,
    Table,
    Update,
    bindparam,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ClauseElement, ColumnElement

from orchestrator.messages import BatchRequest
from orchestrator.store import postgres_direct, sqlite_direct
from orchestrator.store.base import (
    EVENT_TYPES,
    AddResult,
    BatchRecord,
    Claim,
    Lifecycle,
    OutboxEvent,
    State,
    StateChange,
    Step,
    event_body,
)
from orchestrator.store.engine import async_url, on_driver, open_engine, reader
from orchestrator.store.lifecycle import LifecycleQueries, files_from_json, files_json
from orchestrator.store.schema import (
    NO_LEASE,
    OUTCOME,
    batch_event,
    batch_lifecycle,
    batch_request,
    event_outbox,
    metadata,
    sqlite_text,
)

__all__ = ["MIGRATIONS", "SqlBatchStore", "alembic_config", "metadata", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")

# An arbitrary constant: PostgreSQL replicas starting together take turns migrating.
_MIGRATION_LOCK = 7_305_412_001


_UNFINISHED = batch_request.c.state.in_([State.PENDING.value, State.RETRYING.value])
_DUE = batch_request.c.next_attempt_at.is_not(None)  # the same rows (ck_batch_request_due)
# Records as users see them: the request, and its lifecycle when it has one.
_LIFE_COLUMNS = (
    batch_lifecycle.c.step.label("life_step"),
    batch_lifecycle.c.files_done.label("life_files_done"),
    batch_lifecycle.c.files_total.label("life_files_total"),
    batch_lifecycle.c.errors.label("life_errors"),
    batch_lifecycle.c.record_count.label("life_record_count"),
    batch_lifecycle.c.failed_record_count.label("life_failed_record_count"),
)
_RECORDS = select(batch_request, *_LIFE_COLUMNS).select_from(
    batch_request.outerjoin(batch_lifecycle, batch_lifecycle.c.batch_request_id == batch_request.c.id)
)


@functools.lru_cache(maxsize=32)
def _cached_fenced_update(columns: tuple[str, ...]) -> Update:
    return _build_fenced_update(columns, {})


def _fenced_update(columns: tuple[str, ...], **expressions: ClauseElement) -> Update:
    """`UPDATE batch_request SET <columns>, no lease WHERE request_id AND lease_token match`.

    Without SQL expressions among the values (every outcome but a release), one statement object per
    set of columns is reused: SQLAlchemy then keeps its cache key and compiled form, where building
    the statement anew on every call cost more CPU than the database's own work."""
    if expressions:
        return _build_fenced_update(columns, expressions)
    return _cached_fenced_update(columns)


def _build_fenced_update(columns: tuple[str, ...], expressions: dict[str, ClauseElement]) -> Update:
    binds = {name: bindparam(f"v_{name}", type_=batch_request.c[name].type) for name in columns}
    return (
        update(batch_request)
        .where(
            batch_request.c.request_id == bindparam("fence_request_id"),
            batch_request.c.lease_token == bindparam("fence_lease"),
        )
        .values(**binds, **expressions, **NO_LEASE)
        .returning(*OUTCOME)
    )


@functools.lru_cache(maxsize=32)
def _cached_update_by_id(columns: tuple[str, ...]) -> Update:
    return _build_update_by_id(columns, {})


def _update_by_id(columns: tuple[str, ...], expressions: dict[str, ClauseElement]) -> Update:
    """`UPDATE batch_request SET <columns>, no lease WHERE id = :pk`, for outcomes whose lease was
    checked in the same transaction (`SqlBatchStore._outcomes`)."""
    if expressions:
        return _build_update_by_id(columns, expressions)
    return _cached_update_by_id(columns)


def _build_update_by_id(columns: tuple[str, ...], expressions: dict[str, ClauseElement]) -> Update:
    binds = {name: bindparam(f"v_{name}", type_=batch_request.c[name].type) for name in columns}
    return (
        update(batch_request)
        .where(batch_request.c.id == bindparam("pk"))
        .values(**binds, **expressions, **NO_LEASE)
    )


@dataclass(frozen=True)
class _After:
    """A request's row as an outcome left it (what its trail, event and lifecycle need)."""

    id: int
    request_id: str
    dataset_id: str
    batch_id: str | None
    batch_status: str | None
    last_error: str | None
    files: str | None


def _after(row: Any, values: dict[str, Any]) -> _After:
    def value(name: str) -> Any:
        given = values.get(name, getattr(row, name))
        return getattr(row, name) if isinstance(given, ClauseElement) else given

    return _After(
        id=row.id,
        request_id=row.request_id,
        dataset_id=row.dataset_id,
        batch_id=value("batch_id"),
        batch_status=value("batch_status"),
        last_error=value("last_error"),
        files=row.files,
    )


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini is needed at runtime."""
    config = Config()
    # ConfigParser interpolates '%'.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision, inside the caller's transaction.

    On SQLite the transaction began IMMEDIATE, so concurrent openers take turns; on PostgreSQL an
    advisory lock does the same. Either way the second one finds the schema current.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
    command.upgrade(alembic_config(connection), "head")


class SqlBatchStore(LifecycleQueries):
    """`BatchStore` on SQLAlchemy Core. `url` is `sqlite:///PATH` or `postgresql://…`.

    On SQLite every write goes through one writer task that commits whatever is queued in one
    transaction (group commit, at most `MAX_BATCH` operations): a lone call is written at once, and
    calls that arrive while a commit is under way share the next one. SQLite has one writer at a
    time anyway, and on this project's 2-vCPU test machine a statement through SQLAlchemy and
    aiosqlite costs about half a millisecond of CPU, so one transaction per call capped `add` near
    200 a second; batched, concurrent adds share a single multi-row INSERT. The order of operations
    is the order of the calls. If anything in a batch fails, the batch is rolled back and each
    operation is retried alone, so one bad call cannot fail its neighbours.

    PostgreSQL takes many writers at once, and one writer per replica would queue every claim,
    renewal and outcome of a replica behind the others' commits: there each write runs in its own
    transaction on a pooled connection (`engine.POSTGRES_POOL_SIZE`), concurrently. Only the
    records of received messages (`add`, `reject`) still share a writer and its commits, so that
    a batch received together costs one multi-row INSERT and one commit, in the order received.

    Either way, cancelling a caller does not withdraw its write, and `close` waits for every write
    asked for.

    With `events` on (ORCH_EVENTS__URL is set), a request's move to `created` or `failed` also
    writes its batch event to the outbox, in the same transaction: the event exists exactly when
    the state change does, whatever happens to the process before the relay publishes it.
    """

    MAX_BATCH = 256

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        events: bool = False,
        track_without_files: bool = False,
        first_look: float = 0.0,
    ) -> None:
        self.url = url
        self._pool_size = pool_size
        self._events = events
        # Requests without files get a lifecycle too (ORCH_TRACK__WITHOUT_FILES, ABORT_LOADING_AFTER).
        self._track_without_files = track_without_files
        self._first_look = first_look
        self._events_written = asyncio.Event()
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._postgres = False
        self._insert: Callable[[Table], sqlite.Insert | postgresql.Insert] = sqlite.insert
        self._writes = _Writes()

    async def open(self) -> None:
        if self._engine is not None:
            return
        postgres = async_url(self.url).get_backend_name() == "postgresql"
        # SQLite: one connection for the writer task, one so reads need not wait for its commit.
        # PostgreSQL: the engine's default (POSTGRES_POOL_SIZE) unless told otherwise.
        pool_size = self._pool_size or (None if postgres else 2)
        engine = await open_engine(self.url, synchronous="FULL", pool_size=pool_size)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(upgrade)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._reader = reader(engine)
        self._postgres = postgres
        self._insert = postgresql.insert if postgres else sqlite.insert

    async def close(self) -> None:
        # Let queued and running writes finish: their callers were promised them.
        writes = self._writes
        writers = (writes.writer, writes.outcome_writer)
        running = [*writes.alone, *(task for task in writers if task is not None)]
        if running:
            await asyncio.wait(running)
        writes.writer = writes.outcome_writer = None
        engine, self._engine, self._reader = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    @property
    def _read(self) -> AsyncEngine:
        if self._reader is None:
            raise RuntimeError("the store is not open")
        return self._reader

    async def add(self, request: BatchRequest, now: datetime) -> AddResult:
        [result] = await self.add_many([request], now)
        return result

    async def add_many(self, requests: Sequence[BatchRequest], now: datetime) -> list[AddResult]:
        """`add` for several requests received together: one write, in the order given."""
        if not requests:
            return []
        results: list[AddResult] = await self._write(
            _Op(add=[(request, now) for request in requests], shared=True)
        )
        return results

    async def reject(self, request_id: str, dataset_id: str | None, reason: str, now: datetime) -> None:
        row = {
            "request_id": request_id,
            "dataset_id": dataset_id or "",
            "fingerprint": "",
            "tags": "{}",
            "state": State.REJECTED.value,
            "attempts": 0,
            "needs_lookup": False,
            "last_error": reason,
            "created_at": now,
            "updated_at": now,
        }
        statement = (
            self._insert(batch_request)
            .values(row)
            .on_conflict_do_nothing(index_elements=[batch_request.c.request_id])
            .returning(batch_request.c.id)
        )

        async def run(tx: _Tx) -> None:
            pk = (await tx.connection.execute(statement)).scalar_one_or_none()
            if pk is not None:
                tx.trail(pk, now, None, State.REJECTED, 0, reason)

        # A record of a received message, like `add`: in order with the adds around it.
        await self._write(_Op(run=run, shared=True))

    async def next_due(self) -> datetime | None:
        # A row becomes claimable at next_attempt_at, or at its lease's expiry while leased (the
        # holder may have died). A leased row's next_attempt_at is already past (it was due when
        # claimed), so its expiry is the later of the two; and every leased row is unfinished,
        # since finishing clears the lease. Two index walks instead of a scan of the backlog.
        # On PostgreSQL a lease expiry is a time on the database's clock (`_lease_clock`) and the
        # others are on the callers' clocks: a replica whose clock is off by more than the poll
        # interval then polls a little too often or too late, while claims, which compare on the
        # database, still decide who gets what.
        unleased = (
            select(batch_request.c.next_attempt_at)
            .where(_DUE, batch_request.c.lease_expires_at.is_(None))
            .order_by(batch_request.c.next_attempt_at)
            .limit(1)
        )
        leased = select(func.min(batch_request.c.lease_expires_at)).where(
            batch_request.c.lease_expires_at.is_not(None)
        )
        reconcile = select(func.min(batch_request.c.reconcile_at)).where(
            batch_request.c.reconcile_at.is_not(None), batch_request.c.lease_expires_at.is_(None)
        )
        async with self._read.connect() as connection:
            first = (await connection.execute(unleased)).scalar_one_or_none()
            expiry = (await connection.execute(leased)).scalar_one_or_none()
            again = (await connection.execute(reconcile)).scalar_one_or_none()
        times = [value for value in (first, expiry, again) if value is not None]
        return min(times) if times else None

    async def claim(self, owner: str, limit: int, lease_seconds: float, now: datetime) -> list[Claim]:
        if limit <= 0:
            return []
        token = uuid4().hex

        async def run(tx: _Tx) -> list[Claim]:
            # One call to the driver either way (`sqlite_direct`, `postgres_direct`). On PostgreSQL
            # due times stay on the callers' clocks (each replica's `now`), unlike leases: skew there
            # only makes a request due a little early or late on a replica whose clock is off, and a
            # retry that comes early or late is still one attempt, fenced by its own lease.
            if self._postgres:
                lease = functools.partial(postgres_direct.lease_due, owner, token, limit, now, lease_seconds)
                return _claims(*await postgres_direct.run(tx.connection, lease, one_statement=True))
            expires = now + timedelta(seconds=lease_seconds)
            leased = functools.partial(
                sqlite_direct.lease_due, owner, token, limit, sqlite_text(now), sqlite_text(expires)
            )
            return _claims(*await on_driver(tx.connection, leased))

        claims: list[Claim] = await self._write(_Op(run=run))
        return claims

    async def claim_reconciliations(
        self, owner: str, limit: int, lease_seconds: float, now: datetime
    ) -> list[Claim]:
        if limit <= 0:
            return []
        claimable = (batch_request.c.reconcile_at <= now, self._lease_free(now))
        due = (
            select(batch_request.c.id, batch_request.c.lease_expires_at.is_not(None))
            .where(*claimable)
            .order_by(batch_request.c.reconcile_at, batch_request.c.id)
            .limit(limit)
        )
        due = self._lock_for_claim(due)

        async def run(tx: _Tx) -> list[Claim]:
            rows, taken_over = await self._lease_due(
                tx,
                batch_request,
                batch_request.c.id,
                due,
                claimable,
                owner,
                lease_seconds,
                now,
                updated_at=now,
            )
            return _claims(rows, taken_over)

        claims: list[Claim] = await self._write(_Op(run=run))
        return claims

    async def _lease_due(
        self,
        tx: _Tx,
        table: Table,
        key: ColumnElement[Any],
        due: Any,
        claimable: tuple[ColumnElement[bool], ...],
        owner: str,
        lease_seconds: float,
        now: datetime,
        **values: Any,
    ) -> tuple[list[RowMapping], set[int]]:
        """Lease the rows `due` selects (their `key` and whether a lease was left on them), with one
        token for the claim, for `lease_seconds` on the lease clock, setting `values` too. Returns the
        leased rows whole, in the order `due` gave them, and the keys of those taken over (a lease
        was still set: its holder died or stalled)."""
        found = (await tx.connection.execute(due)).all()
        if not found:
            return [], set()
        ids = [pk for pk, _ in found]
        taken_over = {pk for pk, leased in found if leased}
        # One lease token for the claim: it fences per row together with the row's key, and a
        # single bound value keeps the statement cacheable (a CASE per row was compiled anew on
        # every claim).
        token = uuid4().hex
        statement = (
            update(table)
            # The conditions again: should a row have been claimed since the SELECT (possible on
            # PostgreSQL only without the row lock), this skips it rather than claiming it twice.
            .where(key.in_(ids), *claimable)
            .values(
                lease_token=token,
                lease_owner=owner,
                lease_expires_at=self._lease_clock(now) + timedelta(seconds=lease_seconds),
                **values,
            )
            .returning(*table.c)
        )
        rows = (await tx.connection.execute(statement)).mappings().all()
        position = {pk: index for index, pk in enumerate(ids)}
        return sorted(rows, key=lambda row: position[row[key]]), taken_over

    def _lock_for_claim(self, statement: Any) -> Any:
        if self._postgres:
            # Replicas claiming at once skip each other's rows instead of queueing behind them.
            # (SQLite needs nothing: BEGIN IMMEDIATE already makes this the only writer.)
            return statement.with_for_update(skip_locked=True)
        return statement

    async def _run_write(self, run: Callable[[_Tx], Awaitable[Any]]) -> Any:
        return await self._write(_Op(run=run))

    def _record(self, row: RowMapping) -> BatchRecord:
        return _record(row)

    async def mark_created(
        self,
        claim: Claim,
        batch_id: str,
        batch_status: str,
        now: datetime,
        *,
        adopted: bool = False,
        reconcile_at: datetime | None = None,
        count_attempt: bool = True,
    ) -> bool:
        detail = f"batch {batch_id} ({batch_status})"
        if adopted:
            detail += ", adopted: found by externalId lookup, not created by this attempt"
        values: dict[str, Any] = {
            "state": State.CREATED.value,
            "batch_id": batch_id,
            "batch_status": batch_status,
            "last_error": None,  # earlier errors stay in the trail
            "needs_lookup": False,
            "lookup_only": False,
            "next_attempt_at": None,
            "reconcile_at": reconcile_at,
        }
        if not count_attempt:
            values["attempts"] = batch_request.c.attempts - 1
        return await self._finish(claim, now, values, State.CREATED, detail)

    async def mark_retry(
        self,
        claim: Claim,
        error: str,
        next_attempt_at: datetime,
        *,
        ambiguous: bool,
        now: datetime,
        settle_until: datetime | None = None,
        lookup_only: bool = False,
    ) -> bool:
        values: dict[str, Any] = {
            "state": State.RETRYING.value,
            "next_attempt_at": next_attempt_at,
            "last_error": error,
            "lookup_only": lookup_only,
        }
        if settle_until is not None:
            values["settle_until"] = settle_until
        detail = error
        if ambiguous:
            # Stays set until the request is created or failed: once unsure, always look first.
            values["needs_lookup"] = True
            detail += " (outcome unknown: look up before creating again)"
        if lookup_only:
            detail += " (attempts spent: look-ups only, then adopt or fail)"
        return await self._finish(claim, now, values, State.RETRYING, detail)

    async def mark_failed(
        self, claim: Claim, error: str, now: datetime, *, count_attempt: bool = True
    ) -> bool:
        values: dict[str, Any] = {
            "state": State.FAILED.value,
            "last_error": error,
            "needs_lookup": False,
            "lookup_only": False,
            "next_attempt_at": None,
        }
        if not count_attempt:
            values["attempts"] = batch_request.c.attempts - 1
        return await self._finish(claim, now, values, State.FAILED, error)

    async def release(
        self,
        claim: Claim,
        now: datetime,
        *,
        until: datetime | None = None,
        settle_until: datetime | None = None,
    ) -> bool:
        # No attempt was made, so it is not counted; no state changed, so no trail row.
        values: dict[str, Any] = {"attempts": batch_request.c.attempts - 1}
        if until is not None:
            values["next_attempt_at"] = until
        if settle_until is not None:
            values["settle_until"] = settle_until
        return await self._finish(claim, now, values, None, None)

    async def finish_reconciliation(
        self,
        claim: Claim,
        now: datetime,
        *,
        retry_at: datetime | None = None,
        failed: bool = False,
        detail: str | None = None,
    ) -> bool:
        values: dict[str, Any] = {"reconcile_at": retry_at}
        if failed:
            values["reconcile_tries"] = batch_request.c.reconcile_tries + 1
        # A trail row in the state the request is in (created, or on in the upload stage), which
        # this does not change: no arrival, so no event and no new lifecycle.
        to_state = claim.record.state if detail is not None else None
        return await self._finish(claim, now, values, to_state, detail)

    async def lease_owners(self) -> set[str]:
        statement = (
            select(batch_request.c.lease_owner)
            .where(batch_request.c.lease_expires_at.is_not(None))
            .distinct()
        )
        async with self._read.connect() as connection:
            owners = {owner for (owner,) in await connection.execute(statement) if owner is not None}
            return owners | await self._stage_lease_owners(connection)

    async def expire_leases(self, owners: Sequence[str], now: datetime) -> int:
        if not owners:
            return 0
        statement = (
            update(batch_request)
            .where(
                batch_request.c.lease_owner.in_(list(owners)),
                batch_request.c.lease_expires_at > self._lease_clock(now),
            )
            .values(lease_expires_at=self._lease_clock(now))
            .returning(batch_request.c.id)
        )

        async def run(tx: _Tx) -> int:
            ended = len((await tx.connection.execute(statement)).all())
            return ended + await self._expire_stage_leases(tx, owners, now)

        ended: int = await self._write(_Op(run=run))
        return ended

    async def pending_reconciliations(self) -> int:
        statement = (
            select(func.count()).select_from(batch_request).where(batch_request.c.reconcile_at.is_not(None))
        )
        async with self._read.connect() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def renew(self, claims: Sequence[Claim], lease_seconds: float, now: datetime) -> set[str]:
        if not claims:
            return set()
        pairs = [(claim.record.request_id, claim.lease) for claim in claims]
        statement = (
            update(batch_request)
            # Pairs, not two IN lists: those would also match one request's id with another's lease.
            .where(tuple_(batch_request.c.request_id, batch_request.c.lease_token).in_(pairs))
            .values(lease_expires_at=self._lease_clock(now) + timedelta(seconds=lease_seconds))
            .returning(batch_request.c.request_id)
        )

        async def run(tx: _Tx) -> set[str]:
            return set((await tx.connection.execute(statement)).scalars())

        renewed: set[str] = await self._write(_Op(run=run))
        return renewed

    def _lease_clock(self, now: datetime) -> Any:
        """The time leases are set from and compared with.

        PostgreSQL: the database's own clock, so that every replica measures every lease on one
        clock. On each replica's clock, a replica running an hour fast would see every lease held
        by the others as run out and take their requests over mid-call, and one running slow would
        set leases that ran out long ago. `clock_timestamp()`, not `now()`: that is the start of the
        transaction, which can lie behind by however long the transaction waited for its locks.
        (The other times the store keeps, such as when a request is due, stay on the callers'
        clocks: see `claim`.) Outcomes are fenced by the lease's token, never by its time.

        SQLite: the caller's `now`; every process on the file shares one machine's clock.
        """
        if self._postgres:
            # Typed as a plain DateTime: `+ timedelta` then binds an INTERVAL (UtcDateTime would
            # bind the timedelta as a time).
            return func.clock_timestamp(type_=DateTime(timezone=True))
        return now

    def _lease_free(self, now: datetime) -> ColumnElement[bool]:
        """No lease, or one that has run out (`_lease_clock`)."""
        expires = batch_request.c.lease_expires_at
        return or_(expires.is_(None), expires <= self._lease_clock(now))

    async def _finish(
        self,
        claim: Claim,
        now: datetime,
        values: dict[str, Any],
        to_state: State | None,
        detail: str | None,
    ) -> bool:
        """Write an attempt's outcome and drop its lease, only while the lease is still the claim's."""
        outcome = _Outcome(claim, now, {**values, "updated_at": now}, to_state, detail)
        done: bool = await self._write(_Op(outcome=outcome))
        return done

    async def _outcome(self, tx: _Tx, outcome: _Outcome) -> bool:
        """One outcome: a fenced UPDATE … RETURNING."""
        values = outcome.values
        expressions = {name: value for name, value in values.items() if isinstance(value, ClauseElement)}
        statement = _fenced_update(tuple(sorted(set(values) - set(expressions))), **expressions)
        parameters = {f"v_{name}": value for name, value in values.items() if name not in expressions}
        parameters.update(fence_request_id=outcome.claim.record.request_id, fence_lease=outcome.claim.lease)
        row = (await tx.connection.execute(statement, parameters)).one_or_none()
        if row is None:
            return False
        await self._recorded(tx, outcome, row)
        return True

    async def _outcomes(self, tx: _Tx, outcomes: list[_Outcome]) -> list[Any]:
        """Outcomes written together (the writer had several queued): the rows whose lease is still
        the claim's are read in one statement, then updated with one statement per shape of outcome
        (executemany), where one fenced UPDATE each cost a statement's overhead per request. SQLite's
        transaction excludes every other writer from the read to the update; on PostgreSQL the read
        locks the rows."""
        pairs = [(outcome.claim.record.request_id, outcome.claim.lease) for outcome in outcomes]
        leases = select(*OUTCOME, batch_request.c.lease_token).where(
            tuple_(batch_request.c.request_id, batch_request.c.lease_token).in_(pairs)
        )
        locked: set[tuple[str, str]] = set()
        if self._postgres:
            # Locked until the commit, as the fenced UPDATE would lock them: nothing changes them
            # between this read and the update below. A row another transaction holds is skipped
            # here, and its outcome written alone (`_LOCKED`), so it holds up nothing else.
            leases = leases.with_for_update(skip_locked=True)
        held = {(row.request_id, row.lease_token): row for row in await tx.connection.execute(leases)}
        if self._postgres and len(held) < len(pairs):
            missing = [pair for pair in pairs if pair not in held]
            present = select(batch_request.c.request_id, batch_request.c.lease_token).where(
                tuple_(batch_request.c.request_id, batch_request.c.lease_token).in_(missing)
            )
            locked = {(row.request_id, row.lease_token) for row in await tx.connection.execute(present)}
        shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]] = {}
        statements: dict[tuple[tuple[str, ...], tuple[str, ...]], Update] = {}
        for outcome, pair in zip(outcomes, pairs, strict=True):
            row = held.get(pair)
            if row is None:
                continue
            plain = {
                name: value for name, value in outcome.values.items() if not isinstance(value, ClauseElement)
            }
            expressions = {
                name: value for name, value in outcome.values.items() if isinstance(value, ClauseElement)
            }
            key = (tuple(sorted(plain)), tuple(sorted(expressions)))
            if key not in statements:
                statements[key] = _update_by_id(key[0], expressions)
            shapes.setdefault(key, []).append({"pk": row.id, **{f"v_{name}": v for name, v in plain.items()}})
        for key, parameters in shapes.items():
            await tx.connection.execute(statements[key], parameters)
        results: list[Any] = []
        for outcome, pair in zip(outcomes, pairs, strict=True):
            row = held.get(pair)
            if row is not None:
                await self._recorded(tx, outcome, _after(row, outcome.values))
            results.append(_LOCKED if pair in locked else row is not None)
        return results

    async def _outcomes_direct(self, tx: _Tx, outcomes: list[_Outcome]) -> list[Any]:
        """`_outcomes` as one call to the driver (`sqlite_direct.write_outcomes`,
        `postgres_direct.write_outcomes`); only for outcomes of plain values (no SQL expressions)."""
        pairs = [(outcome.claim.record.request_id, outcome.claim.lease) for outcome in outcomes]
        updates: dict[tuple[str, ...], list[tuple[tuple[str, str], tuple[Any, ...]]]] = {}
        bind = postgres_direct.bind if self._postgres else sqlite_direct.bind
        for outcome, pair in zip(outcomes, pairs, strict=True):
            columns = tuple(sorted(outcome.values))
            values = tuple(bind(outcome.values[name]) for name in columns)
            updates.setdefault(columns, []).append((pair, values))
        locked: set[tuple[str, str]] = set()
        if self._postgres:
            write = functools.partial(postgres_direct.write_outcomes, pairs, updates)
            held, locked = await postgres_direct.run(tx.connection, write)
        else:
            held = await on_driver(tx.connection, functools.partial(sqlite_direct.write_outcomes, updates))
        results: list[Any] = []
        for outcome, pair in zip(outcomes, pairs, strict=True):
            row = held.get(pair)
            if row is not None:
                await self._recorded(tx, outcome, _after(_After(*row), outcome.values))
            results.append(_LOCKED if pair in locked else row is not None)
        return results

    async def _recorded(self, tx: _Tx, outcome: _Outcome, row: Any) -> None:
        """The trail, event and lifecycle that go with an outcome written for `row` (its values after
        the update)."""
        to_state, claim = outcome.to_state, outcome.claim
        if to_state is None:
            return
        # The lease fenced every change since the claim, so the state is still the claimed one.
        tx.trail(row.id, outcome.now, claim.record.state, to_state, claim.attempt, outcome.detail)
        # A reconciliation's trail row (created to created) is no arrival: no event.
        arrived = claim.record.state is not to_state
        if self._events and to_state in EVENT_TYPES and arrived:
            tx.event(to_state, row, outcome.now)
        if to_state is State.CREATED and arrived:
            await self._start_lifecycle(tx, row.id, row.files, outcome.now)

    # --- the writer -----------------------------------------------------------------------------

    async def _write(self, op: _Op) -> Any:
        if self._engine is None:
            raise RuntimeError("the store is not open")
        writes = self._writes
        if self._postgres and op.outcome is not None:
            # Outcomes queued while a transaction runs share the next one (see `_outcomes`), on a
            # writer of their own, so that adds and claims do not wait behind them. One writer: a
            # transaction costs far more than the outcomes in it, and with four writers at once
            # each took about 8 outcomes where one takes about 25 (5,000 outcomes in 630
            # transactions against 200; one writer costs 0.72 x the CPU per request of four,
            # `bench/ab.py --backend brokered`). A row locked elsewhere holds up nothing: the
            # writer skips it, and its outcome is written alone (`_LOCKED`).
            writes.outcomes.append(op)
            if writes.outcome_writer is None or writes.outcome_writer.done():
                drain = self._drain(writes.outcomes)
                writes.outcome_writer = asyncio.create_task(drain, name="store.outcomes")
        elif self._postgres and not op.shared:
            self._alone(op)
        else:
            writes.queue.append(op)
            if writes.writer is None or writes.writer.done():
                writes.writer = asyncio.create_task(self._drain(writes.queue), name="store.writer")
        # Shielded: a write once asked for happens even if its caller is cancelled meanwhile (a
        # dispatcher shutting down still records the outcome it was recording).
        return await asyncio.shield(op.future)

    def _alone(self, op: _Op) -> None:
        task = asyncio.create_task(self._run_alone(op), name="store.write")
        self._writes.alone.add(task)
        task.add_done_callback(self._writes.alone.discard)

    async def _run_alone(self, op: _Op) -> None:
        """`op` in a transaction of its own; its caller gets the result or the error. An outcome
        here waits for its row's lock (it holds up nothing else)."""
        try:
            [result] = await self._transaction([op], alone=True)
        except Exception as exc:  # noqa: BLE001 - handed to the caller that asked
            op.fail(exc)
        except BaseException:
            op.future.cancel()  # cancelled (the loop is shutting down): not written
            raise
        else:
            op.resolve(result)

    async def _drain(self, queue: list[_Op]) -> None:
        """Write what `queue` holds, a transaction of up to MAX_BATCH operations at a time."""
        batch: list[_Op] = []
        try:
            while queue:
                batch = [op for op in queue[: self.MAX_BATCH] if not op.future.done()]
                del queue[: self.MAX_BATCH]
                if not batch:
                    continue
                try:
                    results = await self._transaction(batch)
                except Exception as exc:  # noqa: BLE001 - handed to the callers that asked
                    if len(batch) == 1:
                        batch[0].fail(exc)  # nothing else to spare: its caller learns it
                        continue
                    for op in batch:  # find the one that failed; the others still succeed
                        await self._run_alone(op)
                else:
                    for op, result in zip(batch, results, strict=True):
                        if result is _LOCKED:
                            # Its row is locked elsewhere: written alone, waiting for the lock
                            # without holding up the rest of the batch.
                            self._alone(op)
                        else:
                            op.resolve(result)
        except BaseException:
            # Cancelled (the loop is shutting down): nothing queued will be written, nor the batch
            # under way (its transaction was rolled back). Their callers learn it.
            for op in [*batch, *queue]:
                op.future.cancel()
            queue.clear()
            raise

    async def _transaction(self, batch: list[_Op], *, alone: bool = False) -> list[Any]:
        """Run `batch` in order in one transaction; runs of adds become one multi-row INSERT. On
        PostgreSQL a writer's outcomes, even one, skip rows locked elsewhere (`_outcomes`); an
        outcome `alone` waits for its row (`_outcome`)."""
        assert self._engine is not None  # _write checked it and close() waits for this task
        results: list[Any] = []
        async with self._engine.begin() as connection:
            tx = _Tx(connection, postgres=self._postgres)
            for kind, run in itertools.groupby(batch, key=_Op.kind):
                ops = list(run)
                if kind == "add":
                    added = await self._add_many(tx, [add for op in ops for add in op.add or ()])
                    for op in ops:  # each op its own requests' results, in order
                        taken = len(op.add or ())
                        results.append(added[:taken])
                        added = added[taken:]
                elif (
                    kind == "outcome"
                    and (len(ops) > 1 or not alone)
                    and all(op.outcome and op.outcome.plain for op in ops)
                ):
                    results.extend(await self._outcomes_direct(tx, [op.outcome for op in ops if op.outcome]))
                elif kind == "outcome" and (len(ops) > 1 or (self._postgres and not alone)):
                    results.extend(await self._outcomes(tx, [op.outcome for op in ops if op.outcome]))
                elif kind == "outcome":
                    assert ops[0].outcome is not None
                    results.append(await self._outcome(tx, ops[0].outcome))
                else:
                    for op in ops:
                        assert op.run is not None  # an op is an add, an outcome or a run
                        results.append(await op.run(tx))
            await tx.flush()
        if tx.wrote_events:  # committed: the relay can read them now
            self._events_written.set()
        return results

    async def _add_many(self, tx: _Tx, requests: list[tuple[BatchRequest, datetime]]) -> list[AddResult]:
        rows = []
        for request, now in requests:
            stamp: datetime | str = sqlite_text(now) if tx.sqlite else now
            rows.append(
                # ADD_COLUMNS
                (
                    request.request_id,
                    request.dataset_id,
                    request.fingerprint,
                    request.input_format,
                    request.multiline_json,
                    json.dumps(request.tags, sort_keys=True),
                    files_json(request.files),
                    State.PENDING.value,
                    0,
                    stamp,
                    False,
                    stamp,
                    stamp,
                )
            )
        if tx.sqlite:
            inserted = await on_driver(tx.connection, functools.partial(sqlite_direct.add_requests, rows))
        else:
            add = functools.partial(postgres_direct.add_requests, rows)
            inserted = await postgres_direct.run(tx.connection, add)
        results: list[AddResult] = []
        others: list[int] = []
        for index, (request, now) in enumerate(requests):
            pk = inserted.pop(request.request_id, None)  # pop: a second add of one key is a repeat
            if pk is None:
                others.append(index)
                results.append(AddResult.DUPLICATE)  # settled below
            else:
                results.append(AddResult.ADDED)
                tx.trail(pk, now, None, State.PENDING, 0, None)
        if others:
            # Never overwrite: the first request under a key is the one that counts.
            keys = sorted({requests[index][0].request_id for index in others})
            fingerprints: dict[str, str]
            if tx.sqlite:
                lookup = functools.partial(sqlite_direct.fingerprints, keys)
                fingerprints = await on_driver(tx.connection, lookup)
            else:
                found = await tx.connection.execute(
                    select(batch_request.c.request_id, batch_request.c.fingerprint).where(
                        batch_request.c.request_id.in_(keys)
                    )
                )
                fingerprints = {request_id: fingerprint for request_id, fingerprint in found}
            for index in others:
                request = requests[index][0]
                if fingerprints[request.request_id] != request.fingerprint:
                    results[index] = AddResult.CONFLICT
        return results

    # --- reads ---------------------------------------------------------------------------------

    async def counts(self) -> dict[State, int]:
        statement = select(batch_request.c.state, func.count()).group_by(batch_request.c.state)
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).all()
        counts = dict.fromkeys(State, 0)
        for state, count in rows:
            counts[State(state)] = count
        return counts

    async def unfinished(self) -> int:
        statement = select(func.count()).select_from(batch_request).where(_UNFINISHED)
        async with self._read.connect() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def oldest_unfinished(self) -> datetime | None:
        # The due index holds exactly the unfinished rows; their creation times are not indexed,
        # so this reads them all: it runs every few seconds for the metrics, not per request.
        statement = select(func.min(batch_request.c.created_at)).where(_DUE)
        async with self._read.connect() as connection:
            oldest: datetime | None = (await connection.execute(statement)).scalar_one_or_none()
        return oldest

    # --- operator commands (`status`, `requeue`) ---------------------------------------------------

    async def oldest_unfinished_record(self) -> BatchRecord | None:
        statement = (
            select(batch_request)
            .where(_DUE)
            .order_by(batch_request.c.created_at, batch_request.c.id)
            .limit(1)
        )
        async with self._read.connect() as connection:
            row = (await connection.execute(statement)).mappings().one_or_none()
        return None if row is None else _record(row)

    async def last_errors(self, limit: int) -> list[BatchRecord]:
        statement = (
            select(batch_request)
            .where(
                batch_request.c.state.in_([State.FAILED.value, State.RETRYING.value]),
                batch_request.c.last_error.is_not(None),
            )
            .order_by(batch_request.c.updated_at.desc(), batch_request.c.id.desc())
            .limit(limit)
        )
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        return [_record(row) for row in rows]

    async def recent_changes(self, since: datetime) -> list[StateChange]:
        # The trail has no index on `at`, and a filter on it would read the whole trail. Its ids
        # follow commit order, so it is read backwards from the newest row, a chunk at a time, until
        # a whole chunk is older than `since` by more than the slack: `at` is the writer's clock at
        # the outcome, which can trail the commit order by a group commit (or by the clock skew
        # between replicas). The cost follows the rows of the window, not the length of the trail.
        slack = timedelta(seconds=60)
        columns = (
            batch_event.c.id,
            batch_event.c.at,
            batch_event.c.from_state,
            batch_event.c.to_state,
            batch_event.c.attempt,
            batch_event.c.detail,
        )
        changes: list[StateChange] = []
        before: int | None = None
        async with self._read.connect() as connection:
            while True:
                statement = select(*columns).order_by(batch_event.c.id.desc()).limit(_TRAIL_CHUNK)
                if before is not None:
                    statement = statement.where(batch_event.c.id < before)
                rows = (await connection.execute(statement)).all()
                for _, at, was, to, attempt, detail in rows:
                    if at >= since:
                        changes.append(StateChange(at, was and State(was), State(to), attempt, detail))
                if len(rows) < _TRAIL_CHUNK or max(row.at for row in rows) < since - slack:
                    return changes
                before = rows[-1].id

    async def failed_records(
        self, dataset_id: str | None = None, failed_since: datetime | None = None
    ) -> list[BatchRecord]:
        statement = (
            select(batch_request)
            .where(*_failed_filter(dataset_id, failed_since))
            .order_by(batch_request.c.updated_at, batch_request.c.id)
        )
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        return [_record(row) for row in rows]

    async def requeue_failed(
        self, now: datetime, *, dataset_id: str | None = None, failed_since: datetime | None = None
    ) -> list[str]:
        statement = (
            update(batch_request)
            # The state is the fence: a request that is no longer failed (requeued by someone else
            # meanwhile) is left alone, in one statement, so nothing can change in between.
            .where(*_failed_filter(dataset_id, failed_since))
            .values(
                state=State.PENDING.value,
                attempts=0,  # a full ORCH_RETRY__MAX_ATTEMPTS again; the trail keeps the old ones
                next_attempt_at=now,
                # The cause was fixed, but an earlier attempt may have made a batch whose answer
                # was lost: look it up by externalId before any create, and adopt it if listed.
                needs_lookup=True,
                lookup_only=False,
                last_error=None,  # the trail's failed row keeps it
                reconcile_at=None,
                updated_at=now,
                **NO_LEASE,
            )
            .returning(batch_request.c.id, batch_request.c.request_id)
        )

        async def run(tx: _Tx) -> list[str]:
            rows = (await tx.connection.execute(statement)).all()
            for pk, _ in rows:
                tx.trail(pk, now, State.FAILED, State.PENDING, 0, REQUEUED)
            return [request_id for _, request_id in rows]

        requeued: list[str] = await self._write(_Op(run=run))
        return requeued

    async def get(self, request_id: str) -> BatchRecord | None:
        statement = _RECORDS.where(batch_request.c.request_id == request_id)
        async with self._read.connect() as connection:
            row = (await connection.execute(statement)).mappings().one_or_none()
        return None if row is None else _record(row)

    async def records(
        self, state: State | None = None, dataset_id: str | None = None, limit: int | None = None
    ) -> list[BatchRecord]:
        statement = _RECORDS.order_by(batch_request.c.created_at, batch_request.c.id)
        if state is not None:
            statement = statement.where(batch_request.c.state == state.value)
        if dataset_id is not None:
            statement = statement.where(batch_request.c.dataset_id == dataset_id)
        if limit is not None:
            statement = statement.limit(limit)
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        return [_record(row) for row in rows]

    async def page(
        self, state: State | None, dataset_id: str | None, after: int, limit: int
    ) -> tuple[list[BatchRecord], int | None]:
        statement = _RECORDS.where(batch_request.c.id > after).order_by(batch_request.c.id).limit(limit + 1)
        if state is not None:
            statement = statement.where(batch_request.c.state == state.value)
        if dataset_id is not None:
            statement = statement.where(batch_request.c.dataset_id == dataset_id)
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_record(row) for row in rows], (rows[-1]["id"] if more else None)

    # --- the event outbox ---------------------------------------------------------------------------

    @property
    def events_written(self) -> asyncio.Event:
        return self._events_written

    async def outbox(self, limit: int) -> list[OutboxEvent]:
        statement = (
            select(event_outbox.c.id, event_outbox.c.event_id, event_outbox.c.body)
            .order_by(event_outbox.c.id)
            .limit(limit)
        )
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [OutboxEvent(position, event_id, body.encode()) for position, event_id, body in rows]

    async def events_sent(self, positions: Sequence[int]) -> None:
        if not positions:
            return
        statement = delete(event_outbox).where(event_outbox.c.id.in_(list(positions)))

        async def run(tx: _Tx) -> None:
            await tx.connection.execute(statement)

        await self._write(_Op(run=run))

    async def events_waiting(self) -> int:
        statement = select(func.count()).select_from(event_outbox)
        async with self._read.connect() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def history(self, request_id: str) -> list[StateChange]:
        statement = (
            select(
                batch_event.c.at,
                batch_event.c.from_state,
                batch_event.c.to_state,
                batch_event.c.attempt,
                batch_event.c.detail,
            )
            .join(batch_request, batch_request.c.id == batch_event.c.batch_request_id)
            .where(batch_request.c.request_id == request_id)
            .order_by(batch_event.c.id)
        )
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [
            StateChange(
                at=at,
                from_state=None if from_state is None else State(from_state),
                to_state=State(to_state),
                attempt=attempt,
                detail=detail,
            )
            for at, from_state, to_state, attempt, detail in rows
        ]


class _Writes:
    """The writes under way: the writer's queue and task, and (PostgreSQL) the transactions running
    on their own. One object, so that everything made from the store's state (a test's wrapper that
    copies it) shares the one writer: two would commit in no particular order."""

    __slots__ = ("alone", "outcome_writer", "outcomes", "queue", "writer")

    def __init__(self) -> None:
        self.queue: list[_Op] = []
        self.writer: asyncio.Task[None] | None = None
        self.alone: set[asyncio.Task[None]] = set()
        # PostgreSQL: outcomes waiting for the outcome writer, and that writer.
        self.outcomes: list[_Op] = []
        self.outcome_writer: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _Outcome:
    """An attempt's outcome to write: `values` for the request's row (plain values and SQL
    expressions), fenced by `claim`'s lease; `to_state` (when the state changes, or a trail row is
    due) with the trail's `detail`."""

    claim: Claim
    now: datetime
    values: dict[str, Any]
    to_state: State | None
    detail: str | None

    @property
    def plain(self) -> bool:
        """Values only, no SQL expression among them."""
        return not any(isinstance(value, ClauseElement) for value in self.values.values())


class _Op:
    """One write: adds (merged with neighbouring adds), an outcome (merged with neighbouring
    outcomes on the single writer), or any other transaction step. `shared`: it shares the writer
    (and its commits) on PostgreSQL too; on SQLite every write does."""

    __slots__ = ("add", "future", "outcome", "run", "shared")

    def __init__(
        self,
        *,
        add: list[tuple[BatchRequest, datetime]] | None = None,
        outcome: _Outcome | None = None,
        run: Callable[[_Tx], Awaitable[Any]] | None = None,
        shared: bool = False,
    ) -> None:
        self.add = add
        self.outcome = outcome
        self.run = run
        self.shared = shared
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Marks the outcome as seen, so an error nobody is left to await is not reported as lost.
        self.future.add_done_callback(_consume)

    def kind(self) -> str:
        return "add" if self.add is not None else "outcome" if self.outcome is not None else "run"

    def resolve(self, result: Any) -> None:
        if not self.future.done():  # cancelled if the writer itself was
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Tx:
    """A write transaction, collecting its trail and outbox rows to insert before commit, which go to
    the driver directly (`sqlite_direct`, or `postgres_direct` with `postgres`)."""

    def __init__(self, connection: AsyncConnection, *, postgres: bool) -> None:
        self.connection = connection
        self.sqlite = not postgres
        self._trail: list[tuple[int, datetime, str | None, str, int, str | None]] = []
        self._outbox: list[tuple[str, str, datetime]] = []
        self.wrote_events = False

    def trail(
        self,
        pk: int,
        at: datetime,
        from_state: State | None,
        to_state: State,
        attempt: int,
        detail: str | None,
    ) -> None:
        """Append to the trail, in the transaction of the change it records."""
        from_value = None if from_state is None else from_state.value
        self._trail.append((pk, at, from_value, to_state.value, attempt, detail))

    def event(self, state: State, outcome: Any, at: datetime) -> None:
        """Put the batch event of a request that reached `state` in the outbox, in the transaction
        of that change; `outcome` is the request's row as the change left it (the recorded batch)."""
        event_id = str(uuid4())  # one per state change: a repeat of it is the same event
        body = event_body(
            event_id,
            state,
            request_id=outcome.request_id,
            dataset_id=outcome.dataset_id,
            batch_id=outcome.batch_id,
            batch_status=outcome.batch_status,
            error=outcome.last_error if state is State.FAILED else None,
            at=at,
        )
        self._outbox.append((event_id, json.dumps(body, separators=(",", ":")), at))

    async def flush(self) -> None:
        trail, outbox = self._trail, self._outbox
        self._trail, self._outbox = [], []
        self.wrote_events = self.wrote_events or bool(outbox)
        if self.sqlite:
            if trail or outbox:
                rows = [(pk, sqlite_text(at), *rest) for pk, at, *rest in trail]
                events = [(event_id, body, sqlite_text(at)) for event_id, body, at in outbox]
                await on_driver(self.connection, functools.partial(sqlite_direct.write_trail, rows, events))
        elif trail or outbox:
            write = functools.partial(postgres_direct.write_trail, trail, outbox)
            await postgres_direct.run(self.connection, write)


# A request's row: from SQLAlchemy, or from the driver directly (`sqlite_direct`).
_Row = RowMapping | Mapping[str, Any]
# An outcome whose row another transaction had locked (PostgreSQL): to be written alone.
_LOCKED = object()
# The trail row of a request an operator put back to pending (`orchestrator requeue`).
REQUEUED = "requeued by operator"
# Trail rows read per query when reading the trail backwards (`recent_changes`).
_TRAIL_CHUNK = 2000


def _failed_filter(dataset_id: str | None, failed_since: datetime | None) -> list[ColumnElement[bool]]:
    """The failed requests an operator picked: of a dataset, and that failed at or after a time (a
    failed row is never updated again, so its update time is when it failed)."""
    conditions = [batch_request.c.state == State.FAILED.value]
    if dataset_id is not None:
        conditions.append(batch_request.c.dataset_id == dataset_id)
    if failed_since is not None:
        conditions.append(batch_request.c.updated_at >= failed_since)
    return conditions


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _claims(rows: Sequence[_Row], taken_over: set[int]) -> list[Claim]:
    """Leased rows as claims (`taken_over`: the ids of those whose earlier lease was still set)."""
    return [
        Claim(
            record=_record(row),
            lease=row["lease_token"],
            attempt=row["attempts"],
            needs_lookup=bool(row["needs_lookup"]),
            taken_over=row["id"] in taken_over,
        )
        for row in rows
    ]


def _record(row: _Row) -> BatchRecord:
    tags: dict[str, list[str]] = json.loads(row["tags"])
    return BatchRecord(
        request_id=row["request_id"],
        dataset_id=row["dataset_id"],
        state=State(row["state"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        batch_id=row["batch_id"],
        batch_status=row["batch_status"],
        last_error=row["last_error"],
        next_attempt_at=row["next_attempt_at"],
        input_format=row["input_format"],
        multiline_json=row["multiline_json"],
        tags=tags,
        settle_until=row["settle_until"],
        lookup_only=bool(row["lookup_only"]),
        reconcile_at=row["reconcile_at"],
        reconcile_tries=row["reconcile_tries"],
        files=files_from_json(row["files"]),
        lifecycle=_lifecycle(row),
    )


def _lifecycle(row: _Row) -> Lifecycle | None:
    """The lifecycle columns of a `_RECORDS` row (None when the request has none, or the row was
    read without them)."""
    step = row.get("life_step")
    if step is None:
        return None
    done, total = row["life_files_done"], row["life_files_total"]
    errors = row["life_errors"]
    return Lifecycle(
        # Every file in, the batch not completed yet: the step a user calls "complete".
        step="complete" if step == Step.UPLOAD.value and total and done == total else step,
        files_done=done,
        files_total=total,
        errors=None if errors is None else json.loads(errors),
        record_count=row["life_record_count"],
        failed_record_count=row["life_failed_record_count"],
    )
