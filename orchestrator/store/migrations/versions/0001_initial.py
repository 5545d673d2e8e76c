"""The request record and its append-only trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written out in full rather than importing the store's tables: a migration is history and must not
change when the code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# INTEGER PRIMARY KEY is SQLite's rowid alias; BIGINT there would not autoincrement.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DUE = "next_attempt_at IS NOT NULL"


def upgrade() -> None:
    op.create_table(
        "batch_request",
        sa.Column("id", ID, primary_key=True),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("dataset_id", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("input_format", sa.Text()),
        sa.Column("multiline_json", sa.Boolean()),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("lease_token", sa.Text()),
        sa.Column("lease_owner", sa.Text()),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("needs_lookup", sa.Boolean(), nullable=False),
        sa.Column("batch_id", sa.Text()),
        sa.Column("batch_status", sa.Text()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("request_id", name="uq_batch_request_request_id"),
        sa.CheckConstraint(
            "state IN ('pending', 'retrying', 'created', 'failed', 'rejected')",
            name="ck_batch_request_state",
        ),
        # Exactly the unfinished requests have a next attempt time; claims rely on it.
        sa.CheckConstraint(
            "(state IN ('pending', 'retrying')) = (next_attempt_at IS NOT NULL)", name="ck_batch_request_due"
        ),
    )
    op.create_index(
        "ix_batch_request_due",
        "batch_request",
        ["next_attempt_at", "id"],
        sqlite_where=sa.text(DUE),
        postgresql_where=sa.text(DUE),
    )
    op.create_index(
        "ix_batch_request_lease",
        "batch_request",
        ["lease_expires_at"],
        sqlite_where=sa.text("lease_expires_at IS NOT NULL"),
        postgresql_where=sa.text("lease_expires_at IS NOT NULL"),
    )
    op.create_index("ix_batch_request_state", "batch_request", ["state", "created_at", "id"])
    op.create_index("ix_batch_request_dataset", "batch_request", ["dataset_id", "created_at"])
    op.create_index("ix_batch_request_created", "batch_request", ["created_at", "id"])

    op.create_table(
        "batch_event",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "batch_request_id",
            ID,
            sa.ForeignKey("batch_request.id", name="fk_batch_event_request", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_state", sa.Text()),
        sa.Column("to_state", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text()),
    )
    op.create_index("ix_batch_event_request", "batch_event", ["batch_request_id", "id"])


def downgrade() -> None:
    op.drop_table("batch_event")
    op.drop_table("batch_request")
