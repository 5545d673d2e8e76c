"""The upload stage on a manual clock, over a real SQLite store and an in-memory AEP: files uploaded
byte for byte, COMPLETE only once every file is in, AEP's final word recorded, failures retried or
failed with the batch aborted, a stage cut short resumed where AEP stands."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from orchestrator.aep.api import BatchState, Body
from orchestrator.aep.errors import AepHttpError, AuthError, CallNotSent
from orchestrator.clock import ManualClock
from orchestrator.files import FileSources
from orchestrator.messages import BatchRequest, FileRef
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.pipeline.stage import UploadStage
from orchestrator.settings import RetrySettings, TrackSettings, UploadSettings
from orchestrator.store.base import BatchRecord, State
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import until

DS = "ds1"
POLL = 0.5


def http(status: int, endpoint: str = "files.put") -> AepHttpError:
    return AepHttpError(f"HTTP {status}", endpoint=endpoint, status=status, detail="boom")


@dataclass
class AepBatch:
    dataset_id: str
    status: str = "loading"
    files: dict[str, bytearray] = field(default_factory=dict)
    complete_files: set[str] = field(default_factory=set)
    initialized: set[str] = field(default_factory=set)
    polls: int = 0


class FakeAep:
    """AEP's upload and status calls in memory. `fail[endpoint]` lists errors the next calls of that
    endpoint raise; `final` is the status a completed batch shows after `processing_polls` polls;
    `gate`, when set, makes the next PATCH wait for it (a call in flight to cut short)."""

    def __init__(self) -> None:
        self.batches: dict[str, AepBatch] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, list[Exception | None]] = {}  # None: that call passes
        self.final = "success"
        self.final_errors: list[dict[str, Any]] = []
        self.processing_polls = 1
        self.gate: asyncio.Event | None = None
        self.after_complete: list[str] = []  # uploads that reached a batch past loading
        self.token_refused = False

    def _call(self, endpoint: str, name: str = "") -> None:
        self.calls.append((endpoint, name))
        errors = self.fail.get(endpoint)
        if errors:
            error = errors.pop(0)
            if error is not None:
                raise error

    def _loading(self, batch_id: str, name: str) -> AepBatch:
        batch = self.batches[batch_id]
        if batch.status != "loading":
            self.after_complete.append(name)
            raise http(400)
        return batch

    async def ensure_token(self) -> None:
        if self.token_refused:
            raise AuthError("refused", status=400, permanent=True)

    async def put_file(self, batch_id: str, dataset_id: str, name: str, body: Body, size: int) -> None:
        self._call("files.put", name)
        batch = self._loading(batch_id, name)
        data = b"".join([chunk async for chunk in body()])
        assert len(data) == size
        batch.files[name] = bytearray(data)
        batch.complete_files.add(name)

    async def initialize_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        self._call("files.initialize", name)
        batch = self._loading(batch_id, name)
        batch.files[name] = bytearray()
        batch.initialized.add(name)

    async def put_part(
        self, batch_id: str, dataset_id: str, name: str, start: int, body: Body, length: int, total: int
    ) -> None:
        self._call("files.patch", f"{name}@{start}")
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        batch = self._loading(batch_id, name)
        data = b"".join([chunk async for chunk in body()])
        assert len(data) == length
        assert start == len(batch.files[name]), "parts must follow one another"
        batch.files[name] += data

    async def file_received(self, batch_id: str, dataset_id: str, name: str) -> int | None:
        self._call("files.head", name)
        data = self.batches[batch_id].files.get(name)
        return None if data is None else len(data)

    async def complete_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        self._call("files.complete", name)
        self._loading(batch_id, name).complete_files.add(name)

    async def complete_batch(self, batch_id: str) -> None:
        self._call("batches.complete")
        batch = self.batches[batch_id]
        if batch.status == "loading":
            batch.status = "processing"

    async def abort_batch(self, batch_id: str) -> None:
        self._call("batches.abort")
        self.batches[batch_id].status = "aborted"

    async def batch_state(self, batch_id: str) -> BatchState:
        self._call("catalog.status")
        batch = self.batches[batch_id]
        if batch.status == "processing":
            batch.polls += 1
            if batch.polls > self.processing_polls:
                batch.status = self.final
        errors = self.final_errors if batch.status == "failed" else []
        return BatchState(batch.status, errors, record_count=7, failed_record_count=0)

    def endpoints(self) -> list[str]:
        return [endpoint for endpoint, _ in self.calls]


class Stage:
    """An upload stage running on a manual clock; stopped and drained on exit."""

    def __init__(
        self,
        store: SqlBatchStore,
        api: FakeAep,
        clock: ManualClock,
        root: Path,
        *,
        threshold: int = 1024,
        part_size: int = 4,
        track: TrackSettings | None = None,
        max_attempts: int = 4,
    ) -> None:
        self.store, self.api, self.clock = store, api, clock
        policy = RetryPolicy(
            RetrySettings(max_attempts=max_attempts, base_delay=0.5, max_delay=4),
            random.Random(0),
            RetryBudget(),
        )
        self.stage = UploadStage(
            store,
            api,
            FileSources(root, ["file", "memory"]),
            policy,
            clock,
            owner="test",
            lease_seconds=60,
            upload=UploadSettings(large_file_threshold=threshold, part_size=part_size, concurrency=4),
            track=track or TrackSettings(poll_min=1, poll_max=8),
            poll_interval=POLL,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Stage:
        self.task = asyncio.create_task(self.stage.run(self.stop))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def shutdown(self, grace: float = 0.1) -> None:
        if self.task is None:
            return
        self.stop.set()
        await asyncio.wait_for(self.task, 1.0)
        self.task = None
        await self.stage.drain(grace)

    async def quiet(self) -> None:
        await until(lambda: self.stage.in_flight == 0 and self.clock.sleepers >= 2)

    async def step(self) -> None:
        """Move the clock to whatever the stage has due next and let it act."""
        await self.quiet()
        due = await self.store.next_stage_due()
        wait = POLL if due is None else (due - self.clock.now()).total_seconds()
        self.clock.advance(max(0.0, wait) + 0.001)
        await self.quiet()

    async def until(self, request_id: str, *states: State, limit: int = 60) -> BatchRecord:
        for _ in range(limit):
            record = await self.store.get(request_id)
            assert record is not None
            if record.state in states:
                return record
            await self.step()
        sleeping = sorted(round(d, 3) for d, _, f in self.clock._sleepers if not f.done())
        due = await self.store.next_stage_due()
        raise AssertionError(
            f"{request_id} never reached {states}: {record.state} at {self.clock.monotonic()}, "
            f"sleepers {sleeping}, due {due}, task {self.task}, in flight {self.stage.in_flight}"
        )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    (path / "part=a").mkdir(parents=True)
    (path / "part=a" / "one.json").write_bytes(b'{"a": 1}\n{"a": 2}\n')
    (path / "part=a" / "two.json").write_bytes(b'{"b": 3}\n')
    (path / "big.bin").write_bytes(bytes(range(256)) * 4 + b"tail")
    return path


@pytest.fixture
async def store(tmp_path: Path) -> Iterator[SqlBatchStore]:
    store = SqlBatchStore(f"sqlite:///{tmp_path}/store.db", events=True)
    await store.open()
    yield store  # type: ignore[misc]
    await store.close()


async def created(
    store: SqlBatchStore, api: FakeAep, clock: ManualClock, request_id: str, *files: str
) -> str:
    """A request with `files`, its batch made in AEP (the create path's outcome)."""
    refs = tuple(FileRef(source, source) for source in files)
    await store.add(BatchRequest(request_id=request_id, dataset_id=DS, files=refs), clock.now())
    [claim] = await store.claim("creator", 1, 60, clock.now())
    batch_id = f"b{len(api.batches) + 1}"
    api.batches[batch_id] = AepBatch(DS)
    assert await store.mark_created(claim, batch_id, "loading", clock.now())
    return batch_id


def events(rows: list[Any]) -> list[str]:
    return [json.loads(row.body)["type"] for row in rows]


async def test_files_are_uploaded_then_the_batch_completed_and_followed_to_success(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "part=a/one.json", "part=a/two.json")

    async with Stage(store, api, clock, root) as running:
        record = await running.until("r1", State.SUCCEEDED)

    batch = api.batches[batch_id]
    assert batch.files == {
        "part=a/one.json": (root / "part=a" / "one.json").read_bytes(),
        "part=a/two.json": (root / "part=a" / "two.json").read_bytes(),
    }
    # COMPLETE after both files, never before; then polls until the final status.
    assert api.endpoints()[:3] == ["files.put", "files.put", "batches.complete"]
    assert set(api.endpoints()[3:]) == {"catalog.status"}
    assert (record.batch_status, record.last_error) == ("success", None)
    assert record.lifecycle is not None
    assert (record.lifecycle.step, record.lifecycle.files_done, record.lifecycle.files_total) == (
        "done",
        2,
        2,
    )
    assert record.lifecycle.record_count == 7
    trail = [change.to_state for change in await store.history("r1")]
    assert trail == [State.PENDING, State.CREATED, State.UPLOADING, State.PROCESSING, State.SUCCEEDED]
    assert events(await store.outbox(10)) == ["batch.created", "batch.succeeded"]
    assert record.to_json()["filesDone"] == 2


async def test_a_large_file_goes_in_parts_and_is_completed_as_a_file(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "big.bin")
    size = (root / "big.bin").stat().st_size

    async with Stage(store, api, clock, root, threshold=100, part_size=400) as running:
        await running.until("r1", State.SUCCEEDED)

    assert api.batches[batch_id].files["big.bin"] == (root / "big.bin").read_bytes()
    patches = [name for endpoint, name in api.calls if endpoint == "files.patch"]
    assert patches == [f"big.bin@{start}" for start in range(0, size, 400)]
    assert api.endpoints().index("files.complete") < api.endpoints().index("batches.complete")


async def test_a_stage_cut_short_mid_file_resumes_where_aep_stands(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "big.bin")
    api.gate = asyncio.Event()  # the second part hangs (the first PATCH passes: see below)

    first = Stage(store, api, clock, root, threshold=100, part_size=400)
    async with first:
        await until(lambda: api.gate is None)  # the first PATCH is in flight, waiting
        await first.shutdown(grace=0)  # the service stops: the call is cut short
    assert "batches.complete" not in api.endpoints()  # never completed early
    assert api.batches[batch_id].status == "loading"

    api.calls.clear()
    async with Stage(store, api, clock, root, threshold=100, part_size=400) as second:
        await second.until("r1", State.SUCCEEDED)
    assert api.batches[batch_id].files["big.bin"] == (root / "big.bin").read_bytes()
    # Looked up, then went on from what AEP had (nothing of the cut part): no second INITIALIZE.
    assert api.endpoints()[0] == "files.head"
    assert "files.initialize" not in api.endpoints()
    assert api.after_complete == []


async def test_a_call_the_closed_gate_refused_puts_the_step_back_uncounted(
    store: SqlBatchStore, root: Path
) -> None:
    """Stopping: the second file's upload never got its turn. The step is due again at once with
    no attempt counted (one attempt in all would otherwise have failed the request and aborted its
    batch); the first file is not sent again."""
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "part=a/one.json", "part=a/two.json")
    api.fail["files.put"] = [None, CallNotSent()]

    async with Stage(store, api, clock, root, max_attempts=1) as running:
        record = await running.until("r1", State.SUCCEEDED)

    assert running.stage.stats.retries == 0
    assert api.batches[batch_id].status == "success"
    puts = [name for endpoint, name in api.calls if endpoint == "files.put"]
    assert puts == ["part=a/one.json", "part=a/two.json", "part=a/two.json"]
    assert record.last_error is None


