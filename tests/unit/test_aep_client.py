"""The aiohttp AEP client against aioresponses: exact requests, parsed answers, typed failures."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from orchestrator.aep.api import Batch, BatchApi
from orchestrator.aep.auth import ImsTokenProvider
from orchestrator.aep.client import AepClient, error_fields
from orchestrator.aep.errors import AepHttpError, AepTimeout, AepTransportError, AuthError
from orchestrator.clock import ManualClock
from orchestrator.messages import BatchRequest
from orchestrator.pipeline.retry import Action, classify
from orchestrator.settings import AepSettings
from tests.unit.fakes import IMS_URL, aep_settings

CREATE_URL = "https://platform.test/data/foundation/import/batches"
CATALOG_URL = "https://platform.test/data/foundation/catalog/batches"
LOOKUP = re.compile(r"^https://platform\.test/data/foundation/catalog/batches\?.*$")
DATASET = "5c8c3c555033b814b69f947f"
BATCH_ID = "5d01230fc78a4e4f8c0c6b387b4b8d1c"


def settings(**overrides: Any) -> AepSettings:
    return aep_settings(**{"sandbox": "dev-1", "timeout": 30.0, **overrides})


class FakeTokens:
    """A token provider that hands out tok-1, then tok-2 after a refresh of tok-1."""

    def __init__(self, *, fixed: bool = False, refresh_error: AuthError | None = None) -> None:
        self.current = "tok-1"
        self.refreshed: list[str] = []
        self.fixed = fixed
        self.ready = True
        self.problem: str | None = None
        self._refresh_error = refresh_error

    async def token(self) -> str:
        return self.current

    async def refresh(self, stale: str) -> str:
        self.refreshed.append(stale)
        if self._refresh_error is not None:
            raise self._refresh_error
        if not self.fixed and stale == self.current:
            self.current = f"tok-{int(stale.split('-')[1]) + 1}"
        return self.current


class FakeGate:
    """Records the order of slot entries, exits and reports."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.inside = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.events.append("enter")
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1
            self.events.append("exit")

    def record(self, status: int | None, retry_after: str | None) -> None:
        assert self.inside == 1, "record() belongs inside the slot of the call it reports"
        self.events.append(("record", status, retry_after))


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
def gate() -> FakeGate:
    return FakeGate()


@pytest.fixture
def client(session: aiohttp.ClientSession, tokens: FakeTokens, gate: FakeGate) -> AepClient:
    return AepClient(settings(), session, tokens, gate=gate)


def created(batch_id: str = BATCH_ID, **extra: Any) -> dict[str, Any]:
    return {
        "id": batch_id,
        "imsOrg": "ORG@AdobeOrg",
        "status": "loading",
        "created": 1764331200000,
        "updated": 1764331200000,
        "relatedObjects": [{"type": "dataSet", "id": DATASET}],
        "version": "1.0.0",
        "tags": {},
        **extra,
    }


def calls(mock: aioresponses, method: str, url: str | URL) -> list[Any]:
    return list(mock.requests.get((method, URL(url)), []))


def all_calls(mock: aioresponses) -> list[tuple[str, URL, Any]]:
    return [(method, url, call) for (method, url), items in mock.requests.items() for call in items]


def request(**fields: Any) -> BatchRequest:
    return BatchRequest(request_id="crm-2026-11-28", dataset_id=DATASET, **fields)


def test_client_implements_the_port(client: AepClient) -> None:
    port: BatchApi = client  # mypy checks the shape; the test keeps the line alive
    assert port is client


