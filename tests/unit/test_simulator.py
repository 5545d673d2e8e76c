"""The AEP + IMS simulator, driven over real sockets by a real aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from orchestrator.aep.simulator import (
    Simulator,
    SimulatorConfig,
    add_arguments,
    config_from_args,
    serve,
)
from orchestrator.clock import ManualClock

CREATE = "/data/foundation/import/batches"
CATALOG = "/data/foundation/catalog/batches"
DATASET = "5c8c3c555033b814b69f947f"

Start = Callable[..., Awaitable[tuple[Simulator, str]]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[Simulator] = []

    async def make(clock: ManualClock | None = None, **options: Any) -> tuple[Simulator, str]:
        simulator = Simulator(SimulatorConfig(seed=7, **options), clock=clock)
        started.append(simulator)
        return simulator, await simulator.start()

    yield make
    for simulator in started:
        await simulator.stop()


def platform_headers(token: str, config: SimulatorConfig | None = None) -> dict[str, str]:
    config = config or SimulatorConfig()
    return {
        "Authorization": f"Bearer {token}",
        "x-api-key": config.client_id,
        "x-gw-ims-org-id": config.org_id,
        "x-sandbox-name": "prod",
    }


async def fetch_token(session: aiohttp.ClientSession, url: str) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": "sim-client",
        "client_secret": "sim-secret",
        "scope": "openid,AdobeID",
    }
    async with session.post(url + "/ims/token/v3", data=form) as resp:
        assert resp.status == 200
        body = await resp.json()
    token: str = body["access_token"]
    return token


async def create(
    session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]
) -> tuple[int, Any, Mapping[str, str]]:
    async with session.post(url + CREATE, json=body, headers=platform_headers(token)) as resp:
        payload = await resp.json(content_type=None) if resp.content_type == "application/json" else None
        return resp.status, payload, resp.headers


async def get_json(
    session: aiohttp.ClientSession, url: str, token: str, path: str, **params: str
) -> tuple[int, Any]:
    async with session.get(url + path, params=params, headers=platform_headers(token)) as resp:
        return resp.status, await resp.json()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for something the server does on its own time (not a fixed sleep)."""
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


# IMS


async def test_token_is_issued_for_client_credentials(session: aiohttp.ClientSession, start: Start) -> None:
    simulator, url = await start()
    form = {
        "grant_type": "client_credentials",
        "client_id": "sim-client",
        "client_secret": "sim-secret",
        "scope": "openid",
    }
    async with session.post(url + "/ims/token/v3", data=form) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86399
    assert isinstance(body["access_token"], str)
    assert len(body["access_token"]) >= 32

    # Query parameters work too, as IMS accepts them, and each call gets a new token.
    async with session.post(url + "/ims/token/v3", params=form) as resp:
        assert resp.status == 200
        assert (await resp.json())["access_token"] != body["access_token"]

    status, _ = await get_json(session, url, body["access_token"], CATALOG)
    assert status == 200
    assert simulator.stats.tokens_issued == 2
    assert simulator.stats.count("ims.token", 200) == 2


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "someone-else"}, 400, "invalid_client"),
        ({"client_id": None}, 400, "invalid_client"),
        ({"client_secret": None}, 400, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
    ],
)
async def test_token_is_refused_with_an_oauth_error(
    session: aiohttp.ClientSession, start: Start, change: dict[str, str | None], status: int, error: str
) -> None:
    simulator, url = await start()
    form = {
        "grant_type": "client_credentials",
        "client_id": "sim-client",
        "client_secret": "sim-secret",
        "scope": "openid",
    }
    form.update(change)  # type: ignore[arg-type]
    sent = {key: value for key, value in form.items() if value is not None}
    async with session.post(url + "/ims/token/v3", data=sent) as resp:
        assert resp.status == status
        body = await resp.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str)
    assert simulator.stats.tokens_issued == 0
    assert simulator.stats.ims_failures == 1


