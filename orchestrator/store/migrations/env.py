"""Alembic's environment for the store.

The service runs migrations itself (`SqlBatchStore.open` -> `orchestrator.store.sql.upgrade`), on its
own connection and inside its own transaction, which it hands over in `config.attributes`. There is
no alembic.ini: `orchestrator.store.sql.alembic_config()` builds the configuration in code, e.g. to
write a new revision: `command.revision(alembic_config(), "what changes", rev_id="0002")`.
"""

from __future__ import annotations

from alembic import context

from orchestrator.store.sql import metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if context.is_offline_mode():
        # `--sql` scripts for a DBA; the URL comes from the caller's config.
        context.configure(
            url=context.config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    if connection is None:
        raise RuntimeError("pass a connection: config.attributes['connection'] (see store.sql.upgrade)")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    # The caller's transaction is already open, so this joins it rather than committing on its own.
    with context.begin_transaction():
        context.run_migrations()


run()
