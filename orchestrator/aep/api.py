"""The AEP port: the calls the dispatcher makes, whatever carries them (aiohttp, a fake in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.messages import BatchRequest

# Statuses of a batch that is gone for ingestion (reference §3.4): never adopted, never kept.
DEAD_STATUSES = frozenset({"aborted", "abandoned", "failed", "failure", "inactive", "deleted"})
# AEP's final word on a completed batch (reference §3.4): ingested, or not.
SUCCESS_STATUSES = frozenset({"success", "active"})
FINAL_STATUSES = SUCCESS_STATUSES | DEAD_STATUSES

# A file's bytes, opened anew for every send (a replay after a 401 reads them again).
Body = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class BatchState:
    """A batch's status as the catalog reports it, with AEP's errors and record counts."""

    status: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    record_count: int | None = None
    failed_record_count: int | None = None

    @property
    def final(self) -> bool:
        return self.status.lower() in FINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status.lower() in SUCCESS_STATUSES


@dataclass(frozen=True)
class Batch:
    """What AEP says of a batch. Ids are opaque strings; `created` is Unix milliseconds."""

    id: str
    status: str
    external_id: str | None = None
    dataset_id: str | None = None
    created: int | None = None

    @property
    def live(self) -> bool:
        """Still a batch the request can use: `loading` and every status on the way to `success`."""
        return self.status.lower() not in DEAD_STATUSES


class BatchApi(Protocol):
    async def ensure_token(self) -> None:
        """Make sure a usable token is at hand; raise `AuthError` when IMS refuses or is down."""

    async def create_batch(self, request: BatchRequest, input_format: str) -> Batch:
        """`POST /data/foundation/import/batches` with the request's externalId. Not idempotent."""

    async def find_batches(self, external_id: str) -> list[Batch]:
        """`GET /data/foundation/catalog/batches?externalId=…`, every page, oldest first."""

    async def abort_batch(self, batch_id: str) -> None:
        """`POST /data/foundation/import/batches/{id}?action=ABORT` (safe to repeat)."""

    async def get_batch(self, batch_id: str) -> Batch:
        """`GET /data/foundation/catalog/batches/{id}`."""


class UploadApi(Protocol):
    """The calls of the upload stage (reference §2-3). Files go to
    `…/import/batches/{batch}/datasets/{dataset}/files/{name}`; `name` keeps its folders."""

    async def ensure_token(self) -> None: ...

    async def put_file(self, batch_id: str, dataset_id: str, name: str, body: Body, size: int) -> None:
        """A file up to the large-file threshold in one `PUT` (idempotent: it replaces)."""

    async def initialize_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        """`POST …/files/{name}?action=INITIALIZE`: start (or restart) a large file."""

    async def put_part(
        self, batch_id: str, dataset_id: str, name: str, start: int, body: Body, length: int, total: int
    ) -> None:
        """`PATCH …/files/{name}` with `Content-Range: bytes start-end/total`."""

    async def file_received(self, batch_id: str, dataset_id: str, name: str) -> int | None:
        """`HEAD …/files/{name}`: how many bytes from the start AEP has; None when it has no such
        file (never initialized, or gone)."""

    async def complete_file(self, batch_id: str, dataset_id: str, name: str) -> None:
        """`POST …/files/{name}?action=COMPLETE`: a large file is whole."""

    async def complete_batch(self, batch_id: str) -> None:
        """`POST /batches/{id}?action=COMPLETE` (safe to repeat, reference §3.1)."""

    async def abort_batch(self, batch_id: str) -> None: ...

    async def batch_state(self, batch_id: str) -> BatchState:
        """`GET /catalog/batches/{id}?properties=…`: status, errors and record counts."""


class CallGate(Protocol):
    """What every call to the Platform API passes through (the limiter implements it).

    `slot()` waits out a shared pause, the rate limit and a concurrency slot, and is held while the
    HTTP call runs (once the service is stopping, it raises `CallNotSent` instead); `record()` tells
    the gate how the call ended (its HTTP status, None when no answer came, and the raw `Retry-After`
    header) so it can pause everyone and adapt the rate.
    """

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    def record(self, status: int | None, retry_after: str | None) -> None: ...
