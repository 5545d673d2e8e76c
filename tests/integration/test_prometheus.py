"""A real Prometheus (Debian's `prometheus` package) scrapes the service's /metrics and evaluates the alert
rules of deploy/prometheus/alerts.yml on what it scraped: the exposition is one Prometheus ingests, the
target is up, an orchestrator_ metric is queryable, every rule evaluates without error, and an alert goes
pending on the metric it watches. Prometheus runs on its own temporary config, data directory and port."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from orchestrator.http import Probes, bound_port, make_app, serve
from orchestrator.metrics import Metrics
from orchestrator.store.sql import SqlBatchStore
from tests.conftest import REQUIRE_SERVICES

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
JOB = "orchestrator"
# Seconds: Prometheus starts in one or two, then scrapes and evaluates every second.
WAIT = 30.0


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus is not installed (Debian: apt-get install prometheus)"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ORCH_TEST_REQUIRE_SERVICES=1")
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[Metrics, int]]:
    """The service's HTTP surface on a free port, with its metrics and a real store."""
    store = SqlBatchStore(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    await store.open()
    metrics = Metrics()

    async def ready() -> dict[str, str]:
        return {}

    runner = await serve(make_app(Probes(list, ready), metrics, store), "127.0.0.1", 0)
    port = bound_port(runner)
    assert port is not None
    try:
        yield metrics, port
    finally:
        await runner.cleanup()
        await store.close()


@pytest.fixture
async def prometheus(service: tuple[Metrics, int], tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus scraping the service every second with the alert rules loaded; its base URL."""
    binary = prometheus_binary()
    _, target_port = service
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


async def test_prometheus_scrapes_metrics_and_evaluates_the_alert_rules(
    service: tuple[Metrics, int], prometheus: str
) -> None:
    metrics, _ = service
    metrics.request_finished("created")
    metrics.aep_call("batches.create", 201, 0.2)
    metrics.credentials(refused=True)
    async with aiohttp.ClientSession() as session:

        async def target_up() -> bool:
            targets = (await api(session, prometheus, "targets"))["activeTargets"]
            return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in targets)

        await eventually(target_up, "target up")

        async def created_is_queryable() -> bool:
            query = f'orchestrator_requests_total{{job="{JOB}",outcome="created"}}'
            result = (await api(session, prometheus, "query", query=query))["result"]
            return [float(sample["value"][1]) for sample in result] == [1.0]

        await eventually(created_is_queryable, "orchestrator_requests_total{outcome=created} == 1")
        histogram = await api(
            session,
            prometheus,
            "query",
            query='orchestrator_aep_call_duration_seconds_count{endpoint="batches.create"}',
        )
        assert [float(sample["value"][1]) for sample in histogram["result"]] == [1.0]

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

        # The credentials alert watches the gauge set above: pending (it fires after 5 minutes).
        async def credentials_alert_pending() -> bool:
            alerts = (await api(session, prometheus, "alerts"))["alerts"]
            return any(
                alert["labels"]["alertname"] == "OrchestratorCredentialsRefused"
                and alert["labels"].get("job") == JOB
                and alert["state"] == "pending"
                for alert in alerts
            )

        await eventually(credentials_alert_pending, "OrchestratorCredentialsRefused pending")
