"""The store port: the durable record of every request, its attempts and its batch.

The store is where retries live (attempts, next attempt time, last error), so they behave the same on
every broker and survive restarts; it is also what the later upload steps read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from orchestrator.messages import BatchRequest, FileRef


class State(StrEnum):
    PENDING = "pending"  # waiting for its call
    RETRYING = "retrying"  # a call failed and will be tried again at next_attempt_at
    CREATED = "created"  # the batch exists: batch_id and batch_status are set
    UPLOADING = "uploading"  # its files are being uploaded (then the batch is completed)
    PROCESSING = "processing"  # completed: AEP is at work, its status is polled
    SUCCEEDED = "succeeded"  # AEP ingested the batch
    FAILED = "failed"  # a permanent error, attempts exhausted, or AEP failed the batch
    REJECTED = "rejected"  # the message was invalid and never reached AEP

    @property
    def final(self) -> bool:
        """Final for the create path: the request needs no more calls to get its batch (a
        request with files goes on from `created` in the upload stage)."""
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {State.CREATED, State.UPLOADING, State.PROCESSING, State.SUCCEEDED, State.FAILED, State.REJECTED}
)


class Step(StrEnum):
    """Where a request stands in the batch lifecycle after `created` (the upload stage)."""

    UPLOAD = "upload"  # files to upload, then COMPLETE
    TRACK = "track"  # the batch's status is polled until AEP's final word
    DONE = "done"


@dataclass(frozen=True)
class Lifecycle:
    """What a record shows of its lifecycle: the step (`complete` once every file is in and the
    batch is about to be completed), files done of total, and AEP's final word."""

    step: str
    files_done: int
    files_total: int
    errors: list[dict[str, object]] | None = None
    record_count: int | None = None
    failed_record_count: int | None = None


@dataclass(frozen=True)
class BatchRecord:
    """A request as the store knows it (the contract's record, plus what retries need)."""

    request_id: str
    dataset_id: str
    state: State
    attempts: int
    created_at: datetime
    updated_at: datetime
    batch_id: str | None = None
    batch_status: str | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    input_format: str | None = None
    multiline_json: bool | None = None
    tags: Mapping[str, list[str]] = field(default_factory=dict)
    # No new create before this time: an earlier outcome was ambiguous and AEP's catalog may not
    # list a batch made then until this settle window has passed.
    settle_until: datetime | None = None
    # Attempts are spent: look the batch up (until it settles), adopt it or fail; never create.
    lookup_only: bool = False
    # A created request with an ambiguous history is looked up once more at this time.
    reconcile_at: datetime | None = None
    reconcile_tries: int = 0
    files: tuple[FileRef, ...] = ()
    lifecycle: Lifecycle | None = None

    def to_json(self) -> dict[str, object]:
        """The contract's record shape (`batches --json`, `GET /batches`); a request with files
        (or a batch followed to the end) adds its step, files done of total and AEP's errors."""
        record = self._contract_json()
        life = self.lifecycle
        if life is not None:
            record.update(
                step=life.step,
                filesDone=life.files_done,
                filesTotal=life.files_total,
                errors=life.errors,
                recordCount=life.record_count,
                failedRecordCount=life.failed_record_count,
            )
        return record

    def _contract_json(self) -> dict[str, object]:
        return {
            "requestId": self.request_id,
            "datasetId": self.dataset_id,
            "state": self.state.value,
            "batchId": self.batch_id,
            "batchStatus": self.batch_status,
            "attempts": self.attempts,
            "lastError": self.last_error,
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
        }

    def request(self) -> BatchRequest:
        return BatchRequest(
            request_id=self.request_id,
            dataset_id=self.dataset_id,
            input_format=self.input_format,  # type: ignore[arg-type]  # only valid formats are stored
            multiline_json=self.multiline_json,
            tags=dict(self.tags),
            files=self.files,
        )