async def test_ims_error_rate_answers_503(session: aiohttp.ClientSession, start: Start) -> None:
    simulator, url = await start(ims_error_rate=1.0)
    form = {"grant_type": "client_credentials", "client_id": "sim-client", "client_secret": "sim-secret"}
    async with session.post(url + "/ims/token/v3", data={**form, "scope": "openid"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "temporarily_unavailable"
    assert simulator.stats.ims_failures == 1
    assert simulator.stats.faults["ims_unavailable"] == 1


async def test_token_expires_after_its_lifetime(session: aiohttp.ClientSession, start: Start) -> None:
    clock = ManualClock()
    simulator, url = await start(clock, token_lifetime=60)
    token = await fetch_token(session, url)
    clock.advance(59.9)
    assert (await get_json(session, url, token, CATALOG))[0] == 200
    clock.advance(0.1)
    status, body = await get_json(session, url, token, CATALOG)
    assert (status, body) == (401, {"error_code": "401013", "message": "Oauth token is not valid"})
    assert simulator.stats.unauthorized == 1
    assert simulator.stats.expired_tokens == 1
    assert simulator.stats.header_rejections == 0


# Platform headers


def _without(name: str) -> Callable[[dict[str, str]], object]:
    return lambda headers: headers.pop(name)


def _with(name: str, value: str) -> Callable[[dict[str, str]], object]:
    return lambda headers: headers.__setitem__(name, value)


@pytest.mark.parametrize(
    ("change", "status", "body"),
    [
        (_without("Authorization"), 403, {"error_code": "403010", "message": "Oauth token is missing."}),
        (_without("x-api-key"), 403, {"error_code": "403000", "message": "Api Key is required"}),
        (_with("x-api-key", "other"), 403, {"error_code": "403003", "message": "Api Key is invalid"}),
        (_without("x-gw-ims-org-id"), 400, {"error_code": "400003", "message": "Missing header"}),
        (
            _with("x-gw-ims-org-id", "X@AdobeOrg"),
            403,
            {"error_code": "403025", "message": "Profile is not valid"},
        ),
    ],
)
async def test_gateway_refuses_bad_headers_with_adobe_bodies(
    session: aiohttp.ClientSession,
    start: Start,
    change: Callable[[dict[str, str]], object],
    status: int,
    body: dict[str, str],
) -> None:
    simulator, url = await start()
    headers = platform_headers(await fetch_token(session, url))
    change(headers)
    async with session.post(url + CREATE, json={"datasetId": DATASET}, headers=headers) as resp:
        assert resp.status == status
        assert await resp.json() == body
    assert simulator.stats.header_rejections == 1
    assert simulator.stats.unauthorized == 0
    assert simulator.stats.batches == []


async def test_unknown_token_is_401_and_counted_apart(session: aiohttp.ClientSession, start: Start) -> None:
    simulator, url = await start()
    status, body = await get_json(session, url, "not-a-token", CATALOG)
    assert (status, body) == (401, {"error_code": "401013", "message": "Oauth token is not valid"})
    assert simulator.stats.unauthorized == 1
    assert simulator.stats.expired_tokens == 0
    assert simulator.stats.header_rejections == 0


async def test_headers_are_checked_in_the_gateway_order(session: aiohttp.ClientSession, start: Start) -> None:
    _, url = await start()
    headers = {"x-sandbox-name": "prod"}  # no token and no api key: the token is named first
    async with session.get(url + CATALOG, headers=headers) as resp:
        assert (await resp.json())["error_code"] == "403010"
    headers = platform_headers("bogus")
    del headers["x-api-key"]  # a bad token outranks a missing api key
    async with session.get(url + CATALOG, headers=headers) as resp:
        assert resp.status == 401


async def test_sandbox_header_is_required_but_any_name_is_accepted(
    session: aiohttp.ClientSession, start: Start
) -> None:
    simulator, url = await start()
    headers = platform_headers(await fetch_token(session, url))
    del headers["x-sandbox-name"]
    async with session.get(url + CATALOG, headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["status"] == 400
    assert body["title"] == "BadRequestError"
    headers["x-sandbox-name"] = "dev-sandbox"
    async with session.get(url + CATALOG, headers=headers) as resp:
        assert resp.status == 200
    assert simulator.stats.header_rejections == 1


async def test_create_needs_a_json_content_type(session: aiohttp.ClientSession, start: Start) -> None:
    simulator, url = await start()
    headers = {**platform_headers(await fetch_token(session, url)), "Content-Type": "text/plain"}
    async with session.post(url + CREATE, data=b'{"datasetId": "x"}', headers=headers) as resp:
        assert resp.status == 400
        assert await resp.json() == {
            "type": "/placeholder/type/uri",
            "status": 400,
            "title": "BadRequestError",
            "detail": "A valid content-type must be specified",
        }
    assert simulator.stats.header_rejections == 1
    assert simulator.stats.batches == []


# Batches


async def test_create_answers_201_with_the_documented_batch(
    session: aiohttp.ClientSession, start: Start
) -> None:
    clock = ManualClock()
    simulator, url = await start(clock)
    token = await fetch_token(session, url)
    request = {
        "datasetId": DATASET,
        "externalId": "orch-1",
        "inputFormat": {"format": "Parquet"},
        "tags": {"source": ["crm"]},
    }
    status, batch, _ = await create(session, url, token, request)
    assert status == 201
    assert re.fullmatch(r"[0-9a-f]{32}", batch["id"])
    created = int(clock.now().timestamp() * 1000)
    assert batch == {
        "id": batch["id"],
        "imsOrg": "SIM0RG0000000000000000@AdobeOrg",
        "status": "loading",
        "created": created,
        "updated": created,
        "relatedObjects": [{"type": "dataSet", "id": DATASET}],
        "version": "1.0.0",
        "tags": {
            "source": ["crm"],
            "acp_producer": ["sim-client"],
            "acp_stagePath": [f"sim-client/stage/{batch['id']}"],
            "use_plan_b_batch_status": ["false"],
        },
        "createdUser": "sim-client@techacct.adobe.com",
        "updatedUser": "sim-client@techacct.adobe.com",
        "externalId": "orch-1",
        "createdClient": "sim-client",
        "inputFormat": {"format": "parquet"},
    }
    status, found = await get_json(session, url, token, f"{CATALOG}/{batch['id']}")
    assert status == 200
    assert found == {batch["id"]: batch}
    assert [record.id for record in simulator.stats.batches] == [batch["id"]]


async def test_externalid_defaults_to_the_batch_id(session: aiohttp.ClientSession, start: Start) -> None:
    _, url = await start()
    status, batch, _ = await create(session, url, await fetch_token(session, url), {"datasetId": DATASET})
    assert status == 201
    assert batch["externalId"] == batch["id"]
    assert batch["inputFormat"] == {"format": "json"}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "datasetId is required"),
        ({"datasetId": 42}, "datasetId is required"),
        ({"datasetId": DATASET, "inputFormat": {"format": "xml"}}, "inputFormat.format must be one of"),
        ({"datasetId": DATASET, "tags": {"a": "b"}}, "tags must map"),
        ({"datasetId": "gone-dataset"}, "Dataset gone-dataset not found"),
    ],
)
async def test_create_refuses_bad_bodies_with_400(
    session: aiohttp.ClientSession, start: Start, body: dict[str, Any], detail: str
) -> None:
    simulator, url = await start(unknown_datasets=frozenset({"gone-dataset"}))
    status, answer, _ = await create(session, url, await fetch_token(session, url), body)
    assert status == 400
    assert answer["type"] == "/placeholder/type/uri"
    assert answer["status"] == 400
    assert answer["title"] == "BadRequestError"
    assert answer["detail"].startswith(detail)
    assert simulator.stats.batches == []
    assert simulator.stats.count("batches.create", 400) == 1


