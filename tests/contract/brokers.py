"""One `Broker` per adapter: how the contract tests make a consumer and a publisher on a fresh, unique
destination, read its dead letters back, and clean up. The adapters' own tests (tests/unit for the
embedded queue, tests/integration for the real brokers) go further; these hold every adapter to the
same promises."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from uuid import uuid4

import redis.asyncio

from orchestrator.queues import Consumer, Publisher, open_consumer, open_publisher
from tests.conftest import require_service


class Broker(Protocol):
    url: str
    name: str

    def consumer(self) -> Consumer: ...

    def publisher(self) -> Publisher: ...

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        """(body, reason) of every message dead-lettered so far, oldest first."""

    async def publish_native(self, body: bytes, message_id: str | None = None) -> None:
        """Publish one message as a plain producer of that broker would (not through the adapter)."""


@dataclass
class SqliteBroker:
    path: Path
    name: str = field(default_factory=lambda: f"contract-{uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def consumer(self) -> Consumer:
        return open_consumer(self.url, self.name)

    def publisher(self) -> Publisher:
        return open_publisher(self.url, self.name)

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        with sqlite3.connect(self.path) as connection:
            rows = connection.execute(
                "SELECT payload, last_error FROM queue_message"
                " WHERE queue = ? AND status = 'dead' ORDER BY id",
                (self.name,),
            ).fetchall()
        return [(bytes(payload), reason) for payload, reason in rows]

    async def publish_native(self, body: bytes, message_id: str | None = None) -> None:
        publisher = self.publisher()
        await publisher.open()
        try:
            await publisher.publish([body], None if message_id is None else [message_id])
        finally:
            await publisher.close()


@asynccontextmanager
async def sqlite_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    yield SqliteBroker(tmp_path / "queue.db")


@dataclass
class RedisBroker:
    """A stream of its own on the local Redis; `client` is a plain redis-py client, the producer's."""

    client: redis.asyncio.Redis
    url: str = "redis://127.0.0.1:6379/0"
    name: str = field(default_factory=lambda: f"contract-{uuid4().hex[:8]}")

    def consumer(self) -> Consumer:
        return open_consumer(self.url, self.name)

    def publisher(self) -> Publisher:
        return open_publisher(self.url, self.name)

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        entries = await self.client.xrange(f"{self.name}.dead")
        return [(fields[b"message"], fields[b"reason"].decode()) for _, fields in entries]

    async def publish_native(self, body: bytes, message_id: str | None = None) -> None:
        fields = {b"message": body} if message_id is None else {b"message": body, b"id": message_id}
        await self.client.xadd(self.name, fields)


@asynccontextmanager
async def redis_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    require_service("Redis", "127.0.0.1", 6379)
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    broker = RedisBroker(client)
    try:
        yield broker
    finally:
        await client.delete(broker.name, f"{broker.name}.dead")
        await client.aclose()


# name -> a context manager making a fresh broker destination (and removing it afterwards). Each
# real broker's entry checks first that its service answers (tests.conftest.require_service).
FACTORIES: dict[str, Callable[[Path], AbstractAsyncContextManager[Broker]]] = {
    "sqlite": sqlite_broker,
    "redis": redis_broker,
}
