"""The simulator's batch store and the answers of the batch and catalog endpoints that read or
change it, including a completed batch's processing and outcome. Faults, headers, throttling and
files are `simulator.py`'s and `simulator_files.py`'s; this module only knows batches."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from orchestrator import logs
from orchestrator.aep.api import DEAD_STATUSES
from orchestrator.aep.simulator_files import Summary
from orchestrator.clock import Clock

log = logs.get("simulator")

PROBLEM_TYPE = "/placeholder/type/uri"
INPUT_FORMATS = frozenset({"json", "parquet", "csv"})
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDER_FIELDS = frozenset({"created", "updated"})


class Refusal(Exception):
    """Raised by request validation deep in a handler; carries the answer to give instead."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def problem(status: int, title: str, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """Platform's problem-style error body (reference §4.1, item 2)."""
    body = {"type": PROBLEM_TYPE, "status": status, "title": title, "detail": detail}
    return web.json_response(body, status=status, headers=headers)


def bad_request(detail: str) -> web.Response:
    return problem(400, "BadRequestError", detail)


def not_found(batch_id: str) -> web.Response:
    return problem(404, "NotFoundError", f"Batch {batch_id} not found")


def _is_tags(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(items, list) and all(isinstance(item, str) for item in items) for items in value.values()
    )


