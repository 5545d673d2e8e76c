"""The acceptance for batch events on RabbitMQ: with events on RabbitMQ and a kill -9 mid-run, an event
for every created and failed request, each naming the recorded batch id.

The requests come through the embedded queue (what feeds the service does not matter here); the
events go to a durable queue of this test's own, read back with plain aio-pika and deleted afterwards.
The scenario and the check are those of the same test on the embedded queue (tests/e2e).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from orchestrator.aep.simulator import Simulator
from tests.e2e.test_cli_events import (
    assert_an_event_per_request,
    events_env,
    run_killed_and_restarted,
    slow_simulator_config,
)

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def slow_simulator() -> AsyncIterator[Simulator]:
    async with Simulator(slow_simulator_config(seed=8)) as sim:
        yield sim


async def consume_all(name: str) -> list[tuple[dict[str, Any], str | None]]:
    """Every message on queue `name` (body, AMQP message_id), taken and acked with plain aio-pika."""
    connection = await aio_pika.connect(AMQP_URL)
    found: list[tuple[dict[str, Any], str | None]] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(name)  # passive: the service declared it (a quorum queue)
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            found.append((json.loads(message.body), message.message_id))
            await message.ack()
    return found


async def test_an_event_for_every_created_and_failed_request_across_a_kill_9(
    tmp_path: Path, slow_simulator: Simulator, rabbit_queue: str
) -> None:
    env = events_env(tmp_path, slow_simulator, AMQP_URL, rabbit_queue)

    records = await run_killed_and_restarted(env, slow_simulator, tmp_path)

    # At least once: a repeat (published, then killed before its outbox row went) is the same event.
    by_event: dict[str, dict[str, Any]] = {}
    for body, message_id in await consume_all(rabbit_queue):
        assert message_id == body["eventId"]
        assert by_event.setdefault(body["eventId"], body) == body
    assert_an_event_per_request(records, list(by_event.values()), slow_simulator)
