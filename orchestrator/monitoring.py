"""What the service shows while it runs: the answers of its health probes, the gauges it refreshes from
the store, and the HTTP server (`http.py`) that serves them with the metrics and the records."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from orchestrator import logs
from orchestrator.clock import Clock, sleep_until_set
from orchestrator.http import Probes, make_app, serve
from orchestrator.metrics import Metrics
from orchestrator.pipeline.dispatcher import Dispatcher
from orchestrator.queues.base import Queue
from orchestrator.store.base import BatchStore

log = logs.get("monitoring")

# Seconds between reads of the store's gauges (a few indexed queries each).
REFRESH_INTERVAL = 5.0
# Seconds a readiness check may take before its component counts as not ready.
CHECK_TIMEOUT = 2.0


class Monitor:
    """The probes' answers and the metrics' store gauges for one running service."""

    def __init__(
        self,
        metrics: Metrics,
        store: BatchStore,
        queue: Queue,
        dispatcher: Dispatcher,
        clock: Clock,
        *,
        events: bool,
    ) -> None:
        self.metrics = metrics
        self._store = store
        self._queue = queue
        self._dispatcher = dispatcher
        self._clock = clock
        self._events = events
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stopping = False

    def watch(self, name: str, task: asyncio.Task[Any]) -> None:
        """A task the service lives by: once it has ended, the service is not alive."""
        self._tasks[name] = task

    def stopping(self) -> None:
        """Shutdown began: not ready for new work any more (still alive while it drains)."""
        self._stopping = True

    def live(self) -> list[str]:
        return [f"{name} stopped" for name, task in self._tasks.items() if task.done() and not self._stopping]

    async def ready(self) -> dict[str, str]:
        reasons: dict[str, str] = {}
        if self._stopping:
            reasons["service"] = "shutting down"
        problem = self._dispatcher.credentials_problem
        if problem is not None:
            reasons["credentials"] = problem
        for name, check in (("store", self._store.unfinished()), ("queue", self._queue.is_empty())):
            failure = await _answers(check)
            if failure is not None:
                reasons[name] = failure
        return reasons

    async def refresh(self) -> None:
        waiting = await self._store.events_waiting() if self._events else None
        await self.metrics.refresh(self._store, self._clock.now(), events_waiting=waiting)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the store's gauges until `stop`; a store error is logged and tried again."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the gauges wait; readiness reports the store
                log.warning("monitoring.refresh_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await sleep_until_set(self._clock, REFRESH_INTERVAL, stop)


async def _answers(check: Awaitable[object]) -> str | None:
    """None when `check` answers in time, else why not (never a secret: only the error's type and
    text, which for the store and brokers name hosts and errors, not passwords)."""
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason it is not ready
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


async def start_http(monitor: Monitor, store: BatchStore, host: str, port: int) -> web.AppRunner | None:
    """The HTTP server on host:port; None when the port is 0 (off)."""
    if port == 0:
        return None
    app = make_app(Probes(monitor.live, monitor.ready), monitor.metrics, store)
    return await serve(app, host, port)
