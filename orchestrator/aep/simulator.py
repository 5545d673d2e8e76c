"""A local stand-in for AEP's batch endpoints and IMS's token endpoint, faithful to the reference
(headers, bodies, statuses, error shapes) and able to misbehave on purpose: latency, throttling,
5xx, 503 with Retry-After, dropped connections, slow answers, a lagging catalog, expiring tokens.

One server answers both IMS (`POST /ims/token/v3`) and the Platform paths, so one URL serves as
`ORCH_AEP__BASE_URL` and `ORCH_AEP__IMS_URL`. `GET /_sim/stats` and `POST /_sim/reset` are the
simulator's own; they need no headers and are never faulted.

Choices where the reference is silent (reference §1.5, §4.1 and §6.2 mark them UNCONFIRMED):
- an unknown dataset is a 400 problem body, detail "Dataset <id> not found";
- a 429 carries the gateway body `{"error_code": "429050", "message": "Too many requests"}`, the
  one Adobe's gateway is seen giving elsewhere, and always a Retry-After;
- a 500 and a 503 are problem bodies; a 502 is an HTML page, as a gateway in front gives;
- IMS errors are OAuth2 bodies `{"error", "error_description"}`;
- COMPLETE and ABORT answer 200 with an empty body, as the batch-ingestion guide shows.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from email.utils import format_datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from orchestrator import logs
from orchestrator.aep.simulator_catalog import Catalog, Refusal, bad_request, create_problem, problem
from orchestrator.aep.simulator_config import SimulatorConfig, add_arguments, config_from_args
from orchestrator.aep.simulator_stats import BatchRecord, SimulatorStats, SlidingWindow
from orchestrator.clock import Clock, SystemClock

__all__ = [
    "BatchRecord",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "add_arguments",
    "config_from_args",
    "serve",
]

log = logs.get("simulator")

IMS_PATH = "/ims/token/v3"
IMPORT_BATCHES_PATH = "/data/foundation/import/batches"
CATALOG_BATCHES_PATH = "/data/foundation/catalog/batches"
DROPPED = "dropped"

BAD_GATEWAY_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>\n"


class _Drop:
    """A handler's answer meaning: close the connection without writing anything."""


DROP = _Drop()
Answer = web.Response | _Drop


@dataclass
class _Call:
    endpoint: str
    request: web.Request
    body: bytes
    external_id: str | None
    now: float  # monotonic arrival time


def _gateway_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status, headers=headers)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _drop_connection(request: web.Request) -> web.StreamResponse:
    # Closing the transport first makes aiohttp's write of the response below fail with a
    # ConnectionResetError, which it treats as a client that went away (debug log at most). Raising
    # from the handler instead would be logged at ERROR with a traceback on every drop.
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=444, reason="No Response")


def _external_id_of(endpoint: str, request: web.Request, body: bytes) -> str | None:
    if endpoint == "batches.list":
        return request.query.get("externalId") or None
    if endpoint != "batches.create":
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    value = parsed.get("externalId") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) and value else None


