"""The service: wires queue, store, AEP client, limiter and the two loops, and runs them until told
to stop (a signal) or, with `until_idle`, until there is nothing left to do."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from orchestrator import eventloop, logs
from orchestrator.aep.auth import token_provider
from orchestrator.aep.client import AepClient
from orchestrator.clock import Clock, SystemClock, sleep_until_set
from orchestrator.events import FLUSH_GRACE, EventRelay
from orchestrator.files import FileSources
from orchestrator.metrics import Metrics
from orchestrator.monitoring import Monitor, start_http
from orchestrator.observe import NULL, Observer
from orchestrator.owners import process_owner
from orchestrator.pipeline.dispatcher import Dispatcher
from orchestrator.pipeline.intake import Intake
from orchestrator.pipeline.limiter import Limiter, open_limiter
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.pipeline.stage import UploadStage
from orchestrator.queues import open_publisher, open_queue
from orchestrator.queues.base import Queue
from orchestrator.settings import Settings, TrackSettings
from orchestrator.store.base import BatchStore
from orchestrator.store.engine import async_url
from orchestrator.store.sql import SqlBatchStore

log = logs.get("service")


# Requests the dispatcher holds per call slot before their calls. A request spends time before its
# call (claimed, then waiting for its task's turn and the limiter), and while it does its slot could
# carry another call; holding a few per slot keeps every slot busy. Those whose call answered and
# which wait only for their outcome's commit leave this window (`Dispatcher._free`). Calls in flight
# stay bounded by ORCH_LIMITS__CONCURRENCY (the limiter).
CLAIMS_PER_CALL_SLOT = 4


# How long a claimed request stays leased (seconds). The dispatcher renews the leases of the requests
# it holds every third of this, so it bounds only how soon the requests of a process killed with
# -9 are taken over; a take-over looks the batch up first, and creates only after the catalog's
# settle window, so a short lease costs no duplicate.
LEASE_SECONDS = 15.0


@dataclass
class Components:
    store: BatchStore
    queue: Queue
    session: aiohttp.ClientSession
    limiter: Limiter
    client: AepClient
    intake: Intake
    dispatcher: Dispatcher
    stage: UploadStage
    # The SQLite files behind the store and the queue, watched while the service runs.
    files: tuple[OpenedFile, ...] = ()
    # Publishes the batch events of the store's outbox (only with ORCH_EVENTS__URL set).
    relay: EventRelay | None = None


@dataclass(frozen=True)
class OpenedFile:
    """A SQLite file the service opened (`role`: "store" or "queue") and which file that was. Once
    its path leads to no file or another one (deleted, replaced), what the service writes goes to a
    file nobody will open again: its records are lost, and the service must not go on."""

    role: str
    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, role: str, url: str) -> OpenedFile | None:
        """The file behind a `sqlite:///PATH` URL, just opened; None for any other database."""
        try:
            target = async_url(url)
        except ValueError:
            return None
        database = target.database
        if target.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return None
        try:
            found = Path(database).stat()
        except OSError:
            return None  # a `file:` URI or some such: nothing to watch
        return cls(role, Path(database), found.st_dev, found.st_ino)

    def lost(self) -> str | None:
        """How the path lost the opened file; None while it leads to it. One `stat`: cheap enough
        to ask several times a second."""
        try:
            found = self.path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return "deleted"
        except OSError:
            return None  # unreadable for a moment (permissions, a network share): nothing is known lost
        if (found.st_dev, found.st_ino) != (self.device, self.inode):
            return "replaced by another file"
        return None


class CredentialsWait:
    """How long AEP credentials have been refused while no request got anywhere; `run --until-idle`
    gives up once that reaches `limit` seconds (ORCH_AEP__CREDENTIALS_WAIT).

    An outcome of a request (created, adopted, failed, retry scheduled) starts it over. A moment
    without a problem does not: a refused fixed token is probed now and then, and until the probe
    is refused in turn the dispatcher sees no problem."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._since: float | None = None  # monotonic: first seen refused, no outcome since
        self._outcomes = 0

    def exceeded(self, problem: str | None, outcomes: int, now: float) -> bool:
        """`problem`: the credentials problem now (None: none); `outcomes`: how many requests have
        had an outcome so far; `now`: monotonic seconds."""
        if outcomes != self._outcomes:
            self._outcomes = outcomes
            self._since = None
        if problem is None:
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.limit