def create_problem(body: Any, unknown_datasets: frozenset[str]) -> str | None:
    """Why a create body is refused (the 400 detail), or None when it is fine."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object"
    dataset_id = body.get("datasetId")
    if not isinstance(dataset_id, str) or not dataset_id.strip():
        return "datasetId is required and must be a non-empty string"
    external_id = body.get("externalId")
    if external_id is not None and (not isinstance(external_id, str) or not external_id):
        return "externalId must be a non-empty string"
    input_format = body.get("inputFormat")
    if input_format is not None:
        if not isinstance(input_format, dict):
            return "inputFormat must be an object"
        fmt = input_format.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in INPUT_FORMATS):
            return "inputFormat.format must be one of JSON, Parquet, CSV"
        multiline = input_format.get("isMultiLineJson")
        if multiline is not None and not isinstance(multiline, bool):
            return "inputFormat.isMultiLineJson must be a boolean"
    tags = body.get("tags")
    if tags is not None and not _is_tags(tags):
        return "tags must map each tag name to an array of strings"
    if dataset_id in unknown_datasets:
        return f"Dataset {dataset_id} not found"
    return None


def processing_outcome(summary: Summary, schema_mismatch: bool) -> dict[str, Any]:
    """The fields a completed batch takes when processing ends. An empty batch or file fails with
    the documented code 106 (reference §3.3); a dataset configured to fail rejects every record."""
    records = summary.record_count
    error: dict[str, Any] | None = None
    if summary.file_count == 0 or summary.empty_files:
        error = {"code": "106", "description": "Dataset file is empty. Please upload file with data."}
    elif schema_mismatch:
        description = f"Encountered {records} errors in the data: records do not match the dataset's schema"
        error = {"code": "INGEST-1212-400", "description": description}
    metrics = {
        "inputFileCount": summary.file_count,
        "inputByteSize": summary.byte_size,
        # A failed batch promotes nothing.
        "outputRecordCount": 0 if error else records,
    }
    if error is None:
        return {"status": "success", "recordCount": records, "failedRecordCount": 0, "metrics": metrics}
    return {
        "status": "failed",
        "recordCount": records,
        "failedRecordCount": records,
        "metrics": metrics,
        "errors": [{**error, "rows": []}],
    }


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise Refusal(bad_request(f"{name} must be an integer {bound}"))
    return value


def _ordering(text: str | None) -> list[tuple[str, bool]]:
    """`orderBy` as (field, descending) pairs, most significant first."""
    if not text:
        return [("created", False)]
    keys = []
    for part in text.split(","):
        direction, _, name = part.strip().rpartition(":")
        if (direction or "asc") not in ("asc", "desc") or name not in ORDER_FIELDS:
            raise Refusal(bad_request(f"orderBy {text!r} is not supported (asc:|desc: created, updated)"))
        keys.append((name, direction == "desc"))
    return keys


def _select(batch: dict[str, Any], properties: str | None) -> dict[str, Any]:
    if not properties:
        return batch
    wanted = {name.strip() for name in properties.split(",")}
    return {key: value for key, value in batch.items() if key in wanted}


@dataclass
class _Stored:
    batch: dict[str, Any]
    seq: int
    visible_at: float  # monotonic time from which catalog lists show it
    settles_at: float | None = None  # monotonic time at which processing ends
    settled_ms: int = 0  # the `updated` time it will then show, Unix milliseconds
    outcome: dict[str, Any] | None = None  # the fields processing will set


def _field(name: str) -> Callable[[_Stored], Any]:
    return lambda stored: stored.batch[name]


class Catalog:
    """Every batch created, by id, in creation order."""

    def __init__(self, clock: Clock, ids: random.Random) -> None:
        self._clock = clock
        self._ids = ids
        self._batches: dict[str, _Stored] = {}
        # Look-ups by externalId are the orchestrator's hot path; a benchmark holds many batches.
        self._by_external_id: dict[str, list[_Stored]] = {}
        self._seq = 0
        self._processing: dict[str, _Stored] = {}

    def clear(self) -> None:
        self._batches.clear()
        self._by_external_id.clear()
        self._processing.clear()

    def get(self, batch_id: str) -> dict[str, Any] | None:
        """The batch as it is now (processing ended if its time came), or None."""
        self._settle_due()
        stored = self._batches.get(batch_id)
        return stored.batch if stored is not None else None

    def live_per_external_id(self) -> dict[str, list[str]]:
        """The ids of the batches not aborted, failed or otherwise gone, by externalId, oldest first:
        what "exactly one live batch per request" is judged by."""
        self._settle_due()
        return {
            external_id: [item.batch["id"] for item in stored if item.batch["status"] not in DEAD_STATUSES]
            for external_id, stored in self._by_external_id.items()
        }

    def _now_ms(self) -> int:
        return int(self._clock.now().timestamp() * 1000)

    def create(self, body: dict[str, Any], *, org_id: str, client_id: str, lag: float) -> dict[str, Any]:
        """Store a new batch for a validated create body, shaped as reference §1.4 shows it."""
        batch_id = f"{self._ids.getrandbits(128):032x}"
        while batch_id in self._batches:
            batch_id = f"{self._ids.getrandbits(128):032x}"
        created = self._now_ms()
        dataset_id: str = body["datasetId"]
        requested_format: dict[str, Any] = body.get("inputFormat") or {}
        # Without inputFormat AEP's examples still work; its default is single-line JSON.
        input_format: dict[str, Any] = {"format": str(requested_format.get("format") or "json").lower()}
        if "isMultiLineJson" in requested_format:
            input_format["isMultiLineJson"] = requested_format["isMultiLineJson"]
        user = f"{client_id}@techacct.adobe.com"
        batch: dict[str, Any] = {
            "id": batch_id,
            "imsOrg": org_id,
            "status": "loading",
            "created": created,
            "updated": created,
            "relatedObjects": [{"type": "dataSet", "id": dataset_id}],
            "version": "1.0.0",
            "tags": {
                **(body.get("tags") or {}),
                "acp_producer": [client_id],
                "acp_stagePath": [f"{client_id}/stage/{batch_id}"],
                "use_plan_b_batch_status": ["false"],
            },
            "createdUser": user,
            "updatedUser": user,
            "externalId": body.get("externalId") or batch_id,
            "createdClient": client_id,
            "inputFormat": input_format,
        }
        self._seq += 1
        stored = _Stored(batch, self._seq, self._clock.monotonic() + lag)
        self._batches[batch_id] = stored
        self._by_external_id.setdefault(batch["externalId"], []).append(stored)
        return batch

    def answer_get(self, batch_id: str, query: Mapping[str, str]) -> web.Response:
        batch = self.get(batch_id)
        if batch is None:
            return not_found(batch_id)
        return web.json_response({batch_id: _select(batch, query.get("properties"))})

    def answer_list(self, query: Mapping[str, str]) -> web.Response:
        """`GET /catalog/batches`: filters combine as AND; a batch younger than the catalog lag
        is not listed yet (get-by-id sees it at once)."""
        limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        start = _int_param(query, "start", 0, 0, None)
        ordering = _ordering(query.get("orderBy"))
        wanted = {
            "externalId": query.get("externalId"),
            "dataSet": query.get("dataSet"),
            "status": (query.get("status") or "").lower() or None,
        }
        self._settle_due()
        now = self._clock.monotonic()
        external_id = wanted["externalId"]
        candidates = (
            self._batches.values() if external_id is None else self._by_external_id.get(external_id, [])
        )
        found = []
        for stored in candidates:
            batch = stored.batch
            actual = {
                "externalId": batch["externalId"],
                "dataSet": batch["relatedObjects"][0]["id"],
                "status": batch["status"],
            }
            if stored.visible_at <= now and all(v is None or actual[k] == v for k, v in wanted.items()):
                found.append(stored)
        # Creation order breaks ties, newest first when the main order is descending.
        found.sort(key=lambda s: s.seq, reverse=ordering[0][1])
        for name, descending in reversed(ordering):
            found.sort(key=_field(name), reverse=descending)
        properties = query.get("properties")
        page = found[start : start + limit]
        return web.json_response({s.batch["id"]: _select(s.batch, properties) for s in page})

    def answer_abort(self, batch_id: str) -> web.Response:
        """ABORT: a loading or processing batch can still be cancelled; a finalized one (success or
        failed) cannot (reference §3.2). Aborting again is a success, as retries must be."""
        stored = self._batches.get(batch_id)
        if stored is None:
            return not_found(batch_id)
        self._settle_due()
        batch = stored.batch
        if batch["status"] in ("success", "failed"):
            return bad_request(f"Batch {batch_id} is finalized and cannot be aborted")
        if batch["status"] != "aborted":
            batch["status"] = "aborted"
            batch["updated"] = self._now_ms()
            self._processing.pop(batch_id, None)
            log.debug("simulator.batch_aborted", batch_id=batch_id)
        # The batch-ingestion guide shows an empty 200; the spec's Batch body is not relied on.
        return web.Response(status=200)

    def start_processing(self, batch_id: str, delay: float) -> None:
        """COMPLETE accepted: the batch is `processing` until `settle` has told its outcome and
        `delay` seconds have passed on the monotonic clock."""
        stored = self._batches[batch_id]
        now = self._now_ms()
        stored.batch.update(status="processing", completed=now, updated=now)
        stored.settles_at = self._clock.monotonic() + delay
        stored.settled_ms = now + round(delay * 1000)
        self._processing[batch_id] = stored
        log.debug("simulator.batch_processing", batch_id=batch_id)

    def settle(self, batch_id: str, outcome: Mapping[str, Any]) -> None:
        """The fields the batch takes when its processing ends (status included); ignored when it
        was aborted or forgotten meanwhile."""
        stored = self._processing.get(batch_id)
        if stored is not None:
            stored.outcome = dict(outcome)

    def _settle_due(self) -> None:
        """Processing ends lazily, when a batch is next read: no timers to cancel or to race."""
        now = self._clock.monotonic()
        for batch_id, stored in list(self._processing.items()):
            if stored.outcome is None or stored.settles_at is None or stored.settles_at > now:
                continue
            del self._processing[batch_id]
            stored.batch.update(stored.outcome)
            stored.batch["updated"] = stored.settled_ms
            log.debug("simulator.batch_" + str(stored.batch["status"]), batch_id=batch_id)
