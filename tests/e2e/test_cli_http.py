"""The HTTP surface of `orchestrator run` as an operator and Kubernetes see it: probes, metrics and
records while the service works, readiness that says why not, and a clean stop."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port
from tests.e2e.cli import cli_env, run, start


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        body = await response.text()
        is_json = response.content_type == "application/json"
        return response.status, (json.loads(body) if is_json else body)


async def wait_for(session: aiohttp.ClientSession, url: str, status: int, timeout: float = 30.0) -> Any:
    """The body of `url` once it answers `status` (the service may still be starting)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                got, body = await get(session, url)
            except aiohttp.ClientConnectionError:
                got, body = 0, None
            if got == status:
                return body
            await asyncio.sleep(0.1)


async def test_probes_metrics_and_records_while_running(tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(seed=1)) as sim:
        port = free_port()
        env = cli_env(tmp_path, sim.url, HTTP__PORT=str(port), HTTP__HOST="127.0.0.1")
        ids = "\n".join(f"{index:024x}" for index in range(10)).encode()
        assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=ids)).code == 0
        service = await start(["run"], env, tmp_path)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            assert (await wait_for(session, f"{base}/healthz", 200))["status"] == "ok"
            assert (await wait_for(session, f"{base}/readyz", 200))["status"] == "ready"
            async with asyncio.timeout(30):
                while True:  # the records API is how the upload steps learn of new batches
                    page = await wait_for(session, f"{base}/batches?state=created&limit=20", 200)
                    if len(page["batches"]) == 10:
                        break
                    await asyncio.sleep(0.1)
            metrics = await wait_for(session, f"{base}/metrics", 200)
            status, one = await get(session, f"{base}/batches/{page['batches'][0]['requestId']}")
        service.signal(signal.SIGTERM)
        stopped = await service.wait(timeout=30)
    assert stopped.code == 0, stopped.stderr[-2000:]
    assert len(page["batches"]) == 10
    assert {record["state"] for record in page["batches"]} == {"created"}
    assert (status, one) == (200, page["batches"][0])
    assert 'orchestrator_requests_total{outcome="created"} 10.0' in metrics
    assert 'orchestrator_aep_calls_total{endpoint="batches.create",status="201"} 10.0' in metrics


async def test_not_ready_while_credentials_are_refused(tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(seed=2)) as sim:
        port = free_port()
        env = cli_env(tmp_path, sim.url, HTTP__PORT=str(port), AEP__CLIENT_SECRET="wrong")
        assert (await run(["enqueue", "000000000000000000000001"], env, tmp_path)).code == 0
        service = await start(["run"], env, tmp_path)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            assert (await wait_for(session, f"{base}/healthz", 200))["status"] == "ok"  # alive
            reasons = (await wait_for(session, f"{base}/readyz", 503))["reasons"]
        service.signal(signal.SIGTERM)
        stopped = await service.wait(timeout=30)
    assert stopped.code == 0
    assert set(reasons) == {"credentials"}
    assert "wrong" not in str(reasons)
