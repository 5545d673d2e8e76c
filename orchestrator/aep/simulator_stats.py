"""What the simulator saw: the evidence tests, the chaos test and benchmarks judge the orchestrator by."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, fields
from typing import Any


class SlidingWindow:
    """Timestamps of recent events, for "how many in the last `width` seconds".

    The width is passed on every call so a reconfigured simulator keeps its history.
    """

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def count(self, now: float, width: float) -> int:
        while self._times and self._times[0] <= now - width:
            self._times.popleft()
        return len(self._times)

    def add(self, now: float) -> None:
        self._times.append(now)

    def oldest(self) -> float | None:
        return self._times[0] if self._times else None


@dataclass(frozen=True)
class BatchRecord:
    id: str
    dataset_id: str
    external_id: str
    created: int  # Unix milliseconds, as AEP reports it

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "datasetId": self.dataset_id,
            "externalId": self.external_id,
            "created": self.created,
        }


@dataclass
class SimulatorStats:
    """Counters since start or the last reset.

    `calls` counts every IMS and Platform call by (endpoint, status); the status is the HTTP status
    as text, or "dropped" when the connection was closed without an answer. Endpoints are
    `ims.token`, `batches.create`, `batches.get`, `batches.list`, `batches.complete`,
    `batches.abort`, `batches.action` (an action neither COMPLETE nor ABORT), `files.put`,
    `files.initialize`, `files.patch`, `files.head`, `files.complete` and `files.action` (a file
    action neither INITIALIZE nor COMPLETE).

    `uploads_after_complete` counts PUT, INITIALIZE and PATCH calls refused because their batch
    was no longer loading; `files_stored` counts files that became finished (a small file stored,
    a large one completed; a replaced file counts again); `completed_batches` counts batches that
    COMPLETE moved out of loading.
    """

    tokens_issued: int = 0
    ims_failures: int = 0
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    header_rejections: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    expired_tokens: int = 0
    throttled: int = 0
    early_retries: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    batches: list[BatchRecord] = field(default_factory=list)
    batches_per_external_id: Counter[str] = field(default_factory=Counter)
    batches_per_dataset: Counter[str] = field(default_factory=Counter)
    max_calls_per_second: int = 0
    max_calls_per_period: int = 0
    uploads_after_complete: int = 0
    files_stored: int = 0
    completed_batches: int = 0

    def clear(self) -> None:
        """Back to zero in place, so references held by tests stay live."""
        fresh = SimulatorStats()
        for item in fields(self):
            setattr(self, item.name, getattr(fresh, item.name))

    def count(self, endpoint: str, status: int | str | None = None) -> int:
        """Calls to `endpoint`, all of them or those that ended with `status`."""
        if status is None:
            return sum(n for (name, _), n in self.calls.items() if name == endpoint)
        return self.calls[(endpoint, str(status))]

    @property
    def platform_calls(self) -> int:
        return sum(n for (name, _), n in self.calls.items() if name != "ims.token")

    @property
    def duplicate_external_ids(self) -> dict[str, int]:
        """The externalIds that got more than one batch: each is a duplicate the orchestrator made."""
        return {key: n for key, n in self.batches_per_external_id.items() if n > 1}

    def record_batch(self, record: BatchRecord) -> None:
        self.batches.append(record)
        self.batches_per_external_id[record.external_id] += 1
        self.batches_per_dataset[record.dataset_id] += 1

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `GET /_sim/stats`."""
        calls: dict[str, dict[str, int]] = {}
        for (endpoint, status), n in sorted(self.calls.items()):
            calls.setdefault(endpoint, {})[status] = n
        return {
            "tokens_issued": self.tokens_issued,
            "ims_failures": self.ims_failures,
            "calls": calls,
            "platform_calls": self.platform_calls,
            "header_rejections": self.header_rejections,
            "rejections": dict(self.rejections),
            "unauthorized": self.unauthorized,
            "expired_tokens": self.expired_tokens,
            "throttled": self.throttled,
            "early_retries": self.early_retries,
            "faults": dict(self.faults),
            "batches": [record.as_dict() for record in self.batches],
            "batches_per_external_id": dict(self.batches_per_external_id),
            "batches_per_dataset": dict(self.batches_per_dataset),
            "duplicate_external_ids": self.duplicate_external_ids,
            "max_calls_per_second": self.max_calls_per_second,
            "max_calls_per_period": self.max_calls_per_period,
            "uploads_after_complete": self.uploads_after_complete,
            "files_stored": self.files_stored,
            "completed_batches": self.completed_batches,
        }
