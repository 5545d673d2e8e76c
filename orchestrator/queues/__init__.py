"""Queue adapters behind the `Queue` port (`base.py`), chosen by the URL's scheme."""

from __future__ import annotations

from orchestrator.queues.base import Delivery, Queue
from orchestrator.settings import ConfigError

# Adapters that are planned but not written yet, by scheme.
_PLANNED = {
    "amqp": "RabbitMQ",
    "amqps": "RabbitMQ",
    "redis": "Redis",
    "rediss": "Redis",
    "nats": "NATS",
    "tls": "NATS",
}


def open_queue(url: str, name: str) -> Queue:
    """The adapter for `url` (ORCH_QUEUE__URL), not yet connected: call `await queue.open()`.

    Raises ConfigError, naming the setting, for a scheme without an adapter.
    """
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        # Imported here so each adapter's driver loads only when it is used.
        from orchestrator.queues.sqlite import SqliteQueue

        return SqliteQueue(url, name)
    if scheme in _PLANNED:
        raise ConfigError([f"ORCH_QUEUE__URL: the {_PLANNED[scheme]} queue adapter is not available yet"])
    raise ConfigError(["ORCH_QUEUE__URL: must start with sqlite:///, amqp://, redis:// or nats://"])


__all__ = ["Delivery", "Queue", "open_queue"]
