"""The outbox of batch events: one row per `batch.created` or `batch.failed`, until it is published.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-12

A row is written in the transaction that moves a request to `created` or `failed`, so the event
exists exactly when the state change does; the relay publishes rows oldest first (by `id`) and
deletes them once the broker has confirmed. `event_id` is the event's identity, sent as the message
id, so a row published again after a crash is recognisable as a repeat. `body` is the event's JSON,
fixed at the state change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# INTEGER PRIMARY KEY is SQLite's rowid alias; BIGINT there would not autoincrement.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", ID, primary_key=True),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("event_id", name="uq_event_outbox_event_id"),
    )


def downgrade() -> None:
    op.drop_table("event_outbox")
