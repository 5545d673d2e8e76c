"""The RabbitMQ adapter against the local broker: what the contract suite does not cover (prefetch,
connections lost and found again, what a publish sets), and the acceptance through the CLI with a
plain aio-pika producer: duplicates and poison messages, SIGTERM, kill -9, the broker restarted.

Each test has a queue of its own (tests.contract.brokers.RabbitBroker), deleted afterwards. Without
the broker the tests skip, or fail when ORCH_TEST_REQUIRE_SERVICES=1; so do the ones that need
`rabbitmqctl`. The broker restart test stops the whole RabbitMQ app for a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from structlog.testing import capture_logs

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.clock import SystemClock
from orchestrator.queues import Consumer, Delivery, open_consumer, open_publisher
from orchestrator.queues.rabbitmq import RabbitQueue
from tests.conftest import REQUIRE_SERVICES
from tests.contract.brokers import RabbitBroker, rabbitmq_broker
from tests.e2e.cli import Process, cli_env, events, run, start

pytestmark = pytest.mark.integration

SHARED = Path(os.environ.get("ORCH_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
SERVICES_UP = SHARED / "scripts" / "services-up"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RabbitBroker]:
    async with rabbitmq_broker(tmp_path) as made:
        yield made


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    # Some latency keeps calls in flight, so a kill or a broker restart lands in the middle of a run.
    async with Simulator(SimulatorConfig(latency=0.05, latency_jitter=0.05, seed=11)) as simulator:
        yield simulator


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - the broker and the simulator have no event to await
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ORCH_TEST_REQUIRE_SERVICES=1")
        pytest.skip(message)
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def connections_of(broker: RabbitBroker) -> list[str]:
    """The pids of the broker's connections opened by the adapter for this queue."""
    # Tab-separated: the JSON formatter writes pids that close_connection does not take back.
    listing = await rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "client_properties")
    return [line.split("\t")[0] for line in listing.splitlines() if f"orchestrator {broker.name} " in line]


async def settled_by_the_service(broker: RabbitBroker) -> bool:
    """The service is connected, nothing waits in the queue and nothing it was delivered is unacked.
    Unacked messages as its channels count them: `list_queues` statistics lag by seconds."""
    ours = set(await connections_of(broker))
    listing = await rabbitmqctl(
        "list_channels", "-q", "--no-table-headers", "connection", "messages_unacknowledged"
    )
    rows = [line.split("\t") for line in listing.splitlines()]
    unacked = sum(int(count) for connection, count in rows if connection in ours)
    return bool(ours) and unacked == 0 and await broker.ready() == 0


