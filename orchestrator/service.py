"""The service: wires queue, store, AEP client, limiter and the two loops, and runs them until told
to stop (a signal) or, with `until_idle`, until there is nothing left to do."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from orchestrator import logs
from orchestrator.aep.auth import token_provider
from orchestrator.aep.client import AepClient
from orchestrator.clock import Clock, SystemClock, sleep_until_set
from orchestrator.pipeline.dispatcher import Dispatcher
from orchestrator.pipeline.intake import Intake
from orchestrator.pipeline.limiter import Limiter
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.queues import open_queue
from orchestrator.queues.base import Queue
from orchestrator.settings import Settings
from orchestrator.store.base import BatchStore
from orchestrator.store.sql import SqlBatchStore

log = logs.get("service")


# Requests the dispatcher holds per call slot. A request spends time on either side of its call
# (claimed, then recorded), and while it does its slot could carry another call; holding a few per
# slot keeps every slot busy. Calls in flight stay bounded by ORCH_LIMITS__CONCURRENCY (the limiter).
CLAIMS_PER_CALL_SLOT = 4


def lease_seconds(settings: Settings) -> float:
    """How long a claimed request stays leased: long enough for a lookup and a create (each bounded
    by the timeout) after waiting out a throttling pause; short enough that a request whose process
    was killed mid-call is picked up again soon after."""
    return 3 * settings.aep.timeout + settings.retry.max_delay + 5


@dataclass
class Components:
    store: BatchStore
    queue: Queue
    session: aiohttp.ClientSession
    limiter: Limiter
    client: AepClient
    intake: Intake
    dispatcher: Dispatcher


@contextlib.asynccontextmanager
async def open_components(settings: Settings, clock: Clock) -> AsyncIterator[Components]:
    store: BatchStore = SqlBatchStore(settings.store.url)
    queue = open_queue(settings.queue.url, settings.queue.name)
    await store.open()
    try:
        await queue.open()
        try:
            connector = aiohttp.TCPConnector(limit=settings.limits.concurrency * 2)
            async with aiohttp.ClientSession(connector=connector) as session:
                policy = RetryPolicy(settings.retry, random.Random(), RetryBudget())
                # One cap on Retry-After for both: the shared pause and the request's own retry.
                limiter = Limiter(settings.limits, clock, pause_cap=policy.retry_after_cap)
                tokens = token_provider(settings.aep, session, clock)
                client = AepClient(settings.aep, session, tokens, gate=limiter)
                wake = asyncio.Event()
                owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
                yield Components(
                    store=store,
                    queue=queue,
                    session=session,
                    limiter=limiter,
                    client=client,
                    intake=Intake(
                        queue, store, clock, max_backlog=settings.limits.max_backlog, on_added=wake
                    ),
                    dispatcher=Dispatcher(
                        store,
                        client,
                        policy,
                        clock,
                        owner=owner,
                        concurrency=settings.limits.concurrency * CLAIMS_PER_CALL_SLOT,
                        lease_seconds=lease_seconds(settings),
                        default_format=settings.aep.input_format,
                        wake=wake,
                    ),
                )
        finally:
            await queue.close()
    finally:
        await store.close()


async def run(
    settings: Settings,
    *,
    until_idle: bool = False,
    clock: Clock | None = None,
    on_progress: Callable[[Components], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the service; returns the process exit code."""
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, stop, sig)
    try:
        async with open_components(settings, clock) as parts:
            log.info(
                "service.started",
                queue=settings.queue.name,
                rate=settings.limits.rate,
                period=settings.limits.period,
                concurrency=settings.limits.concurrency,
                until_idle=until_idle,
            )
            intake_task = asyncio.create_task(parts.intake.run(stop), name="intake")
            dispatch_task = asyncio.create_task(parts.dispatcher.run(stop), name="dispatcher")
            watcher = asyncio.create_task(_watch(parts, stop, clock, until_idle, on_progress), name="watch")
            done, _ = await asyncio.wait(
                {intake_task, dispatch_task, watcher}, return_when=asyncio.FIRST_EXCEPTION
            )
            stop.set()
            await asyncio.gather(intake_task, dispatch_task, watcher, return_exceptions=True)
            await parts.dispatcher.drain(settings.shutdown.grace)
            failure = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
            if failure is not None:
                log.error("service.crashed", exc_info=failure)
                return 1
            stats = parts.dispatcher.stats
            log.info(
                "service.stopped",
                created=stats.created,
                adopted=stats.adopted,
                failed=stats.failed,
                retries=stats.retries,
            )
            return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("service.stopping", signal=sig.name)
    stop.set()


async def _watch(
    parts: Components,
    stop: asyncio.Event,
    clock: Clock,
    until_idle: bool,
    on_progress: Callable[[Components], None] | None,
) -> None:
    """Report progress and, with `until_idle`, stop once the queue is empty and nothing waits for a
    call or a retry. Idle must hold on two checks in a row: a message can sit between the queue and
    the store for an instant (received, not yet recorded)."""
    idle_checks = 0
    while not stop.is_set():
        await sleep_until_set(clock, 0.2, stop)
        if on_progress is not None:
            on_progress(parts)
        if not until_idle:
            continue
        idle = (
            parts.dispatcher.in_flight == 0
            and await parts.store.unfinished() == 0
            and await parts.queue.is_empty()
        )
        idle_checks = idle_checks + 1 if idle else 0
        if idle_checks >= 2:
            log.info("service.idle")
            stop.set()
