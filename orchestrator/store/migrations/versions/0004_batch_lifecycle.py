"""The batch lifecycle: files to upload, the upload stage's own claims, and AEP's final word.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

- `batch_request.files`: the files a request names (JSON `[[source, name], ...]`), none for a request
  that leaves its batch to the upload steps.
- `batch_request.state` may now also be `uploading`, `processing` and `succeeded`.
- `batch_lifecycle`: one row per request whose batch the service follows after `created` (its files
  are uploaded and the batch completed, or its status is polled). It has its own step, due time,
  lease and attempts, so the upload stage is claimed, fenced and retried like the creates, without
  touching the create path's rows or indexes.
- `upload_file`: each file's progress (bytes received by AEP, done), written as it goes, so a
  restart resumes a large file where AEP says it stands and never uploads a finished file again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OLD_STATES = "state IN ('pending', 'retrying', 'created', 'failed', 'rejected')"
STATES = (
    "state IN ('pending', 'retrying', 'created', 'uploading', 'processing', 'succeeded', 'failed', "
    "'rejected')"
)
STEPS = "step IN ('upload', 'track', 'done')"
# The partial indexes of batch_request, made again after SQLite copies the table (see below).
PARTIAL = {
    "ix_batch_request_due": (["next_attempt_at", "id"], "next_attempt_at IS NOT NULL"),
    "ix_batch_request_lease": (["lease_expires_at"], "lease_expires_at IS NOT NULL"),
    "ix_batch_request_reconcile": (["reconcile_at"], "reconcile_at IS NOT NULL"),
}


def _states(check: str) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table, and the copy's indexes are
    # made from reflection, which may drop their WHERE clauses: they are made again, explicitly.
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        for name in PARTIAL:
            op.drop_index(name, table_name="batch_request")
    with op.batch_alter_table("batch_request") as table:
        table.drop_constraint("ck_batch_request_state", type_="check")
        table.create_check_constraint("ck_batch_request_state", sa.text(check))
    if sqlite:
        for name, (columns, where) in PARTIAL.items():
            op.create_index(name, "batch_request", columns, sqlite_where=sa.text(where))


def upgrade() -> None:
    with op.batch_alter_table("batch_request") as table:
        table.add_column(sa.Column("files", sa.Text()))
    _states(STATES)
    op.create_table(
        "batch_lifecycle",
        sa.Column(
            "batch_request_id",
            ID,
            sa.ForeignKey("batch_request.id", name="fk_batch_lifecycle_request", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True)),
        sa.Column("lease_token", sa.Text()),
        sa.Column("lease_owner", sa.Text()),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text()),
        sa.Column("files_total", sa.Integer(), nullable=False),
        sa.Column("files_done", sa.Integer(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("record_count", sa.BigInteger()),
        sa.Column("failed_record_count", sa.BigInteger()),
        sa.Column("errors", sa.Text()),
        sa.CheckConstraint(sa.text(STEPS), name="ck_batch_lifecycle_step"),
        sa.CheckConstraint(sa.text("(step = 'done') = (next_at IS NULL)"), name="ck_batch_lifecycle_due"),
    )
    op.create_index(
        "ix_batch_lifecycle_due",
        "batch_lifecycle",
        ["next_at"],
        sqlite_where=sa.text("next_at IS NOT NULL"),
        postgresql_where=sa.text("next_at IS NOT NULL"),
    )
    op.create_index(
        "ix_batch_lifecycle_lease",
        "batch_lifecycle",
        ["lease_expires_at"],
        sqlite_where=sa.text("lease_expires_at IS NOT NULL"),
        postgresql_where=sa.text("lease_expires_at IS NOT NULL"),
    )
    op.create_table(
        "upload_file",
        sa.Column(
            "batch_request_id",
            ID,
            sa.ForeignKey("batch_request.id", name="fk_upload_file_request", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger()),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("initialized", sa.Boolean(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("upload_file")
    op.drop_index("ix_batch_lifecycle_lease", table_name="batch_lifecycle")
    op.drop_index("ix_batch_lifecycle_due", table_name="batch_lifecycle")
    op.drop_table("batch_lifecycle")
    _states(OLD_STATES)
    with op.batch_alter_table("batch_request") as table:
        table.drop_column("files")