class Simulator:
    """The AEP + IMS simulator: `app` to mount, or `start()` to serve it on a port.

    `config` may be replaced while it runs (a chaos test turning faults on and off); history such
    as rate windows and tokens is kept. Time comes from `clock`: token expiry, rate windows,
    catalog lag and Retry-After deadlines use its monotonic time, batch timestamps and HTTP dates
    its wall time, and latency and slow answers its `sleep`.
    """

    def __init__(self, config: SimulatorConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.stats = SimulatorStats()
        self.url: str | None = None
        self._clock: Clock = clock or SystemClock()
        seed = self.config.seed
        # Two sources so that faults drawn for a given call sequence do not depend on how many
        # ids were made; a None seed gives fresh entropy to both.
        self._rng = random.Random(seed)
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.catalog = Catalog(self._clock, random.Random(None if seed is None else f"ids-{seed}"))
        self._rate_windows: dict[str, SlidingWindow] = {}
        self._second_window = SlidingWindow()
        self._period_window = SlidingWindow()
        self._deadlines: dict[str, float] = {}  # externalId -> monotonic end of its Retry-After
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_post(IMS_PATH, self._token)
        self.app.router.add_post(IMPORT_BATCHES_PATH, self._create)
        self.app.router.add_post(IMPORT_BATCHES_PATH + "/{batch_id}", self._action)
        self.app.router.add_get(CATALOG_BATCHES_PATH, self._list)
        self.app.router.add_get(CATALOG_BATCHES_PATH + "/{batch_id}", self._get)
        self.app.router.add_get("/_sim/stats", self._stats)
        self.app.router.add_post("/_sim/reset", self._reset)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        # A short shutdown grace: a slow answer parked on a manual clock would otherwise hold
        # stop() for aiohttp's default minute.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self.url = f"http://{url_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget batches, counters, rate windows and Retry-After deadlines; tokens stay valid so a
        running orchestrator is not logged out."""
        self.stats.clear()
        self.catalog.clear()
        self._rate_windows.clear()
        self._second_window = SlidingWindow()
        self._period_window = SlidingWindow()
        self._deadlines.clear()

    def issue_token(self) -> str:
        """A valid bearer token without a round trip to IMS (counted in `tokens_issued`)."""
        token = secrets.token_urlsafe(48)
        self._tokens[token] = self._clock.monotonic() + self.config.token_lifetime
        self.stats.tokens_issued += 1
        return token

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """The batch as the catalog holds it now (a copy), or None."""
        batch = self.catalog.get(batch_id)
        return dict(batch) if batch is not None else None

    # IMS

    async def _token(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        form = await request.post()
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
        response = self._grant(params)
        self.stats.calls[("ims.token", str(response.status))] += 1
        if response.status != 200:
            self.stats.ims_failures += 1
        return response

    def _grant(self, params: dict[str, str]) -> web.Response:
        config = self.config
        if self._chance(config.ims_error_rate):
            self._fault("ims_unavailable", "ims.token")
            return _oauth_error(503, "temporarily_unavailable", "The service is temporarily unavailable")
        client_id = params.get("client_id")
        if not client_id:
            return _oauth_error(400, "invalid_client", "client_id is missing")
        if client_id != config.client_id:
            return _oauth_error(400, "invalid_client", "invalid client_id parameter")
        secret = params.get("client_secret")
        if not secret:
            return _oauth_error(400, "invalid_client", "client_secret is missing")
        if not secrets.compare_digest(secret, config.client_secret):
            return _oauth_error(401, "invalid_client", "invalid client_secret parameter")
        grant_type = params.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", f"unsupported grant_type {grant_type!r}")
        if not params.get("scope"):
            return _oauth_error(400, "invalid_scope", "scope is missing")
        token = self.issue_token()
        log.debug("simulator.token_issued", expires_in=config.token_lifetime)
        body = {"access_token": token, "token_type": "bearer", "expires_in": config.token_lifetime}
        return web.json_response(body)

    # Platform: every call goes through `_platform`, which owns headers, throttling, faults, delay.

    async def _create(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.create", request, self._do_create)

    async def _action(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.action", request, self._do_action)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.get", request, self._do_get)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.list", request, self._do_list)

    async def _platform(
        self, endpoint: str, request: web.Request, handler: Callable[[_Call], Awaitable[Answer]]
    ) -> web.StreamResponse:
        now = self._clock.monotonic()
        self._note_arrival(now)
        body = await request.read()
        call = _Call(endpoint, request, body, _external_id_of(endpoint, request, body), now)
        if call.external_id is not None:
            self._check_early(call)
        answer: Answer | None = self._check_headers(call) or self._throttle(call) or self._failure(call)
        if answer is None:
            try:
                answer = await handler(call)
            except Refusal as refusal:
                answer = refusal.response
        delay = self._answer_delay(endpoint)
        if delay > 0:
            await self._clock.sleep(delay)
        if isinstance(answer, _Drop):
            self.stats.calls[(endpoint, DROPPED)] += 1
            return _drop_connection(request)
        self.stats.calls[(endpoint, str(answer.status))] += 1
        return answer

    def _note_arrival(self, now: float) -> None:
        self._second_window.add(now)
        self._period_window.add(now)
        self.stats.max_calls_per_second = max(
            self.stats.max_calls_per_second, self._second_window.count(now, 1.0)
        )
        self.stats.max_calls_per_period = max(
            self.stats.max_calls_per_period, self._period_window.count(now, self.config.rate_period)
        )

    def _check_early(self, call: _Call) -> None:
        assert call.external_id is not None
        deadline = self._deadlines.get(call.external_id)
        if deadline is None:
            return
        if call.now < deadline:
            self.stats.early_retries += 1
            log.debug(
                "simulator.early_retry",
                endpoint=call.endpoint,
                external_id=call.external_id,
                early_by=round(deadline - call.now, 3),
            )
        else:
            del self._deadlines[call.external_id]

    def _check_headers(self, call: _Call) -> web.Response | None:
        """The gateway's checks, in its order, with its bodies (reference §4.1, §7)."""
        config = self.config
        headers = call.request.headers
        authorization = headers.get("Authorization", "").strip()
        if not authorization:
            return self._reject(call, "403010", _gateway_error(403, "403010", "Oauth token is missing."))
        scheme, _, token = authorization.partition(" ")
        expires = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires is None or call.now >= expires:
            self.stats.unauthorized += 1
            if expires is not None:
                self.stats.expired_tokens += 1
            reason = "unknown" if expires is None else "expired"
            log.debug("simulator.unauthorized", endpoint=call.endpoint, reason=reason)
            return _gateway_error(401, "401013", "Oauth token is not valid")
        api_key = headers.get("x-api-key", "").strip()
        if not api_key:
            return self._reject(call, "403000", _gateway_error(403, "403000", "Api Key is required"))
        if api_key != config.client_id:
            return self._reject(call, "403003", _gateway_error(403, "403003", "Api Key is invalid"))
        org = headers.get("x-gw-ims-org-id", "").strip()
        if not org:
            return self._reject(call, "400003", _gateway_error(400, "400003", "Missing header"))
        if org != config.org_id:
            return self._reject(call, "403025", _gateway_error(403, "403025", "Profile is not valid"))
        if not headers.get("x-sandbox-name", "").strip():
            detail = "The x-sandbox-name header is required"
            return self._reject(call, "sandbox", bad_request(detail))
        has_body = call.endpoint == "batches.create" or bool(call.body)
        if has_body and call.request.content_type != "application/json":
            detail = "A valid content-type must be specified"
            return self._reject(call, "content-type", bad_request(detail))
        return None

    def _reject(self, call: _Call, code: str, response: web.Response) -> web.Response:
        self.stats.header_rejections += 1
        self.stats.rejections[code] += 1
        log.debug("simulator.header_rejected", endpoint=call.endpoint, code=code)
        return response

    def _throttle(self, call: _Call) -> web.Response | None:
        limit = self.config.rate_limit
        if limit is None:
            return None
        period = self.config.rate_period
        window = self._rate_windows.setdefault(call.request.headers["x-gw-ims-org-id"], SlidingWindow())
        if window.count(call.now, period) < limit:
            window.add(call.now)
            return None
        oldest = window.oldest()
        wait = max(1, math.ceil((oldest if oldest is not None else call.now) + period - call.now))
        self.stats.throttled += 1
        self._fault("throttled", call.endpoint, retry_after=wait)
        headers = self._retry_after(call, wait)
        return _gateway_error(429, "429050", "Too many requests", headers=headers)

    def _failure(self, call: _Call) -> web.Response | None:
        config = self.config
        if self._chance(config.throttle_rate):
            # A 429 the client could not have avoided by pacing: a busy org, another client.
            self.stats.throttled += 1
            self._fault("throttled", call.endpoint, retry_after=config.throttle_retry_after)
            headers = self._retry_after(call, config.throttle_retry_after)
            return _gateway_error(429, "429050", "Too many requests", headers=headers)
        if self._chance(config.unavailable_rate):
            self._fault("unavailable", call.endpoint)
            headers = self._retry_after(call, config.unavailable_retry_after)
            detail = "The service is currently unavailable."
            return problem(503, "ServiceUnavailableError", detail, headers=headers)
        if self._chance(config.error_rate):
            status = self._rng.choice((500, 502))
            self._fault(f"error_{status}", call.endpoint)
            if status == 502:
                return web.Response(status=502, text=BAD_GATEWAY_PAGE, content_type="text/html")
            return problem(500, "InternalServerError", "An internal server error has occurred.")
        return None

    def _retry_after(self, call: _Call, seconds: int) -> dict[str, str]:
        """The Retry-After header in the configured format; remembers when it ends for the call's
        externalId, to count retries that come back sooner."""
        value = str(seconds)
        wait = float(seconds)
        if self.config.retry_after_format == "date":
            wall = self._clock.now()
            # HTTP dates have whole seconds: round up, never tell a time before the one meant.
            at = wall + timedelta(seconds=seconds)
            if at.microsecond:
                at += timedelta(microseconds=1_000_000 - at.microsecond)
            value = format_datetime(at, usegmt=True)
            wait = (at - wall).total_seconds()
        if call.external_id is not None:
            deadline = call.now + wait
            self._deadlines[call.external_id] = max(deadline, self._deadlines.get(call.external_id, 0.0))
        return {"Retry-After": value}

    def _answer_delay(self, endpoint: str) -> float:
        config = self.config
        delay = config.latency
        if config.latency_jitter > 0:
            delay += self._rng.uniform(0, config.latency_jitter)
        if self._chance(config.slow_rate):
            self._fault("slow", endpoint, delay=config.slow_delay)
            delay += config.slow_delay
        return delay

    def _chance(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _fault(self, fault: str, endpoint: str, **details: Any) -> None:
        self.stats.faults[fault] += 1
        log.debug("simulator.fault", fault=fault, endpoint=endpoint, **details)

    async def _do_create(self, call: _Call) -> Answer:
        config = self.config
        if self._chance(config.drop_before_rate):
            self._fault("drop_before", call.endpoint, external_id=call.external_id)
            return DROP
        try:
            body = json.loads(call.body)
        except ValueError:
            return bad_request("The request body is not valid JSON")
        reason = create_problem(body, config.unknown_datasets)
        if reason is not None:
            return bad_request(reason)
        batch = self.catalog.create(
            body, org_id=config.org_id, client_id=config.client_id, lag=config.catalog_lag
        )
        record = BatchRecord(batch["id"], body["datasetId"], batch["externalId"], batch["created"])
        self.stats.record_batch(record)
        log.debug(
            "simulator.batch_created",
            batch_id=record.id,
            dataset_id=record.dataset_id,
            external_id=record.external_id,
        )
        if self._chance(config.drop_after_rate):
            self._fault("drop_after", call.endpoint, batch_id=batch["id"], external_id=batch["externalId"])
            return DROP
        return web.json_response(batch, status=201)

    async def _do_get(self, call: _Call) -> Answer:
        return self.catalog.answer_get(call.request.match_info["batch_id"], call.request.query)

    async def _do_list(self, call: _Call) -> Answer:
        return self.catalog.answer_list(call.request.query)

    async def _do_action(self, call: _Call) -> Answer:
        return self.catalog.answer_action(call.request.match_info["batch_id"], call.request.query)

    # The simulator's own endpoints.

    def live_batches(self) -> dict[str, list[str]]:
        """The live batches (not aborted, failed, ...) of each externalId, oldest first."""
        return self.catalog.live_per_external_id()

    def live_duplicates(self) -> dict[str, int]:
        """The externalIds with more than one live batch: a request that holds two batches AEP may
        ingest."""
        return {key: len(ids) for key, ids in self.live_batches().items() if len(ids) > 1}

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                **self.stats.as_dict(),
                "live_batches": self.live_batches(),
                "live_duplicate_external_ids": self.live_duplicates(),
            }
        )

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        log.info("simulator.reset")
        return web.json_response({"reset": True})


def _describe(config: SimulatorConfig) -> dict[str, Any]:
    """The settings that differ from the defaults, for the start-up log line (never the secret)."""
    defaults = asdict(SimulatorConfig())
    changed = {k: v for k, v in asdict(config).items() if v != defaults[k] and k != "client_secret"}
    if "unknown_datasets" in changed:
        changed["unknown_datasets"] = sorted(config.unknown_datasets)
    return changed


async def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8081) -> None:
    """Run the simulator until cancelled (`orchestrator simulate`)."""
    simulator = Simulator(config)
    url = await simulator.start(host, port)
    log.info(
        "simulator.started",
        url=url,
        client_id=config.client_id,
        org_id=config.org_id,
        settings=_describe(config),
    )
    try:
        await asyncio.Event().wait()
    finally:
        await simulator.stop()
        log.info("simulator.stopped", url=url)
