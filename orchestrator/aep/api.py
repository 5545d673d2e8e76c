"""The AEP port: the calls the dispatcher makes, whatever carries them (aiohttp, a fake in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator.messages import BatchRequest


@dataclass(frozen=True)
class Batch:
    """What AEP says of a batch. Ids are opaque strings; `created` is Unix milliseconds."""

    id: str
    status: str
    external_id: str | None = None
    dataset_id: str | None = None
    created: int | None = None


class BatchApi(Protocol):
    async def ensure_token(self) -> None:
        """Make sure a usable token is at hand; raise `AuthError` when IMS refuses or is down."""

    async def create_batch(self, request: BatchRequest, input_format: str) -> Batch:
        """`POST /data/foundation/import/batches` with the request's externalId. Not idempotent."""

    async def find_batches(self, external_id: str) -> list[Batch]:
        """`GET /data/foundation/catalog/batches?externalId=…`, oldest first."""

    async def get_batch(self, batch_id: str) -> Batch:
        """`GET /data/foundation/catalog/batches/{id}`."""
