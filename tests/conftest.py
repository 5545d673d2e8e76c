"""Shared fixtures. Integration tests use the machine's real services; without them they skip with
the reason, unless ORCH_TEST_REQUIRE_SERVICES=1 (CI), where a missing service fails the test."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import uuid4

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


def require_command(name: str, package: str) -> str:
    """The path of a command a test needs (e.g. Debian's `prometheus` package's `promtool`): the test
    skips without it locally, and fails without it in CI."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ORCH_TEST_REQUIRE_SERVICES=1")
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def rabbit_queue() -> AsyncIterator[str]:
    """A RabbitMQ queue name for this test alone; the queue and its `.dead` twin (declared by the
    service) are deleted afterwards."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    import aio_pika

    name = f"test.{uuid4().hex[:12]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead"):
            await channel.queue_delete(queue)


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
