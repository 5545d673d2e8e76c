"""Credential problems fail no request: requests wait, token requests back off, an event says why."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, events, run, start


async def test_ims_down_then_back_loses_nothing(tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(ims_error_rate=1.0, seed=5))
    await sim.start()
    try:
        env = cli_env(tmp_path, sim.url)
        ids = "\n".join(f"{index:024x}" for index in range(20)).encode()
        assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0
        service = await start(["run", "--until-idle"], env, tmp_path)
        async with asyncio.timeout(20):
            while sim.stats.ims_failures < 2:  # noqa: ASYNC110 - the stats have no event to await
                await asyncio.sleep(0.05)
        assert sim.stats.platform_calls == 0, "no Platform call without a token"
        sim.config = dataclasses.replace(sim.config, ims_error_rate=0.0)  # IMS recovers
        result = await service.wait(timeout=90)
    finally:
        await sim.stop()
    assert result.code == 0, result.stderr[-2000:]
    seen = [event["event"] for event in events(result.stderr)]
    assert "dispatcher.waiting_for_credentials" in seen
    assert "dispatcher.credentials_restored" in seen
    assert seen.count("batch.created") == 20
    assert "batch.failed" not in seen
    assert len(sim.stats.batches) == 20
    # Token requests backed off: a handful of IMS calls, not one per poll.
    assert sim.stats.ims_failures < 10


async def test_bad_secret_leaves_requests_pending(tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(seed=6))
    await sim.start()
    try:
        env = cli_env(tmp_path, sim.url, AEP__CLIENT_SECRET="not-the-secret")
        assert (await run(["enqueue", "000000000000000000000001"], env, tmp_path)).code == 0
        service = await start(["run"], env, tmp_path)
        async with asyncio.timeout(20):
            while sim.stats.ims_failures < 1:  # noqa: ASYNC110 - the stats have no event to await
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        service.proc.terminate()
        result = await service.wait(timeout=30)
    finally:
        await sim.stop()
    assert result.code == 0
    failures = [e for e in events(result.stderr) if e["event"] == "auth.token_failed"]
    assert failures
    assert failures[0]["permanent"] is True
    assert "not-the-secret" not in result.stderr
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert [record["state"] for record in records] == ["pending"]
    assert records[0]["attempts"] == 0
    assert sim.stats.platform_calls == 0


async def test_refused_fixed_token_fails_no_request_and_until_idle_gives_up(tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(seed=7))
    await sim.start()
    try:
        env = cli_env(
            tmp_path,
            sim.url,
            AEP__ACCESS_TOKEN="expired-token-SENSITIVE",
            AEP__CREDENTIALS_WAIT="2",
            LIMITS__CONCURRENCY="4",
            RETRY__MAX_ATTEMPTS="2",
        )
        ids = "\n".join(f"{index:024x}" for index in range(20)).encode()
        assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0
        result = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    finally:
        await sim.stop()
    assert result.code == 1, result.stderr[-2000:]
    seen = [event["event"] for event in events(result.stderr)]
    assert seen.count("dispatcher.waiting_for_credentials") == 1
    assert "batch.released" in seen
    assert "batch.failed" not in seen
    assert "retry.scheduled" not in seen
    [gave_up] = [event for event in events(result.stderr) if event["event"] == "service.credentials_refused"]
    assert "ORCH_AEP__ACCESS_TOKEN" in gave_up["error"]
    assert gave_up["unfinished"] == 20
    assert "SENSITIVE" not in result.stderr
    # No hot loop: the calls in flight when AEP first refused the token, then nothing for a backoff.
    assert 1 <= sim.stats.unauthorized <= 8
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert {(record["state"], record["attempts"]) for record in records} == {("pending", 0)}


async def test_until_idle_gives_up_on_refused_client_credentials(tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(seed=8))
    await sim.start()
    try:
        env = cli_env(tmp_path, sim.url, AEP__CLIENT_SECRET="not-the-secret", AEP__CREDENTIALS_WAIT="1.5")
        assert (await run(["enqueue", "000000000000000000000001"], env, tmp_path)).code == 0
        result = await run(["run", "--until-idle"], env, tmp_path, timeout=60)
    finally:
        await sim.stop()
    assert result.code == 1, result.stderr[-2000:]
    [gave_up] = [event for event in events(result.stderr) if event["event"] == "service.credentials_refused"]
    assert gave_up["level"] == "error"
    assert "invalid_client" in gave_up["error"]
    assert gave_up["waited"] == 1.5
    assert "not-the-secret" not in result.stderr
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert [(record["state"], record["attempts"]) for record in records] == [("pending", 0)]
    assert sim.stats.platform_calls == 0
