"""The Platform API over aiohttp: the `BatchApi` port with headers, token, timeouts, the gate, and
every failure turned into a typed `AepError` the retry table can classify.

The client itself never retries, with one exception: a 401 gets a fresh token and one replay,
because that is a property of tokens, not a retry policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from orchestrator import logs
from orchestrator.aep.api import Batch, BatchState, Body, CallGate
from orchestrator.aep.auth import TokenProvider, TokenRefused
from orchestrator.aep.errors import AepHttpError, AepTimeout, AepTransportError
from orchestrator.messages import DATASET_ID, BatchRequest
from orchestrator.observe import NULL, Observer
from orchestrator.settings import AepSettings

log = logs.get("aep")
# The same logger structlog writes through: asking it first keeps the per-call debug event free
# when debug is off (the structlog processors would otherwise run for every call).
_stdlib_log = logging.getLogger("aep")

# Batch ids go into URL paths: only what AEP issues (hex, ULIDs), nothing that could change the path.
BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# External ids go into a query string (yarl encodes it); still refuse what no caller should send.
EXTERNAL_ID = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
MAX_DETAIL = 300
# The catalog's page limit (reference §3.5); a request has one batch, a few after lost answers.
LOOKUP_LIMIT = 100
# Pages a look-up reads at most: far more batches under one externalId than any retry history makes.
LOOKUP_MAX_PAGES = 20


# What a status poll asks the catalog for: enough for AEP's final word, not the whole batch.
STATUS_PROPERTIES = "status,errors,recordCount,failedRecordCount,metrics"
# "bytes=0-1023", "bytes 0-1023", "0 - 1023": the last byte AEP has of a file.
_RANGE_END = re.compile(r"(\d+)\s*-\s*(\d+)")


@dataclass(frozen=True)
class _Reply:
    status: int
    text: str
    retry_after: str | None
    range: str | None = None


@dataclass(frozen=True)
class _Upload:
    """A request body of file bytes: opened anew for each send, `size` bytes long."""

    body: Body
    size: int


class AepClient:
    """`BatchApi` over an aiohttp session the caller owns (and closes)."""

    def __init__(
        self,
        settings: AepSettings,
        session: aiohttp.ClientSession,
        tokens: TokenProvider,
        gate: CallGate | None = None,
        observer: Observer = NULL,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._gate = gate
        self._observer = observer
        base = URL(str(settings.base_url))
        self._create_url = base.joinpath("data", "foundation", "import", "batches")
        # File bodies can take far longer than one API call: bounded by silence, not by duration.
        self._upload_timeout = aiohttp.ClientTimeout(
            total=None, connect=min(10.0, settings.timeout), sock_read=settings.timeout
        )
        self._catalog_url = base.joinpath("data", "foundation", "catalog", "batches")
        connect = min(10.0, settings.timeout)
        # `total` bounds the whole call, body included, as ORCH_AEP__TIMEOUT promises; `connect`
        # fails fast on a host that does not answer, which is also the one certainly-unsent case.
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout, connect=connect, sock_connect=connect)
        headers = {"Accept": "application/json", "x-sandbox-name": settings.sandbox}
        # Missing ones are left out rather than sent empty: AEP then names the missing header
        # (403000, 400003), and `credentials_problems` has already told the operator.
        if settings.client_id is not None:
            headers["x-api-key"] = settings.client_id
        if settings.org_id is not None:
            headers["x-gw-ims-org-id"] = settings.org_id
        self._headers = headers

    async def ensure_token(self) -> None:
        await self._tokens.token()

    async def create_batch(self, request: BatchRequest, input_format: str) -> Batch:
        input_spec: dict[str, Any] = {"format": request.input_format or input_format}
        if request.multiline_json is not None:
            input_spec["isMultiLineJson"] = request.multiline_json
        body: dict[str, Any] = {
            "datasetId": request.dataset_id,
            "inputFormat": input_spec,
            "externalId": request.external_id,
        }
        if request.tags:
            body["tags"] = request.tags
        endpoint = "batches.create"
        reply = await self._call(endpoint, "POST", self._create_url, body=body)
        if reply.status != 201:
            raise _http_error(endpoint, reply)
        data = _json(reply.text)
        batch = _batch(data) if isinstance(data, dict) else None
        if batch is None:
            # Something answered 201 but gave no batch id: we cannot record it, and cannot tell
            # whether a batch exists. The caller should treat this as an ambiguous create.
            raise AepHttpError(
                f"{endpoint} answered HTTP {reply.status} without a batch id",
                endpoint=endpoint,
                status=reply.status,
                detail=_truncate(reply.text) or "empty body",
            )
        return batch

    async def find_batches(self, external_id: str) -> list[Batch]:
        if not EXTERNAL_ID.fullmatch(external_id):
            raise ValueError("external id must be 1 to 256 characters without control characters")
        batches: list[Batch] = []
        for page in range(LOOKUP_MAX_PAGES):
            listed, kept = await self._lookup_page(external_id, page * LOOKUP_LIMIT)
            batches.extend(kept)
            if listed < LOOKUP_LIMIT:
                break
        # Oldest first, so every replica adopts the same one; undated ones last, ids break ties.
        batches.sort(key=lambda b: (b.created is None, b.created or 0, b.id))
        return batches

    async def _lookup_page(self, external_id: str, start: int) -> tuple[int, list[Batch]]:
        """One catalog page: how many entries it listed, and those that carry `external_id`."""
        endpoint = "catalog.lookup"
        params = {
            "externalId": external_id,
            "orderBy": "asc:created",
            "limit": str(LOOKUP_LIMIT),
            "start": str(start),
        }
        reply = await self._call(endpoint, "GET", self._catalog_url, params=params)
        if reply.status != 200:
            raise _http_error(endpoint, reply)
        data = _json(reply.text)
        if not isinstance(data, dict):
            raise AepHttpError(
                f"{endpoint} answered HTTP 200 with something other than a map of batches",
                endpoint=endpoint,
                status=reply.status,
                detail=_truncate(reply.text),
            )
        batches = []
        for key, value in data.items():
            batch = _batch(value, key) if isinstance(value, dict) else None
            # Keep only what carries our externalId: were the filter ever ignored, the catalog
            # would list unrelated batches, and adopting one of those would be far worse than
            # creating a second batch.
            if batch is not None and batch.external_id == external_id:
                batches.append(batch)
        skipped = len(data) - len(batches)
        if skipped and not batches:
            # A page of nothing but strangers says nothing about whether our batch exists (the
            # filter was ignored, or the answer is not what it seems): not "none found", which
            # would lead to a second create, but an error the caller retries.
            raise AepHttpError(
                f"{endpoint} answered HTTP 200 with {skipped} batches, none with the externalId asked for",
                endpoint=endpoint,
                status=reply.status,
                detail="the catalog did not apply the externalId filter",
            )
        if skipped:
            log.warning("aep.lookup_skipped", endpoint=endpoint, skipped=skipped, kept=len(batches))
        return len(data), batches

    async def abort_batch(self, batch_id: str) -> None:
        if not BATCH_ID.fullmatch(batch_id):
            raise ValueError("batch id must be 1 to 128 letters, digits, '-' or '_'")
        endpoint = "batches.abort"
        reply = await self._call(endpoint, "POST", self._create_url / batch_id, params={"action": "ABORT"})
        # AEP answers 200 with an empty body; aborting an aborted batch is a success too.
        if reply.status not in (200, 204):
            raise _http_error(endpoint, reply)

    async def get_batch(self, batch_id: str) -> Batch:
        if not BATCH_ID.fullmatch(batch_id):
            raise ValueError("batch id must be 1 to 128 letters, digits, '-' or '_'")
        endpoint = "catalog.get"
        reply = await self._call(endpoint, "GET", self._catalog_url / batch_id)
        if reply.status != 200:
            raise _http_error(endpoint, reply)
        data = _json(reply.text)
        # The catalog keys the answer by batch id; tolerate a single entry under another key.
        entry: Any = None
        if isinstance(data, dict):
            entry = data.get(batch_id)
            if entry is None and len(data) == 1:
                entry = next(iter(data.values()))
        batch = _batch(entry, batch_id) if isinstance(entry, dict) else None
        if batch is None:
            raise AepHttpError(
                f"{endpoint} answered HTTP 200 without batch {batch_id}",
                endpoint=endpoint,
                status=reply.status,
                detail=_truncate(reply.text),
            )
        return batch

    # --- the upload stage (reference §2-3) -----------------------------------------------------

    async def put_file(self, batch_id: str, dataset_id: str, name: str, body: Body, size: int) -> None:
        endpoint = "files.put"
        upload = _Upload(body, size)
        reply = await self._call(endpoint, "PUT", self._file_url(batch_id, dataset_id, name), upload=upload)
        if reply.status not in (200, 201):
            raise _http_error(endpoint, reply)

    async def initialize_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        await self._file_action("files.initialize", batch_id, dataset_id, name, "INITIALIZE")

    async def put_part(
        self, batch_id: str, dataset_id: str, name: str, start: int, body: Body, length: int, total: int
    ) -> None:
        endpoint = "files.patch"
        url = self._file_url(batch_id, dataset_id, name)
        content_range = f"bytes {start}-{start + length - 1}/{total}"
        reply = await self._call(
            endpoint, "PATCH", url, upload=_Upload(body, length), headers={"Content-Range": content_range}
        )
        if reply.status not in (200, 201, 204):
            raise _http_error(endpoint, reply)

    async def file_received(self, batch_id: str, dataset_id: str, name: str) -> int | None:
        endpoint = "files.head"
        reply = await self._call(endpoint, "HEAD", self._file_url(batch_id, dataset_id, name))
        if reply.status == 404:
            return None
        if reply.status not in (200, 204):
            raise _http_error(endpoint, reply)
        match = _RANGE_END.search(reply.range or "")
        return int(match.group(2)) + 1 if match else 0

    async def complete_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        await self._file_action("files.complete", batch_id, dataset_id, name, "COMPLETE")

    async def complete_batch(self, batch_id: str) -> None:
        endpoint = "batches.complete"
        url = self._create_url / _checked_batch(batch_id)
        reply = await self._call(endpoint, "POST", url, params={"action": "COMPLETE"})
        if reply.status not in (200, 201, 204):
            raise _http_error(endpoint, reply)

    async def batch_state(self, batch_id: str) -> BatchState:
        endpoint = "catalog.status"
        url = self._catalog_url / _checked_batch(batch_id)
        reply = await self._call(endpoint, "GET", url, params={"properties": STATUS_PROPERTIES})
        if reply.status != 200:
            raise _http_error(endpoint, reply)
        entry = _entry(_json(reply.text), batch_id)
        status = entry.get("status") if entry is not None else None
        if entry is None or not isinstance(status, str):
            raise AepHttpError(
                f"{endpoint} answered HTTP 200 without the status of batch {batch_id}",
                endpoint=endpoint,
                status=reply.status,
                detail=_truncate(reply.text),
            )
        return _batch_state(status, entry)

    async def _file_action(
        self, endpoint: str, batch_id: str, dataset_id: str, name: str, action: str
    ) -> None:
        url = self._file_url(batch_id, dataset_id, name)
        reply = await self._call(endpoint, "POST", url, params={"action": action})
        if reply.status not in (200, 201, 204):
            raise _http_error(endpoint, reply)

    def _file_url(self, batch_id: str, dataset_id: str, name: str) -> URL:
        if not DATASET_ID.fullmatch(dataset_id):
            raise ValueError("dataset id must be 1 to 128 letters, digits, '-' or '_'")
        segments = name.split("/")
        if not name or any(part in ("", ".", "..") for part in segments) or not name.isprintable():
            raise ValueError("file name must be a relative path without empty, '.' or '..' segments")
        # Each segment is percent-encoded on its own: the folders stay folders (partitions).
        return self._create_url.joinpath(_checked_batch(batch_id), "datasets", dataset_id, "files", *segments)

    async def _call(
        self,
        endpoint: str,
        method: str,
        url: URL,
        *,
        params: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
        upload: _Upload | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        """One platform call with the current token; on a 401, one replay with a fresh one (a file
        body is opened anew for it)."""
        send = _Send(params, body, upload, headers)
        reply, token = await self._send(endpoint, method, url, send)
        if reply.status == 401:
            await self._tokens.refresh(token)
            if self._tokens.fixed:
                # No fresh token to replay with: the credentials are at fault, not the request,
                # which then waits for them (the provider now holds calls back) instead of failing.
                code, detail = error_fields(reply.text)
                raise TokenRefused(
                    f"{endpoint} answered HTTP 401 to ORCH_AEP__ACCESS_TOKEN",
                    endpoint=endpoint,
                    error_code=code,
                    detail=detail,
                )
            reply, _ = await self._send(endpoint, method, url, send)
        return reply

    async def _send(self, endpoint: str, method: str, url: URL, send: _Send) -> tuple[_Reply, str]:
        """One HTTP call, inside the gate's slot when there is a gate, and reported to it once.

        The token is taken inside the slot, right before sending: a call can wait in the slot for a
        throttling pause longer than a short-lived token has left."""
        if self._gate is None:
            token = await self._tokens.token()
            return await self._http(endpoint, method, url, self._with(token, send), send), token
        async with self._gate.slot():
            token = await self._tokens.token()
            try:
                reply = await self._http(endpoint, method, url, self._with(token, send), send)
            except AepTransportError:
                self._gate.record(None, None)
                raise
            # Recorded before the slot is freed, so a 429's pause holds the next caller already.
            self._gate.record(reply.status, reply.retry_after)
            return reply, token

    def _with(self, token: str, send: _Send) -> dict[str, str]:
        headers = {**self._headers, **(send.headers or {}), "Authorization": f"Bearer {token}"}
        if send.body is not None:
            headers["Content-Type"] = "application/json"
        if send.upload is not None:
            # A known length, not chunked: AEP's gateway checks a file's size against its limits.
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(send.upload.size)
        return headers

    async def _http(
        self, endpoint: str, method: str, url: URL, headers: dict[str, str], send: _Send
    ) -> _Reply:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        upload = send.upload
        try:
            async with self._session.request(
                method,
                url,
                params=send.params,
                json=send.body,
                data=None if upload is None else upload.body(),
                headers=headers,
                timeout=self._timeout if upload is None else self._upload_timeout,
            ) as response:
                status = response.status
                raw = await response.read()
                return _Reply(
                    status,
                    raw.decode("utf-8", errors="replace"),
                    response.headers.get("Retry-After"),
                    response.headers.get("Range"),
                )
        except aiohttp.ConnectionTimeoutError as exc:
            # Checked before the other timeouts: no connection, so nothing was sent.
            raise AepTimeout(
                f"{endpoint}: no connection within the timeout", endpoint=endpoint, maybe_sent=False
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            # Refused, DNS or TLS handshake failure: the request never left this process.
            raise AepTransportError(
                f"{endpoint}: {exc}"[:MAX_DETAIL], endpoint=endpoint, maybe_sent=False
            ) from exc
        except TimeoutError as exc:
            # The total or read timeout, with the request (perhaps) on the wire.
            raise AepTimeout(
                f"{endpoint}: no complete answer in time", endpoint=endpoint, maybe_sent=True
            ) from exc
        except aiohttp.ClientError as exc:
            # Disconnected, reset, or a broken body: the server may have acted on the request.
            raise AepTransportError(
                f"{endpoint}: {type(exc).__name__}: {exc}"[:MAX_DETAIL], endpoint=endpoint, maybe_sent=True
            ) from exc
        finally:
            duration = loop.time() - started
            self._observer.aep_call(endpoint, status, duration)
            if _stdlib_log.isEnabledFor(logging.DEBUG):
                log.debug("aep.call", endpoint=endpoint, status=status, duration=round(duration, 4))


@dataclass(frozen=True)
class _Send:
    """What one call sends besides its method and URL."""

    params: Mapping[str, str] | None
    body: dict[str, Any] | None
    upload: _Upload | None
    headers: Mapping[str, str] | None


def _checked_batch(batch_id: str) -> str:
    if not BATCH_ID.fullmatch(batch_id):
        raise ValueError("batch id must be 1 to 128 letters, digits, '-' or '_'")
    return batch_id


def _entry(data: Any, batch_id: str) -> dict[str, Any] | None:
    """The batch's object in a catalog answer keyed by batch id (tolerating one entry under another
    key, or the object itself)."""
    if not isinstance(data, dict):
        return None
    entry = data.get(batch_id)
    if entry is None and len(data) == 1:
        entry = next(iter(data.values()))
    if entry is None and "status" in data:
        entry = data
    return entry if isinstance(entry, dict) else None


def _batch_state(status: str, entry: dict[str, Any]) -> BatchState:
    errors = entry.get("errors")
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    assert isinstance(metrics, dict)
    records = _count(entry.get("recordCount"))
    for key in ("outputRecordCount", "inputRecordCount"):
        if records is None:
            records = _count(metrics.get(key))  # an output of 0 records is an answer, not a gap
    failed = _count(entry.get("failedRecordCount"))
    if failed is None:
        failed = _count(metrics.get("failedRecordCount"))
    return BatchState(
        status=status,
        errors=[_error(item) for item in errors if isinstance(item, dict)][:20]
        if isinstance(errors, list)
        else [],
        record_count=records,
        failed_record_count=failed,
    )


def _error(item: dict[str, Any]) -> dict[str, Any]:
    """One of AEP's batch errors, kept to its known fields and bounded (it is stored and logged)."""
    kept: dict[str, Any] = {}
    for key in ("code", "description", "rows"):
        if key in item:
            value = item[key]
            kept[key] = value if isinstance(value, int | float | list) else _str(value)
    if isinstance(kept.get("rows"), list):
        kept["rows"] = [str(row)[:40] for row in kept["rows"][:20]]
    return kept


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def error_text(errors: list[dict[str, Any]]) -> str | None:
    """AEP's batch errors as one line for `lastError`: code and description of each."""
    parts = [" ".join(str(e[key]) for key in ("code", "description") if e.get(key)) for e in errors]
    text = "; ".join(part for part in parts if part)
    return text[:500] or None


