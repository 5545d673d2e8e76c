"""A local stand-in for AEP's batch endpoints and IMS's token endpoint, faithful to the reference
(headers, bodies, statuses, error shapes) and able to misbehave on purpose: latency, throttling,
5xx, 503 with Retry-After, dropped connections, slow answers, a lagging catalog, expiring tokens.

One server answers both IMS (`POST /ims/token/v3`) and the Platform paths, so one URL serves as
`ORCH_AEP__BASE_URL` and `ORCH_AEP__IMS_URL`. `GET /_sim/stats`, `GET /_sim/files` and
`POST /_sim/reset` are the simulator's own; they need no headers and are never faulted.

The batch lifecycle: create, upload files (small PUT, or large INITIALIZE + PATCH parts + COMPLETE,
reference §2), COMPLETE the batch, which is `processing` for `processing_time` seconds and then
`success` or `failed` (reference §3). File bodies are streamed to a temporary directory, never held
in memory (`simulator_files.py`).

Choices where the reference is silent (reference §1.5, §4.1 and §6.2 mark them UNCONFIRMED):
- an unknown dataset is a 400 problem body, detail "Dataset <id> not found";
- a 429 carries the gateway body `{"error_code": "429050", "message": "Too many requests"}`, the
  one Adobe's gateway is seen giving elsewhere, and always a Retry-After;
- a 500 and a 503 are problem bodies; a 502 is an HTML page, as a gateway in front gives;
- IMS errors are OAuth2 bodies `{"error", "error_description"}`;
- COMPLETE and ABORT answer 200 with an empty body, as the batch-ingestion guide shows;
- a batch can be aborted while loading or processing, not once success or failed (reference §3.2);
- a file upload to a batch that is not loading is a 400 problem "Batch <id> is <status>: files can
  no longer be added"; the file endpoints refuse a filePath with an empty, `.` or `..` segment (400);
- PUT and PATCH without `Content-Type: application/octet-stream` are a 415 problem
  (UnsupportedMediaTypeError, the spec's "The uploaded file media type isn't supported.");
- INITIALIZE of an existing file, finished or not, starts it again empty (201);
- PATCH of a file not initialized, already completed, or with a Content-Range that is malformed,
  ends past an announced size, announces another size than earlier parts, or does not match the
  body's length is a 400; a refused part is not counted as received. Its 200 carries
  `Range: bytes=0-<last>` for the bytes received from 0 without a gap (no header when none) and
  `{"name", "sizeInBytes"}` with every byte received so far;
- HEAD of a file gives the same Range header, 404 when there is no such file;
- a file COMPLETE checks the ranges (reference §2.2): 400 naming the first gap, or bytes sent twice
  with different content (identical re-sends are retries, accepted), or parts still uploading;
  completing a finished file again, or a small file, is 200;
- a batch COMPLETE is a 400 while a large file is unfinished or a body is still being received;
- a finished batch's errors: code "106" (the documented empty-file error) for a batch without files
  or with an empty file, "INGEST-1212-400" for a dataset in `fail_datasets`; a failed batch has
  `failedRecordCount` = `recordCount` and `metrics.outputRecordCount` 0;
- a record is a line: a file's newlines, plus one when it does not end with one;
- `upload_error_rate` answers 500 before anything is stored; a body cut short is a 400.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from orchestrator import logs
from orchestrator.aep.simulator_catalog import (
    Catalog,
    Refusal,
    bad_request,
    create_problem,
    not_found,
    problem,
    processing_outcome,
)
from orchestrator.aep.simulator_config import SimulatorConfig, add_arguments, config_from_args
from orchestrator.aep.simulator_files import (
    CHUNK,
    FileStore,
    StoredFile,
    bad_file_path,
    describe,
    parse_content_range,
)
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
FILES_PATH = IMPORT_BATCHES_PATH + "/{batch_id}/datasets/{dataset_id}/files/{file_path:.+}"
OCTET_STREAM = "application/octet-stream"
DROPPED = "dropped"

# Stats endpoint names by `action` query value; anything else is refused under the fallback name.
BATCH_ACTIONS = {"COMPLETE": "batches.complete", "ABORT": "batches.abort"}
FILE_ACTIONS = {"INITIALIZE": "files.initialize", "COMPLETE": "files.complete"}

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
    streamed: bool = False  # the body is a file's bytes, left unread for the handler to stream


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


def _endpoint(request: web.Request, names: Mapping[str, str], fallback: str) -> str:
    return names.get(request.query.get("action", "").upper(), fallback)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in chunks, as it arrives."""
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            yield chunk
    except (ConnectionError, HttpProcessingError) as error:
        # The client went away or broke the framing: a refusal to answer (if anyone still listens),
        # not a server error logged with a traceback.
        raise Refusal(bad_request(f"The request body could not be read: {error}")) from None


