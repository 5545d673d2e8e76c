"""The NATS adapter without a server: how its URL and subject are read, and how it fails to connect.
What it does with a server is in tests/integration/test_nats.py and the contract tests."""

from __future__ import annotations

import socket

import pytest

from orchestrator.queues import open_publisher, open_queue
from orchestrator.queues.nats import NatsQueue
from orchestrator.settings import ConfigError


def test_nats_and_tls_urls_choose_the_adapter() -> None:
    for url in ("nats://localhost:4222", "tls://user:secret@nats.example.com:4443"):
        assert isinstance(open_queue(url, "q"), NatsQueue)
        assert isinstance(open_publisher(url, "q", setting="ORCH_EVENTS__URL"), NatsQueue)


def test_the_url_sets_ack_wait_and_max_deliver_unless_the_constructor_does() -> None:
    queue = NatsQueue("nats://localhost:4222?ack_wait=2.5&max_deliver=4", "aep.batch-requests")
    assert (queue.ack_wait, queue.max_deliver) == (2.5, 4)
    assert (queue.stream, queue.dead_subject) == ("aep_batch-requests", "aep.batch-requests.dead")
    queue = NatsQueue("nats://localhost:4222?ack_wait=2.5", "q", ack_wait=9, max_deliver=3)
    assert (queue.ack_wait, queue.max_deliver) == (9, 3)
    queue = NatsQueue("nats://a:4222,nats://b:4222", "q")
    assert (queue.ack_wait, queue.max_deliver) == (NatsQueue.ACK_WAIT, NatsQueue.MAX_DELIVER)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("ack_wait=0", "ack_wait must be seconds above 0"),
        ("ack_wait=soon", "ack_wait must be seconds above 0"),
        ("ack_wait=86401", "at most 86400"),
        ("max_deliver=1", "max_deliver must be a whole number of at least 2"),
        ("max_deliver=2.5", "max_deliver must be a whole number of at least 2"),
        ("token=hunter2", "unknown parameter 'token'"),
    ],
)
def test_a_bad_url_parameter_is_a_configuration_error(query: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        NatsQueue(f"nats://localhost:4222?{query}", "q")
    assert "hunter2" not in str(raised.value)  # the value of an unknown parameter may be a secret


@pytest.mark.parametrize("name", ["a..b", ".a", "a.", "a b"])
def test_a_name_that_is_no_nats_subject_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="not a NATS subject"):
        NatsQueue("nats://localhost:4222", name)


async def test_open_gives_up_when_no_server_answers_and_names_it_without_credentials() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = NatsQueue(f"nats://user:secret@127.0.0.1:{port}", "q")
    queue.OPEN_TIMEOUT = 0.5
    with pytest.raises(ConnectionError, match=f"NATS at 127.0.0.1:{port} did not answer") as raised:
        await queue.open()
    assert "secret" not in str(raised.value)
    await queue.close()  # nothing to close: no error


async def test_a_queue_that_is_not_open_says_so() -> None:
    queue = NatsQueue("nats://localhost:4222", "q")
    with pytest.raises(RuntimeError, match="not open"):
        await queue.receive(1, 0.1)
    with pytest.raises(RuntimeError, match="not open"):
        await queue.publish([b"x"])
