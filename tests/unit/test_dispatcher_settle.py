"""The catalog's settle window, adoption of live batches and reconciliation: what keeps exactly one
live batch per request when AEP's catalog lists a new batch only seconds after it was made."""

from __future__ import annotations

import asyncio
import socket
import sys
from datetime import timedelta

from orchestrator.aep.api import Batch
from orchestrator.aep.errors import AepHttpError, CallNotSent
from orchestrator.clock import ManualClock
from orchestrator.pipeline.dispatcher import RECONCILE_CHECK
from orchestrator.store.base import State
from orchestrator.store.sql import SqlBatchStore
from tests.unit.dispatching import DS, EXT, SETTLE, Running, add, http
from tests.unit.fakes import FakeApi, Hang, until


def batch(batch_id: str, status: str = "loading", created: int = 1) -> Batch:
    return Batch(batch_id, status, EXT, DS, created)


# --- the settle window survives what used to skip it -----------------------------------------------


async def test_the_settle_window_outlives_a_restart(store: SqlBatchStore, clock: ManualClock) -> None:
    """A new process (a restart, another replica) keeps the window: it is in the store."""
    api = FakeApi(creates=[http(504)])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as first:
        record = await first.outcome()
    settle_until = record.settle_until
    assert settle_until == clock.now() + timedelta(seconds=SETTLE)

    again = FakeApi()
    async with Running(store, again, clock) as second:
        await second.until_due()
        await second.until_due()
        assert again.methods == ["lookup", "lookup"]  # no create inside the window
        record = await second.until_final()
    assert record.state is State.CREATED
    assert again.methods[-1] == "create"
    assert again.methods.count("create") == 1
    assert clock.now() >= settle_until


async def test_shutdown_mid_create_opens_the_window(store: SqlBatchStore, clock: ManualClock) -> None:
    hang = Hang()
    api = FakeApi(creates=[hang])
    await add(store, clock, "r1")
    run = Running(store, api, clock)
    async with run:
        await asyncio.wait_for(hang.started.wait(), 5)
        await run.shutdown(grace=0.01)
    interrupted_at = clock.now()

    again = FakeApi()
    async with Running(store, again, clock) as second:
        await second.quiet()
        assert again.methods == ["lookup"]  # due at once, but for a look-up only
        record = await second.until_final()
    assert record.state is State.CREATED
    assert again.methods.count("create") == 1
    assert clock.now() >= interrupted_at + timedelta(seconds=SETTLE)


async def test_a_take_over_opens_the_window(store: SqlBatchStore, clock: ManualClock) -> None:
    """A lease left by a dead process: its create may have happened just before it died."""
    await add(store, clock, "r1")
    assert len(await store.claim("crashed", 1, 15, clock.now())) == 1
    clock.advance(16)  # its lease expires
    taken_at = clock.now()
    api = FakeApi()
    async with Running(store, api, clock) as run:
        await run.quiet()
        record = await run.get()
        assert api.methods == ["lookup"]
        assert record.settle_until == taken_at + timedelta(seconds=SETTLE)
        assert record.attempts == 1  # the dead attempt counts once, the look-up not at all
        record = await run.until_final()
    assert record.state is State.CREATED
    assert api.methods.count("create") == 1


