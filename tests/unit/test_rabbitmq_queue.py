"""The RabbitMQ adapter's rules that need no broker: message identity, delivery attempts, the URL
schemes it is chosen for. Everything else runs against the local RabbitMQ (tests/integration)."""

from __future__ import annotations

import socket

import pytest

from orchestrator.queues import body_identity, open_consumer, open_publisher
from orchestrator.queues.rabbitmq import RabbitQueue, delivery_attempt, message_identity


def test_identity_is_the_producer_s_message_id_else_a_hash_of_the_body() -> None:
    assert message_identity("order-7", b"{}") == "order-7"
    assert message_identity(None, b'{"datasetId": "a"}') == body_identity(b'{"datasetId": "a"}')
    assert message_identity("", b"x") == body_identity(b"x")  # an empty id is no id


@pytest.mark.parametrize(
    ("headers", "redelivered", "attempt"),
    [
        ({}, False, 1),  # a first delivery: quorum queues add the count from the first return on
        ({"x-delivery-count": 1}, True, 2),
        ({"x-delivery-count": 4}, True, 5),
        ({}, True, None),  # redelivered by a queue that does not count
        ({"x-delivery-count": True}, True, None),  # not a count
    ],
)
def test_attempt_is_the_quorum_queue_s_delivery_count_plus_one(
    headers: dict[str, object], redelivered: bool, attempt: int | None
) -> None:
    assert delivery_attempt(headers, redelivered=redelivered) == attempt


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672/", "amqps://u:p@rabbit.example/vh"])
def test_amqp_urls_get_the_rabbitmq_adapter(url: str) -> None:
    assert isinstance(open_consumer(url, "q"), RabbitQueue)
    assert isinstance(open_publisher(url, "q"), RabbitQueue)


async def test_open_without_a_broker_fails_without_the_password() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = RabbitQueue(f"amqp://guest:s3cret@127.0.0.1:{port}/", "q")
    with pytest.raises(ConnectionError) as raised:
        await queue.open()
    assert "s3cret" not in str(raised.value)
    assert not queue.connected
