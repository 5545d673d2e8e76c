"""The portable store tests of tests/unit/test_store.py, again on PostgreSQL (asyncpg), and what
only PostgreSQL does: leases on the database's clock, concurrent pooled writes, the migration lock.

Each test gets a fresh database, dropped afterwards. The server is ORCH_TEST_POSTGRES_URL (default
the machine's local one); without it the tests skip, or fail when ORCH_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from orchestrator.store import postgres_direct
from orchestrator.store.base import State
from orchestrator.store.engine import POSTGRES_POOL_SIZE, async_url, create_engine
from orchestrator.store.sql import _MIGRATION_LOCK, SqlBatchStore
from tests.conftest import MakeStore, require_service
from tests.e2e.cli import until
from tests.unit import test_store as unit
from tests.unit.test_store import now  # noqa: F401  # the fixture, shared

pytestmark = pytest.mark.integration

SERVER = make_url(os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))

for _test in unit.PORTABLE:
    globals()[_test.__name__] = _test


async def _admin(sql: str) -> None:
    # CREATE and DROP DATABASE cannot run inside a transaction.
    engine = create_async_engine(async_url(SERVER.render_as_string(hide_password=False)), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture
async def store_url() -> AsyncIterator[str]:
    require_service("PostgreSQL", SERVER.host or "127.0.0.1", SERVER.port or 5432)
    name = f"orch_test_{uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield SERVER.set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- PostgreSQL only ----------------------------------------------------------------------------


async def _database_clock(store: SqlBatchStore) -> datetime:
    assert store._engine is not None
    async with store._engine.connect() as connection:
        time: datetime = (await connection.execute(text("SELECT clock_timestamp()"))).scalar_one()
    return time


async def test_leases_run_on_the_database_clock_whatever_the_callers_say(make_store: MakeStore) -> None:
    # Two replicas whose clocks are two hours apart: on their own clocks, the fast one would see the
    # slow one's leases as long run out and take its requests over mid-call.
    store = await make_store()
    hour = timedelta(hours=1)
    slow, fast = unit.T0 - hour, unit.T0 + hour
    for request_id in ("held", "lost"):
        await store.add(unit.request(request_id), slow - hour)  # due for both
    [held] = await store.claim("slow", 1, 30, slow)
    [lost] = await store.claim("crashed", 1, 0, slow)  # runs out at once

    [taken] = await store.claim("fast", 2, 30, fast)

    assert (taken.record.request_id, taken.taken_over) == ("lost", True)
    # The slow replica's renewal counts on the database's clock too, and so does ending a lease.
    assert await store.renew([held], 30, slow) == {"held"}
    assert await store.claim("fast", 2, 30, fast) == []
    assert await store.expire_leases(["slow"], slow - hour) == 1
    [again] = await store.claim("fast", 2, 30, fast)
    assert (again.record.request_id, again.taken_over) == ("held", True)
    assert await store.mark_created(held, "b-late", "loading", slow) is False  # fenced by the token
    assert lost.lease != taken.lease


async def test_next_due_reports_a_lease_expiry_on_the_database_clock(make_store: MakeStore) -> None:
    store = await make_store()
    await store.add(unit.request(), unit.T0)
    before = await _database_clock(store)

    await store.claim("d", 1, 30, unit.T0)

    after = await _database_clock(store)
    due = await store.next_due()
    assert due is not None
    assert before + timedelta(seconds=30) <= due <= after + timedelta(seconds=30)


async def test_writes_run_concurrently_in_pooled_transactions(make_store: MakeStore, store_url: str) -> None:
    # One outcome's row is locked by another connection: the outcome writer skips it and writes the
    # others meanwhile; the blocked one is written alone, in a transaction of its own that waits for
    # the lock.
    store, at = await make_store(), unit.T0
    assert store._engine is not None
    assert store._engine.pool.size() == POSTGRES_POOL_SIZE  # type: ignore[attr-defined]
    for request_id in ("blocked", "a", "b"):
        await store.add(unit.request(request_id), at)
    claims = {claim.record.request_id: claim for claim in await store.claim("d", 3, 30, at)}
    locker = create_engine(store_url)
    try:
        async with locker.begin() as connection:
            await connection.execute(
                text("SELECT id FROM batch_request WHERE request_id = 'blocked' FOR UPDATE")
            )
            blocked = asyncio.create_task(store.mark_created(claims["blocked"], "b0", "loading", at))

            async def waiting_for_the_lock() -> bool:
                async with locker.connect() as other:
                    found = await other.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'"
                        )
                    )
                    return bool(found.scalar_one())

            # Its write waits for the lock before the others are asked for: they must not queue behind it.
            await until(waiting_for_the_lock, "the blocked outcome to wait for the row lock", timeout=10)
            async with asyncio.timeout(10):
                assert await store.mark_created(claims["a"], "b1", "loading", at) is True
                assert await store.mark_failed(claims["b"], "HTTP 400", at) is True
            assert not blocked.done()
        assert await asyncio.wait_for(blocked, 10) is True
    finally:
        await locker.dispose()
    assert (await store.counts())[State.CREATED] == 2


async def test_opening_waits_for_the_migration_lock(store_url: str) -> None:
    # Replicas starting together take turns migrating: while another holds the lock, open() waits.
    locker = create_engine(store_url)
    store = SqlBatchStore(store_url)
    try:
        async with locker.begin() as connection:
            await connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            opening = asyncio.create_task(store.open())

            async def waiting() -> bool:
                async with locker.connect() as other:
                    waiters = text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                    return bool((await other.execute(waiters)).scalar_one())

            await until(waiting, "open() to wait for the migration lock", timeout=10)
            assert not opening.done()
        await asyncio.wait_for(opening, 30)
        assert await store.counts() == dict.fromkeys(State, 0)
    finally:
        await store.close()
        await locker.dispose()


async def test_a_connection_dropped_mid_transaction_fails_that_write_only(make_store: MakeStore) -> None:
    """Idle pooled connections that died (a database restart) are replaced at checkout, unseen
    (pre-ping). A connection lost while its transaction waits fails that write, with nothing of it
    committed, and the store's next write, on a new connection, works."""
    store, at = await make_store(), unit.T0
    assert store._engine is not None
    await store.add(unit.request(), at)
    [claim] = await store.claim("d", 1, 30, at)
    admin = create_engine(store._engine.url.render_as_string(hide_password=False))

    async def terminate(*, waiting_for_a_lock: bool) -> int:
        """Ends the backends of the store's database (not the asking one), or those of them waiting
        for a lock; returns how many."""
        async with admin.connect() as connection:
            found = await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND (NOT :waiting OR wait_event_type = 'Lock')"
                ),
                {"waiting": waiting_for_a_lock},
            )
            return len(found.all())

    try:
        assert await terminate(waiting_for_a_lock=False) >= 1  # the store's pooled connections, idle
        assert await store.get("r1") is not None
        async with admin.begin() as locker:
            await locker.execute(text("SELECT id FROM batch_request WHERE request_id = 'r1' FOR UPDATE"))
            write = asyncio.create_task(store.mark_created(claim, "b1", "loading", at))

            async def cut() -> bool:  # the write's UPDATE, once it waits for the row lock
                return await terminate(waiting_for_a_lock=True) > 0

            await until(cut, "the write to wait for the row lock", timeout=10)
            with pytest.raises(DBAPIError):
                await asyncio.wait_for(write, 10)
    finally:
        await admin.dispose()

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.batch_id) == (State.PENDING, None)  # nothing of it committed
    assert await store.mark_created(claim, "b1", "loading", at) is True
    assert (await store.counts())[State.CREATED] == 1