@contextlib.asynccontextmanager
async def open_components(
    settings: Settings, clock: Clock, observer: Observer = NULL
) -> AsyncIterator[Components]:
    events = settings.events
    track = settings.track
    store = SqlBatchStore(
        settings.store.url,
        events=events.url is not None,
        track_without_files=track.without_files or track.abort_loading_after is not None,
        first_look=_first_look(track),
    )
    queue = open_queue(settings.queue.url, settings.queue.name)
    relay = None
    if events.url is not None:
        # Made (not connected) before anything opens: an events URL without an adapter is a
        # configuration error, found before the service starts. The relay connects, and reconnects.
        publisher = open_publisher(events.url, events.name, setting="ORCH_EVENTS__URL")
        relay = EventRelay(store, publisher, clock)
    await store.open()
    try:
        await queue.open()
        opened = (OpenedFile.of("store", settings.store.url), OpenedFile.of("queue", settings.queue.url))
        files = tuple(file for file in opened if file is not None)
        try:
            connector = aiohttp.TCPConnector(limit=settings.limits.concurrency * 2)
            policy = RetryPolicy(settings.retry, random.Random(), RetryBudget())
            owner = process_owner()
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                # One cap on Retry-After for both: the shared pause and the request's own retry.
                # Shared with the other replicas through ORCH_LIMITS__REDIS_URL when it is set; it
                # checks Redis at start, and says when other replicas work unshared on the store.
                open_limiter(
                    settings, clock, store, owner, pause_cap=policy.retry_after_cap, observer=observer
                ) as limiter,
            ):
                tokens = token_provider(settings.aep, session, clock, observer)
                client = AepClient(settings.aep, session, tokens, gate=limiter, observer=observer)
                wake = asyncio.Event()
                sources = FileSources(settings.upload.root, settings.upload.protocols)
                yield Components(
                    store=store,
                    queue=queue,
                    files=files,
                    session=session,
                    limiter=limiter,
                    client=client,
                    intake=Intake(
                        queue,
                        store,
                        clock,
                        max_backlog=settings.limits.max_backlog,
                        on_added=wake,
                        observer=observer,
                        sources=sources,
                    ),
                    dispatcher=Dispatcher(
                        store,
                        client,
                        policy,
                        clock,
                        owner=owner,
                        concurrency=settings.limits.concurrency * CLAIMS_PER_CALL_SLOT,
                        lease_seconds=LEASE_SECONDS,
                        default_format=settings.aep.input_format,
                        catalog_settle=settings.aep.catalog_settle,
                        wake=wake,
                        observer=observer,
                    ),
                    stage=UploadStage(
                        store,
                        client,
                        sources,
                        policy,
                        clock,
                        owner=owner,
                        lease_seconds=LEASE_SECONDS,
                        upload=settings.upload,
                        track=track,
                        observer=observer,
                    ),
                    relay=relay,
                )
        finally:
            await queue.close()
            if relay is not None:
                await relay.close()
    finally:
        await store.close()


def _freeze_start_up() -> None:
    """Move what start-up made (modules, classes, the compiled statements, the settings, the
    connections) to the collector's permanent generation. They live as long as the process, and
    every full collection walked them all again: one of 40 to 50 ms every few thousand requests,
    and more during start-up's last second. Frozen: 0.93 x the CPU per request beyond start-up and
    0.8 x the start-up's (`bench/ab.py`, both backends). Not in a test's process, whose garbage it
    would keep (hence the CLI's alone)."""
    gc.freeze()


