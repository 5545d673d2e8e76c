"""The HTTP surface: probes, metrics, and the records API with its validation and cursor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from orchestrator.clock import ManualClock
from orchestrator.http import Probes, make_app
from orchestrator.messages import BatchRequest
from orchestrator.metrics import Metrics
from orchestrator.store.sql import SqlBatchStore

Client = TestClient[object, object]


class State:
    def __init__(self) -> None:
        self.dead: list[str] = []
        self.not_ready: dict[str, str] = {}

    def live(self) -> list[str]:
        return self.dead

    async def ready(self) -> dict[str, str]:
        return self.not_ready


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
async def client(store: SqlBatchStore, state: State) -> AsyncIterator[Client]:
    metrics = Metrics()
    metrics.request_finished("created")
    app = make_app(Probes(state.live, state.ready), metrics, store)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_probes_answer_200_then_503_with_reasons(client: Client, state: State) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ready"})
    state.dead.append("dispatcher stopped")
    state.not_ready["credentials"] = "IMS refused the client credentials"
    live = await client.get("/healthz")
    assert (live.status, (await live.json())["problems"]) == (503, ["dispatcher stopped"])
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["reasons"] == {"credentials": "IMS refused the client credentials"}


async def test_metrics_are_prometheus_text(client: Client) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'orchestrator_requests_total{outcome="created"} 1.0' in await response.text()


async def test_batches_pages_with_a_cursor_and_filters(
    client: Client, store: SqlBatchStore, clock: ManualClock
) -> None:
    for index in range(5):
        dataset = "even" if index % 2 == 0 else "odd"
        await store.add(BatchRequest(request_id=f"r{index}", dataset_id=dataset), clock.now())
    first = await (await client.get("/batches", params={"limit": "2"})).json()
    assert [b["requestId"] for b in first["batches"]] == ["r0", "r1"]
    second = await (await client.get("/batches", params={"limit": "2", "after": str(first["next"])})).json()
    assert [b["requestId"] for b in second["batches"]] == ["r2", "r3"]
    last = await (await client.get("/batches", params={"limit": "2", "after": str(second["next"])})).json()
    assert ([b["requestId"] for b in last["batches"]], last["next"]) == (["r4"], None)
    even = await (await client.get("/batches", params={"datasetId": "even", "state": "pending"})).json()
    assert [b["requestId"] for b in even["batches"]] == ["r0", "r2", "r4"]
    assert even["batches"][0]["state"] == "pending"


@pytest.mark.parametrize(
    "query",
    [
        {"state": "done"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"after": "x"},
        {"datasetId": "a/b"},
    ],
)
async def test_bad_queries_are_400_with_a_reason(client: Client, query: dict[str, str]) -> None:
    response = await client.get("/batches", params=query)
    assert response.status == 400
    assert (await response.json())["error"]


async def test_one_record_or_404(client: Client, store: SqlBatchStore, clock: ManualClock) -> None:
    await store.add(BatchRequest(request_id="crm-2026 11/28", dataset_id="d1"), clock.now())
    found = await client.get("/batches/crm-2026%2011%2F28")
    assert (found.status, (await found.json())["datasetId"]) == (200, "d1")
    missing = await client.get("/batches/nope")
    assert (missing.status, await missing.json()) == (404, {"error": "no such request"})
