"""What every queue adapter promises intake and the publishers: at-least-once delivery with an
explicit ack, a message identity stable across redeliveries, dead letters with their reason, and an
`is_empty` that `run --until-idle` can trust."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orchestrator.queues import Consumer, Delivery
from tests.contract.brokers import Broker

WAIT = 5.0  # seconds a receive may wait for a message that is there (a broker's round trip)


@asynccontextmanager
async def opened(consumer: Consumer) -> AsyncIterator[Consumer]:
    await consumer.open()
    try:
        yield consumer
    finally:
        await consumer.close()


async def receive(consumer: Consumer, count: int) -> list[Delivery]:
    """Exactly `count` deliveries, received within WAIT seconds per call."""
    got: list[Delivery] = []
    for _ in range(count * 2 + 2):
        got += await consumer.receive(count - len(got), WAIT)
        if len(got) >= count:
            return got
    raise AssertionError(f"received {len(got)} of {count} messages")


async def publish(broker: Broker, bodies: list[bytes], ids: list[str] | None = None) -> int:
    publisher = broker.publisher()
    await publisher.open()
    try:
        return await publisher.publish(bodies, ids)
    finally:
        await publisher.close()


async def test_published_messages_are_delivered_once_acked(broker: Broker) -> None:
    assert await publish(broker, [b'{"datasetId": "a"}', b'{"datasetId": "b"}']) == 2
    async with opened(broker.consumer()) as consumer:
        got = await receive(consumer, 2)
        assert sorted(d.body for d in got) == [b'{"datasetId": "a"}', b'{"datasetId": "b"}']
        assert len({d.message_id for d in got}) == 2
        assert not await consumer.is_empty()  # delivered, not settled
        for delivery in got:
            await consumer.ack(delivery)
        assert await consumer.is_empty()
        assert await consumer.receive(10, 0.2) == []


async def test_messages_acked_together_are_settled_and_only_they(broker: Broker) -> None:
    bodies = [f'{{"datasetId": "d{index}"}}'.encode() for index in range(5)]
    assert await publish(broker, bodies) == 5
    async with opened(broker.consumer()) as consumer:
        earlier = await receive(consumer, 1)
        later = await receive(consumer, 2)
        await consumer.ack_many(later)
        assert not await consumer.is_empty()  # the earlier delivery is still held, and the rest
        rest = await receive(consumer, 2)
        await consumer.ack_many(rest)
        await consumer.ack_many([])
        assert not await consumer.is_empty()
        await consumer.ack_many(earlier)
        assert await consumer.is_empty()
        settled = {d.body for d in [*earlier, *later, *rest]}
        assert settled == set(bodies)
    async with opened(broker.consumer()) as again:
        assert await again.receive(10, 0.5) == []


async def test_a_released_message_comes_back_with_the_same_identity(broker: Broker) -> None:
    await publish(broker, [b'{"datasetId": "a"}'])
    async with opened(broker.consumer()) as consumer:
        [first] = await receive(consumer, 1)
        await consumer.release(first)
        [again] = await receive(consumer, 1)
        assert (again.body, again.message_id) == (first.body, first.message_id)
        await consumer.ack(again)
        assert await consumer.is_empty()


async def test_unsettled_messages_go_back_when_the_consumer_closes(broker: Broker) -> None:
    await publish(broker, [b'{"datasetId": "a"}'])
    async with opened(broker.consumer()) as first:
        [delivery] = await receive(first, 1)
    async with opened(broker.consumer()) as second:
        [again] = await receive(second, 1)
        assert again.message_id == delivery.message_id
        await second.ack(again)
        assert await second.is_empty()


async def test_dead_letters_keep_the_message_and_its_reason(broker: Broker) -> None:
    await publish(broker, [b"not json"])
    async with opened(broker.consumer()) as consumer:
        [delivery] = await receive(consumer, 1)
        await consumer.dead_letter(delivery, "not JSON")
        assert await consumer.is_empty()
        assert await consumer.receive(10, 0.2) == []
    assert await broker.dead_letters() == [(b"not json", "not JSON")]


async def test_a_native_producer_s_messages_have_stable_identities(broker: Broker) -> None:
    """A message from a plain producer, with and without an id of its own."""
    await broker.publish_native(b'{"datasetId": "with-id"}', message_id="producer-1")
    await broker.publish_native(b'{"datasetId": "without-id"}')
    async with opened(broker.consumer()) as consumer:
        got = {d.body: d for d in await receive(consumer, 2)}
        assert got[b'{"datasetId": "with-id"}'].message_id.endswith("producer-1")
        first_ids = {d.message_id for d in got.values()}
        for delivery in got.values():
            await consumer.release(delivery)
        again = await receive(consumer, 2)
        assert {d.message_id for d in again} == first_ids
        for delivery in again:
            await consumer.ack(delivery)


async def test_is_empty_sees_a_waiting_message(broker: Broker) -> None:
    async with opened(broker.consumer()) as consumer:
        assert await consumer.is_empty()
        await publish(broker, [b'{"datasetId": "a"}'])
        assert not await consumer.is_empty()
        [delivery] = await receive(consumer, 1)
        await consumer.ack(delivery)
        assert await consumer.is_empty()
