from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from datetime import timedelta
from types import TracebackType

import pytest

from orchestrator.aep.api import Batch, BatchApi
from orchestrator.aep.errors import AepHttpError, AepTimeout, AepTransportError, AuthError
from orchestrator.clock import ManualClock
from orchestrator.messages import BatchRequest, external_id_for
from orchestrator.pipeline.dispatcher import Dispatcher
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.settings import RetrySettings
from orchestrator.store.base import BatchRecord, State
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import Call, FakeApi, Hang, until

DS = "5c8c3c555033b814b69f947f"
EXT = external_id_for("r1")
POLL_INTERVAL = 0.5


def http(status: int, retry_after: str | None = None, detail: str = "boom") -> AepHttpError:
    return AepHttpError(
        f"HTTP {status}", endpoint="batches.create", status=status, detail=detail, retry_after=retry_after
    )


class Running:
    """A dispatcher running on a manual clock; stopped and drained on exit."""

    def __init__(
        self,
        store: SqlBatchStore,
        api: FakeApi,
        clock: ManualClock,
        *,
        max_attempts: int = 5,
        concurrency: int = 4,
        grace: float = 0.1,
    ) -> None:
        self.store, self.api, self.clock, self.grace = store, api, clock, grace
        policy = RetryPolicy(
            RetrySettings(max_attempts=max_attempts, base_delay=0.5, max_delay=4),
            random.Random(0),
            RetryBudget(),
        )
        self.wake = asyncio.Event()
        self.dispatcher = Dispatcher(
            store,
            api,
            policy,
            clock,
            owner="test",
            concurrency=concurrency,
            lease_seconds=60,
            default_format="json",
            poll_interval=POLL_INTERVAL,
            wake=self.wake,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.dispatcher.run(self.stop))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def shutdown(self, grace: float | None = None) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 1.0)
        await self.dispatcher.drain(self.grace if grace is None else grace)

    async def outcome(self, request_id: str = "r1", outcomes: int = 1) -> BatchRecord:
        """Wait until `outcomes` attempt outcomes are in the request's trail; return the record."""
        await until(lambda: self._trail_has(request_id, outcomes + 1))
        record = await self.store.get(request_id)
        assert record is not None
        return record

    async def _trail_has(self, request_id: str, length: int) -> bool:
        return len(await self.store.history(request_id)) >= length

    async def until_due(self, request_id: str = "r1") -> None:
        """Move the clock to the request's next attempt, then on a poll interval at a time until the
        dispatcher has claimed it: time may move before the dispatcher has gone to sleep, and a
        sleep begun after that waits for the clock to move again."""
        record = await self.store.get(request_id)
        assert record is not None
        assert record.next_attempt_at is not None
        attempts = record.attempts
        self.clock.advance(max(0.0, (record.next_attempt_at - self.clock.now()).total_seconds()) + 0.001)
        for _ in range(100):
            await asyncio.sleep(0.01)
            record = await self.store.get(request_id)
            assert record is not None
            if record.attempts > attempts or record.state.final:
                return
            self.clock.advance(POLL_INTERVAL)
        raise AssertionError(f"{request_id} was not claimed again")


async def add(store: SqlBatchStore, clock: ManualClock, *request_ids: str, **fields: object) -> None:
    for request_id in request_ids:
        request = BatchRequest(request_id=request_id, dataset_id=DS, **fields)  # type: ignore[arg-type]
        await store.add(request, clock.now())


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
        clock.advance(3600)
        await asyncio.sleep(0.02)
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


