"""SqlBatchStore on SQLite files in a temporary directory.

Tests marked `@portable` take only the `make_store` and `now` fixtures and hold on every dialect:
tests/integration/test_store_postgres.py runs them again against PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from orchestrator.messages import BatchRequest, FileRef
from orchestrator.store.base import AddResult, BatchStore, State, Step
from orchestrator.store.engine import async_url, create_engine
from orchestrator.store.sql import MIGRATIONS, SqlBatchStore, metadata
from tests.conftest import MakeStore

T = TypeVar("T")

PORTABLE: list[Callable[..., Awaitable[None]]] = []


def portable(test: T) -> T:
    PORTABLE.append(test)  # type: ignore[arg-type]  # only async tests are registered
    return test


T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def now() -> datetime:
    return T0


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store.db"


def request(request_id: str = "r1", dataset_id: str = "ds1", **fields: object) -> BatchRequest:
    return BatchRequest(request_id=request_id, dataset_id=dataset_id, **fields)  # type: ignore[arg-type]


def test_sql_store_implements_the_port() -> None:
    store: BatchStore = SqlBatchStore("sqlite:///unused.db")  # mypy checks the structure
    assert store is not None


# --- add and reject ---------------------------------------------------------------------------


@portable
async def test_add_records_a_pending_request(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    new = request(input_format="json", multiline_json=True, tags={"source": ["crm"]})

    assert await store.add(new, now) is AddResult.ADDED

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts, record.dataset_id) == (State.PENDING, 0, "ds1")
    assert (record.created_at, record.updated_at, record.next_attempt_at) == (now, now, now)
    assert record.request() == new
    assert [(c.from_state, c.to_state, c.attempt) for c in await store.history("r1")] == [
        (None, State.PENDING, 0)
    ]


@portable
async def test_add_is_idempotent_and_never_overwrites(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(tags={"a": ["1"]}), now)

    assert await store.add(request(tags={"a": ["1"]}), now + timedelta(seconds=1)) is AddResult.DUPLICATE
    assert await store.add(request(dataset_id="other"), now) is AddResult.CONFLICT
    assert await store.add(request(tags={"a": ["2"]}), now) is AddResult.CONFLICT
    assert await store.add(request(input_format="csv", tags={"a": ["1"]}), now) is AddResult.CONFLICT

    record = await store.get("r1")
    assert record is not None
    assert (record.dataset_id, dict(record.tags), record.updated_at) == ("ds1", {"a": ["1"]}, now)
    assert len(await store.history("r1")) == 1


@portable
async def test_reject_records_the_reason_once(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()

    await store.reject("msg:1", None, "datasetId is missing", now)
    await store.reject("msg:1", "ds", "another reason", now + timedelta(seconds=5))

    record = await store.get("msg:1")
    assert record is not None
    assert (record.state, record.dataset_id, record.last_error) == (
        State.REJECTED,
        "",
        "datasetId is missing",
    )
    assert record.next_attempt_at is None
    history = await store.history("msg:1")
    assert [(c.from_state, c.to_state, c.detail) for c in history] == [
        (None, State.REJECTED, "datasetId is missing")
    ]
    # A rejected key is taken: a valid request under it conflicts rather than replacing it.
    assert await store.add(request("msg:1"), now) is AddResult.CONFLICT
    assert await store.claim("d", 10, 30, now + timedelta(hours=1)) == []


@portable
async def test_reject_never_overwrites_a_valid_request(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)

    await store.reject("r1", "ds1", "late duplicate judged invalid", now)

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.last_error) == (State.PENDING, None)


@portable
async def test_times_come_back_aware_in_utc(make_store: MakeStore) -> None:
    store = await make_store()
    local = datetime(2026, 11, 28, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    await store.add(request(), local)

    record = await store.get("r1")
    assert record is not None
    assert record.created_at == local
    assert record.created_at.tzinfo is UTC
    assert record.created_at.hour == 12
    assert record.to_json()["createdAt"] == "2026-11-28T12:30:15.123Z"
    # Raised as it is: adds go to the driver directly on both databases, the store binding the times.
    with pytest.raises(ValueError, match="naive datetime"):
        await store.add(request("r2"), datetime(2026, 11, 28, 12, 0))  # the point


# --- claim and outcomes -------------------------------------------------------------------------


@portable
async def test_claim_leases_due_requests_oldest_first(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    for seconds, request_id in [(2, "c"), (0, "a"), (1, "b")]:
        await store.add(request(request_id), now + timedelta(seconds=seconds))

    first = await store.claim("d1", 2, 30, now + timedelta(seconds=5))
    second = await store.claim("d1", 2, 30, now + timedelta(seconds=5))

    assert [c.record.request_id for c in first] == ["a", "b"]
    assert [c.record.request_id for c in second] == ["c"]
    assert {(c.attempt, c.record.attempts, c.needs_lookup) for c in first + second} == {(1, 1, False)}
    # One token per claim (it fences together with the request id); every claim gets a new one.
    assert len({c.lease for c in first}) == 1
    assert first[0].lease != second[0].lease
    assert await store.claim("d1", 2, 30, now + timedelta(seconds=5)) == []
    assert (await store.counts())[State.PENDING] == 3  # a claim is not a state change
    assert len(await store.history("a")) == 1


@portable
async def test_claim_skips_requests_not_yet_due(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now + timedelta(seconds=10))

    assert await store.claim("d", 10, 30, now) == []
    assert await store.claim("d", 0, 30, now + timedelta(seconds=10)) == []
    assert len(await store.claim("d", 10, 30, now + timedelta(seconds=10))) == 1


@portable
async def test_an_expired_lease_is_claimed_again_and_needs_a_lookup(
    make_store: MakeStore, now: datetime
) -> None:
    store = await make_store()
    await store.add(request("held"), now)
    await store.add(request(), now)
    # A lease of 30 s is held a second later, and one of 0 s has run out as soon as it is taken, on
    # the caller's clock (SQLite) and on the database's (PostgreSQL) alike.
    [held] = await store.claim("alive", 1, 30, now)
    [lost] = await store.claim("crashed", 1, 0, now)

    [taken] = await store.claim("d2", 2, 30, now + timedelta(seconds=1))

    assert (taken.record.request_id, held.record.request_id) == ("r1", "held")
    assert (taken.attempt, taken.needs_lookup, taken.taken_over) == (2, True, True)
    assert taken.lease != lost.lease
    # The first holder wakes up late: every outcome it tries to record is refused, and nothing changes.
    later = now + timedelta(seconds=2)
    assert await store.mark_created(lost, "b-late", "loading", later) is False
    assert await store.mark_retry(lost, "e", later, ambiguous=False, now=later) is False
    assert await store.mark_failed(lost, "e", later) is False
    await store.release(lost, later)
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts, record.batch_id, record.updated_at) == (
        State.PENDING,
        2,
        None,
        now + timedelta(seconds=1),
    )
    assert len(await store.history("r1")) == 1
    assert await store.mark_created(taken, "b1", "loading", later) is True


@portable
async def test_mark_created_finishes_the_request(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)
    assert await store.mark_retry(claim, "HTTP 503", now, ambiguous=False, now=now) is True
    [claim] = await store.claim("d", 1, 30, now)

    done = now + timedelta(seconds=1)
    assert await store.mark_created(claim, "b1", "loading", done, adopted=True) is True

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.batch_id, record.batch_status, record.attempts) == (
        State.CREATED,
        "b1",
        "loading",
        2,
    )
    assert (record.last_error, record.next_attempt_at, record.updated_at) == (None, None, done)
    assert await store.next_due() is None
    assert await store.claim("d", 1, 30, now + timedelta(days=1)) == []
    assert await store.mark_created(claim, "b2", "loading", done) is False  # the lease is gone
    history = await store.history("r1")
    assert [(c.from_state, c.to_state, c.attempt) for c in history] == [
        (None, State.PENDING, 0),
        (State.PENDING, State.RETRYING, 1),
        (State.RETRYING, State.CREATED, 2),
    ]
    assert history[-1].at == done
    assert history[-1].detail is not None
    assert "b1" in history[-1].detail
    assert "lookup" in history[-1].detail


@portable
async def test_mark_retry_schedules_the_next_attempt(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)
    due = now + timedelta(seconds=8)

    assert await store.mark_retry(claim, "timeout", due, ambiguous=True, now=now) is True

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.last_error, record.next_attempt_at) == (State.RETRYING, "timeout", due)
    assert await store.next_due() == due
    assert await store.claim("d", 1, 30, due - timedelta(microseconds=1)) == []
    [again] = await store.claim("d", 1, 30, due)
    assert (again.attempt, again.needs_lookup, again.record.state) == (2, True, State.RETRYING)
    # A definite failure later does not clear the doubt about the earlier attempt.
    assert await store.mark_retry(again, "HTTP 429", due, ambiguous=False, now=due) is True
    [third] = await store.claim("d", 1, 30, due)
    assert (third.attempt, third.needs_lookup) == (3, True)
    history = await store.history("r1")
    assert history[1].detail is not None
    assert "unknown" in history[1].detail


@portable
async def test_needs_lookup_is_cleared_by_an_outcome(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    for request_id in ("created", "failed"):
        await store.add(request(request_id), now)
    claims = await store.claim("d", 2, 30, now)
    for claim in claims:
        await store.mark_retry(claim, "timeout", now, ambiguous=True, now=now)
    created, failed = await store.claim("d", 2, 30, now)
    assert created.needs_lookup
    assert failed.needs_lookup

    assert await store.mark_created(created, "b1", "loading", now) is True
    assert await store.mark_failed(failed, "HTTP 400: bad dataset", now) is True

    record = await store.get("failed")
    assert record is not None
    assert (record.state, record.last_error, record.next_attempt_at) == (
        State.FAILED,
        "HTTP 400: bad dataset",
        None,
    )
    assert await store.unfinished() == 0
    assert [c.to_state for c in await store.history("failed")][-1] is State.FAILED


@portable
async def test_release_gives_a_claim_back_uncounted(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)

    await store.release(claim, now)

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts) == (State.PENDING, 0)
    assert await store.next_due() == now
    [again] = await store.claim("d", 1, 30, now)
    assert (again.attempt, again.needs_lookup) == (1, False)
    assert await store.mark_created(claim, "b", "loading", now) is False  # the released lease is dead
    assert len(await store.history("r1")) == 1


@portable
async def test_renew_matches_request_and_lease_pairs(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request("r1"), now)
    await store.add(request("r2"), now + timedelta(seconds=1))
    [first] = await store.claim("d", 1, 30, now + timedelta(seconds=1))
    [second] = await store.claim("d", 1, 30, now + timedelta(seconds=1))
    assert first.lease != second.lease
    crossed = [replace(first, lease=second.lease), replace(second, lease=first.lease)]
    later = now + timedelta(seconds=20)

    assert await store.renew(crossed, 0, later) == set()
    assert await store.claim("other", 2, 30, later) == []  # the crossed pairs changed nothing
    # A renewal sets the lease anew from when it is made: one of 0 s has run out at once, on the
    # caller's clock (SQLite) and on the database's (PostgreSQL) alike.
    assert await store.renew([first, second], 0, later) == {"r1", "r2"}
    taken = await store.claim("other", 2, 30, later)
    assert sorted(claim.record.request_id for claim in taken) == ["r1", "r2"]
    assert await store.renew([first, second], 30, later) == set()  # no longer theirs


@portable
async def test_settle_window_and_lookup_only_are_kept(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)
    settle = now + timedelta(seconds=30)
    assert await store.mark_retry(
        claim, "HTTP 502", now + timedelta(seconds=1), ambiguous=True, now=now, settle_until=settle
    )
    [again] = await store.claim("d", 1, 30, now + timedelta(seconds=1))
    assert (again.record.settle_until, again.needs_lookup, again.attempt) == (settle, True, 2)
    # A look-up inside the window: given back uncounted, due again later, window unchanged.
    assert await store.release(again, now, until=now + timedelta(seconds=3))
    record = await store.get("r1")
    assert record is not None
    assert (record.attempts, record.next_attempt_at, record.settle_until) == (
        1,
        now + timedelta(seconds=3),
        settle,
    )
    [third] = await store.claim("d", 1, 30, now + timedelta(seconds=3))
    assert await store.mark_retry(
        third, "gave up", now + timedelta(seconds=4), ambiguous=True, now=now, lookup_only=True
    )
    [last] = await store.claim("d", 1, 30, now + timedelta(seconds=4))
    assert (last.record.lookup_only, last.record.settle_until) == (True, settle)
    assert await store.mark_failed(last, "gave up", now, count_attempt=False)
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts, record.lookup_only) == (State.FAILED, 2, False)


@portable
async def test_reconciliation_is_claimed_once_due(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)
    reconcile = now + timedelta(seconds=30)
    assert await store.mark_created(claim, "b1", "loading", now, adopted=True, reconcile_at=reconcile)
    assert await store.pending_reconciliations() == 1
    assert await store.next_due() == reconcile
    assert await store.claim_reconciliations("d", 10, 30, now) == []
    [due] = await store.claim_reconciliations("d", 10, 30, reconcile)
    assert (due.record.state, due.record.batch_id, due.attempt) == (State.CREATED, "b1", 1)
    assert await store.claim_reconciliations("other", 10, 30, reconcile) == []  # leased
    assert await store.claim("other", 10, 30, reconcile) == []  # never a create
    assert await store.finish_reconciliation(
        due, reconcile, retry_at=reconcile + timedelta(seconds=5), failed=True
    )
    [again] = await store.claim_reconciliations("d", 10, 30, reconcile + timedelta(seconds=5))
    assert again.record.reconcile_tries == 1
    assert await store.finish_reconciliation(again, reconcile, detail="reconciled: aborted b2")
    assert await store.pending_reconciliations() == 0
    assert await store.next_due() is None
    assert (await store.history("r1"))[-1].detail == "reconciled: aborted b2"


@portable
async def test_outcomes_write_events_to_the_outbox(make_store: MakeStore, now: datetime) -> None:
    store = await make_store(events=True)
    for request_id in ("r1", "r2", "r3"):
        await store.add(request(request_id), now)
    first, second, third = await store.claim("d", 3, 30, now)
    await store.mark_created(first, "b1", "loading", now)
    await store.mark_failed(second, "HTTP 400", now)
    await store.mark_retry(third, "HTTP 503", now, ambiguous=False, now=now)  # no event

    events = await store.outbox(10)
    bodies = [json.loads(event.body) for event in events]
    assert [(b["type"], b["requestId"], b["batchId"], b["error"]) for b in bodies] == [
        ("batch.created", "r1", "b1", None),
        ("batch.failed", "r2", None, "HTTP 400"),
    ]
    assert [event.event_id for event in events] == [body["eventId"] for body in bodies]
    assert await store.events_waiting() == 2

    await store.events_sent([events[0].position])

    assert [event.event_id for event in await store.outbox(10)] == [events[1].event_id]
    assert await store.events_waiting() == 1


# --- queries ------------------------------------------------------------------------------------


# Not portable: leases run on the caller's clock here; on PostgreSQL they run on the database's
# (tests/integration/test_store_postgres.py has that side).


async def test_sqlite_leases_run_on_the_callers_clock(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [held] = await store.claim("d1", 1, 30, now)

    assert await store.claim("d2", 1, 30, now + timedelta(seconds=29)) == []
    assert await store.renew([held], 30, now + timedelta(seconds=20)) == {"r1"}
    assert await store.next_due() == now + timedelta(seconds=50)
    assert await store.claim("d2", 1, 30, now + timedelta(seconds=49)) == []
    [taken] = await store.claim("d2", 1, 30, now + timedelta(seconds=50))
    assert (taken.attempt, taken.taken_over) == (2, True)
    assert await store.expire_leases(["d2"], now + timedelta(seconds=51)) == 1
    assert await store.next_due() == now + timedelta(seconds=51)
    [again] = await store.claim("d3", 1, 30, now + timedelta(seconds=51))
    assert again.attempt == 3


async def test_next_due_includes_lease_expiry(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    assert await store.next_due() is None
    await store.add(request("later"), now + timedelta(seconds=100))
    await store.add(request("sooner"), now + timedelta(seconds=10))
    assert await store.next_due() == now + timedelta(seconds=10)

    await store.claim("d", 1, 30, now + timedelta(seconds=10))
    # "sooner" is leased until +40: it is due then, in case its holder died.
    assert await store.next_due() == now + timedelta(seconds=40)
    # At +100 the expired lease comes first; then "later" is the earliest; then its lease.
    [again] = await store.claim("d", 1, 300, now + timedelta(seconds=100))
    assert (again.record.request_id, again.needs_lookup) == ("sooner", True)
    assert await store.next_due() == now + timedelta(seconds=100)
    await store.claim("d", 1, 50, now + timedelta(seconds=100))
    assert await store.next_due() == now + timedelta(seconds=150)


@portable
async def test_counts_and_unfinished(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    assert await store.counts() == dict.fromkeys(State, 0)

    for request_id in ("a", "b", "c", "d"):
        await store.add(request(request_id), now)
    await store.reject("bad", None, "not JSON", now)
    a, b, c = await store.claim("x", 3, 30, now)
    await store.mark_created(a, "b1", "loading", now)
    await store.mark_failed(b, "HTTP 403", now)
    await store.mark_retry(c, "HTTP 503", now, ambiguous=False, now=now)

    assert await store.counts() == {
        **dict.fromkeys(State, 0),
        State.PENDING: 1,
        State.RETRYING: 1,
        State.CREATED: 1,
        State.FAILED: 1,
        State.REJECTED: 1,
    }
    assert await store.unfinished() == 2


@portable
async def test_records_oldest_first_with_filters(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request("second", "ds1"), now + timedelta(seconds=2))
    await store.add(request("first", "ds2"), now + timedelta(seconds=1))
    await store.add(request("third", "ds1"), now + timedelta(seconds=3))
    await store.reject("fourth", "ds1", "bad tags", now + timedelta(seconds=4))

    assert [r.request_id for r in await store.records()] == ["first", "second", "third", "fourth"]
    assert [r.request_id for r in await store.records(dataset_id="ds1")] == ["second", "third", "fourth"]
    assert [r.request_id for r in await store.records(state=State.REJECTED)] == ["fourth"]
    assert [r.request_id for r in await store.records(State.PENDING, "ds1", limit=1)] == ["second"]
    assert await store.records(state=State.CREATED) == []
    assert await store.get("missing") is None
    assert await store.history("missing") == []


# --- concurrency --------------------------------------------------------------------------------


@portable
async def test_concurrent_claimers_never_share_a_request(make_store: MakeStore, now: datetime) -> None:
    # Three instances on one database (one with a pool of four connections), twelve claimers.
    stores = [await make_store(), await make_store(), await make_store(pool_size=4)]
    total = 300
    for index in range(total):
        await stores[0].add(request(f"r{index}"), now)
    claimed: list[str] = []

    async def claimer(store: SqlBatchStore, owner: str) -> None:
        while batch := await store.claim(owner, 7, 60, now):
            claimed.extend(claim.record.request_id for claim in batch)

    await asyncio.gather(*(claimer(stores[n % 3], f"owner-{n}") for n in range(12)))

    duplicates = [request_id for request_id, seen in Counter(claimed).items() if seen > 1]
    assert duplicates == []
    assert len(claimed) == total


@portable
async def test_fifty_concurrent_claim_and_mark_cycles(make_store: MakeStore, now: datetime) -> None:
    stores = [await make_store(), await make_store()]
    for index in range(100):
        await stores[0].add(request(f"r{index}"), now)

    async def cycle(n: int) -> int:
        store = stores[n % 2]
        done = 0
        while claims := await store.claim(f"w{n}", 1, 60, now):
            for claim in claims:
                if n % 3:
                    done += await store.mark_created(claim, f"b-{claim.record.request_id}", "loading", now)
                else:
                    done += await store.mark_failed(claim, "HTTP 400", now)
        return done

    results = await asyncio.gather(*(cycle(n) for n in range(50)))

    assert sum(results) == 100
    counts = await stores[1].counts()
    assert counts[State.CREATED] + counts[State.FAILED] == 100
    assert await stores[1].unfinished() == 0


@portable
async def test_concurrent_adds_of_one_request_add_it_once(make_store: MakeStore, now: datetime) -> None:
    stores = [await make_store(), await make_store()]

    results = await asyncio.gather(*(stores[n % 2].add(request(), now) for n in range(20)))

    assert Counter(results) == {AddResult.ADDED: 1, AddResult.DUPLICATE: 19}


# --- the writer (group commit) ------------------------------------------------------------------


@portable
async def test_concurrent_writes_share_commits(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    assert store._engine is not None
    commits: list[object] = []
    event.listen(store._engine.sync_engine, "commit", commits.append)

    results = await asyncio.gather(*(store.add(request(f"r{n}"), now) for n in range(40)))

    assert set(results) == {AddResult.ADDED}
    assert 1 <= len(commits) < 10
    assert await store.unfinished() == 40
    assert len(await store.history("r39")) == 1


@portable
async def test_a_failing_write_does_not_fail_its_neighbours(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    naive = datetime(2026, 11, 28, 12, 0)  # the failure under test

    results = await asyncio.gather(
        store.add(request("a"), now),
        store.add(request("bad"), naive),
        store.reject("c", None, "not JSON", now),
        return_exceptions=True,
    )

    assert results[0] is AddResult.ADDED
    assert type(results[1]) is ValueError
    assert "naive datetime" in str(results[1])
    assert results[2] is None
    assert await store.get("bad") is None
    assert [r.request_id for r in await store.records()] == ["a", "c"]


@portable
async def test_writes_in_one_batch_keep_their_order(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()

    results = await asyncio.gather(
        store.reject("k", "ds1", "invalid", now),
        store.add(request("k"), now),
        store.add(request("n"), now),
        store.add(request("n"), now),
        store.add(request("n", "ds2"), now),
    )

    assert list(results) == [
        None,
        AddResult.CONFLICT,
        AddResult.ADDED,
        AddResult.DUPLICATE,
        AddResult.CONFLICT,
    ]
    record = await store.get("k")
    assert record is not None
    assert record.state is State.REJECTED


@portable
async def test_close_finishes_queued_writes(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    adds = [asyncio.create_task(store.add(request(f"r{n}"), now)) for n in range(10)]
    await asyncio.sleep(0)  # let them queue

    await store.close()

    assert [task.result() for task in adds] == [AddResult.ADDED] * 10
    again = await make_store()
    assert await again.unfinished() == 10
    with pytest.raises(RuntimeError, match="not open"):
        await store.add(request("late"), now)


@portable
async def test_a_cancelled_caller_still_gets_its_write(make_store: MakeStore, now: datetime) -> None:
    store = await make_store()
    await store.add(request(), now)
    [claim] = await store.claim("d", 1, 30, now)
    marking = asyncio.create_task(store.mark_created(claim, "b1", "loading", now))
    await asyncio.sleep(0)  # queued

    marking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await marking
    await store.close()

    again = await make_store()
    record = await again.get("r1")
    assert record is not None
    assert (record.state, record.batch_id) == (State.CREATED, "b1")


# --- schema and migrations ----------------------------------------------------------------------


@portable
async def test_reopening_keeps_data_and_schema(make_store: MakeStore, now: datetime) -> None:
    first = await make_store()
    await first.add(request(), now)
    await first.close()

    again = await make_store()

    assert (await again.counts())[State.PENDING] == 1


@portable
async def test_concurrent_first_opens_migrate_once(store_url: str) -> None:
    stores = [SqlBatchStore(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        assert await stores[3].counts() == dict.fromkeys(State, 0)
    finally:
        for store in stores:
            await store.close()


@portable
async def test_migrations_build_the_schema_the_code_queries(store_url: str) -> None:
    store = SqlBatchStore(store_url)
    await store.open()
    await store.close()
    engine = create_engine(store_url)

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
            version = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            # The newest migration file's revision, so a migration without a matching table
            # change (or the reverse) is caught above.
            assert version == max(path.name[:4] for path in (MIGRATIONS / "versions").glob("0*.py"))
    finally:
        await engine.dispose()


@portable
async def test_schema_refuses_unknown_states(make_store: MakeStore, store_url: str) -> None:
    await make_store()
    engine = create_engine(store_url)
    insert = text(
        "INSERT INTO batch_request (request_id, dataset_id, fingerprint, tags, state, attempts, "
        "needs_lookup, created_at, updated_at) VALUES "
        "('x', 'd', 'f', '{}', :state, 0, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    try:
        for bad in ("bogus", "pending"):  # pending without a next attempt time breaks the due index
            with pytest.raises(IntegrityError):
                async with engine.begin() as connection:
                    await connection.execute(insert, {"state": bad})
    finally:
        await engine.dispose()


def test_migrations_ship_inside_the_package() -> None:
    # The wheel includes the package directory whole; Alembic finds the scripts by this path.
    assert (MIGRATIONS / "env.py").is_file()
    assert (MIGRATIONS / "script.py.mako").is_file()
    assert (MIGRATIONS / "versions" / "0001_initial.py").is_file()


# --- SQLite specifics ---------------------------------------------------------------------------


async def test_sqlite_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, now: datetime
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqlBatchStore("sqlite:///var/nested/orchestrator.db")
    await store.open()
    try:
        await store.add(request(), now)
    finally:
        await store.close()

    assert (tmp_path / "var" / "nested" / "orchestrator.db").is_file()
    connection = sqlite3.connect(tmp_path / "var" / "nested" / "orchestrator.db")
    try:
        assert connection.execute("SELECT count(*) FROM batch_request").fetchone() == (1,)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        connection.close()


async def test_sqlite_connections_carry_the_concurrency_settings(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/x.db", synchronous="FULL")
    try:
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
            }
    finally:
        await engine.dispose()

    assert pragmas == {"journal_mode": "wal", "busy_timeout": 5000, "synchronous": 2, "foreign_keys": 1}


def test_database_urls_get_async_drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = async_url("sqlite:///var/x.db")
    assert (relative.drivername, relative.database) == ("sqlite+aiosqlite", str(tmp_path / "var" / "x.db"))
    assert async_url("sqlite:////srv/x.db").database == "/srv/x.db"
    assert async_url("sqlite://").database in (None, "")
    pg = async_url("postgresql://u:secret@db:5432/orch")
    assert (pg.drivername, pg.host, pg.database, pg.password) == (
        "postgresql+asyncpg",
        "db",
        "orch",
        "secret",
    )
    assert async_url("postgres://db/orch").drivername == "postgresql+asyncpg"
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://db/orch")
    with pytest.raises(ValueError, match="not a database URL"):
        async_url("no scheme at all")


# --- the upload stage's rows (store/lifecycle.py) -----------------------------------------------


@portable
async def test_the_upload_stage_claims_fences_and_finishes(make_store: MakeStore, now: datetime) -> None:
    store = await make_store(events=True)
    files = (FileRef("part=a/x.json", "part=a/x.json"), FileRef("s3://b/y.json", "y.json"))
    await store.add(request("r1", files=files), now)
    await store.add(request("plain"), now)
    claims = await store.claim("d", 2, 30, now)
    for claim in claims:
        assert await store.mark_created(claim, f"b-{claim.record.request_id}", "loading", now)
    assert await store.stages_waiting() == 1  # a request without files gets no lifecycle

    [dead] = await store.claim_stages("crashed", 5, 0, now)  # its lease runs out at once
    assert (dead.step, [f.name for f in dead.files], dead.taken_over) == (
        Step.UPLOAD,
        ["part=a/x.json", "y.json"],
        False,
    )
    [stage] = await store.claim_stages("alive", 5, 30, now + timedelta(seconds=1))
    assert (stage.taken_over, stage.record.state) == (True, State.UPLOADING)
    assert "crashed" not in await store.lease_owners()
    assert "alive" in await store.lease_owners()
    # The dead holder's writes change nothing; the live one's do.
    assert not await store.file_progress(dead, 0, now, size=3, done=True)
    assert await store.file_progress(stage, 0, now, size=3, done=True)
    assert await store.file_progress(stage, 0, now, size=3, done=True)  # counted once
    assert await store.file_progress(stage, 1, now, initialized=True, bytes_sent=10)
    assert await store.renew_stages([stage, dead], 30, now) == {"r1"}
    assert await store.file_progress(stage, 1, now, size=20, done=True)
    assert await store.step_counts() == {"complete": 1}
    assert await store.batch_completed(stage, now, now)
    assert not await store.batch_completed(stage, now, now)  # its lease is gone with the outcome

    [tracked] = await store.claim_stages("alive", 5, 30, now + timedelta(seconds=2))
    assert (tracked.step, tracked.record.state, [f.done for f in tracked.files]) == (
        Step.TRACK,
        State.PROCESSING,
        [True, True],
    )
    errors = [{"code": "106", "description": "Dataset file is empty.", "rows": []}]
    assert await store.stage_finished(
        tracked,
        now,
        to_state=State.FAILED,
        batch_status="failed",
        error="106 Dataset file is empty.",
        errors=errors,
        record_count=0,
    )
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.batch_status, record.last_error) == (
        State.FAILED,
        "failed",
        "106 Dataset file is empty.",
    )
    assert record.to_json()["errors"] == errors
    assert (record.to_json()["filesDone"], record.to_json()["step"]) == (2, "done")
    assert [change.to_state for change in await store.history("r1")] == [
        State.PENDING,
        State.CREATED,
        State.UPLOADING,
        State.PROCESSING,
        State.FAILED,
    ]
    types = [json.loads(event.body)["type"] for event in await store.outbox(10)]
    assert types == ["batch.created", "batch.created", "batch.failed"]
    assert await store.stages_waiting() == 0
    assert await store.step_counts() == {"done": 1}
    plain = await store.get("plain")
    assert plain is not None
    assert (plain.state, plain.lifecycle, "step" in plain.to_json()) == (State.CREATED, None, False)


@portable
async def test_outcomes_written_together_are_each_fenced_and_trailed(
    make_store: MakeStore, now: datetime
) -> None:
    # Outcomes asked for at once share a transaction on SQLite's writer (one read of the leases, one
    # update per shape); on PostgreSQL each is its own. Either way each is fenced by its own lease.
    store = await make_store(events=True)
    for request_id in ("a", "b", "c", "d"):
        await store.add(request(request_id), now)
    a, b, c, d = await store.claim("x", 4, 30, now)
    await store.add(request("e"), now)
    [e] = await store.claim("x", 1, 0, now)  # a lease that runs out at once
    [e_again] = await store.claim("y", 5, 30, now)  # taken over

    results = await asyncio.gather(
        store.mark_created(a, "b-a", "loading", now),
        store.mark_created(b, "b-b", "loading", now, adopted=True),
        store.mark_failed(c, "HTTP 400", now),
        store.mark_retry(d, "HTTP 503", now + timedelta(seconds=5), ambiguous=True, now=now),
        store.mark_created(e, "b-stale", "loading", now),  # its lease was taken over: not written
        store.release(e_again, now),
    )

    assert results == [True, True, True, True, False, True]
    records = {record.request_id: record for record in await store.records()}
    assert {key: (r.state, r.batch_id, r.last_error) for key, r in records.items()} == {
        "a": (State.CREATED, "b-a", None),
        "b": (State.CREATED, "b-b", None),
        "c": (State.FAILED, None, "HTTP 400"),
        "d": (State.RETRYING, None, "HTTP 503"),
        "e": (State.PENDING, None, None),
    }
    assert records["e"].attempts == 1  # claimed twice, released once
    assert records["d"].next_attempt_at == now + timedelta(seconds=5)
    assert [change.to_state for change in await store.history("a")] == [State.PENDING, State.CREATED]
    assert [change.to_state for change in await store.history("e")] == [State.PENDING]
    bodies = [json.loads(event.body) for event in await store.outbox(10)]
    assert sorted((body["type"], body["requestId"], body["batchId"]) for body in bodies) == [
        ("batch.created", "a", "b-a"),
        ("batch.created", "b", "b-b"),
        ("batch.failed", "c", None),
    ]
    assert await store.lease_owners() == set()
