"""The queue port: what intake needs from any broker, and nothing more.

Every adapter gives at-least-once delivery with an explicit ack. Intake acks only after the request
is recorded in the store, so a crash between the two means a redelivery, which the store's unique
request key turns into a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Delivery:
    """One received message.

    `message_id` is the broker's identity of the message, stable across redeliveries; it keys
    requests that carry no `requestId`. `handle` is the adapter's own receipt (a row id, a delivery
    tag, a stream entry id) and means nothing outside it.
    """

    body: bytes
    message_id: str
    attempt: int
    handle: object = None


class Queue(Protocol):
    """A source of request messages. Adapters live next to this module, one per broker."""

    name: str
    # Whether invalid messages should be recorded as `rejected` in the store: true where the broker
    # has no dead-letter destination of its own (the embedded queue).
    dead_letters_in_store: bool

    async def open(self) -> None:
        """Connect and declare what the service owns (queues, streams, consumer groups, tables)."""

    async def close(self) -> None:
        """Release unacked deliveries for redelivery and disconnect."""

    async def publish(self, bodies: Sequence[bytes]) -> int:
        """Publish messages (the `enqueue` command); returns how many were accepted."""

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to `timeout` seconds for at most `max_messages` deliveries."""

    async def ack(self, delivery: Delivery) -> None:
        """The message is recorded; the broker may forget it."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """The message is invalid: move it to the dead-letter destination with its reason."""

    async def release(self, delivery: Delivery) -> None:
        """Give an unprocessed delivery back for redelivery (shutdown)."""

    async def is_empty(self) -> bool:
        """True when no message is waiting or leased (`run --until-idle`)."""