async def test_get_unknown_batch_is_404(session: aiohttp.ClientSession, start: Start) -> None:
    _, url = await start()
    status, body = await get_json(session, url, await fetch_token(session, url), f"{CATALOG}/{'0' * 32}")
    assert status == 404
    assert body["status"] == 404


async def test_duplicate_externalids_make_new_batches_and_lists_filter(
    session: aiohttp.ClientSession, start: Start
) -> None:
    clock = ManualClock()
    simulator, url = await start(clock)
    token = await fetch_token(session, url)
    ids = []
    for dataset, external in [("ds-a", "x-1"), ("ds-a", "x-1"), ("ds-b", "x-2")]:
        clock.advance(1)
        status, batch, _ = await create(session, url, token, {"datasetId": dataset, "externalId": external})
        assert status == 201
        ids.append(batch["id"])

    status, by_external = await get_json(session, url, token, CATALOG, externalId="x-1")
    assert status == 200
    assert list(by_external) == ids[:2]
    assert all(batch["externalId"] == "x-1" for batch in by_external.values())
    assert list((await get_json(session, url, token, CATALOG, dataSet="ds-b"))[1]) == ids[2:]
    both = await get_json(session, url, token, CATALOG, dataSet="ds-a", externalId="x-2")
    assert both == (200, {})
    newest_first = await get_json(session, url, token, CATALOG, orderBy="desc:created")
    assert list(newest_first[1]) == ids[::-1]
    page = await get_json(session, url, token, CATALOG, limit="1", start="1")
    assert list(page[1]) == ids[1:2]

    assert simulator.stats.batches_per_external_id == {"x-1": 2, "x-2": 1}
    assert simulator.stats.batches_per_dataset == {"ds-a": 2, "ds-b": 1}
    assert simulator.stats.duplicate_external_ids == {"x-1": 2}


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"orderBy": "name"}])
async def test_list_refuses_bad_paging(
    session: aiohttp.ClientSession, start: Start, params: dict[str, str]
) -> None:
    _, url = await start()
    status, body = await get_json(session, url, await fetch_token(session, url), CATALOG, **params)
    assert status == 400
    assert body["title"] == "BadRequestError"


