"""The service's HTTP surface (aiohttp): health for the orchestrator of containers, metrics for
Prometheus, and the records for the upload steps.

- `GET /healthz`: 200 while the event loop answers and the service's tasks are alive, else 503
  with the dead ones named. A liveness probe: restarting fixes what it reports.
- `GET /readyz`: 200 when the queue, the store and the AEP credentials are usable, else 503 with
  the reasons as JSON. A readiness probe: waiting fixes what it reports.
- `GET /metrics`: the Prometheus text format.
- `GET /batches?state=&datasetId=&after=&limit=`: records (the contract's shape) in the order
  they were recorded, `limit` (1-1000, default 100) at a time; `next` is the `after` of the next
  page, null on the last. `GET /batches/{requestId}`: one record, 404 when unknown.

Every query value is validated before it reaches the store; errors are `{"error": "..."}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from orchestrator import logs
from orchestrator.messages import DATASET_ID, REQUEST_ID
from orchestrator.metrics import CONTENT_TYPE_LATEST, Metrics
from orchestrator.store.base import BatchStore, State

log = logs.get("http")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Probes:
    """What the endpoints ask the service: the problems that make it not alive, and those that
    make it not ready (by component); empty when all is well."""

    live: Callable[[], list[str]]
    ready: Callable[[], Awaitable[dict[str, str]]]


def make_app(probes: Probes, metrics: Metrics, store: BatchStore) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        problems = probes.live()
        if problems:
            return web.json_response({"status": "failing", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await probes.ready()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_text(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def batches(request: web.Request) -> web.Response:
        query = request.query
        try:
            state = _state(query.get("state"))
            dataset_id = _dataset(query.get("datasetId"))
            after = _whole(query.get("after"), "after", 0, None, default=0)
            limit = _whole(query.get("limit"), "limit", 1, MAX_LIMIT, default=DEFAULT_LIMIT)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        records, following = await store.page(state, dataset_id, after, limit)
        return web.json_response({"batches": [record.to_json() for record in records], "next": following})

    async def batch(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        if not REQUEST_ID.fullmatch(request_id):
            return web.json_response({"error": "not a request id"}, status=400)
        record = await store.get(request_id)
        if record is None:
            return web.json_response({"error": "no such request"}, status=404)
        return web.json_response(record.to_json())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/batches", batches)
    app.router.add_get("/batches/{request_id}", batch)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen on host:port; the caller cleans the runner up on shutdown."""
    # No access log: probes and scrapes every few seconds would drown the service's own events.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("http.listening", host=host, port=bound_port(runner) or port)
    return runner


def bound_port(runner: web.AppRunner) -> int | None:
    """The port actually listened on (port 0 asks the system for a free one)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def _state(value: str | None) -> State | None:
    if value is None or value == "":
        return None
    try:
        return State(value)
    except ValueError:
        raise ValueError(f"state must be one of {', '.join(s.value for s in State)}") from None


def _dataset(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not DATASET_ID.fullmatch(value):
        raise ValueError("datasetId must be 1 to 128 letters, digits, '-' or '_'")
    return value


def _whole(value: str | None, name: str, low: int, high: int | None, *, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 18:
        raise ValueError(f"{name} must be a whole number")
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}")
    return number
