"""The Redis Streams adapter against the machine's Redis: the adapter on its own where a test must
place a crash or a poison message exactly, and the service through its CLI (as a user runs it,
against the simulator) fed by a plain redis-py producer, not by the orchestrator.

Every test uses a stream of its own, deleted afterwards. The restart tests stop the Redis server by
its pid and start it again with ../shared/scripts/services-up (always, even when the test fails);
this Redis keeps nothing across a restart (`--save ""`, no AOF), so they check what a restart
without persistence leaves meaningful: what was recorded finishes, nothing is created twice, and
the service goes on consuming what is published after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from orchestrator.aep.simulator import Simulator
from orchestrator.queues import open_consumer, open_publisher
from orchestrator.queues.redis import GROUP, RedisStreamQueue, masked
from tests.conftest import require_service
from tests.e2e import test_cli_crash
from tests.e2e.cli import cli_env, events, kill_9_underway, run, start, until

pytestmark = pytest.mark.integration

URL = "redis://127.0.0.1:6379/0"
SHARED = Path(os.environ.get("ORCH_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
SERVICES_UP = SHARED / "scripts" / "services-up"
WAIT = 5.0  # seconds a receive may take for an entry that is there

# The crash tests' simulator, with slow answers that keep calls in flight, so that a kill or a
# restart lands in the middle of a run.
simulator = test_cli_crash.slow_simulator


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    require_service("Redis", "127.0.0.1", 6379)
    made = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def stream(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    name = f"it-redis-{uuid4().hex[:10]}"
    try:
        yield name
    finally:
        await client.delete(name, f"{name}.dead")


def request(index: int) -> bytes:
    return json.dumps({"datasetId": f"{index:024x}", "requestId": f"req-{index}"}).encode()


async def xadd_all(client: redis.asyncio.Redis, stream: str, bodies: list[bytes]) -> None:
    """A plain producer: one entry per body, the JSON in field `message`."""
    async with client.pipeline(transaction=False) as pipe:
        for body in bodies:
            pipe.xadd(stream, {"message": body})
        await pipe.execute()


async def group(client: redis.asyncio.Redis, stream: str) -> dict[str, Any]:
    [info] = [g for g in await client.xinfo_groups(stream) if g["name"] == GROUP.encode()]
    return info


async def all_settled(client: redis.asyncio.Redis, stream: str, entries: int) -> bool:
    """The group has read `entries` entries and acked every one of them (False while the group
    does not exist yet)."""
    groups = [g for g in await client.xinfo_groups(stream) if g["name"] == GROUP.encode()]
    return bool(groups and groups[0]["entries-read"] == entries and groups[0]["pending"] == 0)


def one_batch_each(sim: Simulator) -> Counter[str]:
    per_dataset = Counter(batch.dataset_id for batch in sim.stats.batches)
    assert max(per_dataset.values(), default=0) <= 1, [d for d, n in per_dataset.items() if n > 1]
    return per_dataset


@asynccontextmanager
async def redis_stopped(client: redis.asyncio.Redis) -> AsyncIterator[None]:
    """The Redis server stopped by its pid for the body, then started again, whatever happens."""
    if not SERVICES_UP.is_file():
        pytest.skip(f"{SERVICES_UP} is missing: cannot start Redis again after stopping it")
    pid = int((await client.info("server"))["process_id"])
    try:
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError:
            pytest.skip("the Redis server belongs to another user: this test cannot stop it")

        async def stopped() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        await until(stopped, "Redis to stop", timeout=15)
        yield
    finally:
        started = await asyncio.create_subprocess_exec(str(SERVICES_UP), "redis")
        assert await started.wait() == 0, "Redis did not start again"


# -- the adapter ------------------------------------------------------------------------------

CHILD = """
import asyncio, sys
from orchestrator import logs
from orchestrator.queues.redis import RedisStreamQueue

async def main():
    logs.configure()  # to stderr: stdout says how many it holds
    queue = RedisStreamQueue(sys.argv[1], sys.argv[2])
    await queue.open()
    got = []
    while len(got) < int(sys.argv[3]):
        got += await queue.receive(10, 1.0)
    print(len(got), flush=True)
    await asyncio.Event().wait()  # holds them, unacked, until killed