async def test_create_sends_exact_headers_and_minimal_body(mock: aioresponses, client: AepClient) -> None:
    req = request()
    mock.post(CREATE_URL, status=201, payload=created(externalId=req.external_id))

    batch = await client.create_batch(req, "json")

    assert batch == Batch(
        id=BATCH_ID,
        status="loading",
        external_id=req.external_id,
        dataset_id=DATASET,
        created=1764331200000,
    )
    [call] = calls(mock, "POST", CREATE_URL)
    assert call.kwargs["headers"] == {
        "Authorization": "Bearer tok-1",
        "x-api-key": "cid-123",
        "x-gw-ims-org-id": "ORG@AdobeOrg",
        "x-sandbox-name": "dev-1",
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    assert call.kwargs["json"] == {
        "datasetId": DATASET,
        "inputFormat": {"format": "json"},
        "externalId": req.external_id,
    }
    timeout = call.kwargs["timeout"]
    assert (timeout.total, timeout.connect, timeout.sock_connect) == (30.0, 10.0, 10.0)
    assert call.kwargs.get("ssl", True) is not False


async def test_create_body_carries_the_request_format_multiline_flag_and_tags(
    mock: aioresponses, client: AepClient
) -> None:
    mock.post(CREATE_URL, status=201, payload=created(), repeat=True)
    tags = {"source": ["crm"], "team": ["data", "ops"]}

    await client.create_batch(request(input_format="parquet", tags=tags), "json")
    await client.create_batch(request(multiline_json=True), "csv")
    await client.create_batch(request(input_format="json", multiline_json=False), "parquet")

    bodies = [call.kwargs["json"] for call in calls(mock, "POST", CREATE_URL)]
    assert bodies[0]["inputFormat"] == {"format": "parquet"}
    assert bodies[0]["tags"] == tags
    assert bodies[1]["inputFormat"] == {"format": "csv", "isMultiLineJson": True}
    assert "tags" not in bodies[1]
    assert bodies[2]["inputFormat"] == {"format": "json", "isMultiLineJson": False}


async def test_base_url_with_a_path_prefix_is_kept(
    mock: aioresponses, session: aiohttp.ClientSession, tokens: FakeTokens
) -> None:
    client = AepClient(settings(base_url="http://127.0.0.1:8081/aep/"), session, tokens)
    mock.post("http://127.0.0.1:8081/aep/data/foundation/import/batches", status=201, payload=created())

    assert (await client.create_batch(request(), "json")).id == BATCH_ID


@pytest.mark.parametrize(
    ("status", "payload"),
    [(201, {"status": "loading"}), (201, None), (200, created())],
)
async def test_create_succeeds_only_on_201_with_an_id(
    mock: aioresponses, client: AepClient, status: int, payload: dict[str, Any] | None
) -> None:
    mock.post(CREATE_URL, status=status, payload=payload)

    with pytest.raises(AepHttpError) as caught:
        await client.create_batch(request(), "json")
    assert caught.value.status == status
    assert caught.value.endpoint == "batches.create"


async def test_lookup_parses_every_batch_oldest_first(mock: aioresponses, client: AepClient) -> None:
    external = request().external_id
    mock.get(
        LOOKUP,
        payload={
            "b-new": {"status": "loading", "externalId": external, "created": 3000},
            "b-old": {"status": "success", "externalId": external, "created": 1000},
            "b-mid": {
                "id": "b-mid",
                "status": "failed",
                "externalId": external,
                "created": 2000,
                "relatedObjects": [{"type": "dataSet", "id": DATASET}],
            },
        },
    )

    batches = await client.find_batches(external)

    assert [b.id for b in batches] == ["b-old", "b-mid", "b-new"]
    assert batches[0] == Batch(id="b-old", status="success", external_id=external, created=1000)
    assert batches[1].dataset_id == DATASET
    [(method, url, call)] = all_calls(mock)
    assert (method, url.path) == ("GET", "/data/foundation/catalog/batches")
    assert dict(url.query) == {
        "externalId": external,
        "orderBy": "asc:created",
        "limit": "100",
        "start": "0",
    }
    assert "Content-Type" not in call.kwargs["headers"]
    assert call.kwargs["headers"]["x-sandbox-name"] == "dev-1"


async def test_lookup_ignores_batches_of_other_requests(mock: aioresponses, client: AepClient) -> None:
    mock.get(
        LOOKUP,
        payload={
            "mine": {"status": "loading", "externalId": "orch-abc", "created": 5},
            "theirs": {"status": "loading", "externalId": "orch-xyz", "created": 1},
            "unlabelled": {"status": "loading", "created": 2},
        },
    )

    assert [b.id for b in await client.find_batches("orch-abc")] == ["mine"]


async def test_lookup_reads_every_page(mock: aioresponses, client: AepClient) -> None:
    """A full page (100 entries) may have a next one: read on until a page is not full."""
    external = "orch-abc"
    first = {f"b{i:03}": {"status": "aborted", "externalId": external, "created": i} for i in range(100)}
    mock.get(LOOKUP, payload=first)
    mock.get(LOOKUP, payload={"b-last": {"status": "loading", "externalId": external, "created": 500}})

    batches = await client.find_batches(external)

    assert len(batches) == 101
    assert batches[-1].id == "b-last"
    assert [url.query["start"] for _, url, _ in all_calls(mock)] == ["0", "100"]


async def test_a_page_of_strangers_is_an_error_not_none_found(mock: aioresponses, client: AepClient) -> None:
    """A catalog that ignored the filter says nothing about our batch: treating that as "none"
    would lead to a second create."""
    mock.get(LOOKUP, payload={"theirs": {"status": "loading", "externalId": "orch-xyz", "created": 1}})

    with pytest.raises(AepHttpError) as caught:
        await client.find_batches("orch-abc")
    assert caught.value.endpoint == "catalog.lookup"
    assert classify(caught.value, creating=False).action is Action.RETRY


async def test_abort_posts_the_action(mock: aioresponses, client: AepClient) -> None:
    mock.post(f"{CREATE_URL}/{BATCH_ID}?action=ABORT", status=200, body="")

    await client.abort_batch(BATCH_ID)

    [(method, url, _)] = all_calls(mock)
    assert (method, url.path, url.query["action"]) == (
        "POST",
        f"/data/foundation/import/batches/{BATCH_ID}",
        "ABORT",
    )


async def test_abort_refusal_is_an_error(mock: aioresponses, client: AepClient) -> None:
    mock.post(
        f"{CREATE_URL}/{BATCH_ID}?action=ABORT",
        status=400,
        payload={"type": "x", "status": 400, "title": "BadRequestError", "detail": "finalized"},
    )

    with pytest.raises(AepHttpError) as caught:
        await client.abort_batch(BATCH_ID)
    assert (caught.value.endpoint, caught.value.status) == ("batches.abort", 400)


async def test_lookup_of_nothing_is_an_empty_list(mock: aioresponses, client: AepClient) -> None:
    mock.get(LOOKUP, payload={})

    assert await client.find_batches("orch-abc") == []


async def test_lookup_answer_that_is_not_a_map_is_an_error(mock: aioresponses, client: AepClient) -> None:
    mock.get(LOOKUP, payload=["not", "a", "map"])

    with pytest.raises(AepHttpError) as caught:
        await client.find_batches("orch-abc")
    assert caught.value.endpoint == "catalog.lookup"


async def test_lookup_query_is_encoded_not_concatenated(mock: aioresponses, client: AepClient) -> None:
    mock.get(LOOKUP, payload={})

    await client.find_batches("a&limit=1#x")

    [(_, url, _)] = all_calls(mock)
    assert url.query["externalId"] == "a&limit=1#x"
    assert url.query["limit"] == "100"


async def test_get_parses_the_batch_keyed_by_its_id(mock: aioresponses, client: AepClient) -> None:
    mock.get(
        f"{CATALOG_URL}/{BATCH_ID}",
        payload={BATCH_ID: {"status": "success", "externalId": "orch-1", "created": 7, "imsOrg": "x"}},
    )

    batch = await client.get_batch(BATCH_ID)

    assert batch == Batch(id=BATCH_ID, status="success", external_id="orch-1", created=7)


async def test_get_accepts_a_single_entry_under_another_key(mock: aioresponses, client: AepClient) -> None:
    mock.get(f"{CATALOG_URL}/{BATCH_ID}", payload={"other": {"id": BATCH_ID, "status": "active"}})

    assert (await client.get_batch(BATCH_ID)).status == "active"


async def test_get_without_the_batch_is_an_error(mock: aioresponses, client: AepClient) -> None:
    mock.get(f"{CATALOG_URL}/{BATCH_ID}", payload={"a": {}, "b": {}})

    with pytest.raises(AepHttpError) as caught:
        await client.get_batch(BATCH_ID)
    assert caught.value.endpoint == "catalog.get"


@pytest.mark.parametrize("bad", ["", "../import/batches", "a/b", "id?x=1", "x" * 129, "é"])
async def test_get_refuses_ids_that_could_change_the_path(
    mock: aioresponses, client: AepClient, bad: str
) -> None:
    with pytest.raises(ValueError, match="batch id"):
        await client.get_batch(bad)
    assert all_calls(mock) == []


ERROR_SHAPES = [
    pytest.param(
        401,
        {"error_code": "401013", "message": "Oauth token is not valid"},
        "401013",
        "Oauth token is not valid",
        id="gateway",
    ),
    pytest.param(
        400,
        {
            "type": "/placeholder/type/uri",
            "status": 400,
            "title": "BadRequestError",
            "detail": "A valid content-type must be specified",
        },
        "BadRequestError",
        "A valid content-type must be specified",
        id="problem",
    ),
    pytest.param(
        412,
        {"errorMessage": "Supplied version=[1] does not match"},
        None,
        "Supplied version=[1] does not match",
        id="errorMessage",
    ),
    pytest.param(404, {"message": "Dataset not found"}, None, "Dataset not found", id="message"),
    pytest.param(
        400,
        {"status": 400, "report": {"message": "datasetId is invalid"}},
        None,
        "datasetId is invalid",
        id="report",
    ),
    pytest.param(
        400,
        {"status": 400, "report": {"errors": [1]}},
        None,
        '{"errors":[1]}',
        id="report-without-message",
    ),
    pytest.param(
        401,
        {"error": "invalid_token", "error_description": "token expired"},
        "invalid_token",
        "token expired",
        id="oauth",
    ),
    pytest.param(500, {"unexpected": True}, None, '{"unexpected":true}', id="unknown-json"),
]


@pytest.mark.parametrize(("status", "payload", "code", "detail"), ERROR_SHAPES)
async def test_error_shapes_are_parsed(
    mock: aioresponses,
    session: aiohttp.ClientSession,
    status: int,
    payload: dict[str, Any],
    code: str | None,
    detail: str,
) -> None:
    # A fixed token, so a 401 is reported as it is, without a replay.
    client = AepClient(settings(), session, FakeTokens(fixed=True))
    mock.post(CREATE_URL, status=status, payload=payload)

    with pytest.raises(AepHttpError) as caught:
        await client.create_batch(request(), "json")

    error = caught.value
    assert (error.status, error.error_code, error.detail) == (status, code, detail)
    assert error.endpoint == "batches.create"
    assert error.summary().startswith(f"batches.create HTTP {status}")


async def test_non_json_error_is_truncated_text(mock: aioresponses, client: AepClient) -> None:
    page = "<html>" + "gateway timeout " * 40 + "</html>"
    mock.get(LOOKUP, status=504, body=page, content_type="text/html")

    with pytest.raises(AepHttpError) as caught:
        await client.find_batches("orch-abc")
    assert caught.value.status == 504
    assert caught.value.error_code is None
    assert caught.value.detail == page[:300]


def test_empty_error_body_has_no_detail() -> None:
    assert error_fields("") == (None, None)
    assert error_fields("   ") == (None, None)


async def test_retry_after_is_passed_on_raw(mock: aioresponses, client: AepClient, gate: FakeGate) -> None:
    mock.post(
        CREATE_URL, status=429, body="slow down", headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}
    )

    with pytest.raises(AepHttpError) as caught:
        await client.create_batch(request(), "json")
    assert caught.value.retry_after == "Wed, 21 Oct 2026 07:28:00 GMT"
    assert gate.events == ["enter", ("record", 429, "Wed, 21 Oct 2026 07:28:00 GMT"), "exit"]