async def test_server_error_then_empty_lookup_creates(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi(creates=[http(502)], lookups=[[]])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        record = await run.outcome(outcomes=2)
    assert (record.state, record.batch_id, record.attempts) == (State.CREATED, "batch-1", 2)
    assert api.methods == ["create", "lookup", "create"]
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
    api = FakeApi(creates=[error])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        assert (await run.outcome()).state is State.RETRYING
        await run.until_due()
        assert (await run.outcome(outcomes=2)).state is State.CREATED
    assert api.methods == (["create", "lookup", "create"] if looks_up else ["create", "create"])


async def test_a_failed_lookup_keeps_the_request_marked_for_lookup(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    lookup_error = AepHttpError("HTTP 503", endpoint="catalog.lookup", status=503)
    api = FakeApi(creates=[http(500)], lookups=[lookup_error, []])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        assert (await run.outcome(outcomes=2)).state is State.RETRYING
        await run.until_due()
        record = await run.outcome(outcomes=3)
    assert (record.state, record.attempts) == (State.CREATED, 3)
    assert api.methods == ["create", "lookup", "lookup", "create"]


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


async def test_last_attempt_looks_up_once_more_and_adopts(store: SqlBatchStore, clock: ManualClock) -> None:
    late = Batch("b-late", "loading", EXT, DS)
    api = FakeApi(creates=[http(500), http(500)], lookups=[[], [late]])
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=2) as run:
        await run.outcome()
        await run.until_due()
        record = await run.outcome(outcomes=2)
    assert (record.state, record.batch_id, record.attempts) == (State.CREATED, "b-late", 2)
    assert api.methods == ["create", "lookup", "create", "lookup"]
    assert (run.dispatcher.stats.adopted, run.dispatcher.stats.failed) == (1, 0)


async def test_last_attempt_fails_when_the_final_lookup_finds_nothing(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    api = FakeApi(creates=[http(500), http(500)], lookups=[[], []])
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=2) as run:
        await run.outcome()
        await run.until_due()
        record = await run.outcome(outcomes=2)
        clock.advance(3600)
        await asyncio.sleep(0.02)
    assert (record.state, record.attempts) == (State.FAILED, 2)
    assert record.last_error is not None
    assert record.last_error.startswith("gave up after 2 attempts")
    assert api.methods == ["create", "lookup", "create", "lookup"]
    assert run.dispatcher.stats.failed == 1


async def test_final_lookup_error_still_fails(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi(
        creates=[http(500)], lookups=[AepTimeout("slow", endpoint="catalog.lookup", maybe_sent=True)]
    )
    await add(store, clock, "r1")
    async with Running(store, api, clock, max_attempts=1) as run:
        record = await run.outcome()
    assert (record.state, record.attempts) == (State.FAILED, 1)
    assert api.methods == ["create", "lookup"]


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
        clock.advance(10)
        await until(lambda: api.token_checks >= 2)
        record = await store.get("r1")
        assert record is not None
        assert (record.state, record.attempts) == (State.PENDING, 0)
        assert api.calls == []
        api.token_error = None
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
        clock.advance(10)
        await until(lambda: api.token_checks >= 3)
        assert len(api.calls) == calls  # waits while there is no token
        api.token_error = None  # IMS is back
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
        await asyncio.wait_for(hang.started.wait(), 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await run.shutdown(grace=0.03)
        assert loop.time() - started < 0.5
    assert hang.cancelled == 1
    assert run.dispatcher.in_flight == 0
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts) == (State.RETRYING, 1)
    assert record.last_error == "interrupted by shutdown during the call"
    assert record.next_attempt_at == clock.now()  # due at once

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
        await run.until_due()
        await asyncio.wait_for(hang.started.wait(), 1)
        await run.shutdown(grace=0.01)
    assert hang.cancelled == 1
    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.attempts) == (State.RETRYING, 1)  # the lookup did not count
    [claim] = await store.claim("next", 1, 60, clock.now())
    assert claim.needs_lookup  # still unsure whether the first create happened


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
        await asyncio.wait_for(started.wait(), 1)
        await run.shutdown(grace=2)
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
        # Each call stays in flight until `concurrency` calls are (or 0.2 s passed), then a little
        # longer: a dispatcher that started more calls than its bound would be caught overlapping.
        if api.in_flight >= concurrency:
            full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), 0.2)
        await asyncio.sleep(0.01)
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


async def test_wake_picks_up_new_requests_at_once(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi()
    async with Running(store, api, clock) as run:
        await until(lambda: clock.sleepers >= 1)  # idle, on the (manual) clock
        await add(store, clock, "r1")
        run.wake.set()  # what intake does after recording a request
        record = await run.outcome()  # no clock advance needed
    assert record.state is State.CREATED


async def test_outcomes_are_fenced_by_the_lease(store: SqlBatchStore, clock: ManualClock) -> None:
    released = asyncio.Event()

    async def take_over() -> None:
        # As another dispatcher sees it, 61 s on: this process stalled past its lease, unrenewed.
        later = clock.now() + timedelta(seconds=61)
        [other] = await store.claim("other", 1, 60, later)
        assert await store.mark_created(other, "b-other", "loading", later)
        released.set()

    async def slow_create() -> Batch:
        # The lease renewer may notice the lost lease and cancel this call (shielded, the takeover
        # completes either way); if not, the stale outcome is fenced off. Either way the other
        # dispatcher's batch must stand.
        await asyncio.shield(take_over())
        clock.advance(61)
        return Batch("b-stale", "loading", EXT, DS)

    api = FakeApi(creates=[slow_create])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await asyncio.wait_for(released.wait(), 1)
        await until(lambda: run.dispatcher.in_flight == 0)
    record = await store.get("r1")
    assert record is not None
    assert record.batch_id == "b-other"  # the stale attempt overwrote nothing
    assert run.dispatcher.stats.created == 0


async def test_a_call_waiting_past_its_lease_keeps_it(store: SqlBatchStore, clock: ManualClock) -> None:
    """A call held up longer than the lease (throttling pauses) has its lease renewed, so no other
    dispatcher can claim the request meanwhile and create a second batch."""
    stolen: list[object] = []

    async def slow_create() -> Batch:
        for _ in range(6):  # 6 x 25 s = 150 s, well past the 60 s lease
            clock.advance(25)
            await asyncio.sleep(0.01)  # room for the renewer to run
            stolen.extend(await store.claim("other", 1, 60, clock.now()))
        return Batch("b1", "loading", EXT, DS)

    api = FakeApi(creates=[slow_create])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await until(lambda: run.dispatcher.stats.created == 1)
    assert stolen == []
    record = await store.get("r1")
    assert record is not None
    assert record.batch_id == "b1"
