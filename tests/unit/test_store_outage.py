"""A store that stops answering for a while (a database restart, a dropped connection): the claim loop,
intake, the outcome writes, `--until-idle` and readiness wait for it and go on, and nothing is lost or
made twice. The store is the real SQLite one behind a switch that fails the chosen methods as asyncpg
fails a connection to a database that is down; time is a `ManualClock`."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses
from structlog.testing import capture_logs

from orchestrator import service
from orchestrator.aep.api import Batch
from orchestrator.clock import ManualClock
from orchestrator.metrics import Metrics
from orchestrator.monitoring import Monitor
from orchestrator.pipeline.intake import Intake
from orchestrator.store.base import State
from orchestrator.store.outage import FIRST_WAIT, LONGEST_WAIT
from orchestrator.store.sql import SqlBatchStore
from tests.unit.dispatching import DS, EXT, Running, add
from tests.unit.fakes import IMS_URL, FakeApi, FakeQueue, until
from tests.unit.test_service import Service, events, publish, service_settings

# Every method the service's loops call while it runs.
EVERYTHING = frozenset(
    {
        "add",
        "add_many",
        "reject",
        "claim",
        "claim_reconciliations",
        "next_due",
        "renew",
        "mark_created",
        "mark_retry",
        "mark_failed",
        "release",
        "finish_reconciliation",
        "lease_owners",
        "expire_leases",
        "unfinished",
        "pending_reconciliations",
        "events_waiting",
        "counts",
        "oldest_unfinished",
    }
)


class SwitchedStore(SqlBatchStore):
    """The real store, whose `methods` fail while `down` is set, as they do when the database
    restarts; `failures` counts the calls refused."""

    def __init__(self, store: SqlBatchStore, methods: Iterable[str] = EVERYTHING) -> None:
        self.__dict__.update(store.__dict__)  # the same engine and writer
        self.methods = frozenset(methods)
        self.down = False
        self.failures: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in EVERYTHING and object.__getattribute__(self, "down") and name in self.methods:

            async def refused(*args: object, **kwargs: object) -> Any:
                self.failures[name] += 1
                raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

            return refused
        return attribute


def logged(entries: Sequence[Mapping[str, Any]], event: str) -> list[Mapping[str, Any]]:
    return [entry for entry in entries if entry["event"] == event]


# --- the dispatcher's claim loop ----------------------------------------------------------------------


async def test_the_claim_loop_waits_for_the_store_backing_off_then_goes_on(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    switched = SwitchedStore(store, {"claim", "claim_reconciliations", "next_due"})
    await add(store, clock, "r1")
    switched.down = True
    api = FakeApi()
    with capture_logs() as logs:
        async with Running(switched, api, clock) as run:
            await until(lambda: switched.failures["claim"] == 1)
            # Tries again after 0.5 s, then 1, 2, 4 and 5 s (the longest wait) apart.
            waits = [FIRST_WAIT * 2**n for n in range(4)] + [LONGEST_WAIT, LONGEST_WAIT]
            assert waits[:5] == [0.5, 1.0, 2.0, 4.0, 5.0]
            for tries, wait in enumerate(waits, start=2):
                await run.quiet()
                clock.advance(wait - 0.01)
                await run.quiet()
                assert switched.failures["claim"] == tries - 1, f"tried again before {wait} s"
                clock.advance(0.01)
                await until(lambda tries=tries: switched.failures["claim"] == tries)  # type: ignore[misc]
            assert run.task is not None
            assert not run.task.done()
            assert api.calls == []

            switched.down = False
            clock.advance(LONGEST_WAIT)
            record = await run.outcome()
    assert (record.state, record.attempts) == (State.CREATED, 1)
    assert api.methods == ["create"]
    [unavailable] = logged(logs, "store.unavailable")  # once for the whole outage
    assert (unavailable["log_level"], unavailable["loop"]) == ("warning", "dispatcher")
    assert (
        unavailable["error"] == "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 5432)"
    )
    [recovered] = logged(logs, "store.recovered")
    assert recovered["loop"] == "dispatcher"
    assert recovered["down_for"] == pytest.approx(sum(waits) + LONGEST_WAIT, abs=0.1)


async def test_an_outage_at_start_is_waited_out_too(store: SqlBatchStore, clock: ManualClock) -> None:
    # The dispatcher's first read (the leases of dead processes) fails as well: it goes on to claim.
    switched = SwitchedStore(store)
    await add(store, clock, "r1")
    switched.down = True
    with capture_logs() as logs:
        async with Running(switched, FakeApi(), clock) as run:
            await until(lambda: switched.failures["lease_owners"] == 1)
            await run.quiet()
            switched.down = False
            clock.advance(FIRST_WAIT)
            record = await run.outcome()
    assert record.state is State.CREATED
    assert len(logged(logs, "store.unavailable")) == 1


# --- outcome writes -----------------------------------------------------------------------------------


async def test_an_outcome_the_store_failed_to_record_is_adopted_after_the_lease_runs_out(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """The batch is made, then the database goes away before the outcome is written: the lease runs
    out, the request is taken over and looked up, and the batch is adopted. One batch, not two."""
    switched = SwitchedStore(store)
    made = Batch("b1", "loading", EXT, DS)

    async def created_then_the_database_goes() -> Batch:
        switched.down = True
        return made

    # Listed from the first look-up on (a catalog that lags would be looked up across the window).
    api = FakeApi(creates=[created_then_the_database_goes], lookups=[[made]])
    await add(store, clock, "r1")
    with capture_logs() as logs:
        async with Running(switched, api, clock, lease=60) as run:
            await until(lambda: switched.failures["mark_created"] == 1)
            await run.quiet()
            clock.advance(3)  # the claim loop finds the store down meanwhile
            await run.quiet()
            switched.down = False
            for _ in range(10):  # to the lease's end, and the take-over
                if (await run.get()).state is State.CREATED:
                    break
                await run.step()
            record = await run.get()
    assert (record.state, record.batch_id) == (State.CREATED, "b1")
    assert api.methods == ["create", "lookup"]
    assert [entry["error"] for entry in logged(logs, "dispatcher.outcome_not_recorded")] == [
        "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 5432)"
    ]
    assert logged(logs, "dispatcher.unexpected_error") == []  # a store error is not the call's
    assert len(logged(logs, "dispatcher.lease_taken_over")) == 1
    [adopted] = logged(logs, "batch.adopted")
    assert adopted["batch_id"] == "b1"
    history = await store.history("r1")
    assert [change.to_state for change in history] == [State.PENDING, State.CREATED]
    assert history[-1].attempt == 2


# --- intake -------------------------------------------------------------------------------------------


async def test_intake_gives_what_it_received_back_while_the_store_is_down(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    switched = SwitchedStore(store, {"add", "add_many", "reject"})
    queue = FakeQueue()
    bodies = [json.dumps({"datasetId": DS, "requestId": f"r{n}"}).encode() for n in range(3)]
    await queue.publish([*bodies, b"not json"])
    intake = Intake(queue, switched, clock, max_backlog=100, poll_timeout=0.01)
    switched.down = True
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(intake.run(stop))
        try:
            await until(lambda: len(queue.released) == 4)
            assert (queue.acked, queue.dead) == ([], [])
            assert await store.records() == []
            await until(lambda: clock.sleepers == 1)
            clock.advance(FIRST_WAIT)  # the next try: received again, given back again
            await until(lambda: len(queue.released) == 8)
            await until(lambda: clock.sleepers == 1)
            assert not task.done()

            switched.down = False
            clock.advance(FIRST_WAIT * 2)
            await until(lambda: len(queue.acked) == 3 and len(queue.dead) == 1)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    assert sorted(record.request_id for record in await store.records(state=State.PENDING)) == [
        "r0",
        "r1",
        "r2",
    ]
    assert len(await store.records(state=State.REJECTED)) == 1
    assert (intake.stats.added, intake.stats.rejected) == (3, 1)  # each counted once
    assert len(logged(logs, "intake.rejected")) == 1
    [unavailable] = logged(logs, "store.unavailable")
    assert unavailable["loop"] == "intake"
    assert len(logged(logs, "store.recovered")) == 1


async def test_intake_reads_nothing_while_the_store_cannot_count_its_backlog(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    switched = SwitchedStore(store, {"unfinished"})
    queue = FakeQueue()
    await queue.publish([json.dumps({"datasetId": DS, "requestId": "r1"}).encode()])
    intake = Intake(queue, switched, clock, max_backlog=100, poll_timeout=0.01)
    switched.down = True
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop))
    try:
        await until(lambda: switched.failures["unfinished"] == 1 and clock.sleepers == 1)
        assert queue.receive_calls == []
        switched.down = False
        clock.advance(FIRST_WAIT)
        await until(lambda: len(queue.acked) == 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


# --- readiness and --until-idle -----------------------------------------------------------------------


async def test_readiness_names_the_store_while_it_is_down(store: SqlBatchStore, clock: ManualClock) -> None:
    switched = SwitchedStore(store)
    running = Running(switched, FakeApi(), clock)
    monitor = Monitor(Metrics(), switched, FakeQueue(), running.dispatcher, clock, events=False)
    assert await monitor.ready() == {}

    switched.down = True
    reasons = await monitor.ready()

    assert reasons == {"store": "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 5432)"}
    switched.down = False
    assert await monitor.ready() == {}


async def test_until_idle_waits_out_a_store_outage(
    tmp_path: Path,
    mock: aioresponses,
    clock: ManualClock,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing to do, but the store does not answer: the service is not idle, and nothing of it
    ends, until the store is back; then it is, and exits 0."""
    opened: list[SwitchedStore] = []

    def switched_store(url: str, **options: Any) -> SwitchedStore:
        made = SwitchedStore(SqlBatchStore(url, **options))
        made.down = True
        opened.append(made)
        return made

    async def open_switched(self: SwitchedStore) -> None:
        # Opened while up (the service checks the store at start), then down.
        self.down = False
        await SqlBatchStore.open(self)
        self.down = True

    mock.post(IMS_URL, payload={"access_token": "t", "expires_in": 86399}, repeat=True)
    monkeypatch.setattr(service, "SqlBatchStore", switched_store)
    monkeypatch.setattr(SwitchedStore, "open", open_switched)
    settings = service_settings(tmp_path)
    await publish(settings)  # makes the queue's file; nothing in it
    run = Service(settings, clock, until_idle=True)
    await run.advance_until(lambda: len(run.ticks) >= 50)  # 50 watcher ticks: 10 s of outage
    [switched] = opened
    assert not run.task.done()
    assert {"unfinished", "claim"} <= set(switched.failures)

    switched.down = False

    assert await run.finish() == 0
    entries = events(log_output)
    assert sorted(entry["loop"] for entry in entries if entry["event"] == "store.unavailable") == [
        "dispatcher",
        "intake",
    ]
    # (Whether a loop logs store.recovered first depends on where its backoff stood when the
    # service went idle: the tests above check that.)
    assert [entry["event"] for entry in entries if entry["level"] == "error"] == []