async def run(
    settings: Settings,
    *,
    until_idle: bool = False,
    clock: Clock | None = None,
    on_progress: Callable[[Components], None] | None = None,
    stop: asyncio.Event | None = None,
    freeze_start_up: bool = False,
) -> int:
    """Run the service; returns the process exit code. `freeze_start_up`: the process is the
    service's alone (the CLI), so what start-up made is frozen out of the garbage collector's
    reach once it is done (`_freeze_start_up`)."""
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, stop, sig)
    metrics = Metrics()
    try:
        async with open_components(settings, clock, metrics) as parts:
            monitor = Monitor(
                metrics, parts.store, parts.queue, parts.dispatcher, clock, events=parts.relay is not None
            )
            http = await start_http(monitor, parts.store, settings.http.host, settings.http.port)
            log.info(
                "service.started",
                queue=settings.queue.name,
                rate=settings.limits.rate,
                period=settings.limits.period,
                concurrency=settings.limits.concurrency,
                until_idle=until_idle,
                event_loop=eventloop.name(),
            )
            if freeze_start_up:
                _freeze_start_up()
            intake_task = asyncio.create_task(parts.intake.run(stop), name="intake")
            dispatch_task = asyncio.create_task(parts.dispatcher.run(stop), name="dispatcher")
            stage_task = asyncio.create_task(parts.stage.run(stop), name="stage")
            watcher = asyncio.create_task(
                _watch(parts, stop, clock, until_idle, on_progress, settings.aep.credentials_wait),
                name="watch",
            )
            tasks: tuple[asyncio.Task[Any], ...] = (intake_task, dispatch_task, stage_task, watcher)
            for task in tasks:
                monitor.watch(task.get_name(), task)
            monitoring = asyncio.create_task(monitor.run(stop), name="monitoring")
            # Stopping starts no call: those waiting for their turn give their work back at once,
            # and only the calls in flight have the grace to finish.
            gate_closer = asyncio.create_task(_close_at(stop, parts.limiter), name="gate-closer")
            relay_task = None
            if parts.relay is not None:
                # It runs on through the dispatcher's drain below, so the events of the calls
                # finishing then go out too; a broker error never ends it, only a bug would.
                relay_task = parts.relay.start()
            await _supervise(tasks, relay_task)
            if relay_task is not None:
                tasks += (relay_task,)
            stop.set()
            await gate_closer
            monitor.stopping()
            await asyncio.gather(intake_task, dispatch_task, stage_task, watcher, return_exceptions=True)
            ending = "stopped" if watcher.exception() is not None else watcher.result()
            # With the store's file gone, nothing a call in flight records survives: stop them all.
            grace = 0.0 if ending == "store_lost" else settings.shutdown.grace
            await asyncio.gather(parts.dispatcher.drain(grace), parts.stage.drain(grace))
            if parts.relay is not None:
                await parts.relay.stop(0.0 if ending == "store_lost" else FLUSH_GRACE)
            await asyncio.gather(monitoring, return_exceptions=True)
            if http is not None:
                await http.cleanup()
            failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception()), None)
            if failure is not None:
                log.error("service.crashed", exc_info=failure)
                return 1
            stats, stage = parts.dispatcher.stats, parts.stage.stats
            code = exit_code(ending, stats.failed + stage.failed)
            files, sent = parts.stage.transferred
            log.info(
                "service.stopped",
                created=stats.created,
                adopted=stats.adopted,
                failed=stats.failed,
                retries=stats.retries,
                files_uploaded=files,
                bytes_uploaded=sent,
                batches_completed=stage.completed,
                batches_succeeded=stage.succeeded,
                batches_failed=stage.failed,
                exit_code=code,
            )
            return code
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _supervise(tasks: tuple[asyncio.Task[Any], ...], beside: asyncio.Task[Any] | None) -> None:
    """Wait until every one of `tasks` has ended or one has failed, or until `beside` (a task that
    runs until told to stop, so it ending at all means it broke) has ended."""
    pending = set(tasks) if beside is None else {*tasks, beside}
    while pending.intersection(tasks):
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if beside in done or any(not task.cancelled() and task.exception() for task in done):
            return


# Why the watcher stopped the service: the work was done, it gave up (an error event says why: the
# credentials, the queue's file), the store's file was lost, or something else stopped it (a signal,
# the caller's `stop`).
Ending = Literal["idle", "gave_up", "store_lost", "stopped"]


