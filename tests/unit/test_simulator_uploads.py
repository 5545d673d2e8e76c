"""The simulator's file uploads and the rest of the batch lifecycle (COMPLETE, processing, outcome),
driven over real sockets by a real aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import tracemalloc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from orchestrator.aep.simulator import Simulator, SimulatorConfig, add_arguments, config_from_args
from orchestrator.clock import ManualClock
from tests.unit.fakes import until

IMPORT = "/data/foundation/import/batches"
CATALOG = "/data/foundation/catalog/batches"
DATASET = "5c8c3c555033b814b69f947f"
OCTET = {"Content-Type": "application/octet-stream"}
NOT_FOUND = "The batch or dataset resource is not found."


@dataclass
class Api:
    """One started simulator and a client holding a valid token for it."""

    simulator: Simulator
    session: aiohttp.ClientSession
    url: str
    token: str

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        config = self.simulator.config
        return {
            "Authorization": f"Bearer {self.token}",
            "x-api-key": config.client_id,
            "x-gw-ims-org-id": config.org_id,
            "x-sandbox-name": "prod",
            **(extra or {}),
        }

    def file_url(self, batch_id: str, name: str, dataset: str = DATASET) -> URL:
        # Encoded as given, so a test can send `..` or `//` that a client would otherwise normalize.
        return URL(f"{self.url}{IMPORT}/{batch_id}/datasets/{dataset}/files/{name}", encoded=True)

    async def create(self, dataset: str = DATASET) -> str:
        async with self.session.post(
            self.url + IMPORT, json={"datasetId": dataset}, headers=self.headers()
        ) as resp:
            assert resp.status == 201
            batch_id: str = (await resp.json())["id"]
            return batch_id

    async def put(
        self, batch_id: str, name: str, data: Any, dataset: str = DATASET, content_type: str | None = None
    ) -> tuple[int, Any]:
        headers = self.headers({"Content-Type": content_type or OCTET["Content-Type"]})
        async with self.session.put(
            self.file_url(batch_id, name, dataset), data=data, headers=headers
        ) as resp:
            return resp.status, await _body(resp)

    async def file_action(self, batch_id: str, name: str, action: str) -> tuple[int, Any]:
        url = self.file_url(batch_id, name).with_query(action=action)
        async with self.session.post(url, headers=self.headers()) as resp:
            return resp.status, await _body(resp)

    async def patch(
        self, batch_id: str, name: str, data: bytes, content_range: str
    ) -> tuple[int, Any, Mapping[str, str]]:
        headers = self.headers({**OCTET, "Content-Range": content_range})
        async with self.session.patch(self.file_url(batch_id, name), data=data, headers=headers) as resp:
            return resp.status, await _body(resp), resp.headers

    async def head(self, batch_id: str, name: str) -> tuple[int, Mapping[str, str]]:
        async with self.session.head(self.file_url(batch_id, name), headers=self.headers()) as resp:
            return resp.status, resp.headers

    async def batch_action(self, batch_id: str, action: str) -> tuple[int, Any]:
        async with self.session.post(
            f"{self.url}{IMPORT}/{batch_id}", params={"action": action}, headers=self.headers()
        ) as resp:
            return resp.status, await _body(resp)

    async def batch(self, batch_id: str, **params: str) -> dict[str, Any]:
        async with self.session.get(
            f"{self.url}{CATALOG}/{batch_id}", params=params, headers=self.headers()
        ) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            assert list(body) == [batch_id]
            found: dict[str, Any] = body[batch_id]
            return found

    async def own(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            assert resp.status == 200
            return await resp.json()


async def _body(resp: aiohttp.ClientResponse) -> Any:
    if resp.content_type == "application/json":
        return await resp.json()
    return await resp.read()


Start = Callable[..., Any]


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    """`await start(clock=None, **config)` -> Api; every simulator started is stopped after."""
    started: list[Simulator] = []
    async with aiohttp.ClientSession() as session:

        async def make(clock: ManualClock | None = None, **options: Any) -> Api:
            simulator = Simulator(SimulatorConfig(seed=7, **options), clock=clock)
            started.append(simulator)
            url = await simulator.start()
            return Api(simulator, session, url, simulator.issue_token())

        yield make
        for simulator in started:
            await simulator.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_problem(body: Any, status: int, detail: str) -> None:
    assert body["type"] == "/placeholder/type/uri"
    assert body["status"] == status
    assert detail in body["detail"], body


# Small files


async def test_small_put_is_stored_byte_for_byte_with_partition_folders(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    first = b'{"a": 1}\n{"a": 2}\n'
    second = bytes(range(256)) * 3  # not text: stored as sent
    assert await api.put(batch_id, "part=a/x.json", first) == (201, b"")
    assert await api.put(batch_id, "part%3Db/deep/y.json", second) == (201, b"")  # percent-decoded
    replacement = b'{"a": 3}\n'
    assert await api.put(batch_id, "part=a/x.json", replacement) == (200, b"")  # PUT is idempotent

    files = api.simulator.files(batch_id)
    assert files == {
        "part=a/x.json": {"size": len(replacement), "sha256": sha(replacement), "complete": True},
        "part=b/deep/y.json": {"size": len(second), "sha256": sha(second), "complete": True},
    }
    stored = api.simulator.files_of(batch_id)
    assert stored["part=b/deep/y.json"].path.read_bytes() == second
    assert await api.own("/_sim/files") == {
        batch_id: {"datasetId": DATASET, "status": "loading", "files": files}
    }
    stats = api.simulator.stats
    assert (stats.count("files.put", 201), stats.count("files.put", 200)) == (2, 1)
    assert stats.files_stored == 3


async def test_put_needs_an_octet_stream_content_type(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    status, body = await api.put(batch_id, "x.json", b"{}", content_type="application/json")
    assert status == 415
    assert body == {
        "type": "/placeholder/type/uri",
        "status": 415,
        "title": "UnsupportedMediaTypeError",
        "detail": "The uploaded file media type isn't supported.",
    }
    assert api.simulator.stats.header_rejections == 1
    assert api.simulator.files(batch_id) == {}


async def test_put_goes_through_the_gateway_checks(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    headers = {**api.headers(OCTET), "Authorization": "Bearer unknown"}
    async with api.session.put(api.file_url(batch_id, "x.json"), data=b"1\n", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error_code"] == "401013"
    assert api.simulator.files(batch_id) == {}
    assert api.simulator.stats.count("files.put", 401) == 1


async def test_a_dataset_that_is_not_the_batchs_is_404(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    status, body = await api.put(batch_id, "x.json", b"1\n", dataset="another-dataset")
    assert status == 404
    assert_problem(body, 404, NOT_FOUND)
    status, body = await api.put("f" * 32, "x.json", b"1\n")
    assert status == 404
    assert api.simulator.files(batch_id) == {}


@pytest.mark.parametrize("name", ["a/%2E%2E/x.json", "..", "a//x.json", "./x.json", "a/"])
async def test_file_paths_with_empty_or_dot_segments_are_400(start: Start, name: str) -> None:
    api: Api = await start()
    batch_id = await api.create()
    status, body = await api.put(batch_id, name, b"1\n")
    assert status == 400
    assert_problem(body, 400, "must not have empty, '.' or '..' segments")
    assert api.simulator.files(batch_id) == {}


# Large files


async def test_large_file_in_parts_with_a_resume_and_a_gap(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    data = bytes(range(30))
    name = "part=1/big.parquet"
    assert await api.file_action(batch_id, name, "INITIALIZE") == (201, b"")
    status, headers = await api.head(batch_id, name)
    assert status == 200
    assert "Range" not in headers  # nothing received yet

    status, body, headers = await api.patch(batch_id, name, data[:10], "bytes 0-9/30")
    assert (status, body, headers["Range"]) == (200, {"name": name, "sizeInBytes": 10}, "bytes=0-9")
    status, body, headers = await api.patch(batch_id, name, data[20:], "bytes 20-29/30")
    assert (status, body, headers["Range"]) == (200, {"name": name, "sizeInBytes": 20}, "bytes=0-9")
    assert (await api.head(batch_id, name))[1]["Range"] == "bytes=0-9"  # where to resume from

    status, body = await api.file_action(batch_id, name, "COMPLETE")
    assert status == 400
    assert_problem(body, 400, "bytes 10-19 of 30 were never uploaded")
    assert api.simulator.files(batch_id)[name]["complete"] is False

    _, _, headers = await api.patch(batch_id, name, data[10:20], "bytes 10-19")  # no total: fine
    assert headers["Range"] == "bytes=0-29"
    assert (await api.patch(batch_id, name, data[:10], "bytes 0-9/30"))[0] == 200  # a retried part
    assert await api.file_action(batch_id, name, "COMPLETE") == (200, b"")
    assert await api.file_action(batch_id, name, "COMPLETE") == (200, b"")  # retrying is safe
    assert api.simulator.files(batch_id) == {name: {"size": 30, "sha256": sha(data), "complete": True}}
    assert api.simulator.files_of(batch_id)[name].path.read_bytes() == data
    stats = api.simulator.stats
    assert stats.count("files.initialize", 201) == 1
    assert stats.count("files.patch", 200) == 4
    assert stats.count("files.head", 200) == 2
    assert (stats.count("files.complete", 400), stats.count("files.complete", 200)) == (1, 2)
    assert stats.files_stored == 1


async def test_parts_sent_twice_with_different_bytes_fail_the_file_completion(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    await api.file_action(batch_id, "f.json", "INITIALIZE")
    await api.patch(batch_id, "f.json", b"0123456789", "bytes 0-9/10")
    assert (await api.patch(batch_id, "f.json", b"xy", "bytes 4-5/10"))[0] == 200  # checked at completion
    status, body = await api.file_action(batch_id, "f.json", "COMPLETE")
    assert status == 400
    assert_problem(body, 400, "bytes 4-5 were uploaded twice with different content")


@pytest.mark.parametrize(
    ("initialize", "data", "content_range", "detail"),
    [
        (False, b"0123456789", "bytes 0-9/10", "was not initialized"),
        (True, b"0123456789", "0-9/10", "is not 'bytes <start>-<end>[/<total>]'"),
        (True, b"0123456789", "bytes 9-0", "ends before it starts"),
        (True, b"0123456789", "bytes 0-9/5", "ends past the file's size"),
        (True, b"01234", "bytes 0-9/10", "The body has 5 bytes; the Content-Range says 10"),
    ],
)
async def test_bad_parts_are_400_and_not_received(
    start: Start, initialize: bool, data: bytes, content_range: str, detail: str
) -> None:
    api: Api = await start()
    batch_id = await api.create()
    if initialize:
        await api.file_action(batch_id, "f.json", "INITIALIZE")
    status, body, headers = await api.patch(batch_id, "f.json", data, content_range)
    assert status == 400
    assert_problem(body, 400, detail)
    assert "Range" not in headers
    if initialize:
        assert "Range" not in (await api.head(batch_id, "f.json"))[1]


async def test_a_chunked_part_of_the_wrong_length_is_not_received(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    await api.file_action(batch_id, "f.json", "INITIALIZE")
    await api.patch(batch_id, "f.json", b"01234", "bytes 0-4/15")

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: the length shows at the end
        yield b"56789"
        yield b"abcdef"

    headers = api.headers({**OCTET, "Content-Range": "bytes 5-14/15"})
    async with api.session.patch(api.file_url(batch_id, "f.json"), data=body(), headers=headers) as resp:
        assert resp.status == 400
        assert_problem(await resp.json(), 400, "The body has 11 bytes; the Content-Range says 10")
    assert (await api.head(batch_id, "f.json"))[1]["Range"] == "bytes=0-4"
    assert (await api.patch(batch_id, "f.json", b"56789abcde", "bytes 5-14/15"))[0] == 200
    assert (await api.file_action(batch_id, "f.json", "COMPLETE"))[0] == 200
    assert api.simulator.files_of(batch_id)["f.json"].path.read_bytes() == b"0123456789abcde"


async def test_head_of_a_missing_file_is_404(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    assert (await api.head(batch_id, "nothing.json"))[0] == 404
    await api.put(batch_id, "small.json", b"12345")
    status, headers = await api.head(batch_id, "small.json")
    assert (status, headers["Range"]) == (200, "bytes=0-4")


async def test_reinitializing_an_unfinished_file_starts_it_again(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    await api.file_action(batch_id, "f.json", "INITIALIZE")
    await api.patch(batch_id, "f.json", b"0123456789", "bytes 0-9/20")
    assert await api.file_action(batch_id, "f.json", "INITIALIZE") == (201, b"")
    assert "Range" not in (await api.head(batch_id, "f.json"))[1]
    assert (await api.patch(batch_id, "f.json", b"abc", "bytes 0-2/3"))[0] == 200  # a new size is fine
    assert (await api.file_action(batch_id, "f.json", "COMPLETE"))[0] == 200
    assert api.simulator.files(batch_id)["f.json"]["sha256"] == sha(b"abc")


# Batch COMPLETE and processing


async def test_complete_processes_then_succeeds_with_record_counts(start: Start) -> None:
    clock = ManualClock()
    api: Api = await start(clock, processing_time=5.0)
    batch_id = await api.create()
    await api.put(batch_id, "part=a/1.json", b'{"n": 1}\n{"n": 2}\n')
    await api.put(batch_id, "part=b/2.json", b'{"n": 3}\n{"n": 4}')  # no final newline: still 2
    completed = int(clock.now().timestamp() * 1000)
    assert await api.batch_action(batch_id, "COMPLETE") == (200, b"")

    batch = await api.batch(batch_id)
    assert (batch["status"], batch["completed"], batch["updated"]) == ("processing", completed, completed)
    assert "recordCount" not in batch
    clock.advance(4.9)
    assert (await api.batch(batch_id))["status"] == "processing"
    assert await api.batch_action(batch_id, "COMPLETE") == (200, b"")  # retrying is safe
    clock.advance(0.1)
    batch = await api.batch(batch_id)
    assert batch["status"] == "success"
    assert batch["updated"] == completed + 5000
    assert (batch["recordCount"], batch["failedRecordCount"]) == (4, 0)
    assert batch["metrics"] == {"inputFileCount": 2, "inputByteSize": 35, "outputRecordCount": 4}
    assert "errors" not in batch

    assert await api.batch_action(batch_id, "COMPLETE") == (200, b"")
    assert (await api.batch_action(batch_id, "ABORT"))[0] == 400  # finalized
    async with api.session.get(
        api.url + CATALOG, params={"status": "success"}, headers=api.headers()
    ) as resp:
        assert list(await resp.json()) == [batch_id]
    stats = api.simulator.stats
    assert stats.completed_batches == 1
    assert stats.count("batches.complete", 200) == 3
    assert stats.count("batches.abort", 400) == 1
    assert (await api.own("/_sim/files"))[batch_id]["status"] == "success"


async def test_a_processing_batch_can_still_be_aborted(start: Start) -> None:
    clock = ManualClock()
    api: Api = await start(clock, processing_time=5.0)
    batch_id = await api.create()
    await api.put(batch_id, "x.json", b"1\n")
    await api.batch_action(batch_id, "COMPLETE")
    assert await api.batch_action(batch_id, "ABORT") == (200, b"")
    clock.advance(10)
    assert (await api.batch(batch_id))["status"] == "aborted"
    assert (await api.batch_action(batch_id, "COMPLETE"))[0] == 400
    assert api.simulator.live_batches() == {batch_id: []}


async def test_complete_waits_for_unfinished_large_files(start: Start) -> None:
    api: Api = await start(ManualClock(), processing_time=0.0)
    batch_id = await api.create()
    await api.file_action(batch_id, "big.json", "INITIALIZE")
    await api.patch(batch_id, "big.json", b"1\n", "bytes 0-1/2")
    status, body = await api.batch_action(batch_id, "COMPLETE")
    assert status == 400
    assert_problem(body, 400, "files initialized but not completed: big.json")
    assert (await api.batch(batch_id))["status"] == "loading"
    await api.file_action(batch_id, "big.json", "COMPLETE")
    assert (await api.batch_action(batch_id, "COMPLETE"))[0] == 200
    assert (await api.batch(batch_id))["recordCount"] == 1


@pytest.mark.parametrize(
    ("files", "dataset", "records", "code", "description"),
    [
        ({"a.json": b"1\n2\n3\n"}, "ds-bad", 3, "INGEST-1212-400", "Encountered 3 errors in the data"),
        ({}, DATASET, 0, "106", "Dataset file is empty. Please upload file with data."),
        ({"a.json": b"1\n", "b.json": b""}, DATASET, 1, "106", "Dataset file is empty."),
    ],
)
async def test_batches_fail_with_errors(
    start: Start, files: dict[str, bytes], dataset: str, records: int, code: str, description: str
) -> None:
    api: Api = await start(ManualClock(), processing_time=0.0, fail_datasets=frozenset({"ds-bad"}))
    batch_id = await api.create(dataset)
    for name, data in files.items():
        assert (await api.put(batch_id, name, data, dataset=dataset))[0] == 201
    assert (await api.batch_action(batch_id, "COMPLETE"))[0] == 200
    batch = await api.batch(batch_id)
    assert batch["status"] == "failed"
    assert (batch["recordCount"], batch["failedRecordCount"]) == (records, records)
    assert batch["metrics"]["outputRecordCount"] == 0
    [error] = batch["errors"]
    assert (error["code"], error["rows"]) == (code, [])
    assert error["description"].startswith(description)
    assert api.simulator.live_batches() == {batch_id: []}  # failed is dead


async def test_uploads_after_complete_are_refused_and_counted(start: Start) -> None:
    api: Api = await start(ManualClock(), processing_time=1.0)
    batch_id = await api.create()
    await api.put(batch_id, "x.json", b"1\n")
    await api.batch_action(batch_id, "COMPLETE")
    status, body = await api.put(batch_id, "y.json", b"2\n")
    assert status == 400
    assert_problem(body, 400, f"Batch {batch_id} is processing: files can no longer be added")
    assert (await api.file_action(batch_id, "z.json", "INITIALIZE"))[0] == 400
    assert (await api.patch(batch_id, "x.json", b"2\n", "bytes 0-1"))[0] == 400
    assert await api.file_action(batch_id, "x.json", "COMPLETE") == (200, b"")  # finished: a retry

    aborted = await api.create()
    await api.batch_action(aborted, "ABORT")
    status, body = await api.put(aborted, "y.json", b"2\n")
    assert_problem(body, 400, f"Batch {aborted} is aborted: files can no longer be added")

    assert list(api.simulator.files(batch_id)) == ["x.json"]
    assert api.simulator.files(aborted) == {}
    stats = await api.own("/_sim/stats")
    assert (stats["uploads_after_complete"], stats["files_stored"], stats["completed_batches"]) == (4, 1, 1)


# Faults


async def test_upload_error_rate_answers_500_and_stores_nothing(start: Start) -> None:
    api: Api = await start(upload_error_rate=1.0)
    batch_id = await api.create()
    status, body = await api.put(batch_id, "x.json", b"1\n")
    assert status == 500
    assert_problem(body, 500, "An internal server error has occurred.")
    assert (await api.file_action(batch_id, "y.json", "INITIALIZE"))[0] == 500
    assert (await api.patch(batch_id, "y.json", b"1\n", "bytes 0-1"))[0] == 500
    assert (await api.file_action(batch_id, "y.json", "COMPLETE"))[0] == 500
    assert (await api.head(batch_id, "x.json"))[0] == 404  # HEAD reads only: never an upload error
    assert api.simulator.stats.faults["upload_error"] == 4
    assert api.simulator.files(batch_id) == {}
    assert await api.own("/_sim/files") == {}


async def test_throttling_and_general_faults_apply_to_uploads(start: Start) -> None:
    clock = ManualClock()
    api: Api = await start(clock, rate_limit=2)
    batch_id = await api.create()
    assert (await api.put(batch_id, "x.json", b"1\n"))[0] == 201
    status, body = await api.put(batch_id, "y.json", b"2\n")
    assert (status, body) == (429, {"error_code": "429050", "message": "Too many requests"})
    assert list(api.simulator.files(batch_id)) == ["x.json"]

    api.simulator.config = SimulatorConfig(unavailable_rate=1.0)
    assert (await api.put(batch_id, "y.json", b"2\n"))[0] == 503
    assert (await api.head(batch_id, "x.json"))[0] == 503
    assert list(api.simulator.files(batch_id)) == ["x.json"]


async def test_a_body_cut_short_stores_nothing(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api: Api = await start()
    batch_id = await api.create()
    url = api.file_url(batch_id, "cut.json")
    head = [f"PUT {url.raw_path} HTTP/1.1", f"Host: {url.host}:{url.port}", "Content-Length: 1000"]
    head += [f"{key}: {value}" for key, value in api.headers(OCTET).items()]
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b"only ten b")
    await writer.drain()
    writer.close()  # 990 bytes short
    await writer.wait_closed()
    await until(lambda: api.simulator.stats.count("files.put") == 1)
    assert api.simulator.stats.count("files.put", 400) == 1
    assert api.simulator.files(batch_id) == {}
    root = api.simulator.files_root
    assert root is None or list(root.rglob("*.bin")) == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_large_streamed_put_is_not_held_in_memory(start: Start) -> None:
    api: Api = await start()
    batch_id = await api.create()
    chunk = b"x" * (1 << 20)
    size = 48 * len(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk  # the same object each time: the client allocates nothing per chunk

    tracemalloc.start()
    try:
        status, _ = await api.put(batch_id, "big.json", body())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 201
    # The peak (client and server together) is a few buffers, about 4 MiB whatever the size.
    assert peak < size // 4, f"peak {peak} bytes for a {size} byte upload"
    digest = hashlib.sha256()
    for _ in range(size // len(chunk)):
        digest.update(chunk)
    assert api.simulator.files(batch_id)["big.json"] == {
        "size": size,
        "sha256": digest.hexdigest(),
        "complete": True,
    }


# Catalog, inspection, configuration


async def test_catalog_get_honours_properties(start: Start) -> None:
    api: Api = await start(ManualClock(), processing_time=0.0)
    batch_id = await api.create()
    await api.put(batch_id, "x.json", b"1\n2\n")
    await api.batch_action(batch_id, "COMPLETE")
    selected = await api.batch(batch_id, properties="status,recordCount, metrics,unknownField")
    assert selected == {
        "status": "success",
        "recordCount": 2,
        "metrics": {"inputFileCount": 1, "inputByteSize": 4, "outputRecordCount": 2},
    }


async def test_reset_and_stop_remove_the_files(start: Start, tmp_path: Path) -> None:
    api: Api = await start(files_dir=str(tmp_path / "uploads"))
    batch_id = await api.create()
    await api.put(batch_id, "x.json", b"1\n")
    [root] = (tmp_path / "uploads").iterdir()
    assert len(list(root.rglob("*.bin"))) == 1
    async with api.session.post(api.url + "/_sim/reset") as resp:
        assert resp.status == 200
    assert not root.exists()
    assert await api.own("/_sim/files") == {}
    assert (await api.put(batch_id, "x.json", b"1\n"))[0] == 404  # the batch is forgotten too

    batch_id = await api.create()
    await api.put(batch_id, "x.json", b"1\n")
    [root] = (tmp_path / "uploads").iterdir()
    await api.simulator.stop()
    assert list((tmp_path / "uploads").iterdir()) == []


def test_cli_flags_for_uploads_and_processing() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--processing-time", "2.5", "--upload-error-rate", "0.1", "--files-dir", "/tmp/sim"),
            *("--fail-dataset", "a", "--fail-dataset", "b"),
        ]
    )
    config = config_from_args(args)
    assert config.processing_time == 2.5
    assert config.upload_error_rate == 0.1
    assert config.files_dir == "/tmp/sim"
    assert config.fail_datasets == frozenset({"a", "b"})
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.processing_time, defaults.fail_datasets, defaults.files_dir) == (0.5, frozenset(), None)
    with pytest.raises(ValueError, match="upload_error_rate"):
        SimulatorConfig(upload_error_rate=2.0)
    with pytest.raises(ValueError, match="processing_time"):
        SimulatorConfig(processing_time=-1.0)