async def test_direct_writes_commit_and_roll_back_with_sqlalchemy_s_transaction(
    make_store: MakeStore,
) -> None:
    """The adds, outcomes and trail rows sent to asyncpg directly run inside the transaction
    SQLAlchemy began (`postgres_direct.run` starts it the adapter's way): rolled back with it, not
    written on their own. Fails should a SQLAlchemy release change the adapter's attributes."""
    store = await make_store()
    engine = store._engine
    assert engine is not None
    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    async def add(request_id: str, *, then_fail: bool) -> None:
        row = (request_id, "ds1", "f", None, None, "{}", None, "pending", 0, at, False, at, at)  # ADD_COLUMNS
        async with engine.begin() as connection:
            added = await postgres_direct.run(connection, partial(postgres_direct.add_requests, [row]))
            assert list(added) == [request_id]  # written, in the transaction
            if then_fail:
                raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        await add("gone", then_fail=True)
    await add("kept", then_fail=False)

    assert await store.get("gone") is None
    kept = await store.get("kept")
    assert kept is not None
    assert kept.state is State.PENDING
    assert kept.created_at == at


async def test_a_claim_is_one_statement_in_a_transaction_of_its_own(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim (one statement that locks and leases the due rows) is sent without BEGIN and COMMIT,
    and is committed when it answers; a statement sent so after others of a transaction is refused,
    as it would commit them too."""
    store = await make_store()
    engine = store._engine
    assert engine is not None
    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    await store.add(unit.request(), at)
    in_transaction: list[bool] = []
    lease_due = postgres_direct.lease_due

    async def watched(*args: Any) -> tuple[list[Any], set[int]]:
        in_transaction.append(args[-1].is_in_transaction())  # the asyncpg connection
        return await lease_due(*args)

    monkeypatch.setattr(postgres_direct, "lease_due", watched)
    [claim] = await store.claim("d1", 5, 30, at)
    assert in_transaction == [False]
    async with engine.connect() as other:
        token = (await other.execute(text("SELECT lease_token FROM batch_request"))).scalar_one()
    assert token == claim.lease  # committed, seen from another connection

    async with engine.begin() as connection:
        await connection.execute(text("SELECT 1"))
        with pytest.raises(RuntimeError, match="one statement"):
            await postgres_direct.run(
                connection, partial(lease_due, "d2", "t2", 5, at, 30.0), one_statement=True
            )