async def test_list_returns_at_most_20_by_default(session: aiohttp.ClientSession, start: Start) -> None:
    _, url = await start()
    token = await fetch_token(session, url)
    for _ in range(21):
        await create(session, url, token, {"datasetId": DATASET})
    assert len((await get_json(session, url, token, CATALOG))[1]) == 20
    assert len((await get_json(session, url, token, CATALOG, limit="100"))[1]) == 21


async def test_catalog_lag_hides_new_batches_from_lists_only(
    session: aiohttp.ClientSession, start: Start
) -> None:
    clock = ManualClock()
    _, url = await start(clock, catalog_lag=5.0)
    token = await fetch_token(session, url)
    _, batch, _ = await create(session, url, token, {"datasetId": DATASET, "externalId": "lagging"})
    assert await get_json(session, url, token, CATALOG, externalId="lagging") == (200, {})
    assert (await get_json(session, url, token, f"{CATALOG}/{batch['id']}"))[0] == 200
    clock.advance(4.9)
    assert await get_json(session, url, token, CATALOG, externalId="lagging") == (200, {})
    clock.advance(0.1)
    assert list((await get_json(session, url, token, CATALOG, externalId="lagging"))[1]) == [batch["id"]]


async def test_complete_and_abort_move_the_status(session: aiohttp.ClientSession, start: Start) -> None:
    clock = ManualClock()
    simulator, url = await start(clock, processing_time=1.0)
    token = await fetch_token(session, url)
    _, first, _ = await create(session, url, token, {"datasetId": DATASET})
    _, second, _ = await create(session, url, token, {"datasetId": DATASET})
    headers = platform_headers(token)
    file_headers = {**headers, "Content-Type": "application/octet-stream"}
    file_url = f"{url}{CREATE}/{first['id']}/datasets/{DATASET}/files/data.json"
    async with session.put(file_url, data=b'{"a": 1}\n', headers=file_headers) as resp:
        assert resp.status == 201

    async def act(batch_id: str, action: str) -> int:
        async with session.post(
            f"{url}{CREATE}/{batch_id}", params={"action": action}, headers=headers
        ) as resp:
            return resp.status

    assert await act(first["id"], "COMPLETE") == 200
    assert await act(first["id"], "COMPLETE") == 200  # retrying COMPLETE is safe
    assert (simulator.batch(first["id"]) or {})["status"] == "processing"
    clock.advance(1.0)
    assert (simulator.batch(first["id"]) or {})["status"] == "success"
    assert await act(first["id"], "ABORT") == 400
    assert await act(second["id"], "ABORT") == 200
    assert (await get_json(session, url, token, f"{CATALOG}/{second['id']}"))[1][second["id"]]["status"] == (
        "aborted"
    )
    assert await act(second["id"], "REPLAY") == 400
    assert await act("f" * 32, "COMPLETE") == 404
    assert list((await get_json(session, url, token, CATALOG, status="success"))[1]) == [first["id"]]


# Throttling and faults