def _received_range(stored: StoredFile) -> dict[str, str]:
    """The `Range` header of PATCH and HEAD: what arrived from byte 0 without a gap."""
    return {"Range": f"bytes=0-{stored.prefix - 1}"} if stored.prefix else {}


def _no_such_file() -> web.Response:
    return problem(404, "NotFoundError", "The batch or dataset resource is not found.")


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
        self._files = FileStore(self.config.files_dir)
        self._rate_windows: dict[str, SlidingWindow] = {}
        self._second_window = SlidingWindow()
        self._period_window = SlidingWindow()
        self._deadlines: dict[str, float] = {}  # externalId -> monotonic end of its Retry-After
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_post(IMS_PATH, self._token)
        self.app.router.add_post(IMPORT_BATCHES_PATH, self._create)
        self.app.router.add_post(IMPORT_BATCHES_PATH + "/{batch_id}", self._action)
        self.app.router.add_put(FILES_PATH, self._file_put)
        self.app.router.add_patch(FILES_PATH, self._file_patch)
        self.app.router.add_post(FILES_PATH, self._file_action)
        self.app.router.add_route("HEAD", FILES_PATH, self._file_head)
        self.app.router.add_get(CATALOG_BATCHES_PATH, self._list)
        self.app.router.add_get(CATALOG_BATCHES_PATH + "/{batch_id}", self._get)
        self.app.router.add_get("/_sim/stats", self._stats)
        self.app.router.add_get("/_sim/files", self._files_view)
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
        self._files.clear()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget batches, their files, counters, rate windows and Retry-After deadlines; tokens
        stay valid so a running orchestrator is not logged out."""
        self.stats.clear()
        self.catalog.clear()
        self._files.clear()
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

    def files(self, batch_id: str) -> dict[str, dict[str, Any]]:
        """The batch's files by name: `{"size", "sha256", "complete"}` each (reads them from disk)."""
        return describe(self.files_of(batch_id))

    def files_of(self, batch_id: str) -> dict[str, StoredFile]:
        """The batch's files as stored (their `path` on disk included), by name."""
        return self._files.of(batch_id)

    @property
    def files_root(self) -> Path | None:
        """The temporary directory holding the uploaded bytes, once the first upload made it."""
        return self._files.root

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
        endpoint = _endpoint(request, BATCH_ACTIONS, "batches.action")
        return await self._platform(endpoint, request, self._do_action)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.get", request, self._do_get)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("batches.list", request, self._do_list)

    async def _file_put(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("files.put", request, self._do_put, streamed=True)

    async def _file_patch(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("files.patch", request, self._do_patch, streamed=True)

    async def _file_action(self, request: web.Request) -> web.StreamResponse:
        endpoint = _endpoint(request, FILE_ACTIONS, "files.action")
        return await self._platform(endpoint, request, self._do_file_action)

    async def _file_head(self, request: web.Request) -> web.StreamResponse:
        return await self._platform("files.head", request, self._do_head)

    async def _platform(
        self,
        endpoint: str,
        request: web.Request,
        handler: Callable[[_Call], Awaitable[Answer]],
        *,
        streamed: bool = False,
    ) -> web.StreamResponse:
        """`streamed` endpoints take a file's bytes: the gateway checks, throttling and faults come
        before any of it is read, and the handler streams it to disk instead of reading it whole."""
        now = self._clock.monotonic()
        self._note_arrival(now)
        body = b"" if streamed else await request.read()
        call = _Call(endpoint, request, body, _external_id_of(endpoint, request, body), now, streamed)
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
        if call.streamed:
            if call.request.content_type != OCTET_STREAM:
                detail = "The uploaded file media type isn't supported."
                return self._reject(call, "content-type", problem(415, "UnsupportedMediaTypeError", detail))
            return None
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
        batch_id = call.request.match_info["batch_id"]
        action = call.request.query.get("action", "").upper()
        if action == "ABORT":
            return self.catalog.answer_abort(batch_id)
        if action == "COMPLETE":
            return await self._complete_batch(batch_id)
        return bad_request("action must be COMPLETE or ABORT")

    async def _complete_batch(self, batch_id: str) -> Answer:
        batch = self.catalog.get(batch_id)
        if batch is None:
            return not_found(batch_id)
        status = batch["status"]
        if status == "aborted":
            return bad_request(f"Batch {batch_id} is aborted and cannot be completed")
        if status != "loading":
            # Retrying COMPLETE is safe: "the API will return success" (reference §3.1).
            return web.Response(status=200)
        reason = self._unfinished(batch_id)
        if reason is not None:
            return bad_request(reason)
        # Out of loading before the files are read, so no upload can slip in while they are.
        self.catalog.start_processing(batch_id, self.config.processing_time)
        self.stats.completed_batches += 1
        try:
            summary = await self._files.summarize(batch_id)
        except FileNotFoundError:
            if self.catalog.get(batch_id) is None:  # a reset removed the batch and its files meanwhile
                return not_found(batch_id)
            raise
        failing = batch["relatedObjects"][0]["id"] in self.config.fail_datasets
        self.catalog.settle(batch_id, processing_outcome(summary, failing))
        # The batch-ingestion guide shows an empty 200; the spec's Batch body is not relied on.
        return web.Response(status=200)

    def _unfinished(self, batch_id: str) -> str | None:
        """Why the batch cannot be completed yet: "All the files you want to ingest must be
        uploaded before marking the batch as complete" (reference §3.1)."""
        if self._files.busy(batch_id):
            return f"Batch {batch_id} has file uploads in progress"
        names = sorted(name for name, stored in self._files.of(batch_id).items() if not stored.complete)
        if names:
            return f"Batch {batch_id} has files initialized but not completed: {', '.join(names)}"
        return None

    # Files (reference §2)

    def _file_target(self, call: _Call) -> tuple[str, str, dict[str, Any]]:
        """The batch id, file name and batch of a file call; refuses a bad file path (400), an
        unknown batch or a dataset that is not the batch's (404)."""
        info = call.request.match_info
        batch_id, name = info["batch_id"], info["file_path"]
        reason = bad_file_path(name)
        if reason is not None:
            raise Refusal(bad_request(reason))
        batch = self.catalog.get(batch_id)
        if batch is None or batch["relatedObjects"][0]["id"] != info["dataset_id"]:
            raise Refusal(_no_such_file())
        return batch_id, name, batch

    def _require_loading(self, call: _Call, batch: dict[str, Any]) -> None:
        status = batch["status"]
        if status == "loading":
            return
        self.stats.uploads_after_complete += 1
        log.debug("simulator.upload_refused", endpoint=call.endpoint, batch_id=batch["id"], status=status)
        raise Refusal(bad_request(f"Batch {batch['id']} is {status}: files can no longer be added"))

    def _upload_fault(self, call: _Call) -> web.Response | None:
        """`upload_error_rate`: a 500 drawn before anything is stored."""
        if not self._chance(self.config.upload_error_rate):
            return None
        self._fault("upload_error", call.endpoint)
        return problem(500, "InternalServerError", "An internal server error has occurred.")

    async def _do_put(self, call: _Call) -> Answer:
        fault = self._upload_fault(call)
        if fault is not None:
            return fault
        batch_id, name, batch = self._file_target(call)
        self._require_loading(call, batch)
        with self._files.uploading(batch_id):
            path, size = await self._files.receive(batch_id, _body(call.request))
            try:
                # The batch may have been aborted or forgotten while the bytes arrived.
                self._require_loading(call, self._file_target(call)[2])
            except Refusal:
                self._files.discard(path)
                raise
            replaced = self._files.store(batch_id, name, path, size)
        self.stats.files_stored += 1
        log.debug("simulator.file_stored", batch_id=batch_id, name=name, size=size, replaced=replaced)
        return web.Response(status=200 if replaced else 201)

    async def _do_file_action(self, call: _Call) -> Answer:
        action = call.request.query.get("action", "").upper()
        if action not in FILE_ACTIONS:
            return bad_request("action must be INITIALIZE or COMPLETE")
        fault = self._upload_fault(call)
        if fault is not None:
            return fault
        batch_id, name, batch = self._file_target(call)
        if action == "INITIALIZE":
            self._require_loading(call, batch)
            self._files.initialize(batch_id, name)
            log.debug("simulator.file_initialized", batch_id=batch_id, name=name)
            return web.Response(status=201)
        return self._complete_file(batch_id, name, batch)

    def _complete_file(self, batch_id: str, name: str, batch: dict[str, Any]) -> Answer:
        stored = self._files.get(batch_id, name)
        if stored is None:
            return bad_request(f"File {name} was not initialized")
        if stored.complete:
            return web.Response(status=200)  # a retry, or a small file: finished already
        if batch["status"] != "loading":
            return bad_request(f"Batch {batch_id} is {batch['status']}: files can no longer be added")
        reason = self._files.finish(stored)
        if reason is not None:
            return bad_request(f"File {name} cannot be completed: {reason}")
        self.stats.files_stored += 1
        log.debug("simulator.file_completed", batch_id=batch_id, name=name, size=stored.size)
        return web.Response(status=200)

    def _part(self, call: _Call, stored: StoredFile | None, name: str) -> tuple[StoredFile, int, int]:
        """The file and byte range [start, end) a PATCH writes; refuses (400) what can be refused
        before its body is read."""
        if stored is None or not stored.large:
            raise Refusal(bad_request(f"File {name} was not initialized: POST ?action=INITIALIZE first"))
        if stored.complete:
            raise Refusal(bad_request(f"File {name} is already complete"))
        try:
            start, end, total = parse_content_range(call.request.headers.get("Content-Range"))
        except ValueError as error:
            raise Refusal(bad_request(str(error))) from None
        if stored.total is not None and total is not None and total != stored.total:
            detail = f"Content-Range announces {total} bytes; earlier parts announced {stored.total}"
            raise Refusal(bad_request(detail))
        size = stored.total if total is None else total
        if size is not None and max(end, stored.size) > size:
            raise Refusal(bad_request(f"Content-Range goes past the file's size of {size} bytes"))
        length = call.request.content_length
        if length is not None and length != end - start:
            raise Refusal(bad_request(f"The body has {length} bytes; the Content-Range says {end - start}"))
        if total is not None:
            stored.total = total
        return stored, start, end

    async def _do_patch(self, call: _Call) -> Answer:
        fault = self._upload_fault(call)
        if fault is not None:
            return fault
        batch_id, name, batch = self._file_target(call)
        self._require_loading(call, batch)
        stored, start, end = self._part(call, self._files.get(batch_id, name), name)
        with self._files.uploading(batch_id):
            # Without a Content-Length (chunked) the length is known only once the body is read.
            length = await self._files.write_part(stored, start, end, _body(call.request))
        if length != end - start:
            return bad_request(f"The body has {length} bytes; the Content-Range says {end - start}")
        if self._files.get(batch_id, name) is not stored:
            return bad_request(f"File {name} was initialized again while this part was uploading")
        self._require_loading(call, self._file_target(call)[2])
        received = sum(b - a for a, b in stored.received)
        return web.json_response({"name": name, "sizeInBytes": received}, headers=_received_range(stored))

    async def _do_head(self, call: _Call) -> Answer:
        batch_id, name, _ = self._file_target(call)
        stored = self._files.get(batch_id, name)
        if stored is None:
            return _no_such_file()
        return web.Response(status=200, headers=_received_range(stored))

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

    async def _files_view(self, request: web.Request) -> web.StreamResponse:
        """Every batch with files: `{batchId: {"datasetId", "status", "files": {name: {"size",
        "sha256", "complete"}}}}`."""
        snapshot = {batch_id: self._files.of(batch_id) for batch_id in self._files.batch_ids()}
        # Hashing reads every file: off the event loop, on a snapshot the loop will not change.
        described = await asyncio.to_thread(lambda: {key: describe(files) for key, files in snapshot.items()})
        view: dict[str, Any] = {}
        for batch_id, files in described.items():
            batch = self.catalog.get(batch_id)
            if batch is not None and files:
                dataset_id = batch["relatedObjects"][0]["id"]
                view[batch_id] = {"datasetId": dataset_id, "status": batch["status"], "files": files}
        return web.json_response(view)

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        log.info("simulator.reset")
        return web.json_response({"reset": True})


def _describe(config: SimulatorConfig) -> dict[str, Any]:
    """The settings that differ from the defaults, for the start-up log line (never the secret)."""
    defaults = asdict(SimulatorConfig())
    changed = {k: v for k, v in asdict(config).items() if v != defaults[k] and k != "client_secret"}
    for name in ("unknown_datasets", "fail_datasets"):
        if name in changed:
            changed[name] = sorted(changed[name])
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
