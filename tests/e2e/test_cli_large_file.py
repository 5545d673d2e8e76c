"""A 600 MB file through the large-file flow with the default part size: it lands whole in AEP, and the
service's memory stays flat (the file is streamed in chunks, never read whole)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, run, start

SIZE = 600 * 1024 * 1024
PEAK_RSS_LIMIT = 150 * 1024 * 1024


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set so far (VmHWM, bytes); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")
async def test_a_600_mb_file_goes_in_parts_with_memory_flat(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    big = root / "part=x" / "big.json"
    big.parent.mkdir()
    # Not all zeros: a pattern whose every 64 KiB block differs, so a misplaced part changes the hash.
    with big.open("wb") as handle:
        block = 64 * 1024
        for index in range(SIZE // block):
            handle.write(index.to_bytes(8, "big") * (block // 8))
    async with Simulator(SimulatorConfig(processing_time=0.1, files_dir=str(tmp_path))) as sim:
        env = cli_env(tmp_path, sim.url, UPLOAD__ROOT=str(root), TRACK__POLL_MIN="0.2", AEP__TIMEOUT="60")
        message = json.dumps({"datasetId": "big", "requestId": "big", "files": ["part=x/big.json"]})
        assert (await run(["enqueue", message], env, tmp_path)).code == 0

        service = await start(["run", "--until-idle"], env, tmp_path)
        peak = 0
        while service.proc.returncode is None:
            peak = max(peak, peak_rss(service.proc.pid) or 0)
            await asyncio.sleep(0.05)
        finished = await service.wait(timeout=10)
        assert finished.code == 0, finished.stderr[-3000:]

        [record] = (await run(["batches", "--json"], env, tmp_path)).json_lines()
        assert (record["state"], record["batchStatus"]) == ("succeeded", "success")
        stored = sim.files(record["batchId"])["part=x/big.json"]
        assert (stored["size"], stored["sha256"]) == (SIZE, sha256_of(big))
        patches = sum(n for (endpoint, _), n in sim.stats.calls.items() if endpoint == "files.patch")
        assert patches == 10  # 600 MiB in the default 64 MiB parts
        assert 0 < peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
