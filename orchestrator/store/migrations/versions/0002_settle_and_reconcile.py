"""The catalog's settle window, look-up-only requests and reconciliation after an ambiguous history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

- `settle_until`: no new create for the request before this time. An ambiguous outcome (the batch may
  exist) sets it to the outcome's time plus ORCH_AEP__CATALOG_SETTLE, because AEP's catalog may take
  that long to list a batch just made; until then look-ups alone are made.
- `lookup_only`: the request will never be created again (its attempts are spent): look it up until
  it settles, then adopt what is found or fail.
- `reconcile_at` / `reconcile_tries`: a created request whose history had an ambiguous outcome gets
  one more look-up once the window has passed, to abort any extra batch made inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RECONCILE = "reconcile_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("batch_request") as table:
        table.add_column(sa.Column("settle_until", sa.DateTime(timezone=True)))
        table.add_column(sa.Column("lookup_only", sa.Boolean(), nullable=False, server_default=sa.false()))
        table.add_column(sa.Column("reconcile_at", sa.DateTime(timezone=True)))
        table.add_column(sa.Column("reconcile_tries", sa.Integer(), nullable=False, server_default="0"))
    op.create_index(
        "ix_batch_request_reconcile",
        "batch_request",
        ["reconcile_at"],
        sqlite_where=sa.text(RECONCILE),
        postgresql_where=sa.text(RECONCILE),
    )


def downgrade() -> None:
    op.drop_index("ix_batch_request_reconcile", table_name="batch_request")
    with op.batch_alter_table("batch_request") as table:
        table.drop_column("reconcile_tries")
        table.drop_column("reconcile_at")
        table.drop_column("lookup_only")
        table.drop_column("settle_until")
