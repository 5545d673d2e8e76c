"""Queue adapters behind the `Consumer` and `Publisher` ports (`base.py`), chosen by the URL's scheme.

Each adapter's module is imported only when its scheme is used, so a broker's client library is
needed only by those who use that broker (the extras `.[rabbitmq]`, `.[redis]`, `.[nats]`)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from orchestrator.queues.base import Consumer, Delivery, Publisher, Queue, body_identity
from orchestrator.settings import ConfigError

# scheme -> (module, class, extra that installs its client, broker name)
_ADAPTERS: dict[str, tuple[str, str, str | None, str]] = {
    "sqlite": ("orchestrator.queues.sqlite", "SqliteQueue", None, "embedded SQLite"),
    "amqp": ("orchestrator.queues.rabbitmq", "RabbitQueue", "rabbitmq", "RabbitMQ"),
    "amqps": ("orchestrator.queues.rabbitmq", "RabbitQueue", "rabbitmq", "RabbitMQ"),
    "redis": ("orchestrator.queues.redis", "RedisStreamQueue", "redis", "Redis"),
    "rediss": ("orchestrator.queues.redis", "RedisStreamQueue", "redis", "Redis"),
    "nats": ("orchestrator.queues.nats", "NatsQueue", "nats", "NATS"),
    "tls": ("orchestrator.queues.nats", "NatsQueue", "nats", "NATS"),
}
# Schemes recognised before their adapters are built (none now: Kafka and SQS would come here).
_KNOWN: dict[str, str] = {}


def _adapter(url: str, setting: str) -> Any:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _ADAPTERS:
        if scheme in _KNOWN:
            raise ConfigError([f"{setting}: the {_KNOWN[scheme]} adapter is not available yet"])
        raise ConfigError([f"{setting}: must start with sqlite:///, amqp://, redis:// or nats://"])
    module_name, class_name, extra, broker = _ADAPTERS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = f": pip install 'aep-orchestrator[{extra}]'" if extra else ""
        raise ConfigError([f"{setting}: the {broker} client ({exc.name}) is not installed{hint}"]) from None
    return getattr(module, class_name)


def open_consumer(url: str, name: str, *, setting: str = "ORCH_QUEUE__URL") -> Consumer:
    """The consumer for `url`, not yet connected: call `await consumer.open()`.

    Raises ConfigError, naming the setting, for a scheme without an adapter."""
    consumer: Consumer = _adapter(url, setting)(url, name)
    return consumer


def open_publisher(url: str, name: str, *, setting: str = "ORCH_QUEUE__URL") -> Publisher:
    """The publisher for `url` (requests for `enqueue`, or events on ORCH_EVENTS__URL), not yet
    connected: call `await publisher.open()`."""
    publisher: Publisher = _adapter(url, setting)(url, name)
    return publisher


async def publish_to(
    url: str, name: str, bodies: Sequence[bytes], *, setting: str = "ORCH_QUEUE__URL"
) -> int:
    """Open a publisher, publish `bodies`, close it; returns how many the broker accepted."""
    publisher = open_publisher(url, name, setting=setting)
    await publisher.open()
    try:
        return await publisher.publish(bodies)
    finally:
        await publisher.close()


def open_queue(url: str, name: str) -> Queue:
    """The consumer of ORCH_QUEUE__URL (the name the service and tests have used)."""
    return open_consumer(url, name)


__all__ = [
    "Consumer",
    "Delivery",
    "Publisher",
    "Queue",
    "body_identity",
    "open_consumer",
    "open_publisher",
    "open_queue",
    "publish_to",
]