def _http_error(endpoint: str, reply: _Reply) -> AepHttpError:
    code, detail = error_fields(reply.text)
    return AepHttpError(
        f"{endpoint} answered HTTP {reply.status}",
        endpoint=endpoint,
        status=reply.status,
        error_code=code,
        detail=detail,
        retry_after=reply.retry_after,
    )


def error_fields(text: str) -> tuple[str | None, str | None]:
    """Adobe's error code and message from an error body, whichever of its shapes (reference §4.1)."""
    data = _json(text)
    if not isinstance(data, dict):
        return None, _truncate(text)
    # Gateway: {"error_code": "401013", "message": "Oauth token is not valid"}
    if "error_code" in data:
        return _str(data["error_code"]), _str(data.get("message")) or _str(data.get("detail"))
    # OAuth: {"error": "invalid_client", "error_description": "..."}; some services nest it.
    if "error" in data:
        error = data["error"]
        if isinstance(error, dict):
            return _str(error.get("code")), _str(error.get("message")) or _compact(error)
        return _str(error), _str(data.get("error_description")) or _str(data.get("message"))
    # Problem details: {"type", "status", "title", "detail"}; the title is the error's name.
    if "title" in data or "detail" in data:
        return _str(data.get("title")), _str(data.get("detail")) or _str(data.get("title"))
    # Flow service: {"errorMessage": "..."}
    if "errorMessage" in data:
        return _str(data.get("code")), _str(data["errorMessage"])
    # {..., "status": ..., "report": {...}}: the report's own message when it has one.
    if "report" in data:
        report = data["report"]
        detail = None
        if isinstance(report, dict):
            detail = _str(report.get("message")) or _str(report.get("detail"))
        return _str(data.get("code")) or _str(data.get("error_code")), detail or _compact(report)
    if "message" in data:
        return _str(data.get("code")), _str(data["message"])
    return None, _compact(data)


def _batch(data: dict[str, Any], key: str | None = None) -> Batch | None:
    """A `Batch` from AEP's batch object (ids may be only the map key in catalog answers)."""
    batch_id = data.get("id", key)
    if not isinstance(batch_id, str) or not batch_id:
        return None
    status = data.get("status")
    external_id = data.get("externalId")
    created = data.get("created")
    dataset_id = None
    related = data.get("relatedObjects")
    if isinstance(related, list):
        for item in related:
            if isinstance(item, dict) and item.get("type") == "dataSet" and isinstance(item.get("id"), str):
                dataset_id = item["id"]
                break
    return Batch(
        id=batch_id,
        status=status if isinstance(status, str) else "unknown",
        external_id=external_id if isinstance(external_id, str) else None,
        dataset_id=dataset_id,
        created=int(created) if isinstance(created, int | float) and not isinstance(created, bool) else None,
    )


def _json(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _truncate(value if isinstance(value, str) else json.dumps(value))


def _compact(value: Any) -> str | None:
    return _truncate(json.dumps(value, separators=(",", ":")))


def _truncate(text: str) -> str | None:
    text = text.strip()
    return text[:MAX_DETAIL] if text else None
