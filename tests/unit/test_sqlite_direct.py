"""The store's writes sent to SQLite's driver directly (`orchestrator.store.sqlite_direct`): they run in
SQLAlchemy's transaction, on aiosqlite's thread, raise SQLAlchemy's errors, and leave rows that read
back exactly as SQLAlchemy's own writes do. (Their behaviour as the store's is tested in
test_store.py, which runs on SQLite through this path and on PostgreSQL through SQLAlchemy.)"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aiosqlite
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from orchestrator.messages import BatchRequest, FileRef
from orchestrator.store.base import AddResult, State
from orchestrator.store.engine import create_engine, on_driver
from orchestrator.store.schema import batch_request, from_sqlite_text, sqlite_text
from orchestrator.store.sql import upgrade
from orchestrator.store.sqlite_direct import ROWS_PER_INSERT, bind
from tests.conftest import MakeStore

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store.db"


def test_aiosqlite_still_queues_calls_the_way_on_driver_uses() -> None:
    # on_driver relies on these two private members; a release without them must fail here first.
    assert callable(aiosqlite.Connection._execute)
    assert isinstance(aiosqlite.Connection._conn, property)


async def test_work_runs_on_the_connections_thread_inside_its_transaction(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade)
        threads: list[int] = []

        def insert(db: sqlite3.Connection) -> int:
            threads.append(threading.get_ident())
            cursor = db.execute(
                "INSERT INTO event_outbox (event_id, body, created_at) VALUES ('e1', '{}', 'x') RETURNING id"
            )
            return int(cursor.fetchone()[0])

        async def insert_then_fail() -> None:
            async with engine.begin() as connection:
                assert await on_driver(connection, insert) == 1
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError, match="roll back"):
            await insert_then_fail()
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT count(*) FROM event_outbox")).scalar() == 0

        async with engine.begin() as connection:
            await on_driver(connection, insert)
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT count(*) FROM event_outbox")).scalar() == 1
        assert threads
        assert threading.get_ident() not in threads
    finally:
        await engine.dispose()


async def test_driver_errors_are_raised_as_sqlalchemy_raises_them(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade)

        def twice(db: sqlite3.Connection) -> None:
            for _ in range(2):
                db.execute("INSERT INTO event_outbox (event_id, body, created_at) VALUES ('e1', '{}', 'x')")

        with pytest.raises(IntegrityError, match="UNIQUE") as raised:
            async with engine.begin() as connection:
                await on_driver(connection, twice)
        assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    finally:
        await engine.dispose()


def test_times_are_kept_as_utc_text_and_read_back_equal() -> None:
    local = datetime(2026, 11, 28, 14, 30, 15, 5, tzinfo=timezone(timedelta(hours=1)))
    assert sqlite_text(local) == "2026-11-28 13:30:15.000005"
    assert from_sqlite_text(sqlite_text(local)) == local
    assert from_sqlite_text(sqlite_text(local)).tzinfo is UTC
    assert bind(local) == "2026-11-28 13:30:15.000005"
    assert bind(3) == 3
    with pytest.raises(ValueError, match="naive datetime"):
        bind(datetime(2026, 11, 28, 12, 0))


async def test_a_claimed_record_equals_the_record_sqlalchemy_reads(make_store: MakeStore) -> None:
    store = await make_store()
    full = BatchRequest(
        request_id="r1",
        dataset_id="ds1",
        input_format="json",
        multiline_json=True,
        tags={"source": ["crm", "web"]},
        files=(FileRef(source="/data/a.json", name="part=1/a.json"),),
    )
    plain = BatchRequest(request_id="r2", dataset_id="ds2")
    assert await store.add_many([full, plain], NOW) == [AddResult.ADDED, AddResult.ADDED]

    claims = await store.claim("me", 10, 60, NOW + timedelta(seconds=1))

    assert [claim.record.request_id for claim in claims] == ["r1", "r2"]
    for claim in claims:
        assert claim.record == await store.get(claim.record.request_id)
        assert (claim.attempt, claim.needs_lookup, claim.taken_over) == (1, False, False)
    assert claims[0].record.request() == full
    assert claims[0].record.multiline_json is True
    assert claims[1].record.multiline_json is None


async def test_adds_beyond_one_insert_statement_are_all_recorded_once(make_store: MakeStore) -> None:
    store = await make_store()
    count = ROWS_PER_INSERT * 2 + 7
    first = [BatchRequest(request_id=f"r{i}", dataset_id="ds") for i in range(count)]
    # The same keys again in one write: repeats, and one conflict (another dataset under a key).
    again = [first[0], first[-1], BatchRequest(request_id="r5", dataset_id="other")]

    assert set(await store.add_many(first, NOW)) == {AddResult.ADDED}
    assert await store.add_many([*again, first[1]], NOW) == [
        AddResult.DUPLICATE,
        AddResult.DUPLICATE,
        AddResult.CONFLICT,
        AddResult.DUPLICATE,
    ]
    assert await store.unfinished() == count
    assert len(await store.history(f"r{count - 1}")) == 1


async def test_an_outcome_under_a_lost_lease_writes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    await store.add(BatchRequest(request_id="r1", dataset_id="ds1"), NOW)
    [first] = await store.claim("a", 1, 60, NOW)
    # The lease runs out and another replica takes the request over.
    [second] = await store.claim("b", 1, 60, NOW + timedelta(seconds=61))
    assert second.taken_over
    assert second.needs_lookup

    stale, current = await asyncio.gather(
        store.mark_created(first, "b-stale", "loading", NOW + timedelta(seconds=62)),
        store.mark_created(second, "b-1", "loading", NOW + timedelta(seconds=62)),
    )

    assert (stale, current) == (False, True)
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.batch_id) == (State.CREATED, "b-1")
    history = [(change.to_state, change.attempt) for change in await store.history("r1")]
    assert history == [(State.PENDING, 0), (State.CREATED, 2)]
    # The row as the direct update left it, read by SQLAlchemy: no lease, due time cleared.
    engine = create_engine(store.url)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(select(batch_request).where(batch_request.c.id == 1))).one()
    finally:
        await engine.dispose()
    assert (row.lease_token, row.lease_owner, row.lease_expires_at, row.next_attempt_at) == (None,) * 4
    assert row.updated_at == NOW + timedelta(seconds=62)