async def test_401_refreshes_once_and_replays(
    mock: aioresponses, client: AepClient, tokens: FakeTokens, gate: FakeGate
) -> None:
    mock.post(CREATE_URL, status=401, payload={"error_code": "401013", "message": "Oauth token is not valid"})
    mock.post(CREATE_URL, status=201, payload=created())

    batch = await client.create_batch(request(), "json")

    assert batch.id == BATCH_ID
    assert tokens.refreshed == ["tok-1"]
    sent = [call.kwargs["headers"]["Authorization"] for call in calls(mock, "POST", CREATE_URL)]
    assert sent == ["Bearer tok-1", "Bearer tok-2"]
    # The replay sends the same body: same externalId, so it is the same request.
    bodies = [call.kwargs["json"] for call in calls(mock, "POST", CREATE_URL)]
    assert bodies[0] == bodies[1]
    assert gate.events == ["enter", ("record", 401, None), "exit", "enter", ("record", 201, None), "exit"]


async def test_second_401_is_an_error(mock: aioresponses, client: AepClient, tokens: FakeTokens) -> None:
    mock.get(f"{CATALOG_URL}/{BATCH_ID}", status=401, payload={"error_code": "401013"}, repeat=True)

    with pytest.raises(AepHttpError) as caught:
        await client.get_batch(BATCH_ID)

    assert caught.value.status == 401
    assert tokens.refreshed == ["tok-1"]
    assert len(calls(mock, "GET", f"{CATALOG_URL}/{BATCH_ID}")) == 2


