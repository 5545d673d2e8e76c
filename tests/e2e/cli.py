"""Run the `orchestrator` command as a user would: a separate process, settings in its environment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def cli_env(workdir: Path, sim_url: str | None = None, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ORCH_")}
    env.update(
        {
            "ORCH_QUEUE__URL": f"sqlite:///{workdir}/queue.db",
            "ORCH_STORE__URL": f"sqlite:///{workdir}/orchestrator.db",
            "ORCH_HTTP__PORT": "0",
            "ORCH_LOG__LEVEL": "info",
        }
    )
    if sim_url is not None:
        env.update(
            {
                "ORCH_AEP__BASE_URL": sim_url,
                "ORCH_AEP__IMS_URL": sim_url,
                "ORCH_AEP__CLIENT_ID": "sim-client",
                "ORCH_AEP__CLIENT_SECRET": "sim-secret",
                "ORCH_AEP__ORG_ID": "SIM0RG0000000000000000@AdobeOrg",
            }
        )
    env.update({f"ORCH_{key.upper()}": value for key, value in settings.items()})
    return env


async def start(args: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None) -> Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Process(proc, stdin)


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, stdin: bytes | None) -> None:
        self.proc = proc
        self._io = asyncio.ensure_future(proc.communicate(stdin))

    async def wait(self, timeout: float = 90.0) -> Result:
        try:
            out, err = await asyncio.wait_for(asyncio.shield(self._io), timeout)
        except TimeoutError:
            self.proc.kill()
            out, err = await self._io
            raise AssertionError(
                f"orchestrator did not finish in {timeout}s:\n{err.decode()[-3000:]}"
            ) from None
        assert self.proc.returncode is not None
        return Result(self.proc.returncode, out.decode(), err.decode())

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


async def run(
    args: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None, timeout: float = 90.0
) -> Result:
    return await (await start(args, env, cwd, stdin)).wait(timeout)


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines a run wrote."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll `check` (what a broker or the simulator holds, which has no event to await) until it
    holds; fail naming `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - nothing to await instead
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def kill_9_underway(
    service: Process, batches: Callable[[], int], total: int, at_least: int = 5
) -> None:
    """Kill `service` with SIGKILL once `batches()` (the simulator's count) reaches `at_least`, and
    check that the kill came before all `total` were made: a kill after the end tests nothing."""

    async def underway() -> bool:
        return batches() >= at_least

    await until(underway, "the first batches")
    service.signal(signal.SIGKILL)
    assert (await service.wait()).code == -signal.SIGKILL
    assert batches() < total, "the kill came too late to test anything"
