from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

import pytest

from orchestrator.aep.api import Batch, BatchApi
from orchestrator.aep.errors import AepHttpError, AepTimeout, AepTransportError, AuthError, CallNotSent
from orchestrator.clock import ManualClock
from orchestrator.pipeline.dispatcher import FINAL_LOOKUP_TRIES, RECORDING_ROOM
from orchestrator.store.base import State
from orchestrator.store.sql import SqlBatchStore
from tests.unit.dispatching import (
    DS,
    EXT,
    POLL_INTERVAL,
    SETTLE,
    CountingStore,
    GatedStore,
    Running,
    add,
    http,
)
from tests.unit.fakes import Call, FakeApi, Hang, until


def test_fake_api_implements_the_port() -> None:
    api: BatchApi = FakeApi()  # mypy checks the structure
    assert api is not None


# --- one attempt ------------------------------------------------------------------------------------------


async def test_create_success_is_recorded(store: SqlBatchStore, clock: ManualClock) -> None:
    seen: list[tuple[int, State, int]] = []

    async def create() -> Batch:
        # Claim before call: the request is leased, with its attempt counted, before AEP is called.
        record = await store.get("r1")
        assert record is not None
        others = await store.claim("someone-else", 10, 60, clock.now())
        seen.append((record.attempts, record.state, len(others)))
        return Batch("b-1", "loading", EXT, DS)

    api = FakeApi(creates=[create])
    await add(store, clock, "r1", input_format="csv", tags={"a": ["b"]})
    async with Running(store, api, clock) as run:
        record = await run.outcome()
    assert seen == [(1, State.PENDING, 0)]
    assert (record.state, record.batch_id, record.batch_status, record.attempts) == (
        State.CREATED,
        "b-1",
        "loading",
        1,
    )
    assert record.last_error is None
    assert record.next_attempt_at is None
    assert api.calls == [Call("create", EXT, DS, "json")]
    assert run.dispatcher.stats.created == 1
    assert [c.to_state for c in await store.history("r1")] == [State.PENDING, State.CREATED]
    assert run.dispatcher.in_flight == 0


