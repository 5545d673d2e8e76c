"""The portable store tests of tests/unit/test_store.py, again on PostgreSQL (asyncpg).

Each test gets a fresh database, dropped afterwards. The server is ORCH_TEST_POSTGRES_URL (default
the machine's local one); without it the tests skip, or fail when ORCH_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from orchestrator.store.engine import async_url
from tests.conftest import require_service
from tests.unit import test_store as unit
from tests.unit.test_store import now  # noqa: F401  # the fixture, shared

pytestmark = pytest.mark.integration

SERVER = make_url(os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))

for _test in unit.PORTABLE:
    globals()[_test.__name__] = _test


async def _admin(sql: str) -> None:
    # CREATE and DROP DATABASE cannot run inside a transaction.
    engine = create_async_engine(async_url(SERVER.render_as_string(hide_password=False)), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture
async def store_url() -> AsyncIterator[str]:
    require_service("PostgreSQL", SERVER.host or "127.0.0.1", SERVER.port or 5432)
    name = f"orch_test_{uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield SERVER.set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