async def test_leases_of_a_process_that_died_here_are_taken_back_at_start(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """kill -9, then a restart on the same host: no waiting out the dead process's lease."""
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await gone.wait() == 0  # its pid is free now
    await add(store, clock, "r1")
    owner = f"{socket.gethostname()}/{gone.pid}/x"
    assert len(await store.claim(owner, 1, 15, clock.now())) == 1
    api = FakeApi(lookups=[[batch("b-made-before-the-kill")]])
    async with Running(store, api, clock) as run:
        await run.quiet()  # the clock has not moved: no lease ran out
        record = await run.get()
    assert (record.state, record.batch_id) == (State.CREATED, "b-made-before-the-kill")
    assert api.methods == ["lookup"]


async def test_a_running_dispatcher_takes_back_a_dead_neighbour_s_leases_at_its_next_beat(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """Another replica on this host killed with -9 while this one runs: its requests come back at
    the renewer's next beat (a third of the lease), not when its leases run out."""
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await gone.wait() == 0
    api = FakeApi(lookups=[[batch("b-made-before-the-kill")]])
    async with Running(store, api, clock, lease=60) as run:
        await run.quiet()
        await add(store, clock, "r1")
        owner = f"{socket.gethostname()}/{gone.pid}/x"
        assert len(await store.claim(owner, 1, 60, clock.now())) == 1  # its lease: 60 s
        clock.advance(20.001)  # one beat, well inside that lease
        await until(lambda: api.methods == ["lookup"])
        await run.quiet()
        record = await run.get()
    assert (record.state, record.batch_id) == (State.CREATED, "b-made-before-the-kill")


async def test_leases_of_live_processes_are_left_alone(store: SqlBatchStore, clock: ManualClock) -> None:
    await add(store, clock, "r1")
    assert len(await store.claim(f"{socket.gethostname()}/1/x", 1, 15, clock.now())) == 1  # pid 1 lives
    assert len(await store.claim("elsewhere/123/x", 1, 15, clock.now())) == 0
    api = FakeApi()
    async with Running(store, api, clock) as run:
        await run.quiet()
    assert api.calls == []
    assert await store.expire_leases([], clock.now()) == 0


# --- adoption ---------------------------------------------------------------------------------------


async def test_adoption_takes_the_oldest_live_batch(store: SqlBatchStore, clock: ManualClock) -> None:
    found = [
        batch("b-aborted", "aborted", 1),
        batch("b-failed", "failed", 2),
        batch("b-live", "processing", 3),
    ]
    found += [batch("b-newer", "loading", 4)]
    api = FakeApi(creates=[http(500)], lookups=[found])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        record = await run.get()
    assert (record.state, record.batch_id, record.batch_status) == (State.CREATED, "b-live", "processing")


async def test_only_dead_batches_count_as_none(store: SqlBatchStore, clock: ManualClock) -> None:
    api = FakeApi(creates=[http(500)], lookups=[[batch("b-aborted", "aborted")]] * 20)
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        record = await run.until_final()
    assert record.state is State.CREATED
    assert record.batch_id not in {"b-aborted"}
    assert api.methods.count("create") == 2


# --- reconciliation -----------------------------------------------------------------------------------


async def test_reconciliation_aborts_extras_made_inside_the_window(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    """The lost create made b-lost, listed only after the settle window; the request adopted the
    first one listed. Once the window has passed, the extra still loading is aborted, one already
    past loading is kept and reported, and the recorded batch is never touched."""
    first = [batch("b-kept", "loading", 1)]
    later = [*first, batch("b-lost", "loading", 2), batch("b-processing", "processing", 3)]
    api = FakeApi(creates=[http(502)], lookups=[first, later])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        record = await run.get()
        assert (record.state, record.batch_id) == (State.CREATED, "b-kept")
        assert record.reconcile_at == clock.now() + timedelta(seconds=SETTLE)
        assert await store.pending_reconciliations() == 1
        await run.step()
        record = await run.get()
    assert api.aborted == ["b-lost"]
    assert record.reconcile_at is None
    assert await store.pending_reconciliations() == 0
    assert (record.state, record.batch_id) == (State.CREATED, "b-kept")
    assert run.dispatcher.stats.duplicates_aborted == 1
    trail = await store.history("r1")
    assert "aborted duplicate batches b-lost" in (trail[-1].detail or "")


async def test_no_reconciliation_without_an_ambiguous_history(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    api = FakeApi()
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        record = await run.outcome()
    assert record.reconcile_at is None
    assert api.methods == ["create"]


async def test_a_reconciliation_the_closed_gate_refused_is_due_again_uncounted(
    store: SqlBatchStore, clock: ManualClock
) -> None:
    later = [batch("b-kept", "loading", 1), batch("b-lost", "loading", 2)]
    api = FakeApi(creates=[http(502)], lookups=[[batch("b-kept")], CallNotSent(), later])
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        await run.step()  # the reconciliation's look-up: refused, as the service stops
        record = await run.get()
        assert api.methods[-1] == "lookup"
        assert (record.reconcile_tries, record.reconcile_at) == (0, clock.now())  # due again, uncounted
        clock.advance(RECONCILE_CHECK)  # a busy dispatcher asks for reconciliations this often
        await run.quiet()
    assert api.aborted == ["b-lost"]
    record = await run.get()
    assert (record.batch_id, record.reconcile_tries, record.reconcile_at) == ("b-kept", 0, None)


async def test_a_failed_reconciliation_is_tried_again(store: SqlBatchStore, clock: ManualClock) -> None:
    lookup_error = AepHttpError("HTTP 503", endpoint="catalog.lookup", status=503)
    extra = [batch("b-kept", "loading", 1), batch("b-extra", "loading", 2)]
    api = FakeApi(creates=[http(500)], lookups=[[batch("b-kept")], lookup_error, extra, extra])
    api.abort_errors.append(AepHttpError("HTTP 502", endpoint="batches.abort", status=502))
    await add(store, clock, "r1")
    async with Running(store, api, clock) as run:
        await run.outcome()
        await run.until_due()
        for _ in range(6):
            if await store.pending_reconciliations() == 0:
                break
            await run.step()
    assert await store.pending_reconciliations() == 0
    assert api.aborted == ["b-extra"]
    assert api.methods.count("abort") == 2  # the first abort failed
    record = await run.get()
    assert (record.batch_id, record.reconcile_tries) == ("b-kept", 2)