@dataclass(frozen=True)
class Claim:
    """A request leased to one dispatcher for one attempt.

    `lease` fences the attempt: an outcome is recorded only while the lease is still this one, so a
    dispatcher that lost its lease (it stalled past the expiry and another took over) cannot overwrite
    the newer attempt's result. `needs_lookup` is set when an earlier attempt's outcome is unknown
    (a timeout, a dropped connection, a 5xx, a crash mid-call): the batch may exist, so look it up by
    externalId before creating.
    """

    record: BatchRecord
    lease: str
    attempt: int
    needs_lookup: bool
    # The previous holder's lease had expired: it died or stalled, maybe mid-create, so its batch
    # may exist and may not be listed yet.
    taken_over: bool = False


@dataclass(frozen=True)
class UploadFile:
    """One file of a request in the upload stage, and how far it got."""

    position: int
    source: str
    name: str
    size: int | None
    bytes_sent: int  # a large file's bytes AEP had, as last recorded
    initialized: bool  # a large file's INITIALIZE was answered
    done: bool


@dataclass(frozen=True)
class Stage:
    """A request leased to the upload stage for its current step (`Claim`'s counterpart): every
    write is fenced by `lease`. `attempts`: the step's failures in a row since its last progress;
    `taken_over`: the previous holder's lease ran out (it died or stalled mid-step)."""

    pk: int
    record: BatchRecord
    step: Step
    lease: str
    attempts: int
    files: tuple[UploadFile, ...]
    polls: int
    started_at: datetime  # when the request got its batch
    completed_at: datetime | None
    taken_over: bool = False


# The event a request's arrival in each of these states publishes (ORCH_EVENTS__URL).
EVENT_TYPES = {
    State.CREATED: "batch.created",
    State.FAILED: "batch.failed",
    State.SUCCEEDED: "batch.succeeded",
}


@dataclass(frozen=True)
class OutboxEvent:
    """A batch event in the outbox, written with the state change it reports and kept until the
    relay has published it. `position` orders the outbox (oldest first); `event_id` is the event's
    identity, also its message id, so a repeat (published, then a crash before its row was deleted)
    is recognisable; `body` is the JSON message."""

    position: int
    event_id: str
    body: bytes


def event_body(
    event_id: str,
    state: State,
    *,
    request_id: str,
    dataset_id: str,
    batch_id: str | None,
    batch_status: str | None,
    error: str | None,
    at: datetime,
) -> dict[str, object]:
    """The contract's event for a request that reached `state` (created, succeeded or failed) at `at`."""
    return {
        "type": EVENT_TYPES[state],
        "eventId": event_id,
        "requestId": request_id,
        "datasetId": dataset_id,
        "batchId": batch_id,
        "batchStatus": batch_status,
        "error": error,
        "at": _iso(at),
    }


class AddResult(StrEnum):
    ADDED = "added"
    DUPLICATE = "duplicate"  # same requestId, same request: a redelivery or a resend
    CONFLICT = "conflict"  # same requestId, different dataset, format or tags: kept the first