async def queue_consumers(broker: RabbitBroker) -> int:
    """How many consumers the queue lists (0 when there is no such queue)."""
    try:
        async with broker.channel() as channel:
            declared = await channel.declare_queue(broker.name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return 0
    return declared.declaration_result.consumer_count or 0


async def consumers_of(queue: str) -> list[dict[str, Any]]:
    listing = await rabbitmqctl("list_consumers", "queue_name", "prefetch_count", "--formatter", "json")
    return [consumer for consumer in json.loads(listing) if consumer["queue_name"] == queue]


async def receive(consumer: Consumer, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            got += await consumer.receive(count - len(got), 1.0)
    return got


def body(index: int) -> bytes:
    return json.dumps({"datasetId": f"{index:024x}", "requestId": f"req-{index}"}).encode()


# -- the adapter ---------------------------------------------------------------------------------


async def test_prefetch_is_twice_what_intake_asks_for_and_close_returns_it(broker: RabbitBroker) -> None:
    await broker.publish_many([body(i) for i in range(10)])
    consumer = open_consumer(broker.url, broker.name)
    await consumer.open()
    try:
        assert len(await consumer.receive(2, 5.0)) == 2
        assert [c["prefetch_count"] for c in await consumers_of(broker.name)] == [4]
        await eventually(lambda: _ready_is(broker, 6), "4 of 10 delivered, 6 ready")
        # Asking for more starts a consumer with the larger prefetch in place of the old one.
        assert len(await receive(consumer, 5)) == 5
        assert [c["prefetch_count"] for c in await consumers_of(broker.name)] == [10]
        await eventually(lambda: _ready_is(broker, 0), "all 10 delivered")
    finally:
        await consumer.close()
    # Handed out or only prefetched, nothing was acked: it is all the broker's again.
    await eventually(lambda: _ready_is(broker, 10), "all 10 ready again")


async def _ready_is(broker: RabbitBroker, count: int) -> bool:
    return await broker.ready() == count


async def test_a_batch_is_acked_with_one_frame_unless_an_earlier_delivery_is_held(
    broker: RabbitBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    acks: list[tuple[int | None, bool]] = []
    ack = aiormq.Channel.basic_ack

    async def counted(channel: aiormq.Channel, delivery_tag: int, multiple: bool = False) -> None:
        acks.append((delivery_tag, multiple))
        await ack(channel, delivery_tag, multiple=multiple)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    await broker.publish_many([body(i) for i in range(7)])
    consumer = open_consumer(broker.url, broker.name)
    await consumer.open()
    try:
        first = await receive(consumer, 3)
        await consumer.ack_many(first)
        assert acks == [(max(d.handle.tag for d in first), True)]  # type: ignore[attr-defined]
        acks.clear()
        held = await receive(consumer, 1)
        later = await receive(consumer, 3)
        # The held delivery is below the batch's last tag: multiple would settle it too.
        await consumer.ack_many(later)
        assert [multiple for _, multiple in acks] == [False, False, False]
        await consumer.ack_many(held)
        await eventually(lambda: settled_by_the_service(broker), "all 7 acked, none held or ready")
    finally:
        await consumer.close()
    await eventually(lambda: _ready_is(broker, 0), "nothing given back at close")


async def test_attempt_counts_deliveries(broker: RabbitBroker) -> None:
    await broker.publish_native(body(1))
    consumer = open_consumer(broker.url, broker.name)
    await consumer.open()
    try:
        [first] = await receive(consumer, 1)
        await consumer.release(first)
        [second] = await receive(consumer, 1)
        assert (first.attempt, second.attempt) == (1, 2)
        await consumer.ack(second)
    finally:
        await consumer.close()


async def test_a_connection_closed_by_the_broker_is_reopened_and_old_deliveries_come_back(
    broker: RabbitBroker,
) -> None:
    await broker.publish_many([body(1), body(2), body(3)])
    consumer = RabbitQueue(broker.url, broker.name)
    await consumer.open()
    try:
        held = await receive(consumer, 3)
        ours = await connections_of(broker)
        assert len(ours) == 1
        await rabbitmqctl("close_connection", ours[0], "test: the broker closes the connection")

        async def lost() -> bool:
            return not consumer.connected

        await eventually(lost, "the adapter sees its connection closed")
        with capture_logs() as logs:
            # Settling deliveries of the lost channel is a no-op: they are the broker's again.
            await consumer.ack(held[0])
            await consumer.release(held[1])
            await consumer.dead_letter(held[2], "invalid")
            again = await receive(consumer, 3)
        assert sorted(d.message_id for d in again) == sorted(d.message_id for d in held)
        assert {d.attempt for d in again} == {2}
        for delivery in again:
            await consumer.ack(delivery)
        assert await consumer.is_empty()
    finally:
        await consumer.close()
    names = [entry["event"] for entry in logs]
    assert names.count("queue.ack_failed") == 1
    assert names.count("queue.release_failed") == 1
    assert names.count("queue.dead_letter_failed") == 1
    assert "queue.connection_lost" in names
    assert "queue.reconnected" in names
    assert await broker.dead_letters() == []
    assert await broker.ready() == 0


async def test_a_queue_deleted_under_the_consumer_is_declared_and_consumed_again(
    broker: RabbitBroker,
) -> None:
    consumer = open_consumer(broker.url, broker.name)
    await consumer.open()
    try:
        assert await consumer.receive(1, 0.1) == []  # consuming
        async with broker.channel() as channel:
            await channel.queue_delete(broker.name)  # the broker cancels the consumer; no close

        async def consumed_again() -> bool:
            await consumer.receive(1, 0.2)
            return await queue_consumers(broker) == 1

        await eventually(consumed_again, "the queue declared and consumed again")
        await broker.publish_native(body(1))
        [delivery] = await receive(consumer, 1)
        await consumer.ack(delivery)
        assert await consumer.is_empty()
    finally:
        await consumer.close()


async def test_is_empty_leaves_out_what_another_consumer_holds(broker: RabbitBroker) -> None:
    await broker.publish_native(body(1))
    async with broker.channel() as channel:
        queue = await channel.get_queue(broker.name)
        held = await queue.get()  # delivered to someone else, not acked
        assert held is not None
        consumer = open_consumer(broker.url, broker.name)
        await consumer.open()
        try:
            assert await consumer.is_empty()
        finally:
            await consumer.close()


async def test_publish_is_confirmed_persistent_json_with_the_ids_given(broker: RabbitBroker) -> None:
    publisher = open_publisher(broker.url, broker.name)
    await publisher.open()  # declares the queue: the messages are kept with no consumer yet
    try:
        assert await publisher.publish([body(1), body(2)], ["id-1", "id-2"]) == 2
        assert await publisher.publish([body(3)]) == 1
    finally:
        await publisher.close()
    [queue] = [q for q in json.loads(await _list_queues()) if q["name"] == broker.name]
    assert queue["type"] == "quorum"
    assert queue["durable"] is True
    async with broker.channel() as channel:
        source = await channel.get_queue(broker.name)
        got = {m.body: m for m in [await source.get(no_ack=True) for _ in range(3)]}
    assert sorted(got) == sorted([body(1), body(2), body(3)])
    assert (got[body(1)].message_id, got[body(2)].message_id) == ("id-1", "id-2")
    assert got[body(3)].message_id  # a fresh id, so each published message is a request of its own
    assert {m.delivery_mode for m in got.values()} == {aio_pika.DeliveryMode.PERSISTENT}
    assert {m.content_type for m in got.values()} == {"application/json"}


async def _list_queues() -> str:
    return await rabbitmqctl("list_queues", "name", "type", "durable", "--formatter", "json")


async def test_a_dead_letter_keeps_the_producer_s_id_and_headers(broker: RabbitBroker) -> None:
    async with broker.channel() as channel:
        await channel.declare_queue(broker.name, durable=True, arguments={"x-queue-type": "quorum"})
        message = aio_pika.Message(b"not json", message_id="m-1", headers={"trace": "t-1"})
        await channel.default_exchange.publish(message, routing_key=broker.name)
    consumer = open_consumer(broker.url, broker.name)
    await consumer.open()
    try:
        [delivery] = await receive(consumer, 1)
        await consumer.dead_letter(delivery, "not JSON")
    finally:
        await consumer.close()
    async with broker.channel() as channel:
        dead = await (await channel.get_queue(f"{broker.name}.dead")).get(no_ack=True)
    assert dead is not None
    assert (dead.body, dead.message_id) == (b"not json", "m-1")
    assert dead.headers == {"trace": "t-1", "reason": "not JSON"}
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


# -- through the CLI -----------------------------------------------------------------------------


def service_env(tmp_path: Path, sim: Simulator, broker: RabbitBroker, **settings: str) -> dict[str, str]:
    defaults = {
        "QUEUE__URL": broker.url,
        "QUEUE__NAME": broker.name,
        "AEP__CATALOG_SETTLE": "1",
        "AEP__TIMEOUT": "2",
        "RETRY__BASE_DELAY": "0.05",
        "RETRY__MAX_DELAY": "1",
        "LIMITS__RATE": "40",
        "LIMITS__CONCURRENCY": "8",
        # A small backlog keeps most messages in the broker while the service runs, so a kill or a
        # broker restart finds some delivered and not yet acked.
        "LIMITS__MAX_BACKLOG": "20",
    }
    return cli_env(tmp_path, sim.url, **(defaults | settings))


def batches_per_dataset(sim: Simulator) -> Counter[str]:
    return Counter(batch.dataset_id for batch in sim.stats.batches)


async def created_at_least(sim: Simulator, count: int, service: Process) -> None:
    """Wait until the simulator has `count` batches; if it does not, stop `service` and tell why."""

    async def check() -> bool:
        return len(sim.stats.batches) >= count or service.proc.returncode is not None

    try:
        await eventually(check, f"{count} batches created")
        if len(sim.stats.batches) < count:
            raise AssertionError(f"the service ended before {count} batches were created")
    except AssertionError as exc:
        if service.proc.returncode is None:
            service.signal(signal.SIGKILL)
        raise AssertionError(f"{exc}; the service said:\n{(await service.wait()).stderr[-5000:]}") from None


async def records(env: dict[str, str], cwd: Path, *args: str) -> list[dict[str, Any]]:
    result = await run(["batches", "--json", *args], env, cwd)
    assert result.code == 0, result.stderr
    return result.json_lines()


async def test_acceptance_sigterm_then_kill_9(tmp_path: Path, sim: Simulator, broker: RabbitBroker) -> None:
    env = service_env(tmp_path, sim, broker)
    invalid = [b"not json", b'{"datasetId": "not a dataset id!"}']
    # 60 requests, two of them sent twice, and two poison messages, from a plain producer.
    await broker.publish_many([body(i) for i in range(60)] + [body(7), body(42)] + invalid)

    service = await start(["run"], env, tmp_path)
    await created_at_least(sim, 60, service)
    await eventually(lambda: _dead_letters_are(broker, 2), "2 dead letters")
    # Nothing left unacked (nor ready) while the service still runs.
    await eventually(lambda: settled_by_the_service(broker), "every message acked")
    service.signal(signal.SIGTERM)
    stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-3000:]
    assert ":guest@" not in stopped.stderr  # the URL's password is masked in logs

    assert len(sim.stats.batches) == 60
    assert set(batches_per_dataset(sim).values()) == {1}
    dead = await broker.dead_letters()
    assert sorted(message for message, _ in dead) == sorted(invalid)
    assert all(reason for _, reason in dead)
    assert len(await records(env, tmp_path, "--state", "rejected")) == 2
    assert await broker.ready() == 0

    # 40 more; the service killed with -9 a moment in, then run again until idle.
    await broker.publish_many([body(i) for i in range(60, 100)])
    service = await start(["run"], env, tmp_path)
    await created_at_least(sim, 65, service)
    service.signal(signal.SIGKILL)
    killed = await service.wait()
    assert killed.code == -signal.SIGKILL
    assert len(sim.stats.batches) < 100, "the kill came too late to test anything"

    restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    assert restarted.code == 0, restarted.stderr[-3000:]
    per_dataset = batches_per_dataset(sim)
    assert len(per_dataset) == 100
    assert set(per_dataset.values()) == {1}
    recorded = await records(env, tmp_path)
    assert Counter(r["state"] for r in recorded) == {"created": 100, "rejected": 2}
    created = {r["batchId"] for r in recorded if r["state"] == "created"}
    assert created == {batch.id for batch in sim.stats.batches}
    assert await broker.ready() == 0


async def _dead_letters_are(broker: RabbitBroker, count: int) -> bool:
    return len(await broker.dead_letters()) == count


class HeldAnswers(SystemClock):
    """The simulator's clock, whose answers can be held: while `flowing` is cleared, every answer
    waits (the batch is still made when the call arrives)."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def sleep(self, seconds: float) -> None:
        await self.flowing.wait()
        await super().sleep(seconds)


async def test_the_service_reconnects_after_the_broker_restarts(tmp_path: Path, broker: RabbitBroker) -> None:
    clock = HeldAnswers()
    async with Simulator(SimulatorConfig(latency=0.05, latency_jitter=0.05, seed=11), clock) as sim:
        # Answers are held while the broker is down, for however long its restart takes here.
        env = service_env(tmp_path, sim, broker, AEP__TIMEOUT="300")
        await broker.publish_many([body(i) for i in range(60)])
        service: Process = await start(["run", "--until-idle"], env, tmp_path)
        try:
            await created_at_least(sim, 10, service)
            # From here no request finishes, so intake accepts at most 20 (the backlog bound) beyond
            # those finished by now (about 10): some 30 messages are still in the broker when it
            # stops, however fast this machine is.
            clock.flowing.clear()
            await rabbitmqctl("stop_app")
        finally:
            await rabbitmqctl("start_app")
            await _services_up()
            clock.flowing.set()
        finished = await service.wait(timeout=60)
        assert finished.code == 0, finished.stderr[-3000:]
        names = [event["event"] for event in events(finished.stderr)]
        assert names.count("queue.connection_lost") == 1
        # Requests came in over the new connection: what the lost channel held came back, and the rest.
        after = names[names.index("queue.reconnected") :]
        assert "intake.accepted" in after
        assert names.count("intake.accepted") == 60
        per_dataset = batches_per_dataset(sim)
        assert len(per_dataset) == 60
        assert set(per_dataset.values()) == {1}
        assert await broker.ready() == 0


async def _services_up() -> None:
    if not SERVICES_UP.is_file():
        # A clone with no shared/ beside it: `start_app` above brought the broker back; wait for it.
        async with asyncio.timeout(60):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", 5672)
                except OSError:
                    await asyncio.sleep(0.5)
                    continue
                writer.close()
                await writer.wait_closed()
                return
    proc = await asyncio.create_subprocess_exec(str(SERVICES_UP), "rabbitmq")
    assert await proc.wait() == 0


async def test_enqueue_says_how_many_the_broker_confirmed(tmp_path: Path, broker: RabbitBroker) -> None:
    env = cli_env(tmp_path, QUEUE__URL=broker.url, QUEUE__NAME=broker.name)
    result = await run(["enqueue", "ds-1", "ds-2", "ds-3", "not a dataset id!"], env, tmp_path)
    assert result.code == 1  # one argument was invalid
    assert result.stdout.strip() == "published 3, rejected 1"
    assert await broker.ready() == 3