async def test_401_with_a_fixed_token_is_not_replayed(
    mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    tokens = FakeTokens(fixed=True)
    client = AepClient(settings(), session, tokens)
    mock.post(CREATE_URL, status=401, payload={"error_code": "401013"}, repeat=True)

    with pytest.raises(AepHttpError):
        await client.create_batch(request(), "json")
    assert len(calls(mock, "POST", CREATE_URL)) == 1


async def test_ims_failure_during_the_refresh_propagates(
    mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    tokens = FakeTokens(refresh_error=AuthError("IMS refused", status=401, permanent=True))
    client = AepClient(settings(), session, tokens)
    mock.post(CREATE_URL, status=401, payload={"error_code": "401013"})

    with pytest.raises(AuthError) as caught:
        await client.create_batch(request(), "json")
    assert caught.value.permanent


async def test_a_wave_of_401s_costs_one_ims_fetch(mock: aioresponses, session: aiohttp.ClientSession) -> None:
    wave = 6
    fetched: list[str] = []

    async def ims(url: URL, **kwargs: Any) -> CallbackResult:
        fetched.append(f"ims-token-{len(fetched) + 1}")
        return CallbackResult(payload={"access_token": fetched[-1], "expires_in": 86399})

    stale_arrivals = 0
    all_stale = asyncio.Event()

    async def platform(url: URL, **kwargs: Any) -> CallbackResult:
        nonlocal stale_arrivals
        if kwargs["headers"]["Authorization"] == "Bearer ims-token-1":
            # Hold every first attempt until all of them carry the soon-refused token.
            stale_arrivals += 1
            if stale_arrivals == wave:
                all_stale.set()
            await all_stale.wait()
            return CallbackResult(status=401, payload={"error_code": "401013"})
        return CallbackResult(status=201, payload=created())

    mock.post(IMS_URL, callback=ims, repeat=True)
    mock.post(CREATE_URL, callback=platform, repeat=True)
    provider = ImsTokenProvider(settings(), session, ManualClock())
    client = AepClient(settings(), session, provider)

    batches = await asyncio.gather(*(client.create_batch(request(), "json") for _ in range(wave)))

    assert [b.id for b in batches] == [BATCH_ID] * wave
    assert fetched == ["ims-token-1", "ims-token-2"]  # the first fetch, then ONE forced refresh
    assert len(calls(mock, "POST", CREATE_URL)) == 2 * wave


def _connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("platform.test", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, OSError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("failure", "kind", "maybe_sent"),
    [
        pytest.param(_connector_error(), AepTransportError, False, id="connector"),
        pytest.param(aiohttp.ConnectionTimeoutError("connect"), AepTimeout, False, id="connect-timeout"),
        pytest.param(aiohttp.ServerDisconnectedError(), AepTransportError, True, id="disconnected"),
        pytest.param(aiohttp.ClientOSError(104, "reset"), AepTransportError, True, id="reset"),
        pytest.param(aiohttp.ClientPayloadError("truncated"), AepTransportError, True, id="payload"),
        pytest.param(TimeoutError(), AepTimeout, True, id="total-timeout"),
        pytest.param(aiohttp.SocketTimeoutError("read"), AepTimeout, True, id="read-timeout"),
    ],
)
async def test_transport_failures_say_whether_the_request_may_have_been_sent(
    mock: aioresponses,
    client: AepClient,
    gate: FakeGate,
    failure: Exception,
    kind: type[AepTransportError],
    maybe_sent: bool,
) -> None:
    mock.post(CREATE_URL, exception=failure)

    with pytest.raises(AepTransportError) as caught:
        await client.create_batch(request(), "json")

    assert type(caught.value) is kind
    assert caught.value.maybe_sent is maybe_sent
    assert caught.value.status is None
    assert caught.value.endpoint == "batches.create"
    assert gate.events == ["enter", ("record", None, None), "exit"]


async def test_gate_sees_each_call_once(mock: aioresponses, client: AepClient, gate: FakeGate) -> None:
    mock.get(LOOKUP, payload={})
    mock.post(CREATE_URL, status=503, headers={"Retry-After": "5"})

    await client.find_batches("orch-abc")
    with pytest.raises(AepHttpError):
        await client.create_batch(request(), "json")

    assert gate.events == [
        "enter",
        ("record", 200, None),
        "exit",
        "enter",
        ("record", 503, "5"),
        "exit",
    ]


async def test_ensure_token_asks_the_provider(mock: aioresponses, session: aiohttp.ClientSession) -> None:
    mock.post(IMS_URL, status=400, payload={"error": "invalid_client"})
    client = AepClient(settings(), session, ImsTokenProvider(settings(), session, ManualClock()))

    with pytest.raises(AuthError):
        await client.ensure_token()
    assert len(calls(mock, "POST", IMS_URL)) == 1


async def test_calls_are_logged_without_the_token(
    mock: aioresponses, client: AepClient, log_output: io.StringIO
) -> None:
    mock.post(CREATE_URL, status=401, payload={"error_code": "401013"})
    mock.post(CREATE_URL, status=500, payload={"message": "boom"})

    with pytest.raises(AepHttpError) as caught:
        await client.create_batch(request(), "json")

    events = [json.loads(line) for line in log_output.getvalue().splitlines()]
    aep_calls = [e for e in events if e["event"] == "aep.call"]
    assert [(e["endpoint"], e["status"]) for e in aep_calls] == [
        ("batches.create", 401),
        ("batches.create", 500),
    ]
    assert all(e["duration"] >= 0 for e in aep_calls)
    for text in (log_output.getvalue(), str(caught.value), repr(caught.value), caught.value.summary()):
        assert "tok-1" not in text
        assert "tok-2" not in text