async def test_rate_limit_answers_429_with_retry_after_seconds(
    session: aiohttp.ClientSession, start: Start
) -> None:
    clock = ManualClock()
    simulator, url = await start(clock, rate_limit=2, rate_period=1.0)
    token = await fetch_token(session, url)
    assert (await create(session, url, token, {"datasetId": DATASET, "externalId": "a"}))[0] == 201
    assert (await get_json(session, url, token, CATALOG))[0] == 200  # every Platform call counts

    status, body, headers = await create(session, url, token, {"datasetId": DATASET, "externalId": "b"})
    assert status == 429
    assert body == {"error_code": "429050", "message": "Too many requests"}
    assert headers["Retry-After"] == "1"
    assert simulator.stats.early_retries == 0

    clock.advance(0.5)  # half of what it was told: early
    assert (await get_json(session, url, token, CATALOG, externalId="b"))[0] == 429
    assert simulator.stats.early_retries == 1
    clock.advance(1.0)  # the early call was throttled too, and told 1 s from then
    assert (await create(session, url, token, {"datasetId": DATASET, "externalId": "b"}))[0] == 201
    assert simulator.stats.early_retries == 1
    assert simulator.stats.throttled == 2
    assert simulator.stats.max_calls_per_second == 4
    assert simulator.stats.max_calls_per_period == 4
    assert simulator.stats.batches_per_external_id == {"a": 1, "b": 1}


async def test_rate_limit_can_give_retry_after_as_an_http_date(
    session: aiohttp.ClientSession, start: Start
) -> None:
    clock = ManualClock()
    clock.advance(0.25)  # off the whole second, so the date must be rounded up
    simulator, url = await start(clock, rate_limit=1, retry_after_format="date")
    token = await fetch_token(session, url)
    await create(session, url, token, {"datasetId": DATASET})
    status, _, headers = await create(session, url, token, {"datasetId": DATASET, "externalId": "late"})
    assert status == 429
    retry_at = parsedate_to_datetime(headers["Retry-After"])
    assert retry_at == clock.now().replace(microsecond=0) + timedelta(seconds=2)
    clock.advance(1.5)  # the window is open again, but the date has not come
    assert (await create(session, url, token, {"datasetId": DATASET, "externalId": "late"}))[0] == 201
    assert simulator.stats.early_retries == 1


async def test_unavailable_answers_503_and_creates_nothing(
    session: aiohttp.ClientSession, start: Start
) -> None:
    simulator, url = await start(unavailable_rate=1.0, unavailable_retry_after=3)
    status, body, headers = await create(
        session, url, await fetch_token(session, url), {"datasetId": DATASET}
    )
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert body["status"] == 503
    assert simulator.stats.batches == []
    assert simulator.stats.faults["unavailable"] == 1


async def test_error_rate_answers_500_or_502_and_creates_nothing(
    session: aiohttp.ClientSession, start: Start
) -> None:
    simulator, url = await start(error_rate=1.0)
    token = await fetch_token(session, url)
    statuses = set()
    for n in range(12):
        async with session.post(
            url + CREATE, json={"datasetId": DATASET, "externalId": f"e{n}"}, headers=platform_headers(token)
        ) as resp:
            statuses.add(resp.status)
            if resp.status == 502:
                assert resp.content_type == "text/html"
            else:
                assert (await resp.json())["title"] == "InternalServerError"
    assert statuses == {500, 502}
    assert simulator.stats.batches == []
    assert simulator.stats.faults["error_500"] + simulator.stats.faults["error_502"] == 12


