"""The service's own decisions: when `run --until-idle` gives up on refused credentials, which exit
code a run ends with, and that a store or queue file lost while it runs stops it. Time is a
`ManualClock`: minutes of waiting take a moment."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aioresponses import CallbackResult, aioresponses

from orchestrator import service
from orchestrator.clock import Clock, ManualClock, SystemClock
from orchestrator.queues.sqlite import SqliteQueue
from orchestrator.service import Components, CredentialsWait, OpenedFile, exit_code
from orchestrator.settings import (
    AepSettings,
    HttpSettings,
    QueueSettings,
    RetrySettings,
    Settings,
    StoreSettings,
)
from tests.unit.fakes import IMS_URL, aep_settings

CREATE_URL = "https://platform.test/data/foundation/import/batches"
GOOD = "5c8c3c555033b814b69f947f"
BAD = "5c8c3c555033b814b69f9bad"


def service_settings(directory: Path, aep: AepSettings | None = None) -> Settings:
    return Settings(
        aep=aep or aep_settings(),
        store=StoreSettings(url=f"sqlite:///{directory}/store.db"),
        queue=QueueSettings(url=f"sqlite:///{directory}/queue.db"),
        http=HttpSettings(port=0),
    )


async def publish(settings: Settings, *dataset_ids: str) -> None:
    queue = SqliteQueue(settings.queue.url, settings.queue.name)
    await queue.open()
    try:
        await queue.publish([json.dumps({"datasetId": d, "requestId": d}).encode() for d in dataset_ids])
    finally:
        await queue.close()


class Service:
    """`service.run` in a task, seeing what the watcher saw at each of its ticks. On a manual clock,
    the test moves time; on the system clock, the service runs as it would."""

    def __init__(self, settings: Settings, clock: Clock, *, until_idle: bool) -> None:
        self.clock = clock
        self.stop = asyncio.Event()
        self.ticks: list[tuple[float, str | None]] = []  # (clock time, credentials problem)
        self.parts: Components | None = None
        self.task = asyncio.create_task(
            service.run(settings, until_idle=until_idle, clock=clock, on_progress=self._tick, stop=self.stop)
        )

    def _tick(self, parts: Components) -> None:
        self.parts = parts
        self.ticks.append((self.clock.monotonic(), parts.dispatcher.credentials_problem))

    async def advance_until(self, done: Any, step: float = 1.0, real_seconds: float = 30.0) -> None:
        """Move the manual clock on, a step at a time, until `done()` holds (a real-time bound
        fails the test); the pause between steps lets the store's and the queue's threads answer.
        Only for runs that claim nothing: leases would run out in steps faster than the calls."""
        assert isinstance(self.clock, ManualClock)
        async with asyncio.timeout(real_seconds):
            while not done():
                self.clock.advance(step)
                await asyncio.sleep(0.001)

    async def finish(self) -> int:
        if isinstance(self.clock, ManualClock):
            await self.advance_until(self.task.done)
        return await asyncio.wait_for(self.task, 30)


async def refused_service(
    tmp_path: Path, mock: aioresponses, clock: ManualClock, *, until_idle: bool
) -> Service:
    """A service with a request to make and client credentials IMS refuses: it has work, and waits."""
    mock.post(IMS_URL, status=401, payload={"error": "invalid_client"}, repeat=True)
    settings = service_settings(tmp_path, aep_settings(credentials_wait=300))
    await publish(settings, GOOD)
    return Service(settings, clock, until_idle=until_idle)


def events(log_output: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_output.getvalue().splitlines() if line.startswith("{")]


# --- the bound on refused credentials -----------------------------------------------------------------


def test_credentials_wait_counts_refused_time_without_progress() -> None:
    wait = CredentialsWait(300)

    assert not wait.exceeded(None, 0, 0.0)
    assert not wait.exceeded("refused", 0, 10.0)  # first seen: the wait starts here
    assert not wait.exceeded(None, 0, 70.0)  # a probe of a fixed token: no problem for a moment
    assert not wait.exceeded("refused", 0, 309.9)
    assert wait.exceeded("refused", 0, 310.0)


def test_credentials_wait_starts_over_when_a_request_gets_anywhere() -> None:
    wait = CredentialsWait(300)

    assert not wait.exceeded("refused", 0, 0.0)
    assert not wait.exceeded(None, 1, 200.0)  # a request was created: the credentials work
    assert not wait.exceeded("refused", 1, 250.0)
    assert not wait.exceeded("refused", 1, 549.9)
    assert wait.exceeded("refused", 1, 550.0)


async def test_until_idle_gives_up_once_credentials_were_refused_for_the_wait(
    tmp_path: Path, mock: aioresponses, clock: ManualClock, log_output: io.StringIO
) -> None:
    run = await refused_service(tmp_path, mock, clock, until_idle=True)
    code = await run.finish()

    assert code == 1
    refused = [at for at, problem in run.ticks if problem is not None]
    # It gave up at the first look at or past the bound, not before, and not later.
    assert refused[-1] - refused[0] >= 300
    assert refused[-2] - refused[0] < 300
    [gave_up] = [e for e in events(log_output) if e["event"] == "service.credentials_refused"]
    assert gave_up["level"] == "error"
    assert "invalid_client" in gave_up["error"]
    assert gave_up["unfinished"] == 1


async def test_without_until_idle_the_service_waits_for_credentials(
    tmp_path: Path, mock: aioresponses, clock: ManualClock, log_output: io.StringIO
) -> None:
    run = await refused_service(tmp_path, mock, clock, until_idle=False)
    await run.advance_until(lambda: len([1 for _, problem in run.ticks if problem]) > 0)
    first = run.ticks[-1][0]
    await run.advance_until(lambda: run.ticks[-1][0] - first > 900, step=5.0)
    assert not run.task.done()
    run.stop.set()

    assert await run.finish() == 0
    assert "service.credentials_refused" not in [e["event"] for e in events(log_output)]


# --- exit codes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "failed", "code"),
    [
        ("idle", 0, 0),
        ("idle", 2, 1),  # requests of the run failed: a cron job must notice
        ("gave_up", 0, 1),  # credentials refused for too long, or a file lost
        ("stopped", 0, 0),
        ("stopped", 2, 0),  # SIGTERM: nothing is lost, exit 0 as the service surface promises
    ],
)
def test_exit_code(ending: service.Ending, failed: int, code: int) -> None:
    assert exit_code(ending, failed) == code


async def test_until_idle_exits_1_only_for_requests_that_failed_in_this_run(
    tmp_path: Path, mock: aioresponses, log_output: io.StringIO
) -> None:
    mock.post(IMS_URL, payload={"access_token": "t", "expires_in": 86399}, repeat=True)
    unavailable: set[str] = set()

    async def create(url: Any, **kwargs: Any) -> CallbackResult:
        dataset = kwargs["json"]["datasetId"]
        if dataset == BAD:
            return CallbackResult(status=404, payload={"message": "Dataset not found"})
        if dataset not in unavailable:  # a retry first, then the batch
            unavailable.add(dataset)
            return CallbackResult(status=503, payload={"message": "unavailable"})
        return CallbackResult(status=201, payload={"id": f"batch-{dataset}", "status": "loading"})

    mock.post(CREATE_URL, callback=create, repeat=True)
    settings = service_settings(tmp_path).model_copy(
        update={"retry": RetrySettings(base_delay=0.05, max_delay=0.1)}
    )
    await publish(settings, GOOD, BAD)

    # Calls are claimed and leased here, so the service keeps its own time.
    assert await Service(settings, SystemClock(), until_idle=True).finish() == 1
    stopped = [e for e in events(log_output) if e["event"] == "service.stopped"]
    assert (stopped[0]["created"], stopped[0]["failed"], stopped[0]["retries"]) == (1, 1, 1)
    # A second run finds the failed request recorded as such, and fails nothing itself.
    assert await Service(settings, SystemClock(), until_idle=True).finish() == 0


# --- the store's and the queue's files ---------------------------------------------------------------


def test_opened_file_tells_deleted_from_replaced(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"one")
    opened = OpenedFile.of("store", f"sqlite:///{path}")
    assert opened is not None
    assert opened.lost() is None

    other = tmp_path / "other.db"
    other.write_bytes(b"two")
    os.replace(other, path)
    assert opened.lost() == "replaced by another file"
    path.unlink()
    assert opened.lost() == "deleted"


@pytest.mark.parametrize("url", ["postgresql://db/orchestrator", "sqlite://", "sqlite:///:memory:"])
def test_only_sqlite_files_are_watched(url: str) -> None:
    assert OpenedFile.of("store", url) is None


@pytest.mark.parametrize("role", ["store", "queue"])
async def test_a_file_lost_while_the_service_runs_stops_it(
    tmp_path: Path, mock: aioresponses, clock: ManualClock, log_output: io.StringIO, role: str
) -> None:
    run = await refused_service(tmp_path, mock, clock, until_idle=False)
    await run.advance_until(lambda: run.parts is not None)
    assert run.parts is not None
    assert {file.role for file in run.parts.files} == {"store", "queue"}

    (tmp_path / f"{role}.db").unlink()

    assert await run.finish() == 1
    [lost] = [e for e in events(log_output) if e["event"] == f"service.{role}_lost"]
    assert lost["level"] == "error"
    assert lost["problem"] == "deleted"
    assert lost["path"] == str(tmp_path / f"{role}.db")


# --- the garbage collector ---------------------------------------------------------------------------


async def test_start_up_is_frozen_once_done_before_any_request_when_asked(
    tmp_path: Path, mock: aioresponses, log_output: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock.post(IMS_URL, payload={"access_token": "t", "expires_in": 86399}, repeat=True)
    mock.post(CREATE_URL, status=201, payload={"id": "batch-1", "status": "loading"})
    at_freeze: list[list[str]] = []  # the events logged when the collector was frozen
    # Recorded, not done: frozen, the test process would keep its garbage for good.
    monkeypatch.setattr(
        service.gc, "freeze", lambda: at_freeze.append([e["event"] for e in events(log_output)])
    )
    settings = service_settings(tmp_path)
    await publish(settings, GOOD)

    done = service.run(settings, until_idle=True, freeze_start_up=True)
    assert await asyncio.wait_for(done, 30) == 0

    [logged] = at_freeze
    assert "service.started" in logged
    assert not any(event.startswith(("intake.", "dispatcher.")) for event in logged)
    assert sum(len(calls) for key, calls in mock.requests.items() if key[1].path.endswith("/batches")) == 1
    # Without being asked (a test's process, as here), the service leaves the collector alone.
    await publish(settings, BAD)
    mock.post(CREATE_URL, status=201, payload={"id": "batch-2", "status": "loading"})
    assert await asyncio.wait_for(service.run(settings, until_idle=True), 30) == 0
    assert len(at_freeze) == 1