async def test_bad_request_fails_after_one_attempt(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi(creates=[http(400, detail="datasetId is not a dataset")])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        record = await run.outcome()
        await run.quiet()
        clock.advance(3600)
        await run.quiet()
    assert (record.state, record.attempts) == (State.FAILED, 1)
    assert record.last_error is not None
    assert "HTTP 400" in record.last_error
    assert "datasetId is not a dataset" in record.last_error
    assert api.methods == ["create"]  # no retry, no lookup
    assert run.dispatcher.stats.failed == 1


async def test_server_error_retries_with_a_lookup_that_adopts(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    found = Batch("b-found", "loading", EXT, DS)
    api = FakeApi(creates=[http(500)], lookups=[[found]])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        record = await run.outcome()
        assert (record.state, record.attempts) == (State.RETRYING, 1)
        assert record.last_error is not None
        assert "HTTP 500" in record.last_error
        assert record.next_attempt_at is not None
        # The catalog gets at least lookup_delay (1 s) to list a batch the lost call may have made.
        assert record.next_attempt_at - clock.now() >= timedelta(seconds=1)
        assert "look up before creating" in ((await store.history("r1"))[-1].detail or "")
        await run.until_due()
        record = await run.outcome(outcomes=2)
    assert (record.state, record.batch_id, record.attempts) == (State.CREATED, "b-found", 2)
    assert api.calls == [Call("create", EXT, DS, "json"), Call("lookup", EXT)]  # no second create
    assert run.dispatcher.stats.adopted == 1
    assert "adopted" in ((await store.history("r1"))[-1].detail or "")


async def test_server_error_then_empty_lookups_create_only_after_the_settle_window(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """A look-up that finds nothing inside the window proves nothing (the catalog may not list the
    batch yet): look again, and create only once a look-up after the window still finds nothing."""
    api = FakeApi(creates=[http(502)])
    await add(store, clock, "r1")
    failed_at = clock.now()
    async with Running(store, api, clock) as run:
        record = await run.outcome()
        assert record.settle_until == failed_at + timedelta(seconds=SETTLE)
        created_at = None
        for _ in range(20):
            await run.until_due()
            record = await run.get()
            if record.state is State.CREATED:
                created_at = clock.now()
                break
            assert record.attempts == 1, "a look-up inside the window is not an attempt"
    assert record.state is State.CREATED
    assert (record.batch_id, record.attempts) == ("batch-1", 2)
    assert created_at is not None
    assert created_at >= failed_at + timedelta(seconds=SETTLE)
    methods = api.methods
    assert methods[0] == "create"
    assert methods[-1] == "create"
    lookups = methods[1:-1]
    # Look-ups only in between, spaced out (1 s, 2 s, 4 s, ...) rather than one per poll.
    assert set(lookups) == {"lookup"}
    assert 3 <= len(lookups) <= 8
    assert run.dispatcher.stats.created == 1


async def test_throttled_create_is_not_ambiguous(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi(creates=[http(429, retry_after="3")])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        record = await run.outcome()
        assert record.state is State.RETRYING
        assert record.next_attempt_at is not None
        assert record.next_attempt_at - clock.now() >= timedelta(seconds=3)  # Retry-After honoured
        assert "look up" not in ((await store.history("r1"))[-1].detail or "")
        await run.until_due()
        record = await run.outcome(outcomes=2)
    assert record.state is State.CREATED
    assert api.methods == ["create", "create"]  # no lookup before the second create


@pytest.mark.parametrize(
    ("error", "looks_up"),
    [
        (AepTimeout("slow", endpoint="batches.create", maybe_sent=True), True),
        (AepTransportError("reset", endpoint="batches.create", maybe_sent=True), True),
        (AepTransportError("refused", endpoint="batches.create", maybe_sent=False), False),
        (http(503), False),
        (http(504), True),
        (RuntimeError("201 without a parsable body"), True),
    ],
)
async def test_which_failures_make_the_next_attempt_look_up(
    store: SqlBatchStore, clock: ManualClock, error: Exception, looks_up: bool
) -> None:
    api = FakeApi(creates=[error], lookups=[[Batch("b-found", "loading", EXT, DS)]])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        assert (await run.outcome()).state is State.RETRYING
        await run.until_due()
        record = await run.get()
    assert record.state is State.CREATED
    if looks_up:
        assert api.methods == ["create", "lookup"]
        assert record.batch_id == "b-found"
    else:
        assert api.methods == ["create", "create"]
        assert record.settle_until is None


async def test_a_failed_lookup_keeps_the_request_marked_for_lookup(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    lookup_error = AepHttpError("HTTP 503", endpoint="catalog.lookup", status=503)
    api = FakeApi(creates=[http(500)], lookups=[lookup_error])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        record = await run.get()
        assert (record.state, record.attempts) == (State.RETRYING, 2)  # a failed call counts
        record = await run.until_final()
    assert (record.state, record.attempts) == (State.CREATED, 3)
    assert api.methods[:3] == ["create", "lookup", "lookup"]  # looked up again, not created
    assert api.methods.count("create") == 2


async def test_a_lease_left_by_a_crashed_dispatcher_means_lookup_first(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    await add(store, clock, "r1")
    [crashed] = await store.claim("crashed", 1, 5, clock.now())
    assert not crashed.needs_lookup
    clock.advance(6)  # its lease expires; its create may or may not have happened
    api = FakeApi(lookups=[[Batch("b-made-by-crashed", "loading", EXT, DS)]])
    async with Running(store, api, clock) as run:
        record = await run.outcome()
    assert (record.state, record.batch_id, record.attempts) == (State.CREATED, "b-made-by-crashed", 2)
    assert api.methods == ["lookup"]


# --- attempts exhausted -------------------------------------------------------------------------------


async def test_spent_attempts_look_up_across_the_window_and_adopt(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """The last attempt's create may have happened: the request is not failed at once (orphaning
    that batch) but looked up until the window has passed, and a batch listed late is adopted."""
    late = Batch("b-late", "loading", EXT, DS)
    api = FakeApi(creates=[http(500)], lookups=[[], [], [late]])
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=1) as run:
        record = await run.outcome()
        assert (record.state, record.lookup_only) == (State.RETRYING, True)
        record = await run.until_final()
    assert (record.state, record.batch_id, record.attempts) == (State.CREATED, "b-late", 1)
    assert api.methods == ["create", "lookup", "lookup", "lookup"]
    assert (run.dispatcher.stats.adopted, run.dispatcher.stats.failed) == (1, 0)


async def test_spent_attempts_fail_once_the_window_passed_with_nothing_listed(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    api = FakeApi(creates=[http(500)])
    await add(store, clock, "r1")
    failed_at = clock.now()
    async with Running(store, api, clock, max_attempts=1) as run:
        await run.outcome()
        record = await run.until_final()
    assert (record.state, record.attempts) == (State.FAILED, 1)
    assert clock.now() >= failed_at + timedelta(seconds=SETTLE)
    assert record.last_error is not None
    assert record.last_error.startswith("gave up after 1 attempts")
    assert api.methods[0] == "create"
    assert set(api.methods[1:]) == {"lookup"}  # never a second create
    assert run.dispatcher.stats.failed == 1


async def test_final_lookups_that_keep_failing_fail_the_request(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    timeout = AepTimeout("slow", endpoint="catalog.lookup", maybe_sent=True)
    api = FakeApi(creates=[http(500)], lookups=[timeout] * 10)
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=1) as run:
        record = await run.until_final()
    assert record.state is State.FAILED
    assert record.last_error is not None
    assert "final look-ups failed" in record.last_error
    assert api.methods == ["create"] + ["lookup"] * FINAL_LOOKUP_TRIES


async def test_exhausted_unambiguous_retries_fail_without_lookup(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    api = FakeApi(creates=[http(429), http(429)])
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=2) as run:
        await run.outcome()
        await run.until_due()
        record = await run.outcome(outcomes=2)
    assert (record.state, record.attempts) == (State.FAILED, 2)
    assert record.last_error is not None
    assert "gave up after 2 attempts: rate limited" in record.last_error
    assert api.methods == ["create", "create"]


# --- credentials ------------------------------------------------------------------------------------------


async def test_no_token_claims_nothing_and_recovers(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi()
    api.token_error = AuthError("IMS refused the client credentials", status=400, permanent=True)
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await until(lambda: run.dispatcher.credentials_problem is not None)
        assert "IMS refused" in (run.dispatcher.credentials_problem or "")
        await run.asleep()
        clock.advance(10)
        await until(lambda: api.token_checks >= 2)
        record = await store.get("r1")
        assert record is not None
        assert (record.state, record.attempts) == (State.PENDING, 0)
        assert api.calls == []
        api.token_error = None
        await run.asleep()
        clock.advance(10)
        record = await run.outcome()
        assert run.dispatcher.credentials_problem is None
    assert (record.state, record.attempts) == (State.CREATED, 1)


async def test_auth_error_mid_call_releases_and_fails_nothing(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    api = FakeApi()

    async def token_expired_and_ims_down() -> Batch:
        api.token_error = AuthError("IMS unreachable")
        raise api.token_error

    api.creates.append(token_expired_and_ims_down)
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await until(lambda: run.dispatcher.stats.released == 1)
        await until(lambda: run.dispatcher.credentials_problem is not None)
        record = await store.get("r1")
        assert record is not None
        # Released: not failed, not retrying, and the attempt does not count.
        assert (record.state, record.attempts, record.last_error) == (State.PENDING, 0, None)
        assert [c.to_state for c in await store.history("r1")] == [State.PENDING]
        assert run.dispatcher.stats.failed == 0
        calls = len(api.calls)
        await run.asleep()
        clock.advance(10)
        await until(lambda: api.token_checks >= 3)
        assert len(api.calls) == calls  # waits while there is no token
        api.token_error = None  # IMS is back
        await run.asleep()
        clock.advance(10)
        record = await run.outcome()
    assert (record.state, record.attempts) == (State.CREATED, 1)
    assert api.methods == ["create", "create"]  # the first create was never sent: no lookup
    assert run.dispatcher.credentials_problem is None


# --- shutdown ---------------------------------------------------------------------------------------------


async def test_stop_returns_while_every_slot_is_busy(store: SqlBatchStore, clock: ManualClock) -> None:
    hang = Hang()
    api = FakeApi(creates=[hang])
    await add(store, clock, "r1", "r2")
    run = Running(store, api, clock, concurrency=1)
    async with run:
        await asyncio.wait_for(hang.started.wait(), 1)
        run.stop.set()
        # run() returns at once: the call in flight is drain's business, within its grace.
        assert run.task is not None
        await asyncio.wait_for(asyncio.shield(run.task), 0.5)
        assert run.dispatcher.in_flight == 1
    assert hang.cancelled == 1
    record = await store.get("r2")
    assert record is not None
    assert (record.state, record.attempts) == (State.PENDING, 0)  # never claimed


async def test_drain_cancels_a_hung_create_and_leaves_it_for_a_lookup(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    hang = Hang()
    api = FakeApi(creates=[hang])
    await add(store, clock, "r1")
    run = Running(store, api, clock)
    async with run:
        await asyncio.wait_for(hang.started.wait(), 5)
        await run.shutdown(grace=0.03)  # returns although the call would hang for ever
    assert hang.cancelled == 1
    assert run.dispatcher.in_flight == 0
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts) == (State.RETRYING, 1)
    assert record.last_error == "interrupted during the call"
    assert record.next_attempt_at == clock.now()  # due at once, for a look-up
    assert record.settle_until == clock.now() + timedelta(seconds=SETTLE)  # but no create before

    # The next run looks the batch up before creating again, and adopts it.
    api2 = FakeApi(lookups=[[Batch("b-sent-before-shutdown", "loading", EXT, DS)]])
    async with Running(store, api2, clock) as again:
        record = await again.outcome(outcomes=2)
    assert (record.state, record.batch_id) == (State.CREATED, "b-sent-before-shutdown")
    assert api2.methods == ["lookup"]


async def test_drain_cancels_a_hung_lookup_and_releases_it(store: SqlBatchStore, clock: ManualClock) -> None:
    hang = Hang()
    api = FakeApi(creates=[http(500)], lookups=[hang])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due(finish=False)
        await asyncio.wait_for(hang.started.wait(), 5)
        await run.shutdown(grace=0.01)
    assert hang.cancelled == 1
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts) == (State.RETRYING, 1)  # the lookup did not count
    [claim] = await store.claim("next", 1, 60, clock.now())
    assert claim.needs_lookup  # still unsure whether the first create happened


async def test_a_create_the_closed_gate_refused_is_given_back_as_it_was(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """Stopping: the call gate closed before the create's turn, so nothing was sent. The request is
    due again with no attempt counted and no look-up to make (one attempt in all would otherwise
    have failed it)."""
    api = FakeApi(creates=[CallNotSent()])
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=1) as run:
        await run.quiet()
        record = await run.get()
        assert (record.state, record.attempts, record.next_attempt_at) == (State.PENDING, 0, clock.now())
        assert record.settle_until is None
        clock.advance(POLL_INTERVAL)  # (a stopping service claims nothing more: a test's does)
        await run.quiet()
        record = await run.get()
    assert (record.state, record.attempts, record.last_error) == (State.CREATED, 1, None)
    assert api.methods == ["create", "create"]  # taken again at once, and never looked up
    assert run.dispatcher.stats.retries == 0


async def test_drain_lets_calls_finish_within_grace(store: SqlBatchStore, clock: ManualClock) -> None:
    started = asyncio.Event()

    async def slow() -> Batch:
        started.set()
        await asyncio.sleep(0.03)
        return Batch("b-slow", "loading", EXT, DS)

    api = FakeApi(creates=[slow])
    await add(store, clock, "r1")
    run = Running(store, api, clock)
    async with run:
        await asyncio.wait_for(started.wait(), 5)
        await run.shutdown(grace=60)  # returns as soon as the call is done
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.batch_id) == (State.CREATED, "b-slow")


async def test_drain_with_nothing_in_flight(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi()
    run = Running(store, api, clock)
    async with run:
        await until(lambda: clock.sleepers >= 1)
    assert run.task is not None
    assert run.task.done()
    assert run.dispatcher.in_flight == 0


# --- concurrency ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_bound(store: SqlBatchStore, clock: ManualClock, concurrency: int) -> None:
    api = FakeApi()
    full = asyncio.Event()
    numbers = itertools.count(1)

    async def create() -> Batch:
        # The first calls stay in flight until `concurrency` of them are: a dispatcher that started
        # more calls than its bound would be caught overlapping, one that started fewer would hang.
        if api.in_flight >= concurrency:
            full.set()
        await full.wait()
        return Batch(f"b-{next(numbers)}", "loading")

    ids = [f"r{i}" for i in range(8)]
    api.creates.extend([create] * len(ids))
    await add(store, clock, *ids)
    async with Running(store, api, clock, concurrency=concurrency) as run:
        await until(lambda: run.dispatcher.stats.created == len(ids))
    assert full.is_set()
    assert api.max_in_flight == concurrency
    assert len(api.calls) == len(ids)
    assert {r.state for r in await store.records()} == {State.CREATED}
    assert len({r.batch_id for r in await store.records()}) == len(ids)


async def test_calls_waiting_only_for_their_outcome_leave_the_claim_window(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """A call that answered waits for its outcome's commit (the outcome writer's next transaction);
    meanwhile its place in the claim window goes to the next request, so a slow commit does not
    starve the calls. Those waiting are bounded too: RECORDING_ROOM windows in all."""
    gated = GatedStore(store)
    api, window = FakeApi(), 2
    ids = [f"r{i}" for i in range(10)]
    await add(store, clock, *ids)
    async with Running(gated, api, clock, concurrency=window) as run:
        bound = window * RECORDING_ROOM

        def full() -> bool:  # every place taken, and the claim loop asleep for a freed one
            return gated.waiting == bound and clock.sleepers >= 2

        await until(full)
        assert len(api.calls) == bound  # not `window`: those waiting for their commit left it
        assert run.dispatcher.in_flight == bound
        gated.gate.set()
        await until(lambda: run.dispatcher.stats.created == len(ids))
    records = await store.records()
    assert {r.state for r in records} == {State.CREATED}
    assert len({r.batch_id for r in records}) == len(ids)
    assert len(api.calls) == len(ids)


async def test_wake_picks_up_new_requests_at_once(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi()
    async with Running(store, api, clock) as run:
        await until(lambda: clock.sleepers >= 1)  # idle, on the (manual) clock
        await add(store, clock, "r1")
        run.wake.set()  # what intake does after recording a request
        record = await run.outcome()  # no clock advance needed
    assert record.state is State.CREATED


async def test_a_call_whose_lease_was_taken_over_is_abandoned_before_it_creates(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """This process stalled past its lease while a call waited to be sent (in the limiter); another
    dispatcher took the request over and recorded its batch. The renewer finds the lease gone and
    cancels the call before its create is sent: one batch, the other dispatcher's."""
    counting = CountingStore(store)
    send = asyncio.Event()
    sent: list[str] = []
    waiting = asyncio.Event()

    async def create_after_the_limiter() -> Batch:
        waiting.set()
        await send.wait()  # never set: the lease renewer must cancel this first
        sent.append("b-stale")
        return Batch("b-stale", "loading", EXT, DS)

    api = FakeApi(creates=[create_after_the_limiter])
    await add(store, clock, "r1")
    async with Running(counting, api, clock, lease=60) as run:
        await asyncio.wait_for(waiting.wait(), 5)
        later = clock.now() + timedelta(seconds=61)
        [other] = await store.claim("other", 1, 60, later)
        assert other.taken_over
        assert other.needs_lookup
        assert await store.mark_created(other, "b-other", "loading", later)
        await run.asleep()
        clock.advance(21)  # the renewer's beat (a third of the lease)
        await until(lambda: run.dispatcher.in_flight == 0)
    assert sent == []
    record = await run.get()
    assert (record.state, record.batch_id) == (State.CREATED, "b-other")
    assert run.dispatcher.stats.created == 0


async def test_a_stale_outcome_is_fenced_off(store: SqlBatchStore, clock: ManualClock) -> None:
    """Should a stale call finish anyway, its outcome overwrites nothing."""
    later = clock.now() + timedelta(seconds=61)
    await add(store, clock, "r1")
    [mine] = await store.claim("me", 1, 60, clock.now())
    [theirs] = await store.claim("other", 1, 60, later)
    assert await store.mark_created(theirs, "b-other", "loading", later)
    assert not await store.mark_created(mine, "b-stale", "loading", later)
    assert not await store.mark_retry(mine, "late", later, ambiguous=True, now=later)
    record = await store.get("r1")
    assert record is not None
    assert record.batch_id == "b-other"


async def test_a_call_waiting_past_its_lease_keeps_it(store: SqlBatchStore, clock: ManualClock) -> None:
    """A call held up longer than the lease (throttling pauses) has its lease renewed, so no other
    dispatcher can claim the request meanwhile and create a second batch."""
    counting = CountingStore(store)
    stolen: list[object] = []

    async def slow_create() -> Batch:
        for beat in range(1, 7):  # 6 x 25 s = 150 s, well past the 60 s lease
            await until(lambda: clock.sleepers >= 2)  # the claim loop and the renewer
            clock.advance(25)  # past one renewer beat (every 20 s) each time
            await until(lambda beat=beat: counting.renewals >= beat)  # type: ignore[misc]
            stolen.extend(await store.claim("other", 1, 60, clock.now()))
        return Batch("b1", "loading", EXT, DS)

    api = FakeApi(creates=[slow_create])
    await add(store, clock, "r1")
    async with Running(counting, api, clock) as run:
        await until(lambda: run.dispatcher.stats.created == 1)
    assert stolen == []
    record = await run.get()
    assert record.batch_id == "b1"


async def test_the_renewer_outlives_store_errors(store: SqlBatchStore, clock: ManualClock) -> None:
    counting = CountingStore(store)
    counting.fail_renewals = 1
    release = asyncio.Event()

    async def long_create() -> Batch:
        await release.wait()
        return Batch("b1", "loading", EXT, DS)

    api = FakeApi(creates=[long_create])
    await add(store, clock, "r1")
    async with Running(counting, api, clock, lease=60) as run:
        await until(lambda: run.dispatcher.in_flight == 1)
        await run.asleep()
        clock.advance(20.001)  # beat 1: the store fails; the lease (60 s) outlasts the next beat
        await until(lambda: counting.renewals == 1)
        assert run.dispatcher.in_flight == 1
        await run.asleep()
        clock.advance(20)  # beat 2: renewed
        await until(lambda: counting.renewals == 2)
        assert await store.claim("other", 1, 60, clock.now() + timedelta(seconds=30)) == []
        release.set()
        await until(lambda: run.dispatcher.stats.created == 1)
        assert run.task is not None
        assert not run.task.done()


async def test_a_lease_the_store_will_not_renew_in_time_is_abandoned_as_ambiguous(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """The store fails every renewal: before the lease can run out (and another dispatcher take the
    request over while this call may still create), the call is cancelled; its outcome, recorded
    once the store answers again, is unknown, so the next attempt looks up first."""
    counting = CountingStore(store)
    counting.fail_renewals = 2
    hang = Hang()
    api = FakeApi(creates=[hang])
    await add(store, clock, "r1")
    async with Running(counting, api, clock, lease=60) as run:
        await asyncio.wait_for(hang.started.wait(), 5)
        await run.asleep()
        clock.advance(20.001)
        await until(lambda: counting.renewals == 1)
        assert hang.cancelled == 0  # 40 s of lease left: the next beat may still renew it
        await run.asleep()
        clock.advance(20)
        await until(lambda: hang.cancelled == 1)
        await until(lambda: run.dispatcher.in_flight == 0)
    record = await run.get()
    assert (record.state, record.attempts) == (State.RETRYING, 1)
    assert record.last_error == "interrupted during the call"
    [claim] = await store.claim("next", 1, 60, clock.now())
    assert claim.needs_lookup