asyncio.run(main())
"""


async def test_a_consumer_killed_with_9_leaves_its_entries_to_the_next_at_once(
    client: redis.asyncio.Redis, stream: str
) -> None:
    await xadd_all(client, stream, [request(i) for i in range(3)])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, URL, stream, "3", stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 20)
    finally:
        child.kill()
        await child.wait()
    assert line.strip() == b"3"
    assert (await group(client, stream))["pending"] == 3

    # The lease is a minute; the entries come back within a receive's wait all the same.
    queue = RedisStreamQueue(URL, stream)
    await queue.open()
    try:
        with capture_logs() as logs:
            got = await queue.receive(10, WAIT)
        assert sorted(d.body for d in got) == sorted(request(i) for i in range(3))
        assert {d.attempt for d in got} == {2}
        [taken] = [e for e in logs if e["event"] == "queue.dead_consumers_taken_over"]
        assert (taken["consumers"], taken["entries"]) == (1, 3)
        consumers = [c["name"].decode() for c in await client.xinfo_consumers(stream, GROUP)]
        assert consumers == [queue.consumer_name]
        for delivery in got:
            await queue.ack(delivery)
        assert await queue.is_empty()
    finally:
        await queue.close()
    assert await client.xinfo_consumers(stream, GROUP) == []  # nothing held: deleted at close


async def test_an_entry_delivered_too_many_times_is_dead_lettered(
    client: redis.asyncio.Redis, stream: str
) -> None:
    await xadd_all(client, stream, [request(1)])
    first = RedisStreamQueue(URL, stream)
    # A lease of 0: whatever is pending is claimed at once, as if each consumer died holding it.
    second = RedisStreamQueue(URL, stream, lease_seconds=0, max_deliveries=2)
    await first.open()
    await second.open()
    try:
        [delivery] = await first.receive(1, WAIT)
        assert delivery.attempt == 1
        [again] = await second.receive(1, WAIT)
        assert (again.message_id, again.attempt) == (delivery.message_id, 2)
        with capture_logs() as logs:
            assert await second.receive(1, 0.2) == []
        assert await second.is_empty()
    finally:
        await first.close()
        await second.close()
    [(_, fields)] = await client.xrange(f"{stream}.dead")
    assert fields == {b"message": request(1), b"reason": b"delivered 2 times without being recorded"}
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["queue.dead_lettered"]


async def test_a_release_is_not_counted_as_a_delivery(client: redis.asyncio.Redis, stream: str) -> None:
    await xadd_all(client, stream, [request(1)])
    queue = RedisStreamQueue(URL, stream, max_deliveries=1)
    await queue.open()
    try:
        for _ in range(3):  # past max_deliveries, were releases counted
            [delivery] = await queue.receive(1, WAIT)
            assert delivery.attempt == 1
            await queue.release(delivery)
        [delivery] = await queue.receive(1, WAIT)
        await queue.ack(delivery)
        assert await queue.is_empty()
    finally:
        await queue.close()
    assert await client.xlen(f"{stream}.dead") == 0


async def test_the_adapter_rides_out_a_redis_restart(client: redis.asyncio.Redis, stream: str) -> None:
    await xadd_all(client, stream, [request(1), b"not json"])
    queue = RedisStreamQueue(URL, stream)
    await queue.open()
    try:
        held, invalid = await queue.receive(2, WAIT)
        with capture_logs() as logs:
            async with redis_stopped(client):
                # Intake must go on: the ack and the dead letter wait for the connection.
                await queue.ack(held)
                await queue.dead_letter(invalid, "invalid")
                assert await queue.receive(10, 0.3) == []
                assert not await queue.is_empty()
            # Nothing survived the restart: the group is created again and new entries are read.
            await xadd_all(client, stream, [request(2)])
            got = await queue.receive(10, 15.0)
        assert [d.body for d in got] == [request(2)]
        await queue.ack(got[0])
        assert await queue.is_empty()
    finally:
        await queue.close()
    seen = [e["event"] for e in logs]
    for event in ("queue.ack_deferred", "queue.dead_letter_deferred", "queue.disconnected"):
        assert seen.count(event) == 1, seen
    assert {"queue.reconnected", "queue.group_created"} <= set(seen), seen
    # The dead letter kept while Redis was down is written once it is back.
    [(_, fields)] = await client.xrange(f"{stream}.dead")
    assert fields == {b"message": b"not json", b"reason": b"invalid"}


async def test_the_adapter_is_chosen_by_the_url_and_masks_its_password() -> None:
    for url in (URL, "rediss://:secret@example.com:6380/1"):
        consumer = open_consumer(url, "q")
        assert isinstance(consumer, RedisStreamQueue)
        assert isinstance(open_publisher(url, "q"), RedisStreamQueue)
    assert masked("rediss://user:secret@example.com:6380/1") == "rediss://user:***@example.com:6380/1"
    assert masked(URL) == URL


# -- the service through its CLI --------------------------------------------------------------


def service_env(tmp_path: Path, sim: Simulator, stream: str) -> dict[str, str]:
    return cli_env(
        tmp_path,
        sim.url,
        QUEUE__URL=URL,
        QUEUE__NAME=stream,
        AEP__CATALOG_SETTLE="1",
        LIMITS__RATE="40",
        LIMITS__CONCURRENCY="8",
        AEP__TIMEOUT="2",
        RETRY__BASE_DELAY="0.05",
        RETRY__MAX_DELAY="1",
        SHUTDOWN__GRACE="5",
    )


async def test_native_producer_duplicates_and_invalid_messages_then_sigterm(
    tmp_path: Path, client: redis.asyncio.Redis, stream: str, simulator: Simulator
) -> None:
    valid = [request(i) for i in range(60)]
    invalid = [b"not json", b'{"requestId": "no-dataset"}']
    # Two of them delivered a second time, and the invalid ones among the rest.
    await xadd_all(client, stream, [*valid[:30], invalid[0], valid[0], *valid[30:], invalid[1], valid[1]])
    env = service_env(tmp_path, simulator, stream)
    service = await start(["run"], env, tmp_path)

    async def done() -> bool:
        return len(simulator.stats.batches) >= 60 and await all_settled(client, stream, 64)

    await until(done, "60 batches and every entry acked")
    service.signal(signal.SIGTERM)
    stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-2000:]
    assert "service.stopped" in [e["event"] for e in events(stopped.stderr)]

    assert len(one_batch_each(simulator)) == 60
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert Counter(r["state"] for r in records) == {"created": 60, "rejected": 2}
    rejected = (await run(["batches", "--state", "rejected", "--json"], env, tmp_path)).json_lines()
    assert len(rejected) == 2
    dead = [fields for _, fields in await client.xrange(f"{stream}.dead")]
    assert sorted(fields[b"message"] for fields in dead) == sorted(invalid)
    assert all(set(fields) == {b"message", b"reason"} and fields[b"reason"] for fields in dead)
    assert (await group(client, stream))["pending"] == 0
    assert await client.xinfo_consumers(stream, GROUP) == []  # it held nothing, so it left the group


async def test_killed_with_9_a_second_in_then_started_again(
    tmp_path: Path, client: redis.asyncio.Redis, stream: str, simulator: Simulator
) -> None:
    await xadd_all(client, stream, [request(i) for i in range(40)])
    env = service_env(tmp_path, simulator, stream)
    service = await start(["run"], env, tmp_path)
    await kill_9_underway(service, lambda: len(simulator.stats.batches), 40)

    restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=50)
    assert restarted.code == 0, restarted.stderr[-2000:]
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert Counter(r["state"] for r in records) == {"created": 40}
    assert len(one_batch_each(simulator)) == 40
    assert {r["batchId"] for r in records} == {b.id for b in simulator.stats.batches}
    assert await all_settled(client, stream, 40)
    # The killed process's consumer was taken over and deleted, the restarted one left at its end.
    assert await client.xinfo_consumers(stream, GROUP) == []


async def test_redis_restarted_mid_run(
    tmp_path: Path, client: redis.asyncio.Redis, stream: str, simulator: Simulator
) -> None:
    await xadd_all(client, stream, [request(i) for i in range(20)])
    env = service_env(tmp_path, simulator, stream) | {"ORCH_LIMITS__RATE": "8"}
    service = await start(["run"], env, tmp_path)
    try:
        await until(lambda: all_settled(client, stream, 20), "the 20 requests to be read and acked")
        made = len(simulator.stats.batches)
        assert made < 20, "the restart came too late to test anything"

        async def more_made() -> bool:
            return len(simulator.stats.batches) > made

        async with redis_stopped(client):
            await until(more_made, "a batch made while Redis is down")
        # Published after the restart: the service must find the stream and its group again.
        await xadd_all(client, stream, [request(i) for i in range(20, 30)])

        async def finished() -> bool:
            return len(simulator.stats.batches) >= 30 and await all_settled(client, stream, 10)

        await until(finished, "the 30 batches after the restart", timeout=40)
    finally:
        service.signal(signal.SIGTERM)
        stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-2000:]
    seen = [e["event"] for e in events(stopped.stderr)]
    assert {"queue.disconnected", "queue.reconnected"} <= set(seen), seen
    assert "service.crashed" not in seen
    assert len(one_batch_each(simulator)) == 30
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert Counter(r["state"] for r in records) == {"created": 30}


async def test_enqueue_says_how_many_it_published(
    tmp_path: Path, client: redis.asyncio.Redis, stream: str
) -> None:
    env = cli_env(tmp_path, QUEUE__URL=URL, QUEUE__NAME=stream)
    result = await run(["enqueue", "5c8c3c555033b814b69f947f", "5c8c3c555033b814b69f9480"], env, tmp_path)
    assert (result.code, result.stdout.strip()) == (0, "published 2")
    entries = await client.xrange(stream)
    assert [json.loads(fields[b"message"])["datasetId"] for _, fields in entries] == [
        "5c8c3c555033b814b69f947f",
        "5c8c3c555033b814b69f9480",
    ]
    assert all(fields[b"id"] for _, fields in entries)  # an identity a retried publish keeps