def exit_code(ending: Ending, failed: int) -> int:
    """1 when the watcher gave up or the store's file was lost, or when a run until idle ended with
    `failed` requests of its own (so that a cron job notices); 0 otherwise, also after a signal.
    Invalid messages (`rejected`) do not count: they never were requests to AEP, and were
    dead-lettered and logged."""
    return 1 if ending in ("gave_up", "store_lost") or (ending == "idle" and failed > 0) else 0


async def _close_at(stop: asyncio.Event, limiter: Limiter) -> None:
    await stop.wait()
    limiter.close()


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
    credentials_wait: float,
) -> Ending:
    """Report progress; stop when the store's or the queue's file is lost; with `until_idle`, stop
    once the queue is empty, nothing waits for a call or a retry and no event waits in the outbox, or
    after `credentials_wait` seconds of refused credentials. Idle must hold on two checks in a row: a
    message can sit between the queue and the store for an instant (received, not yet recorded). A
    store that does not answer is not idle (`_store_idle`)."""
    idle_checks = 0
    refused = CredentialsWait(credentials_wait)
    while not stop.is_set():
        await sleep_until_set(clock, 0.2, stop)
        if on_progress is not None:
            on_progress(parts)
        lost = _file_lost(parts.files)
        if lost is not None:
            stop.set()
            return "store_lost" if lost == "store" else "gave_up"
        if not until_idle:
            continue
        if refused.exceeded(parts.dispatcher.credentials_problem, _outcomes(parts), clock.monotonic()):
            try:
                unfinished: int | None = await parts.store.unfinished()
            except Exception:  # noqa: BLE001 - the store is unavailable too: the count is unknown
                unfinished = None
            log.error(
                "service.credentials_refused",
                error=parts.dispatcher.credentials_problem,
                waited=refused.limit,
                unfinished=unfinished,
                hint="fix the credentials and run again; ORCH_AEP__CREDENTIALS_WAIT sets the wait",
            )
            stop.set()
            return "gave_up"
        idle = (
            parts.dispatcher.in_flight == 0
            and parts.stage.in_flight == 0
            and await _store_idle(parts)
            and await parts.queue.is_empty()
        )
        idle_checks = idle_checks + 1 if idle else 0
        if idle_checks >= 2:
            log.info("service.idle")
            stop.set()
            return "idle"
    return "stopped"


async def _store_idle(parts: Components) -> bool:
    """Nothing waits in the store for a call, a retry, a look-up or the event relay. False when the
    store does not answer: the loops wait for it (`store.unavailable`), and so does `--until-idle`."""
    store = parts.store
    try:
        return (
            await store.unfinished() == 0
            and await store.pending_reconciliations() == 0
            and await store.stages_waiting() == 0
            # Every event published (rows of a run without events on are not waited for).
            and (parts.relay is None or await store.events_waiting() == 0)
        )
    except Exception:  # noqa: BLE001 - unavailable, whatever the driver calls it: not idle
        return False


def _file_lost(files: tuple[OpenedFile, ...]) -> str | None:
    """The role of a file that was lost (and logged), if any."""
    for file in files:
        how = file.lost()
        if how is not None:
            # service.store_lost or service.queue_lost
            log.error(
                f"service.{file.role}_lost",
                path=str(file.path),
                problem=how,
                hint="stopped: what it records from now on would be lost; restore the file or enqueue again",
            )
            return file.role
    return None


def _outcomes(parts: Components) -> int:
    stats, stage = parts.dispatcher.stats, parts.stage.stats
    return (
        stats.created
        + stats.adopted
        + stats.failed
        + stats.retries
        + stage.completed
        + stage.succeeded
        + stage.failed
        + stage.retries
    )


def _first_look(track: TrackSettings) -> float:
    """Seconds after `created` a batch without files is first looked at: at the first poll when its
    status is followed, else when it would be overdue in `loading`."""
    if track.without_files or track.abort_loading_after is None:
        return track.poll_min
    return track.abort_loading_after
