"""The client's upload calls against aioresponses: exact URLs, headers and streamed bodies, parsed
answers (`Range`, the batch's status) and typed failures."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from orchestrator.aep.api import BatchState
from orchestrator.aep.auth import TokenRefused
from orchestrator.aep.client import AepClient, error_text
from orchestrator.aep.errors import AepHttpError
from tests.unit.fakes import aep_settings

BATCHES = "https://platform.adobe.io/data/foundation/import/batches"
CATALOG = "https://platform.adobe.io/data/foundation/catalog/batches"
DATASET = "5c8c3c555033b814b69f947f"
BATCH = "01JDXQ3W3V9Y6Q7Z8K2M4N5P6R"
FILE_URL = f"{BATCHES}/{BATCH}/datasets/{DATASET}/files/part=a/x.json"
STATUS_URL = re.compile(rf"^{re.escape(CATALOG)}/{BATCH}\?properties=.*$")
DATA = b'{"a": 1}\n{"a": 2}\n'


class FakeTokens:
    """tok-1, then tok-2 after a refresh of tok-1 (unless the token is fixed)."""

    def __init__(self, *, fixed: bool = False) -> None:
        self.current = "tok-1"
        self.refreshed: list[str] = []
        self.fixed = fixed
        self.ready = True
        self.problem: str | None = None

    async def token(self) -> str:
        return self.current

    async def refresh(self, stale: str) -> str:
        self.refreshed.append(stale)
        if not self.fixed and stale == self.current:
            self.current = "tok-2"
        return self.current


class Body:
    """A body factory that counts how often it is opened, and streams `data` in small chunks."""

    def __init__(self, data: bytes = DATA, chunk: int = 5) -> None:
        self.data = data
        self.chunk = chunk
        self.opened = 0

    def __call__(self) -> AsyncIterator[bytes]:
        self.opened += 1
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            yield self.data[start : start + self.chunk]


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
def client(session: aiohttp.ClientSession, tokens: FakeTokens) -> AepClient:
    settings = aep_settings(base_url="https://platform.adobe.io", sandbox="dev-1", timeout=30.0)
    return AepClient(settings, session, tokens)


def calls(mock: aioresponses, method: str, url: str | URL) -> list[Any]:
    return list(mock.requests.get((method, URL(url) if isinstance(url, str) else url), []))


def only_call(mock: aioresponses) -> tuple[str, URL, Any]:
    [(key, items)] = mock.requests.items()
    [call] = items
    return key[0], key[1], call


# --- file URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("x.json", "x.json"),
        ("part=a/x.json", "part=a/x.json"),
        ("exports/part=a/part=b/x.parquet", "exports/part=a/part=b/x.parquet"),
        ("a b/c%d.json", "a%20b/c%25d.json"),
        ("q?x#y.json", "q%3Fx%23y.json"),
        ("x%2F..%2Fy.json", "x%252F..%252Fy.json"),
        ("dé/ü.csv", "d%C3%A9/%C3%BC.csv"),
    ],
)
async def test_put_file_sends_the_bytes_to_the_file_url(
    mock: aioresponses, client: AepClient, name: str, path: str
) -> None:
    url = f"{BATCHES}/{BATCH}/datasets/{DATASET}/files/{path}"
    mock.put(url, status=200)
    body = Body()

    await client.put_file(BATCH, DATASET, name, body, len(DATA))

    method, sent, call = only_call(mock)
    assert method == "PUT"
    assert str(sent) == url  # folders stay path segments, each segment percent-encoded on its own
    assert sent.raw_path.endswith("/files/" + path)
    assert call.kwargs["params"] is None
    headers = call.kwargs["headers"]
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Authorization"] == "Bearer tok-1"
    assert headers["x-sandbox-name"] == "dev-1"
    assert "Content-Range" not in headers
    assert call.kwargs["data"] == DATA  # aioresponses drains the streamed body
    assert body.opened == 1


async def test_put_file_accepts_201(mock: aioresponses, client: AepClient) -> None:
    mock.put(FILE_URL, status=201)
    await client.put_file(BATCH, DATASET, "part=a/x.json", Body(), len(DATA))
    assert len(calls(mock, "PUT", FILE_URL)) == 1


async def test_put_part_sends_its_range(mock: aioresponses, client: AepClient) -> None:
    mock.patch(FILE_URL, status=200)
    part = b"0123456789"
    body = Body(part, chunk=3)

    await client.put_part(BATCH, DATASET, "part=a/x.json", 256, body, len(part), 1000)

    [call] = calls(mock, "PATCH", FILE_URL)
    headers = call.kwargs["headers"]
    assert headers["Content-Range"] == "bytes 256-265/1000"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == "10"
    assert headers["Authorization"] == "Bearer tok-1"
    assert call.kwargs["params"] is None
    assert call.kwargs["data"] == part
    assert body.opened == 1


@pytest.mark.parametrize(
    ("start", "length", "total", "expected"), [(0, 1, 1, "bytes 0-0/1"), (90, 10, 100, "bytes 90-99/100")]
)
async def test_put_part_ranges_are_inclusive(
    mock: aioresponses, client: AepClient, start: int, length: int, total: int, expected: str
) -> None:
    mock.patch(FILE_URL, status=204)
    await client.put_part(BATCH, DATASET, "part=a/x.json", start, Body(b"x" * length), length, total)
    [call] = calls(mock, "PATCH", FILE_URL)
    assert call.kwargs["headers"]["Content-Range"] == expected


@pytest.mark.parametrize(
    ("method", "action"), [("initialize_file", "INITIALIZE"), ("complete_file", "COMPLETE")]
)
async def test_file_actions_post_the_action(
    mock: aioresponses, client: AepClient, method: str, action: str
) -> None:
    mock.post(f"{FILE_URL}?action={action}", status=200)

    await getattr(client, method)(BATCH, DATASET, "part=a/x.json")

    verb, sent, call = only_call(mock)
    assert verb == "POST"
    assert sent == URL(f"{FILE_URL}?action={action}")
    assert call.kwargs["params"] == {"action": action}
    assert call.kwargs["data"] is None
    assert "Content-Length" not in call.kwargs["headers"]
    assert "Content-Type" not in call.kwargs["headers"]


async def test_complete_batch_posts_the_action_on_the_batch(mock: aioresponses, client: AepClient) -> None:
    mock.post(f"{BATCHES}/{BATCH}?action=COMPLETE", status=200)

    await client.complete_batch(BATCH)

    verb, sent, call = only_call(mock)
    assert (verb, sent) == ("POST", URL(f"{BATCHES}/{BATCH}?action=COMPLETE"))
    assert call.kwargs["params"] == {"action": "COMPLETE"}
    assert call.kwargs["headers"]["Authorization"] == "Bearer tok-1"


# --- file_received ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "received"),
    [
        ({"Range": "bytes=0-1023"}, 1024),
        ({"Range": "bytes 0-0"}, 1),
        ({"Range": "0 - 52428799"}, 52428800),
        ({}, 0),
    ],
)
async def test_file_received_reads_the_range(
    mock: aioresponses, client: AepClient, headers: dict[str, str], received: int
) -> None:
    mock.head(FILE_URL, status=200, headers=headers)

    assert await client.file_received(BATCH, DATASET, "part=a/x.json") == received

    verb, sent, call = only_call(mock)
    assert (verb, sent) == ("HEAD", URL(FILE_URL))
    assert call.kwargs["params"] is None


async def test_file_received_of_an_unknown_file_is_none(mock: aioresponses, client: AepClient) -> None:
    mock.head(FILE_URL, status=404)
    assert await client.file_received(BATCH, DATASET, "part=a/x.json") is None


# --- batch_state ----------------------------------------------------------------------------------


async def test_batch_state_asks_for_the_status_properties(mock: aioresponses, client: AepClient) -> None:
    mock.get(STATUS_URL, status=200, payload={BATCH: {"status": "processing"}})

    state = await client.batch_state(BATCH)

    assert state == BatchState(status="processing")
    verb, sent, call = only_call(mock)
    assert verb == "GET"
    assert sent.path == f"/data/foundation/catalog/batches/{BATCH}"
    properties = call.kwargs["params"]["properties"]
    assert set(properties.split(",")) >= {"status", "errors", "recordCount", "failedRecordCount", "metrics"}
    assert sent.query["properties"] == properties


async def test_batch_state_keeps_errors_and_counts(mock: aioresponses, client: AepClient) -> None:
    entry = {
        "status": "failed",
        "recordCount": 10,
        "failedRecordCount": 3,
        "errors": [
            {
                "code": "INGEST-1212-400",
                "description": "Bad row",
                "rows": ["1", 2, "x" * 50],
                "extra": "dropped",
            },
            {"code": 42, "description": {"nested": True}},
            "not an error object",
        ],
        "metrics": {"outputRecordCount": 99, "inputRecordCount": 100},
        "tags": {"ignored": ["yes"]},
    }
    mock.get(STATUS_URL, status=200, payload={BATCH: entry})

    state = await client.batch_state(BATCH)

    assert state.status == "failed"
    assert state.record_count == 10
    assert state.failed_record_count == 3
    assert state.errors == [
        {"code": "INGEST-1212-400", "description": "Bad row", "rows": ["1", "2", "x" * 40]},
        {"code": 42, "description": '{"nested": true}'},
    ]


async def test_batch_state_bounds_the_errors(mock: aioresponses, client: AepClient) -> None:
    errors = [{"code": f"E{i}", "description": "d" * 1000, "rows": list(range(50))} for i in range(30)]
    mock.get(STATUS_URL, status=200, payload={BATCH: {"status": "failed", "errors": errors}})

    state = await client.batch_state(BATCH)

    assert len(state.errors) == 20
    assert all(len(error["description"]) == 300 for error in state.errors)
    assert all(len(error["rows"]) == 20 for error in state.errors)


async def test_batch_state_falls_back_to_the_metrics(mock: aioresponses, client: AepClient) -> None:
    entry = {
        "status": "success",
        "metrics": {"outputRecordCount": 7, "inputRecordCount": 9, "failedRecordCount": 2},
    }
    mock.get(STATUS_URL, status=200, payload={BATCH: entry})

    state = await client.batch_state(BATCH)

    assert (state.record_count, state.failed_record_count) == (7, 2)
    assert state.errors == []


async def test_batch_state_falls_back_to_the_input_count(mock: aioresponses, client: AepClient) -> None:
    mock.get(
        STATUS_URL, status=200, payload={BATCH: {"status": "success", "metrics": {"inputRecordCount": 9}}}
    )
    state = await client.batch_state(BATCH)
    assert (state.record_count, state.failed_record_count) == (9, None)


async def test_batch_state_without_counts(mock: aioresponses, client: AepClient) -> None:
    entry = {"status": "success", "recordCount": "10", "failedRecordCount": True, "metrics": "no"}
    mock.get(STATUS_URL, status=200, payload={BATCH: entry})
    state = await client.batch_state(BATCH)
    assert (state.record_count, state.failed_record_count) == (None, None)


async def test_batch_state_keeps_an_output_count_of_zero(mock: aioresponses, client: AepClient) -> None:
    entry = {"status": "failed", "metrics": {"outputRecordCount": 0, "inputRecordCount": 100}}
    mock.get(STATUS_URL, status=200, payload={BATCH: entry})

    state = await client.batch_state(BATCH)

    assert state.record_count == 0


async def test_batch_state_accepts_a_single_entry_under_another_key(
    mock: aioresponses, client: AepClient
) -> None:
    mock.get(STATUS_URL, status=200, payload={"other": {"status": "staging"}})
    assert (await client.batch_state(BATCH)).status == "staging"


@pytest.mark.parametrize(
    "payload",
    [
        {BATCH: {"recordCount": 3}},
        {BATCH: {"status": 5}},
        {"a": {"status": "success"}, "b": {"status": "success"}},
        {BATCH: "success"},
        [],
        {},
    ],
)
async def test_batch_state_without_a_status_is_an_error(
    mock: aioresponses, client: AepClient, payload: Any
) -> None:
    mock.get(STATUS_URL, status=200, payload=payload)

    with pytest.raises(AepHttpError) as caught:
        await client.batch_state(BATCH)

    assert caught.value.status == 200
    assert caught.value.endpoint == "catalog.status"


async def test_batch_state_of_a_body_that_is_not_json_is_an_error(
    mock: aioresponses, client: AepClient
) -> None:
    mock.get(STATUS_URL, status=200, body="<html>gateway</html>")
    with pytest.raises(AepHttpError, match="without the status"):
        await client.batch_state(BATCH)


# --- error_text -----------------------------------------------------------------------------------


def test_error_text_joins_code_and_description() -> None:
    errors: list[dict[str, Any]] = [
        {"code": "INGEST-1212-400", "description": "Bad row", "rows": ["1"]},
        {"code": "E2"},
        {"description": "only a description"},
        {"rows": ["3"]},
    ]
    assert error_text(errors) == "INGEST-1212-400 Bad row; E2; only a description"


def test_error_text_of_nothing_is_none() -> None:
    assert error_text([]) is None
    assert error_text([{"rows": ["1"]}, {"code": "", "description": None}]) is None


def test_error_text_is_bounded() -> None:
    text = error_text([{"code": f"E{i}", "description": "d" * 100} for i in range(20)])
    assert text is not None
    assert len(text) == 500
    assert text.startswith("E0 " + "d" * 100 + "; E1 ")


# --- failures -------------------------------------------------------------------------------------

Call = Callable[[AepClient], Awaitable[Any]]
NAME = "part=a/x.json"

FILE_CALLS: dict[str, tuple[str, str, Call]] = {
    "put_file": ("PUT", FILE_URL, lambda c: c.put_file(BATCH, DATASET, NAME, Body(), len(DATA))),
    "put_part": ("PATCH", FILE_URL, lambda c: c.put_part(BATCH, DATASET, NAME, 0, Body(), len(DATA), 100)),
    "initialize_file": (
        "POST",
        f"{FILE_URL}?action=INITIALIZE",
        lambda c: c.initialize_file(BATCH, DATASET, NAME),
    ),
    "complete_file": ("POST", f"{FILE_URL}?action=COMPLETE", lambda c: c.complete_file(BATCH, DATASET, NAME)),
    "file_received": ("HEAD", FILE_URL, lambda c: c.file_received(BATCH, DATASET, NAME)),
    "complete_batch": ("POST", f"{BATCHES}/{BATCH}?action=COMPLETE", lambda c: c.complete_batch(BATCH)),
    "batch_state": ("GET", "", lambda c: c.batch_state(BATCH)),
}
ENDPOINTS = {
    "put_file": "files.put",
    "put_part": "files.patch",
    "initialize_file": "files.initialize",
    "complete_file": "files.complete",
    "file_received": "files.head",
    "complete_batch": "batches.complete",
    "batch_state": "catalog.status",
}


def answer(mock: aioresponses, method: str, url: str, status: int, **kwargs: Any) -> None:
    target: str | re.Pattern[str] = url or STATUS_URL
    mock.add(target, method, status=status, **kwargs)


@pytest.mark.parametrize(
    ("which", "status"),
    # A 404 to the HEAD is an answer (no such file), tested above.
    [
        (which, status)
        for which in FILE_CALLS
        for status in (400, 404, 500)
        if (which, status) != ("file_received", 404)
    ],
)
async def test_error_statuses_are_http_errors(
    mock: aioresponses, client: AepClient, which: str, status: int
) -> None:
    method, url, call = FILE_CALLS[which]
    answer(
        mock,
        method,
        url,
        status,
        payload={"error_code": "X-123", "message": "no"},
        headers={"Retry-After": "7"},
    )

    with pytest.raises(AepHttpError) as caught:
        await call(client)

    assert caught.value.status == status
    assert caught.value.endpoint == ENDPOINTS[which]
    assert caught.value.error_code == "X-123"
    assert caught.value.detail == "no"
    assert caught.value.retry_after == "7"


BAD_NAMES = ["", "..", ".", "a/../b", "../x.json", "a//b", "/a", "a/", "a/./b", "a\nb", "a\x00b"]
BAD_DATASETS = ["", "a/b", "..", "x y", "x?y", "-x", "x" * 129]
BAD_BATCHES = ["", "a/b", "..", "x?y", "x#y", "x%2F", "x" * 129]


def file_methods(batch: str, dataset: str, name: str, body: Body) -> list[Call]:
    return [
        lambda c: c.put_file(batch, dataset, name, body, 3),
        lambda c: c.put_part(batch, dataset, name, 0, body, 3, 3),
        lambda c: c.initialize_file(batch, dataset, name),
        lambda c: c.file_received(batch, dataset, name),
        lambda c: c.complete_file(batch, dataset, name),
    ]


async def refused(mock: aioresponses, client: AepClient, call: Call) -> str:
    with pytest.raises(ValueError, match=r"must be") as caught:
        await call(client)
    assert mock.requests == {}
    return str(caught.value)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_file_names_are_refused_before_any_call(
    mock: aioresponses, client: AepClient, name: str
) -> None:
    body = Body()
    for call in file_methods(BATCH, DATASET, name, body):
        assert "file name" in await refused(mock, client, call)
    assert body.opened == 0


@pytest.mark.parametrize("dataset", BAD_DATASETS)
async def test_bad_dataset_ids_are_refused_before_any_call(
    mock: aioresponses, client: AepClient, dataset: str
) -> None:
    body = Body()
    for call in file_methods(BATCH, dataset, NAME, body):
        assert "dataset id" in await refused(mock, client, call)
    assert body.opened == 0


@pytest.mark.parametrize("batch", BAD_BATCHES)
async def test_bad_batch_ids_are_refused_before_any_call(
    mock: aioresponses, client: AepClient, batch: str
) -> None:
    body = Body()
    calls_: list[Call] = [
        *file_methods(batch, DATASET, NAME, body),
        lambda c: c.complete_batch(batch),
        lambda c: c.batch_state(batch),
    ]
    for call in calls_:
        assert "batch id" in await refused(mock, client, call)
    assert body.opened == 0


# --- 401 ------------------------------------------------------------------------------------------


async def test_a_401_replays_the_put_with_a_fresh_token_and_a_reopened_body(
    mock: aioresponses, client: AepClient, tokens: FakeTokens
) -> None:
    mock.put(FILE_URL, status=401, payload={"error_code": "401013", "message": "Oauth token is not valid"})
    mock.put(FILE_URL, status=200)
    body = Body(chunk=4)

    await client.put_file(BATCH, DATASET, NAME, body, len(DATA))

    assert tokens.refreshed == ["tok-1"]
    assert body.opened == 2
    sent = calls(mock, "PUT", FILE_URL)
    assert [call.kwargs["headers"]["Authorization"] for call in sent] == ["Bearer tok-1", "Bearer tok-2"]
    assert [call.kwargs["data"] for call in sent] == [DATA, DATA]  # the second body whole, not drained
    assert [call.kwargs["headers"]["Content-Length"] for call in sent] == [str(len(DATA))] * 2


async def test_a_401_replays_a_part_with_its_range(
    mock: aioresponses, client: AepClient, tokens: FakeTokens
) -> None:
    mock.patch(FILE_URL, status=401, payload={"error_code": "401013"})
    mock.patch(FILE_URL, status=204)
    body = Body(b"abcdef", chunk=2)

    await client.put_part(BATCH, DATASET, NAME, 10, body, 6, 16)

    assert body.opened == 2
    sent = calls(mock, "PATCH", FILE_URL)
    assert [call.kwargs["data"] for call in sent] == [b"abcdef", b"abcdef"]
    assert [call.kwargs["headers"]["Content-Range"] for call in sent] == ["bytes 10-15/16"] * 2


async def test_a_second_401_is_an_error(mock: aioresponses, client: AepClient, tokens: FakeTokens) -> None:
    mock.put(FILE_URL, status=401, payload={"error_code": "401013"}, repeat=True)
    body = Body()

    with pytest.raises(AepHttpError) as caught:
        await client.put_file(BATCH, DATASET, NAME, body, len(DATA))

    assert caught.value.status == 401
    assert body.opened == 2
    assert len(calls(mock, "PUT", FILE_URL)) == 2


async def test_a_401_to_a_fixed_token_is_not_replayed(
    mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    client = AepClient(aep_settings(base_url="https://platform.adobe.io"), session, FakeTokens(fixed=True))
    mock.put(FILE_URL, status=401, payload={"error_code": "401013"}, repeat=True)
    body = Body()

    with pytest.raises(TokenRefused):
        await client.put_file(BATCH, DATASET, NAME, body, len(DATA))

    assert body.opened == 1
    assert len(calls(mock, "PUT", FILE_URL)) == 1
