"""A real Prometheus (Debian's `prometheus` package) scrapes a running `orchestrator run` and evaluates
the alert rules of deploy/prometheus/alerts.yml on what it scraped: the target is up, the service's metrics
are queryable, every rule evaluates without error, and the alerts for the service's real condition (AEP
credentials refused, requests waiting) go pending. Prometheus runs on its own temporary config, data
directory and port; the service on the embedded SQLite defaults against the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port, require_command
from tests.e2e.cli import cli_env, run, start

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
JOB = "orchestrator"
# Requests enqueued for the service, which cannot create them (its credentials are refused).
WAITING = 5
# Seconds: Prometheus starts in one or two, then scrapes and evaluates every second.
WAIT = 30.0


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[int]:
    """`orchestrator run` with WAITING requests and a client secret IMS refuses; its HTTP port. It
    must stop on SIGTERM with exit 0 when the test is done."""
    require_command("prometheus", "prometheus")  # before starting anything
    workdir = tmp_path / "service"
    workdir.mkdir()
    port = free_port()
    async with Simulator(SimulatorConfig(seed=8)) as sim:
        env = cli_env(
            workdir, sim.url, HTTP__HOST="127.0.0.1", HTTP__PORT=str(port), AEP__CLIENT_SECRET="refused"
        )
        ids = "\n".join(f"{index:024x}" for index in range(WAITING)).encode()
        assert (await run(["enqueue", "--file", "-"], env, workdir, stdin=ids)).code == 0
        process = await start(["run"], env, workdir)
        try:
            yield port
        finally:
            process.signal(signal.SIGTERM)
            stopped = await process.wait(timeout=30)
        assert stopped.code == 0, stopped.stderr[-2000:]


@pytest.fixture
async def prometheus(service: int, tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus scraping the service every second with the alert rules loaded; its base URL."""
    binary = require_command("prometheus", "prometheus")
    target_port = service
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
                ],
            }
        ),
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("wb")
    # The port is free when picked; should another process take it before Prometheus binds it, the
    # readiness wait below fails with Prometheus' own log, which says so.
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def is_ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/-/ready") as response:
                        return response.status == 200
                return False

            await eventually(is_ready, "Prometheus ready", tmp_path)
        yield base
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, logs: Path | None = None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await check():
        if loop.time() > deadline:
            detail = (logs / "prometheus.log").read_text() if logs is not None else ""
            raise AssertionError(f"no {what} within {WAIT:.0f} s {detail}")
        await asyncio.sleep(0.2)


async def api(session: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    async with session.get(f"{base}/api/v1/{path}", params=params) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["status"] == "success", body
    return body["data"]


async def sample_values(session: aiohttp.ClientSession, base: str, query: str) -> list[float]:
    result = (await api(session, base, "query", query=query))["result"]
    return [float(sample["value"][1]) for sample in result]


async def test_prometheus_scrapes_the_service_and_evaluates_the_alert_rules(prometheus: str) -> None:
    async with aiohttp.ClientSession() as session:

        async def target_up() -> bool:
            targets = (await api(session, prometheus, "targets"))["activeTargets"]
            return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in targets)

        await eventually(target_up, "target up")

        # The backlog gauge is read from the store every few seconds.
        async def backlog_queryable() -> bool:
            query = f'orchestrator_backlog{{job="{JOB}",state="pending"}}'
            return await sample_values(session, prometheus, query) == [float(WAITING)]

        await eventually(backlog_queryable, f"orchestrator_backlog{{state=pending}} == {WAITING}")
        failed_tokens = 'orchestrator_token_requests_total{result="failed"}'
        assert (await sample_values(session, prometheus, failed_tokens))[0] >= 1

        # Every rule of alerts.yml loaded and evaluated on the scraped series without an error.
        [expected] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
        names = {rule["alert"] for rule in expected["rules"]}

        async def rules_evaluated() -> bool:
            groups = (await api(session, prometheus, "rules", type="alert"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert {rule["name"] for rule in rules} == names
            bad = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] == "err"]
            assert not bad, bad
            return all(rule["health"] == "ok" for rule in rules)

        await eventually(rules_evaluated, "evaluation of every rule")

        # What is wrong with this service, and only that, is on its way to firing (each has a `for`).
        async def alerts_pending() -> bool:
            alerts = (await api(session, prometheus, "alerts"))["alerts"]
            pending = {a["labels"]["alertname"] for a in alerts if a["labels"].get("job") == JOB}
            assert pending <= {"OrchestratorCredentialsRefused", "OrchestratorNoProgress"}, pending
            return pending == {"OrchestratorCredentialsRefused", "OrchestratorNoProgress"}

        await eventually(alerts_pending, "OrchestratorCredentialsRefused and OrchestratorNoProgress pending")
        alerts = (await api(session, prometheus, "alerts"))["alerts"]
        assert {alert["state"] for alert in alerts} == {"pending"}
