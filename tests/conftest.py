"""Shared fixtures. Integration tests use the machine's real services; without them they skip with
the reason, unless ORCH_TEST_REQUIRE_SERVICES=1 (CI), where a missing service fails the test."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from orchestrator.store.sql import SqlBatchStore

REQUIRE_SERVICES = os.environ.get("ORCH_TEST_REQUIRE_SERVICES") == "1"


def require_service(name: str, host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc.strerror or exc})"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ORCH_TEST_REQUIRE_SERVICES=1")
        pytest.skip(message + "; start it (../shared/scripts/services-up) to run this test")


MakeStore = Callable[..., Awaitable[SqlBatchStore]]


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[MakeStore]:
    """Opens stores on `store_url` (the test module's fixture; several, to test concurrent
    instances) and closes them all."""
    stores: list[SqlBatchStore] = []

    async def make(**options: int) -> SqlBatchStore:
        store = SqlBatchStore(store_url, **options)
        stores.append(store)
        await store.open()
        return store

    yield make
    for store in stores:
        await store.close()
