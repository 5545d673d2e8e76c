"""The NATS JetStream adapter against the machine's NATS server (JetStream, file storage): the
adapter on its own where a test must place a failure exactly, and the service through its CLI (as a
user runs it, against the simulator) fed by a plain nats-py producer, not by the orchestrator.

Every test uses a subject of its own, and deletes the streams that hold it afterwards. The restart
tests stop the server by its pid and start it again with ../shared/scripts/services-up (always,
even when the test fails); JetStream's file storage keeps the streams across the restart. The
service runs with `ack_wait=3` (a URL parameter), so that what a killed process held comes back
within seconds rather than a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from uuid import uuid4

import nats
import pytest
from nats.js.api import ConsumerInfo, StreamConfig
from nats.js.errors import NotFoundError
from structlog.testing import capture_logs

from orchestrator.aep.simulator import Simulator
from orchestrator.queues import open_consumer
from orchestrator.queues.nats import CONSUMER, NatsQueue
from orchestrator.settings import ConfigError
from tests.conftest import require_service
from tests.contract.brokers import NATS_URL, NatsBroker
from tests.e2e import test_cli_crash
from tests.e2e.cli import Process, cli_env, events, run, start

pytestmark = pytest.mark.integration

# A simulator whose slow answers keep calls in flight, so a kill or a restart lands mid-run.
slow_simulator = test_cli_crash.slow_simulator

SHARED = Path(os.environ.get("ORCH_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
SERVICES_UP = SHARED / "scripts" / "services-up"
SERVICE_URL = f"{NATS_URL}?ack_wait=3"
WAIT = 5.0  # seconds a receive may take for a message that is there


async def _quiet(_: Exception) -> None:
    """nats-py's default prints a traceback for every reconnection attempt while a test restarts the
    server."""


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    """A subject of its own, a plain nats-py client (the producer's and the operator's), and the
    streams holding the subject deleted afterwards."""
    require_service("NATS", "127.0.0.1", 4222)
    client = await nats.connect(NATS_URL, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet)
    made = NatsBroker(client, name=f"it.nats-{uuid4().hex[:10]}")
    try:
        yield made
    finally:
        await made.delete()
        await client.close()


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0, service: Process | None = None
) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds, or at once (with
    what it logged) when `service` ended meanwhile."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # polled: neither NATS nor the simulator has an event for it
                if service is not None and service.proc.returncode is not None:
                    ended = await service.wait()
                    raise AssertionError(f"the service ended ({ended.code}):\n{ended.stderr[-3000:]}")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"waited {timeout}s in vain for {what}") from None


def body(index: int) -> bytes:
    return json.dumps({"datasetId": f"{index:024x}", "requestId": f"nats-{index}"}).encode()


async def publish(broker: NatsBroker, bodies: list[bytes]) -> None:
    for item in bodies:
        await broker.publish_native(item)


async def consumer_info(broker: NatsBroker) -> ConsumerInfo:
    js = broker.client.jetstream()
    info: ConsumerInfo = await js.consumer_info(await js.find_stream_name_by_subject(broker.name), CONSUMER)
    return info


async def settled(broker: NatsBroker) -> bool:
    """The service's consumer exists and has nothing waiting and nothing unacked."""
    try:
        info = await consumer_info(broker)
    except NotFoundError:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