class BatchStore(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date (migrations)."""

    async def close(self) -> None: ...

    async def add(self, request: BatchRequest, now: datetime) -> AddResult:
        """Record a new request as pending, idempotently by its request id."""

    async def add_many(self, requests: Sequence[BatchRequest], now: datetime) -> list[AddResult]:
        """`add` for several requests received together, in one write; results in order."""

    async def reject(self, request_id: str, dataset_id: str | None, reason: str, now: datetime) -> None:
        """Record an invalid message as `rejected` with its reason (idempotent)."""

    async def next_due(self) -> datetime | None:
        """When the earliest unleased pending or retrying request is due, if any (or a lease runs
        out, on the lease clock: see `claim`)."""

    async def claim(self, owner: str, limit: int, lease_seconds: float, now: datetime) -> list[Claim]:
        """Lease up to `limit` requests due at `now` for one attempt each (attempts += 1), for
        `lease_seconds`. Leases run on the store's lease clock: the caller's `now` on SQLite, the
        database's own clock on PostgreSQL, so that replicas whose clocks disagree still agree on
        which leases have run out."""

    async def mark_created(
        self,
        claim: Claim,
        batch_id: str,
        batch_status: str,
        now: datetime,
        *,
        adopted: bool = False,
        reconcile_at: datetime | None = None,
        count_attempt: bool = True,
    ) -> bool:
        """The batch exists. Returns False when the lease was lost (nothing written).
        `reconcile_at`: when to look the request up once more (its history was ambiguous).
        `count_attempt=False`: the claim was for a look-up only (attempts spent)."""

    async def mark_retry(
        self,
        claim: Claim,
        error: str,
        next_attempt_at: datetime,
        *,
        ambiguous: bool,
        now: datetime,
        settle_until: datetime | None = None,
        lookup_only: bool = False,
    ) -> bool:
        """The attempt failed and will be retried; `ambiguous` means the batch may exist, and then
        `settle_until` is when a look-up that finds nothing proves it does not. `lookup_only`: no
        create any more, only look-ups (attempts spent)."""

    async def mark_failed(
        self, claim: Claim, error: str, now: datetime, *, count_attempt: bool = True
    ) -> bool:
        """A permanent failure or attempts exhausted. `count_attempt=False` when the claim was for a
        look-up only (the attempts were counted when they were made)."""

    async def release(
        self,
        claim: Claim,
        now: datetime,
        *,
        until: datetime | None = None,
        settle_until: datetime | None = None,
    ) -> bool:
        """Give a claim back without an attempt having been made (shutdown, no token, a look-up made
        before the settle window passed); due again at `until`, or at once. `settle_until` (when
        given) replaces the request's settle window."""

    async def renew(self, claims: Sequence[Claim], lease_seconds: float, now: datetime) -> set[str]:
        """Extend the leases of claims still held, matched by (request, lease) pairs, to
        `lease_seconds` from now on the lease clock (see `claim`); returns the request ids whose
        lease was renewed."""

    async def claim_reconciliations(
        self, owner: str, limit: int, lease_seconds: float, now: datetime
    ) -> list[Claim]:
        """Lease up to `limit` created requests whose reconciliation is due."""

    async def finish_reconciliation(
        self,
        claim: Claim,
        now: datetime,
        *,
        retry_at: datetime | None = None,
        failed: bool = False,
        detail: str | None = None,
    ) -> bool:
        """Reconciliation done, or with `retry_at` to be tried again then (`failed`: this try failed
        and counts); `detail` goes to the trail. Returns False when the lease was lost."""

    async def lease_owners(self) -> set[str]:
        """The owners holding leases now (to find those of dead processes)."""

    async def expire_leases(self, owners: Sequence[str], now: datetime) -> int:
        """End the leases `owners` hold now (on the lease clock, see `claim`), as if they had run
        out: their requests are taken over at once (looked up first). Returns how many were ended."""

    async def pending_reconciliations(self) -> int:
        """How many created requests still wait for their reconciliation (`--until-idle`)."""

    async def counts(self) -> dict[State, int]:
        """How many requests are in each state (backlog metrics, `--until-idle`)."""

    async def step_counts(self) -> dict[str, int]:
        """How many requests are in each step of the upload stage (upload, complete, track, done)."""

    async def stages_waiting(self) -> int:
        """How many requests the upload stage has not finished (`--until-idle` waits for them)."""

    async def unfinished(self) -> int:
        """How many requests are pending or retrying (intake backpressure)."""

    async def oldest_unfinished(self) -> datetime | None:
        """When the oldest request still pending or retrying was recorded (None when none is)."""

    async def oldest_unfinished_record(self) -> BatchRecord | None:
        """The oldest request still pending or retrying (`orchestrator status`)."""

    async def last_errors(self, limit: int) -> list[BatchRecord]:
        """Up to `limit` failed or retrying requests with an error, most recently updated first."""

    async def recent_changes(self, since: datetime) -> list[StateChange]:
        """The state changes of every request at or after `since`, newest first (the effective
        rate), read from the end of the trail: cheap for a recent `since` however long the trail."""

    async def failed_records(
        self, dataset_id: str | None = None, failed_since: datetime | None = None
    ) -> list[BatchRecord]:
        """The failed requests `requeue_failed` would requeue, oldest failure first."""

    async def requeue_failed(
        self, now: datetime, *, dataset_id: str | None = None, failed_since: datetime | None = None
    ) -> list[str]:
        """Put failed requests (of `dataset_id`, failed at or after `failed_since`) back to pending,
        in one transaction: attempts reset to 0, looked up by externalId before any new create,
        no lease; a trail row each (failed to pending, "requeued by operator"). A request that is no
        longer failed is left alone. Returns the request ids requeued."""

    async def get(self, request_id: str) -> BatchRecord | None: ...

    async def records(
        self, state: State | None = None, dataset_id: str | None = None, limit: int | None = None
    ) -> list[BatchRecord]:
        """Records oldest first, optionally filtered."""

    async def page(
        self, state: State | None, dataset_id: str | None, after: int, limit: int
    ) -> tuple[list[BatchRecord], int | None]:
        """Up to `limit` records in the order they were recorded, after the cursor `after` (0 for
        the first page); the cursor of the next page, None on the last."""

    async def history(self, request_id: str) -> list[StateChange]:
        """The append-only trail of a request's state changes, oldest first."""

    # --- the event outbox (written only by a store made with events on) -------------------------

    @property
    def events_written(self) -> asyncio.Event:
        """Set once a transaction that wrote outbox rows has committed (wakes the relay; whoever
        waits on it clears it)."""

    async def outbox(self, limit: int) -> list[OutboxEvent]:
        """Up to `limit` events waiting in the outbox, oldest first."""

    async def events_sent(self, positions: Sequence[int]) -> None:
        """The broker has confirmed these events: remove them from the outbox."""

    async def events_waiting(self) -> int:
        """How many events wait in the outbox (`--until-idle`, metrics)."""


@dataclass(frozen=True)
class StateChange:
    at: datetime
    from_state: State | None
    to_state: State
    attempt: int
    detail: str | None


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class StageStore(Protocol):
    """What the upload stage asks of the store (`store/lifecycle.py`). Every write but the claim is
    fenced by the stage's lease and returns False, writing nothing, once the lease was lost."""

    async def claim_stages(self, owner: str, limit: int, lease_seconds: float, now: datetime) -> list[Stage]:
        """Lease up to `limit` requests whose step is due at `now` (a request starting its upload
        moves from `created` to `uploading`)."""

    async def next_stage_due(self) -> datetime | None: ...

    async def renew_stages(self, stages: Sequence[Stage], lease_seconds: float, now: datetime) -> set[str]:
        """Extend the leases still held; returns the request ids renewed."""

    async def file_progress(
        self,
        stage: Stage,
        position: int,
        now: datetime,
        *,
        size: int | None = None,
        bytes_sent: int | None = None,
        initialized: bool | None = None,
        done: bool = False,
    ) -> bool: ...

    async def batch_completed(self, stage: Stage, now: datetime, next_at: datetime) -> bool: ...

    async def stage_polled(
        self, stage: Stage, batch_status: str, now: datetime, next_at: datetime, *, processing: bool
    ) -> bool: ...

    async def stage_finished(
        self,
        stage: Stage,
        now: datetime,
        *,
        to_state: State | None,
        batch_status: str | None,
        error: str | None,
        errors: list[dict[str, Any]] | None = None,
        record_count: int | None = None,
        failed_record_count: int | None = None,
    ) -> bool: ...

    async def stage_retry(
        self, stage: Stage, error: str | None, next_at: datetime, now: datetime, *, attempts: int | None
    ) -> bool:
        """The step's `attempts`-th failure in a row (None: put back, not counted)."""
