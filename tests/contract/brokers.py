"""One `Broker` per adapter: how the contract tests make a consumer and a publisher on a fresh, unique
destination, read its dead letters back, and clean up. The adapters' own tests (tests/unit for the
embedded queue, tests/integration for the real brokers) go further; these hold every adapter to the
same promises."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit
from uuid import uuid4

import aio_pika
import nats
import redis.asyncio
from aio_pika.abc import AbstractChannel
from nats.aio.client import Client as NatsClient
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

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


RABBITMQ_URL = os.environ.get("ORCH_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class RabbitBroker:
    """A fresh queue NAME (and NAME.dead) on the local RabbitMQ; reads and writes with plain
    aio-pika, as the producers and operators around the service would."""

    url: str = RABBITMQ_URL
    name: str = field(default_factory=lambda: f"contract-{uuid4().hex[:8]}")

    def consumer(self) -> Consumer:
        return open_consumer(self.url, self.name)

    def publisher(self) -> Publisher:
        return open_publisher(self.url, self.name)

    @asynccontextmanager
    async def channel(self) -> AsyncIterator[AbstractChannel]:
        connection = await aio_pika.connect(self.url)
        try:
            yield await connection.channel()
        finally:
            await connection.close()

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        # Read without acking: closing the channel puts them back, so they can be read again.
        found: list[tuple[bytes, str]] = []
        async with self.channel() as channel:
            queue = await channel.declare_queue(f"{self.name}.dead", durable=True)
            while (message := await queue.get(fail=False)) is not None:
                found.append((message.body, str(message.headers.get("reason"))))
        return found

    async def publish_native(self, body: bytes, message_id: str | None = None) -> None:
        await self.publish_many([body], None if message_id is None else [message_id])

    async def publish_many(self, bodies: list[bytes], message_ids: list[str] | None = None) -> None:
        """Publish as a plain producer does: the default exchange, routing key NAME, confirmed. It
        declares NAME as the service does (same arguments, so a no-op once the service has), as a
        producer that may start first would."""
        ids: list[str | None] = list(message_ids) if message_ids is not None else [None] * len(bodies)
        async with self.channel() as channel:
            await channel.declare_queue(self.name, durable=True, arguments={"x-queue-type": "quorum"})
            for body, message_id in zip(bodies, ids, strict=True):
                message = aio_pika.Message(body, message_id=message_id, delivery_mode=2)
                await channel.default_exchange.publish(message, routing_key=self.name)

    async def ready(self, queue: str | None = None) -> int:
        """How many messages wait in NAME (or `queue`) ready: neither delivered nor unacked."""
        async with self.channel() as channel:
            declared = await channel.declare_queue(queue or self.name, passive=True)
            return declared.declaration_result.message_count or 0

    async def delete(self) -> None:
        async with self.channel() as channel:
            for queue in (self.name, f"{self.name}.dead"):
                await channel.queue_delete(queue)


@asynccontextmanager
async def rabbitmq_broker(tmp_path: Path) -> AsyncIterator[RabbitBroker]:
    address = urlsplit(RABBITMQ_URL)
    require_service("RabbitMQ", address.hostname or "127.0.0.1", address.port or 5672)
    broker = RabbitBroker()
    try:
        yield broker
    finally:
        await broker.delete()


NATS_URL = os.environ.get("ORCH_TEST_NATS_URL", "nats://127.0.0.1:4222")


@dataclass
class NatsBroker:
    """A subject of its own on the local NATS, with plain nats-py for what producers and operators
    do: publish, read the dead letters, delete the streams afterwards."""

    client: NatsClient
    url: str = NATS_URL
    name: str = field(default_factory=lambda: f"contract.{uuid4().hex[:8]}")

    def consumer(self) -> Consumer:
        return open_consumer(self.url, self.name)

    def publisher(self) -> Publisher:
        return open_publisher(self.url, self.name)

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        js = self.client.jetstream()
        subject = f"{self.name}.dead"
        try:
            stream = await js.find_stream_name_by_subject(subject)
        except NotFoundError:
            return []
        found: list[tuple[bytes, str]] = []
        seq = 1
        while True:  # by sequence, with no consumer: a work-queue stream allows one per subject
            try:
                message = await js.get_msg(stream, seq, subject=subject, next=True)
            except NotFoundError:
                return found
            found.append((message.data or b"", (message.headers or {}).get("reason", "")))
            seq = (message.seq or seq) + 1

    async def publish_native(self, body: bytes, message_id: str | None = None) -> None:
        js = self.client.jetstream()
        try:
            await js.find_stream_name_by_subject(self.name)
        except NotFoundError:
            # A producer that starts first makes the stream, under a name of its choosing; the
            # service then uses it (it needs NAME and NAME.dead in it).
            config = StreamConfig(
                name=f"producer-{self.name.replace('.', '-')}",
                subjects=[self.name, f"{self.name}.dead"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
            await js.add_stream(config)
        headers = None if message_id is None else {"Nats-Msg-Id": message_id}
        await js.publish(self.name, body, headers=headers)

    async def delete(self) -> None:
        js = self.client.jetstream()
        for subject in (self.name, f"{self.name}.dead"):
            with suppress(NotFoundError):
                await js.delete_stream(await js.find_stream_name_by_subject(subject))


@asynccontextmanager
async def nats_broker(tmp_path: Path) -> AsyncIterator[NatsBroker]:
    address = urlsplit(NATS_URL)
    require_service("NATS", address.hostname or "127.0.0.1", address.port or 4222)
    client = await nats.connect(NATS_URL)
    broker = NatsBroker(client)
    try:
        yield broker
    finally:
        await broker.delete()
        await client.close()


# name -> a context manager making a fresh broker destination (and removing it afterwards). Each
# real broker's entry checks first that its service answers (tests.conftest.require_service).
FACTORIES: dict[str, Callable[[Path], AbstractAsyncContextManager[Broker]]] = {
    "sqlite": sqlite_broker,
    "rabbitmq": rabbitmq_broker,
    "redis": redis_broker,
    "nats": nats_broker,
}
