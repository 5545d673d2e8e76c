"""The AEP port: the calls the dispatcher makes, whatever carries them (aiohttp, a fake in tests)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from orchestrator.messages import BatchRequest

# Statuses of a batch that is gone for ingestion (reference §3.4): never adopted, never kept.
DEAD_STATUSES = frozenset({"aborted", "abandoned", "failed", "failure", "inactive", "deleted"})


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


class CallGate(Protocol):
    """What every call to the Platform API passes through (the limiter implements it).

    `slot()` waits out a shared pause, the rate limit and a concurrency slot, and is held while the
    HTTP call runs; `record()` tells the gate how the call ended (its HTTP status, None when no
    answer came, and the raw `Retry-After` header) so it can pause everyone and adapt the rate.
    """

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    def record(self, status: int | None, retry_after: str | None) -> None: ...