def batches_per_dataset(sim: Simulator) -> Counter[str]:
    return Counter(batch.dataset_id for batch in sim.stats.batches)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a daemon's exit may wait for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def nats_server_pid() -> int:
    """The pid of the nats-server serving port 4222 (found in /proc: the server has no pid file)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else [b""]
        except OSError:
            continue
        if argv[0].endswith(b"nats-server") and b"4222" in argv and running(int(entry.name)):
            return int(entry.name)
    raise AssertionError("no nats-server process serving port 4222")


@asynccontextmanager
async def nats_stopped() -> AsyncIterator[None]:
    """The NATS server stopped by its pid for the body, then started again, whatever happens."""
    if not SERVICES_UP.is_file():
        pytest.skip(f"{SERVICES_UP} is missing: cannot start NATS again after stopping it")
    pid = nats_server_pid()
    try:
        try:
            os.kill(pid, signal.SIGTERM)  # a clean stop: JetStream writes its files out
        except PermissionError:
            pytest.skip("the NATS server belongs to another user: this test cannot stop it")

        async def stopped() -> bool:
            return not running(pid)

        await until(stopped, "NATS to stop", timeout=20)
        yield
    finally:
        started = await asyncio.create_subprocess_exec(str(SERVICES_UP), "nats")
        assert await started.wait() == 0, "NATS did not start again"


# -- the adapter ------------------------------------------------------------------------------


async def test_a_message_delivered_too_often_is_dead_lettered_before_the_server_gives_up(
    broker: NatsBroker,
) -> None:
    await broker.publish_native(body(1), message_id="poison-1")
    queue = NatsQueue(broker.url, broker.name, max_deliver=3)
    await queue.open()
    try:
        [first] = await queue.receive(1, WAIT)
        assert (first.message_id, first.attempt) == ("poison-1", 1)
        await queue.release(first)  # as a process that dies before recording it would leave it
        with capture_logs() as logs:
            assert await queue.receive(1, 1.0) == []  # its second delivery: max_deliver - 1
        assert await queue.is_empty()
        assert (await consumer_info(broker)).config.max_deliver == 3
    finally:
        await queue.close()
    assert await broker.dead_letters() == [(body(1), "delivered 2 times without being recorded")]
    [dead] = [e for e in logs if e["event"] == "queue.dead_lettered"]
    assert dead["message_id"] == "poison-1"


async def test_url_parameters_set_the_consumer_and_a_change_updates_it(broker: NatsBroker) -> None:
    for ack_wait, max_deliver in ((7, 4), (3, 5)):
        queue = open_consumer(f"{NATS_URL}?ack_wait={ack_wait}&max_deliver={max_deliver}", broker.name)
        assert isinstance(queue, NatsQueue)
        await queue.open()
        try:
            assert await queue.receive(1, 0.1) == []  # the consumer is made at the first read
        finally:
            await queue.close()
        config = (await consumer_info(broker)).config
        assert (config.ack_wait, config.max_deliver, config.filter_subject) == (
            ack_wait,
            max_deliver,
            broker.name,
        )


async def test_a_stream_without_the_dead_letter_subject_is_refused(broker: NatsBroker) -> None:
    js = broker.client.jetstream()
    await js.add_stream(StreamConfig(name=f"bare-{uuid4().hex[:8]}", subjects=[broker.name]))
    queue = NatsQueue(broker.url, broker.name)
    with pytest.raises(ConfigError, match=r"no stream holds '.*\.dead'"):
        await queue.open()


async def test_the_adapter_rides_out_a_server_restart(broker: NatsBroker) -> None:
    queue = NatsQueue(broker.url, broker.name, ack_wait=2)
    queue.REQUEST_TIMEOUT = 1.0  # an ack sent while the server is away fails within a second
    await queue.open()
    await publish(broker, [body(1), body(2)])
    try:
        held = await queue.receive(2, WAIT)
        assert len(held) == 2
        await queue.ack(held[0])
        with capture_logs() as logs:
            async with nats_stopped():
                await queue.ack(held[1])  # logged, not raised: intake must go on
                assert await queue.receive(10, 0.3) == []
                assert not await queue.is_empty()
            await broker.publish_native(body(3))
            got: list[bytes] = []

            async def third_read_and_all_settled() -> bool:
                for delivery in await queue.receive(10, 0.5):
                    got.append(delivery.body)
                    await queue.ack(delivery)
                return body(3) in got and await queue.is_empty()

            await until(third_read_and_all_settled, "the message published after the restart")
    finally:
        await queue.close()
    # The second ack either reached the server once it was back or the message came back once.
    assert got in ([body(3)], [body(2), body(3)], [body(3), body(2)])
    seen = [e["event"] for e in logs]
    assert {"queue.disconnected", "queue.ack_failed", "queue.reconnected"} <= set(seen), seen


# -- the service through its CLI --------------------------------------------------------------


def service_env(tmp_path: Path, sim: Simulator, broker: NatsBroker, **settings: str) -> dict[str, str]:
    defaults = {
        "QUEUE__URL": SERVICE_URL,
        "QUEUE__NAME": broker.name,
        "AEP__CATALOG_SETTLE": "1",
        "LIMITS__RATE": "40",
        "LIMITS__CONCURRENCY": "8",
        "AEP__TIMEOUT": "2",
        "RETRY__BASE_DELAY": "0.05",
        "RETRY__MAX_DELAY": "1",
        "SHUTDOWN__GRACE": "5",
    }
    return cli_env(tmp_path, sim.url, **(defaults | settings))


async def stream_exists(broker: NatsBroker) -> bool:
    with suppress(NotFoundError):
        return bool(await broker.client.jetstream().find_stream_name_by_subject(broker.name))
    return False


async def test_sixty_requests_two_again_and_two_invalid_then_sigterm(
    tmp_path: Path, broker: NatsBroker, slow_simulator: Simulator
) -> None:
    env = service_env(tmp_path, slow_simulator, broker)
    service = await start(["run"], env, tmp_path)
    await until(lambda: stream_exists(broker), "the service to create the stream", service=service)
    invalid = [b"not json", b'{"datasetId": "not a dataset id!"}']
    # Two of them a second time (no Nats-Msg-Id, so JetStream stores both), the invalid among them.
    await publish(broker, [body(i) for i in range(30)] + [invalid[0], body(0)])
    await publish(broker, [body(i) for i in range(30, 60)] + [invalid[1], body(1)])

    async def done() -> bool:
        return len(slow_simulator.stats.batches) >= 60 and await settled(broker)

    await until(done, "60 batches and every message settled", service=service)
    service.signal(signal.SIGTERM)
    stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-2000:]
    seen = Counter(e["event"] for e in events(stopped.stderr))
    assert (seen["service.stopped"], seen["intake.duplicate"], seen["intake.rejected"]) == (1, 2, 2)

    per_dataset = batches_per_dataset(slow_simulator)
    assert (len(per_dataset), max(per_dataset.values())) == (60, 1)
    rejected = (await run(["batches", "--state", "rejected", "--json"], env, tmp_path)).json_lines()
    assert len(rejected) == 2
    created = (await run(["batches", "--state", "created", "--json"], env, tmp_path)).json_lines()
    assert {r["batchId"] for r in created} == {b.id for b in slow_simulator.stats.batches}
    dead = await broker.dead_letters()
    assert sorted(message for message, _ in dead) == sorted(invalid)
    assert all(reason for _, reason in dead)
    assert await settled(broker)  # nothing left waiting or unacked


async def test_killed_with_9_mid_run_then_started_again(
    tmp_path: Path, broker: NatsBroker, slow_simulator: Simulator
) -> None:
    # Published before the service ever ran: into the stream the producer made.
    await publish(broker, [body(i) for i in range(100, 140)])
    env = service_env(tmp_path, slow_simulator, broker)
    service = await start(["run"], env, tmp_path)

    async def underway() -> bool:
        return len(slow_simulator.stats.batches) >= 5

    await until(underway, "the first batches", service=service)
    service.signal(signal.SIGKILL)
    assert (await service.wait()).code == -signal.SIGKILL
    assert len(slow_simulator.stats.batches) < 40, "the kill came too late to test anything"

    restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=50)
    assert restarted.code == 0, restarted.stderr[-2000:]
    per_dataset = batches_per_dataset(slow_simulator)
    assert (len(per_dataset), max(per_dataset.values())) == (40, 1)
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert Counter(r["state"] for r in records) == {"created": 40}
    assert {r["batchId"] for r in records} == {b.id for b in slow_simulator.stats.batches}
    assert await settled(broker)


async def test_the_server_restarted_mid_run(
    tmp_path: Path, broker: NatsBroker, slow_simulator: Simulator
) -> None:
    # A backlog of 5: most messages are still in the stream, not in the store, when the server stops.
    env = service_env(tmp_path, slow_simulator, broker, LIMITS__MAX_BACKLOG="5")
    await publish(broker, [body(i) for i in range(200, 240)])
    service = await start(["run"], env, tmp_path)
    try:

        async def underway() -> bool:
            return len(slow_simulator.stats.batches) >= 5

        await until(underway, "the first batches", service=service)
        async with nats_stopped():
            assert len(slow_simulator.stats.batches) < 40, "the restart came too late to test anything"
        # Published after the restart: the service reads them without being restarted itself.
        await publish(broker, [body(i) for i in range(240, 260)])

        async def finished() -> bool:
            return len(slow_simulator.stats.batches) >= 60 and await settled(broker)

        await until(finished, "the 60 batches after the restart", timeout=45, service=service)
    finally:
        service.signal(signal.SIGTERM)
        stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-2000:]
    seen = Counter(e["event"] for e in events(stopped.stderr))
    assert seen["queue.disconnected"] == 1, seen
    assert seen["queue.reconnected"] >= 1, seen
    assert seen["service.crashed"] == 0
    per_dataset = batches_per_dataset(slow_simulator)
    assert (len(per_dataset), max(per_dataset.values())) == (60, 1)
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert Counter(r["state"] for r in records) == {"created": 60}


async def test_enqueue_says_how_many_it_published(tmp_path: Path, broker: NatsBroker) -> None:
    env = cli_env(tmp_path, QUEUE__URL=NATS_URL, QUEUE__NAME=broker.name)
    ids = ["5c8c3c555033b814b69f947f", "5c8c3c555033b814b69f9480", "null"]
    result = await run(["enqueue", *ids], env, tmp_path)
    assert (result.code, result.stdout.strip()) == (1, "published 2, rejected 1")
    js = broker.client.jetstream()
    stream = await js.find_stream_name_by_subject(broker.name)
    assert stream == broker.name.replace(".", "_")  # made by enqueue, named after the subject
    found = [await js.get_msg(stream, seq) for seq in (1, 2)]
    assert [json.loads(message.data or b"")["datasetId"] for message in found] == ids[:2]
    assert all((message.headers or {}).get("Nats-Msg-Id") for message in found)  # kept by a retry
    with pytest.raises(NotFoundError):
        await js.consumer_info(stream, CONSUMER)  # a publisher makes no consumer