async def test_drop_before_creates_nothing_and_disconnects(
    session: aiohttp.ClientSession, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    simulator, url = await start(drop_before_rate=1.0)
    token = await fetch_token(session, url)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(session, url, token, {"datasetId": DATASET, "externalId": "d"})
    assert simulator.stats.batches == []
    assert simulator.stats.count("batches.create", "dropped") == 1
    # The connection is gone, not the server: the next call is answered.
    assert (await get_json(session, url, token, CATALOG, externalId="d")) == (200, {})
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_drop_after_creates_the_batch_and_disconnects(
    session: aiohttp.ClientSession, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    simulator, url = await start(drop_after_rate=1.0)
    token = await fetch_token(session, url)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(session, url, token, {"datasetId": DATASET, "externalId": "d"})
    assert simulator.stats.batches_per_external_id == {"d": 1}
    found = await get_json(session, url, token, CATALOG, externalId="d")
    assert [batch["externalId"] for batch in found[1].values()] == ["d"]
    assert simulator.stats.faults["drop_after"] == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_slow_create_exists_before_its_answer(session: aiohttp.ClientSession, start: Start) -> None:
    clock = ManualClock()
    simulator, url = await start(clock, slow_rate=1.0, slow_delay=30.0)
    token = await fetch_token(session, url)
    answer = asyncio.create_task(create(session, url, token, {"datasetId": DATASET, "externalId": "s"}))
    await until(lambda: clock.sleepers == 1)
    assert simulator.stats.batches_per_external_id == {"s": 1}
    assert not answer.done()
    clock.advance(30.0)
    status, batch, _ = await answer
    assert status == 201
    assert batch["externalId"] == "s"
    assert simulator.stats.faults["slow"] == 1


async def test_latency_delays_every_platform_answer(session: aiohttp.ClientSession, start: Start) -> None:
    clock = ManualClock()
    _, url = await start(clock, latency=0.2, latency_jitter=0.1)
    token = await fetch_token(session, url)  # IMS is not delayed
    answer = asyncio.create_task(get_json(session, url, token, CATALOG))
    await until(lambda: clock.sleepers == 1)
    clock.advance(0.19)
    await asyncio.sleep(0)
    assert not answer.done()
    clock.advance(0.11)
    assert (await answer)[0] == 200


async def test_faults_are_reproducible_with_a_seed(session: aiohttp.ClientSession, start: Start) -> None:
    outcomes = []
    for _ in range(2):
        simulator, url = await start(error_rate=0.5)
        token = await fetch_token(session, url)
        for n in range(10):
            await create(session, url, token, {"datasetId": DATASET, "externalId": f"r{n}"})
        outcomes.append([(b.external_id, b.id) for b in simulator.stats.batches])
    assert outcomes[0] == outcomes[1]
    assert 0 < len(outcomes[0]) < 10


# Observability


async def test_stats_endpoint_and_reset(session: aiohttp.ClientSession, start: Start) -> None:
    clock = ManualClock()
    simulator, url = await start(clock)
    token = await fetch_token(session, url)
    _, batch, _ = await create(session, url, token, {"datasetId": DATASET, "externalId": "st"})
    await get_json(session, url, "expired", CATALOG)
    async with session.get(url + "/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["tokens_issued"] == 1
    assert stats["calls"] == {
        "batches.create": {"201": 1},
        "batches.list": {"401": 1},
        "ims.token": {"200": 1},
    }
    assert stats["unauthorized"] == 1
    assert stats["batches"] == [
        {"id": batch["id"], "datasetId": DATASET, "externalId": "st", "created": batch["created"]}
    ]
    assert stats["batches_per_external_id"] == {"st": 1}
    assert stats["batches_per_dataset"] == {DATASET: 1}
    assert stats["duplicate_external_ids"] == {}
    assert stats["max_calls_per_second"] == 2
    for key in ("ims_failures", "header_rejections", "throttled", "early_retries", "max_calls_per_period"):
        assert key in stats

    held = simulator.stats
    async with session.post(url + "/_sim/reset") as resp:
        assert resp.status == 200
    assert held.batches == []
    assert held.tokens_issued == 0
    assert simulator.batch(batch["id"]) is None
    # Tokens survive a reset: a running orchestrator stays logged in.
    assert await get_json(session, url, token, CATALOG) == (200, {})


# Configuration and CLI


def test_config_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimulatorConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="rate_limit"):
        SimulatorConfig(rate_limit=0)


def test_cli_flags_build_a_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *(
                "--rate-limit",
                "5",
                "--error-rate",
                "0.25",
                "--unknown-dataset",
                "a",
                "--unknown-dataset",
                "b",
            ),
            *("--retry-after-format", "date", "--seed", "3", "--port", "0"),
        ]
    )
    config = config_from_args(args)
    assert config.rate_limit == 5
    assert config.error_rate == 0.25
    assert config.unknown_datasets == frozenset({"a", "b"})
    assert config.retry_after_format == "date"
    assert config.seed == 3
    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert config_from_args(parser.parse_args([])) == SimulatorConfig()
    assert parser.parse_args([]).port == 8081


@pytest.mark.parametrize("flag", ["--error-rate", "--drop-after-rate", "--ims-error-rate"])
def test_cli_refuses_rates_outside_0_1(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([flag, "1.5"])
    assert exit_info.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err


async def test_serve_logs_its_url_and_runs_until_cancelled(session: aiohttp.ClientSession) -> None:
    with capture_logs() as events:
        task = asyncio.create_task(serve(SimulatorConfig(rate_limit=9), "127.0.0.1", 0))
        await until(lambda: any(e["event"] == "simulator.started" for e in events))
        started = next(e for e in events if e["event"] == "simulator.started")
        async with session.get(started["url"] + "/_sim/stats") as resp:
            assert resp.status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert started["settings"] == {"rate_limit": 9}
    assert "sim-secret" not in repr(events)
