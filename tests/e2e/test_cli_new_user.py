"""What a new user met when trying the command, tried again the same way: a separate process,
settings in its environment."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.messages import BatchRequest
from orchestrator.store.sql import SqlBatchStore
from tests.e2e.cli import cli_env, run

HOSTILE_ID = "evil\x9b31m\u202egnp.exe"


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(seed=1))
    await sim.start()
    yield sim
    await sim.stop()


async def record_requests(tmp_path: Path, count: int) -> None:
    store = SqlBatchStore(f"sqlite:///{tmp_path}/orchestrator.db")
    await store.open()
    try:
        for index in range(count):
            await store.add(BatchRequest(f"req-{index}", f"{index:024x}"), datetime.now(UTC))
    finally:
        await store.close()


@pytest.mark.parametrize("args", [["batches", "--json"], ["batches"]])
async def test_a_reader_that_closes_the_pipe_ends_it_quietly(tmp_path: Path, args: list[str]) -> None:
    # `orchestrator batches --json | head -1` ended in a BrokenPipeError traceback. Here the reader is
    # gone before the command writes anything, so the outcome does not depend on timing.
    await record_requests(tmp_path, 50)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            *args,
            env=cli_env(tmp_path),
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert err.decode() == ""
    assert proc.returncode == 1


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["run", "--until-idle"], "AEP__TIMEOUT", "inf"),  # was a traceback
        (["run", "--until-idle"], "LIMITS__PERIOD", "inf"),  # was a silent stall
        (["enqueue", "a1", "a2"], "QUEUE__URL", "sqlite://"),  # was "published 2", then nothing
        (["batches"], "STORE__URL", "sqlite:///:memory:"),
        (["run", "--until-idle"], "LIMIT__RATE", "5"),  # was ignored
        (["run", "--until-idle"], "AEP__BASE_URL", "https://zq1user:zq1pass@localhost"),
    ],
)
async def test_settings_a_new_user_got_wrong_exit_2_naming_them(
    tmp_path: Path, command: list[str], variable: str, value: str
) -> None:
    env = cli_env(tmp_path, "http://127.0.0.1:9", **{variable: value})
    result = await run(command, env, tmp_path)
    assert result.code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"orchestrator: ORCH_{variable}: ")
    assert "zq1pass" not in line


async def test_config_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text("[limits]\nrate = 'zq1'\n")
    result = await run(["run", "--until-idle", "--config", "x.toml"], cli_env(tmp_path), tmp_path)
    assert result.code == 2
    assert result.stderr.startswith("orchestrator: ORCH_LIMITS__RATE: ")  # the file was read


async def test_hostile_request_ids_are_escaped_in_console_logs_and_the_table(
    tmp_path: Path, simulator: Simulator
) -> None:
    env = cli_env(tmp_path, simulator.url, LOG__FORMAT="console")
    message = json.dumps({"datasetId": "5c8c3c555033b814b69f947f", "requestId": HOSTILE_ID})
    assert (await run(["enqueue", "--file", "-"], env, tmp_path, stdin=message.encode())).code == 0
    ran = await run(["run", "--until-idle"], env, tmp_path)
    assert ran.code == 0, ran.stderr[-2000:]
    listed = await run(["batches"], env, tmp_path)
    for output in (ran.stderr, listed.stdout):
        assert "evil\\x9b31m\\u202egnp.exe" in output
        assert "\x9b" not in output
        assert "\u202e" not in output
    # The JSON records keep the id as it is.
    records = (await run(["batches", "--json"], env, tmp_path)).json_lines()
    assert [record["requestId"] for record in records] == [HOSTILE_ID]


async def test_the_demo_hint_is_a_command_that_runs(tmp_path: Path) -> None:
    # The hint named `orchestrator`, which is not on PATH after `make demo`. Here the command runs as
    # `python -m orchestrator`, so that is what the hint must say.
    env = cli_env(tmp_path)
    env["PATH"] = "/usr/bin:/bin"  # nothing called orchestrator
    demo = await run(["demo", "--count", "1"], env, tmp_path)
    assert demo.code == 0, demo.stdout + demo.stderr
    [hint] = [line for line in demo.stdout.splitlines() if line.startswith("Records: ")]
    assert f"{sys.executable} -m orchestrator batches" in hint
    # Run as a user pastes it: a shell command line, without the settings of the demo's environment.
    shell = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        hint.removeprefix("Records: ") + " --json",
        env={key: value for key, value in env.items() if not key.startswith("ORCH_")},
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(shell.communicate(), 60)
    assert shell.returncode == 0, err.decode()
    assert [json.loads(line)["state"] for line in out.decode().splitlines()] == ["created"]
