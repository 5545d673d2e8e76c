"""The store's tables, as the queries see them. The schema itself belongs to the Alembic migrations in
`migrations/`, applied at `open()`; `tests/unit/test_store.py` checks the two agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import TypeEngine


class _SqliteText(sqlite.DATETIME):
    """SQLite's DATETIME column (as the migrations made it) whose values pass as they are: the text
    `UtcDateTime` writes and parses itself."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every dialect.

    SQLite stores naive text and would silently drop the zone of an aware value; storing UTC with a
    fixed format keeps text comparisons in SQL equal to time comparisons. That text is written and
    read here, in SQLAlchemy's own SQLite format (`2026-11-28 12:00:00.000000`), with `isoformat` and
    `fromisoformat` (C): SQLAlchemy's generic DATETIME processing, a format string and a regular
    expression per value, was a tenth of the service's CPU (times are in every row it writes and reads).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return _SqliteText()  # type: ignore[no-untyped-call]  # sqlalchemy types it loosely
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return sqlite_text(value)
        return aware(value).astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return from_sqlite_text(value)
        when: datetime = value
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime: the store takes timezone-aware times")
    return value


def sqlite_text(value: datetime) -> str:
    """A time as the store keeps it on SQLite: UTC, naive, microseconds always written."""
    return aware(value).astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def from_sqlite_text(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


# INTEGER PRIMARY KEY is SQLite's rowid alias (a BIGINT key would not autoincrement there).
_Id = BigInteger().with_variant(Integer(), "sqlite")

_STATES_SQL = (
    "state IN ('pending', 'retrying', 'created', 'uploading', 'processing', 'succeeded', 'failed', "
    "'rejected')"
)
# Exactly the unfinished rows have a next attempt time. Claim and next_due filter on that column
# alone, never on `state`: without ANALYZE statistics SQLite would then pick the state index and sort
# the whole backlog on every claim (measured: 90 ms at 130k pending rows, against 0.1 ms here).
_DUE_SQL = "(state IN ('pending', 'retrying')) = (next_attempt_at IS NOT NULL)"

metadata = MetaData()

batch_request = Table(
    "batch_request",
    metadata,
    Column("id", _Id, primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("dataset_id", Text, nullable=False),  # "" for a rejected message that had none
    Column("fingerprint", Text, nullable=False),  # "" for a rejected message
    Column("input_format", Text),
    Column("multiline_json", Boolean),
    Column("tags", Text, nullable=False),  # JSON object of string lists
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime),  # None once final
    Column("lease_token", Text),  # fences one attempt: outcomes are written only under it
    Column("lease_owner", Text),
    Column("lease_expires_at", UtcDateTime),
    Column("needs_lookup", Boolean, nullable=False),
    Column("batch_id", Text),
    Column("batch_status", Text),
    Column("last_error", Text),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("settle_until", UtcDateTime),  # no new create before (see BatchRecord)
    Column("lookup_only", Boolean, nullable=False, server_default=false()),
    Column("reconcile_at", UtcDateTime),  # a created request's one more look-up
    Column("reconcile_tries", Integer, nullable=False, server_default="0"),
    Column("files", Text),  # JSON [[source, name], ...]: the files to upload, None without
    UniqueConstraint("request_id", name="uq_batch_request_request_id"),
    CheckConstraint(_STATES_SQL, name="ck_batch_request_state"),
    CheckConstraint(_DUE_SQL, name="ck_batch_request_due"),
    # Claim and next_due walk this from the front; final rows are not in it at all.
    Index(
        "ix_batch_request_due",
        "next_attempt_at",
        "id",
        sqlite_where=text("next_attempt_at IS NOT NULL"),
        postgresql_where=text("next_attempt_at IS NOT NULL"),
    ),
    # Only leased rows: next_due finds the earliest lease expiry without a scan.
    Index(
        "ix_batch_request_lease",
        "lease_expires_at",
        sqlite_where=text("lease_expires_at IS NOT NULL"),
        postgresql_where=text("lease_expires_at IS NOT NULL"),
    ),
    # Only rows waiting for reconciliation.
    Index(
        "ix_batch_request_reconcile",
        "reconcile_at",
        sqlite_where=text("reconcile_at IS NOT NULL"),
        postgresql_where=text("reconcile_at IS NOT NULL"),
    ),
    Index("ix_batch_request_state", "state", "created_at", "id"),
    Index("ix_batch_request_dataset", "dataset_id", "created_at"),
    Index("ix_batch_request_created", "created_at", "id"),
)

batch_event = Table(
    "batch_event",
    metadata,
    Column("id", _Id, primary_key=True),
    Column(
        "batch_request_id",
        _Id,
        ForeignKey("batch_request.id", name="fk_batch_event_request", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("at", UtcDateTime, nullable=False),
    Column("from_state", Text),
    Column("to_state", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("detail", Text),
    Index("ix_batch_event_request", "batch_request_id", "id"),
)

# Batch events waiting for the relay (ORCH_EVENTS__URL), written with the state change they report.
event_outbox = Table(
    "event_outbox",
    metadata,
    Column("id", _Id, primary_key=True),  # the publishing order
    Column("event_id", Text, nullable=False),  # also the message id: a repeat is recognisable
    Column("body", Text, nullable=False),  # the event's JSON
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("event_id", name="uq_event_outbox_event_id"),
)


# The lifecycle after `created` of a request with files (or a batch followed to its end): the upload
# stage's own step, due time, lease and attempts, apart from the create path's rows.
batch_lifecycle = Table(
    "batch_lifecycle",
    metadata,
    Column(
        "batch_request_id",
        _Id,
        ForeignKey("batch_request.id", name="fk_batch_lifecycle_request", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("step", Text, nullable=False),  # upload, track or done
    Column("attempts", Integer, nullable=False),  # failures in a row since the last progress
    Column("next_at", UtcDateTime),  # None once done
    Column("lease_token", Text),
    Column("lease_owner", Text),
    Column("lease_expires_at", UtcDateTime),
    Column("last_error", Text),
    Column("files_total", Integer, nullable=False),
    Column("files_done", Integer, nullable=False),
    Column("polls", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),  # when the request got its batch
    Column("completed_at", UtcDateTime),  # when AEP accepted COMPLETE
    Column("record_count", BigInteger),
    Column("failed_record_count", BigInteger),
    Column("errors", Text),  # AEP's errors (JSON list), once final
    CheckConstraint("step IN ('upload', 'track', 'done')", name="ck_batch_lifecycle_step"),
    CheckConstraint("(step = 'done') = (next_at IS NULL)", name="ck_batch_lifecycle_due"),
    Index(
        "ix_batch_lifecycle_due",
        "next_at",
        sqlite_where=text("next_at IS NOT NULL"),
        postgresql_where=text("next_at IS NOT NULL"),
    ),
    Index(
        "ix_batch_lifecycle_lease",
        "lease_expires_at",
        sqlite_where=text("lease_expires_at IS NOT NULL"),
        postgresql_where=text("lease_expires_at IS NOT NULL"),
    ),
)

# Each file of a request with files, and how far its upload got.
upload_file = Table(
    "upload_file",
    metadata,
    Column(
        "batch_request_id",
        _Id,
        ForeignKey("batch_request.id", name="fk_upload_file_request", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("position", Integer, primary_key=True),
    Column("source", Text, nullable=False),
    Column("name", Text, nullable=False),  # its path in the batch
    Column("size", BigInteger),
    Column("bytes_sent", BigInteger, nullable=False),  # a large file's bytes AEP has (as last known)
    Column("initialized", Boolean, nullable=False),  # a large file's INITIALIZE was answered
    Column("done", Boolean, nullable=False),
)


# What a write that ends a lease sets.
NO_LEASE: dict[str, Any] = {"lease_token": None, "lease_owner": None, "lease_expires_at": None}
# What a state change of a request hands back: the row's key, what an event reports of the outcome,
# and the files a new lifecycle starts with.
OUTCOME = (
    batch_request.c.id,
    batch_request.c.request_id,
    batch_request.c.dataset_id,
    batch_request.c.batch_id,
    batch_request.c.batch_status,
    batch_request.c.last_error,
    batch_request.c.files,
)

# What `add` writes of a request, in the order of the rows the store's direct paths take
# (`sqlite_direct`, `postgres_direct`).
ADD_COLUMNS = (
    "request_id",
    "dataset_id",
    "fingerprint",
    "input_format",
    "multiline_json",
    "tags",
    "files",
    "state",
    "attempts",
    "next_attempt_at",
    "needs_lookup",
    "created_at",
    "updated_at",
)
# The columns of a trail row and an outbox row, in the order the store collects them.
TRAIL_COLUMNS = ("batch_request_id", "at", "from_state", "to_state", "attempt", "detail")
OUTBOX_COLUMNS = ("event_id", "body", "created_at")