async def test_a_server_error_is_retried_and_progress_starts_the_count_over(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json", "part=a/two.json")
    # Two failures on the first file, then it is in; two on the second: three in a row would fail.
    api.fail["files.put"] = [http(500), http(503), None, http(500), http(502)]

    async with Stage(store, api, clock, root, max_attempts=3) as running:
        record = await running.until("r1", State.SUCCEEDED)

    assert record.lifecycle is not None
    assert record.lifecycle.files_done == 2
    # The first file is not sent again once it is in.
    assert [name for endpoint, name in api.calls if endpoint == "files.put"] == [
        *["part=a/one.json"] * 3,
        *["part=a/two.json"] * 3,
    ]
    assert running.stage.stats.retries == 4


async def test_failures_in_a_row_without_progress_fail_the_request(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "part=a/one.json")
    api.fail["files.put"] = [http(500), http(503), http(500)]

    async with Stage(store, api, clock, root, max_attempts=3) as running:
        record = await running.until("r1", State.FAILED)

    assert record.last_error is not None
    assert "gave up after 3 attempts" in record.last_error
    assert api.batches[batch_id].status == "aborted"


async def test_a_refused_upload_fails_the_request_and_aborts_its_batch(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "part=a/one.json")
    api.fail["files.put"] = [http(400)]

    async with Stage(store, api, clock, root) as running:
        record = await running.until("r1", State.FAILED)

    assert record.last_error is not None
    assert "HTTP 400" in record.last_error
    assert (record.batch_status, api.batches[batch_id].status) == ("aborted", "aborted")
    assert "batches.complete" not in api.endpoints()
    assert events(await store.outbox(10)) == ["batch.created", "batch.failed"]


async def test_a_file_gone_before_upload_fails_the_request(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json")
    (root / "part=a" / "one.json").unlink()

    async with Stage(store, api, clock, root) as running:
        record = await running.until("r1", State.FAILED)

    assert record.last_error is not None
    assert "no such file" in record.last_error
    assert api.endpoints() == ["batches.abort"]


async def test_aep_failing_the_batch_is_recorded_with_its_error_code(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json")
    api.final = "failed"
    api.final_errors = [{"code": "INGEST-1212-400", "description": "records do not match", "rows": []}]

    async with Stage(store, api, clock, root) as running:
        record = await running.until("r1", State.FAILED)

    assert record.batch_status == "failed"
    assert record.last_error == "INGEST-1212-400 records do not match"
    assert record.lifecycle is not None
    assert record.lifecycle.errors == api.final_errors
    assert record.to_json()["errors"] == api.final_errors


async def test_polls_back_off_from_poll_min_to_poll_max(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json")
    api.processing_polls = 6
    times: list[float] = []

    async with Stage(store, api, clock, root) as running:
        original = api.batch_state

        async def timed(batch_id: str) -> BatchState:
            times.append(clock.monotonic())
            return await original(batch_id)

        api.batch_state = timed  # type: ignore[method-assign]
        await running.until("r1", State.SUCCEEDED)

    gaps = [round(later - earlier) for earlier, later in itertools.pairwise(times)]
    assert gaps == [2, 4, 8, 8, 8, 8]


async def test_requests_without_files_are_left_alone_by_default(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1")

    async with Stage(store, api, clock, root) as running:
        for _ in range(5):
            await running.step()

    record = await store.get("r1")
    assert record is not None
    assert (record.state, record.lifecycle, api.calls) == (State.CREATED, None, [])


@pytest.mark.parametrize("others_complete", [True, False])
async def test_batches_without_files_are_followed_or_aborted_when_asked(
    tmp_path: Path, root: Path, others_complete: bool
) -> None:
    clock, api = ManualClock(), FakeAep()
    track = TrackSettings(poll_min=1, poll_max=8, without_files=True, abort_loading_after=30)
    store = SqlBatchStore(f"sqlite:///{tmp_path}/t.db", track_without_files=True, first_look=1)
    await store.open()
    try:
        batch_id = await created(store, api, clock, "r1")
        async with Stage(store, api, clock, root, track=track) as running:
            await running.step()
            await running.step()
            assert (await running.until("r1", State.CREATED)).state is State.CREATED  # still loading
            if others_complete:
                api.batches[batch_id].status = "processing"  # someone else uploaded and completed
                record = await running.until("r1", State.SUCCEEDED)
                assert record.batch_status == "success"
            else:
                record = await running.until("r1", State.FAILED)
                assert api.batches[batch_id].status == "aborted"
                assert record.last_error is not None
                assert "ABORT_LOADING_AFTER" in record.last_error
                assert clock.monotonic() >= 30
    finally:
        await store.close()


async def test_a_write_under_a_lost_lease_changes_nothing(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json")
    [stale] = await store.claim_stages("a", 1, 10, clock.now())
    clock.advance(11)  # the lease ran out; another worker takes it over
    [fresh] = await store.claim_stages("b", 1, 10, clock.now())
    assert fresh.taken_over

    assert not await store.file_progress(stale, 0, clock.now(), size=1, done=True)
    assert not await store.batch_completed(stale, clock.now(), clock.now())
    assert await store.file_progress(fresh, 0, clock.now(), size=1, done=True)
    record = await store.get("r1")
    assert record is not None
    assert record.lifecycle is not None
    assert (record.state, record.lifecycle.step, record.lifecycle.files_done) == (
        State.UPLOADING,
        "complete",
        1,
    )


async def test_no_token_claims_nothing(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    await created(store, api, clock, "r1", "part=a/one.json")
    api.token_refused = True

    async with Stage(store, api, clock, root):
        await until(lambda: clock.sleepers >= 2)
        clock.advance(5)
        await until(lambda: clock.sleepers >= 2)

    record = await store.get("r1")
    assert record is not None
    assert (record.state, api.calls) == (State.CREATED, [])


async def test_requeued_after_aep_failed_it_starts_its_files_over(store: SqlBatchStore, root: Path) -> None:
    clock, api = ManualClock(), FakeAep()
    first_batch = await created(store, api, clock, "r1", "part=a/one.json")
    api.final = "failed"
    async with Stage(store, api, clock, root) as running:
        await running.until("r1", State.FAILED)

    assert await store.requeue_failed(clock.now()) == ["r1"]
    [claim] = await store.claim("creator", 1, 60, clock.now())
    api.batches["b2"] = AepBatch(DS)
    assert await store.mark_created(claim, "b2", "loading", clock.now())
    api.final = "success"
    async with Stage(store, api, clock, root) as running:
        record = await running.until("r1", State.SUCCEEDED)

    assert record.batch_id == "b2"
    assert api.batches["b2"].files.keys() == {"part=a/one.json"}
    assert api.batches[first_batch].status == "failed"
    assert re.fullmatch(r"done", record.lifecycle.step if record.lifecycle else "")


async def test_a_large_file_aep_will_not_complete_is_sent_again_from_its_start(
    store: SqlBatchStore, root: Path
) -> None:
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "big.bin")
    api.fail["files.complete"] = [http(400, "files.complete")]

    async with Stage(store, api, clock, root, threshold=100, part_size=400) as running:
        record = await running.until("r1", State.SUCCEEDED)

    assert api.batches[batch_id].files["big.bin"] == (root / "big.bin").read_bytes()
    assert api.endpoints().count("files.initialize") == 2  # started over after the refusal
    assert record.batch_status == "success"


async def test_a_file_aep_never_completes_fails_after_the_attempts_despite_its_parts(
    store: SqlBatchStore, root: Path
) -> None:
    # Every round sends all its parts (progress) and then is refused: that is no progress, so the
    # failures in a row add up and the request fails instead of sending the file forever.
    clock, api = ManualClock(), FakeAep()
    batch_id = await created(store, api, clock, "r1", "big.bin")
    api.fail["files.complete"] = [http(400, "files.complete")] * 10

    async with Stage(store, api, clock, root, threshold=100, part_size=400, max_attempts=3) as running:
        record = await running.until("r1", State.FAILED)

    assert api.endpoints().count("files.complete") == 3
    assert record.last_error is not None
    assert "gave up after 3 attempts" in record.last_error
    assert api.batches[batch_id].status == "aborted"
