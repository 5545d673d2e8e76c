"""The queue ports: what intake consumes (`Consumer`), and what `enqueue` and the event relay publish
(`Publisher`). Adapters live next to this module, one per broker; one class may implement both.

Every consumer gives at-least-once delivery with an explicit ack. Intake acks only after the request
is recorded in the store, so a crash between the two means a redelivery, which the store's unique
request key turns into a no-op.

`is_empty` is what `run --until-idle` asks, and means "nothing is waiting for this service", as
close as each broker can tell it:
- embedded (SQLite): no message ready or leased in the queue;
- RabbitMQ: no message ready in the queue and none delivered to this process and not yet settled
  (messages unacked by another consumer are that consumer's);
- Redis Streams: no entry after the group's last delivered one and none pending in the group;
- NATS JetStream: the durable consumer has nothing pending and nothing waiting for an ack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Delivery:
    """One received message.

    `message_id` is the broker's identity of the message, stable across redeliveries; it keys
    requests that carry no `requestId`. `attempt` is how many times it was delivered, where the
    broker counts (None where it does not). `handle` is the adapter's own receipt (a row id, a
    delivery tag, a stream entry id) and means nothing outside it.
    """

    body: bytes
    message_id: str
    attempt: int | None = None
    handle: object = None


def body_identity(body: bytes) -> str:
    """A message identity for brokers whose messages may carry none (an AMQP message without a
    `message_id`): the SHA-256 of the body. Two identical bodies are then one message, which for a
    request without a `requestId` means one batch; give each message a `requestId` (or a
    `message_id`) to make identical ones distinct."""
    return "sha256:" + hashlib.sha256(body).hexdigest()[:40]


class Consumer(Protocol):
    """A source of request messages."""

    name: str

    async def open(self) -> None:
        """Connect and declare what the service owns (queues, streams, consumer groups, tables)."""

    async def close(self) -> None:
        """Give unsettled deliveries back for redelivery and disconnect."""

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to `timeout` seconds for at most `max_messages` deliveries."""

    async def ack(self, delivery: Delivery) -> None:
        """The message is recorded; the broker may forget it."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """`ack` of each, in one call: the messages of one `receive` recorded together. Adapters whose
        broker settles many messages in one command use it."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """The message is invalid: move it to the dead-letter destination with its reason."""

    async def release(self, delivery: Delivery) -> None:
        """Give an unprocessed delivery back for redelivery (shutdown)."""

    async def is_empty(self) -> bool:
        """Nothing is waiting for this service (see the module's notes for each broker)."""


class Publisher(Protocol):
    """A destination for messages: requests (`enqueue`) or batch events (the relay)."""

    name: str

    async def open(self) -> None:
        """Connect and declare the destination where the service owns it."""

    async def close(self) -> None: ...

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        """Publish `bodies` (with broker confirms where the broker has them); returns how many the
        broker accepted. `message_ids`, one per body, is each message's identity where the broker
        carries one (an AMQP `message_id`, a NATS `Nats-Msg-Id`, a field of a Redis entry)."""


# The name intake and the service knew the consumer by.
Queue = Consumer
