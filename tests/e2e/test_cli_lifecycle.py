"""The whole batch lifecycle through the CLI, against the simulator with faults: requests naming files
end with AEP holding exactly those files in one batch each, completed only once both were in, and
AEP's final word recorded; a kill -9 mid-upload resumes without a file sent into a completed batch."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

from orchestrator.aep.simulator import Simulator, SimulatorConfig
from tests.e2e.cli import cli_env, run, start, until

# Quick retries, look-ups and polls, so faults are got over in seconds.
QUICK = {
    "AEP__TIMEOUT": "2",
    "AEP__CATALOG_SETTLE": "1",
    "RETRY__BASE_DELAY": "0.05",
    "RETRY__MAX_DELAY": "0.5",
    "RETRY__MAX_ATTEMPTS": "10",
    "TRACK__POLL_MIN": "0.2",
    "TRACK__POLL_MAX": "1",
    "LIMITS__RATE": "200",
}
FAILING = "ds-fails"


def write_files(root: Path, request: int) -> list[str]:
    """Two files of a request, in partition folders, different for every request."""
    names = []
    for part, lines in (("a", 3), ("b", 5)):
        name = f"req{request}/part={part}/data.json"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"request": request, "line": n}) + "\n" for n in range(lines)))
        names.append(name)
    return names


def digests(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "size": (root / name).stat().st_size,
            "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest(),
            "complete": True,
        }
        for name in names
    }


async def test_files_are_uploaded_completed_and_followed_to_aeps_final_word(tmp_path: Path) -> None:
    root = tmp_path / "data"
    config = SimulatorConfig(
        upload_error_rate=0.1,
        # Enough creates (33) and uploads (60 and more) that some of each fail whatever the order of
        # arrival: no drop at all among 33 creates at 20 % is a 1-in-1600 chance, and so on.
        drop_after_rate=0.2,
        processing_time=0.2,
        fail_datasets=frozenset({FAILING}),
        seed=11,
    )
    async with Simulator(config) as sim:
        env = cli_env(tmp_path, sim.url, UPLOAD__ROOT=str(root), **QUICK)
        lines, files = [], {}
        for index in range(30):
            files[f"r{index}"] = write_files(root, index)
            dataset = FAILING if index < 3 else f"ds{index}"
            lines.append(
                json.dumps({"datasetId": dataset, "requestId": f"r{index}", "files": files[f"r{index}"]})
            )
        lines += [json.dumps({"datasetId": f"plain{n}", "requestId": f"plain{n}"}) for n in range(3)]
        lines.append(json.dumps({"datasetId": "ds-x", "requestId": "escape", "files": ["../outside.json"]}))
        enqueued = await run(["enqueue", "--file", "-"], env, tmp_path, stdin="\n".join(lines).encode())
        assert enqueued.code == 1  # the line naming a path outside the root is refused there
        assert "published 33" in enqueued.stdout.lower()

        finished = await run(["run", "--until-idle"], env, tmp_path, timeout=120)
        # Exit 1: AEP failed the batches of the failing dataset.
        assert finished.code == 1, finished.stderr[-3000:]
        records = {r["requestId"]: r for r in (await run(["batches", "--json"], env, tmp_path)).json_lines()}

        assert sim.stats.faults["upload_error"] > 0
        assert sim.stats.faults["drop_after"] > 0
        assert sim.live_duplicates() == {}  # one batch per request
        assert sim.stats.uploads_after_complete == 0
        for request_id, names in files.items():
            record = records[request_id]
            batch_id = record["batchId"]
            # AEP holds exactly the request's files, byte for byte, in the recorded batch.
            assert sim.files(batch_id) == digests(root, names), request_id
            assert (record["filesDone"], record["filesTotal"], record["step"]) == (2, 2, "done")
            # The batch was completed with both files in: AEP counted the lines of both.
            if request_id in ("r0", "r1", "r2"):
                assert (record["state"], record["batchStatus"]) == ("failed", "failed")
                assert record["lastError"].startswith("INGEST-1212-400")
                assert record["errors"][0]["code"] == "INGEST-1212-400"
            else:
                assert (record["state"], record["batchStatus"], record["lastError"]) == (
                    "succeeded",
                    "success",
                    None,
                )
                assert record["recordCount"] == 8
        for n in range(3):
            plain = records[f"plain{n}"]
            assert (plain["state"], plain["batchStatus"]) == ("created", "loading")
            assert (sim.batch(plain["batchId"]) or {})["status"] == "loading"  # left to the upload steps
            assert "filesDone" not in plain

        status = await run(["status", "--json"], env, tmp_path)
        counts = json.loads(status.stdout)
        assert counts["counts"]["succeeded"] == 27
        assert counts["steps"] == {"done": 30}


async def test_kill_9_mid_upload_then_restart_resumes_and_never_sends_into_a_completed_batch(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    sizes = {f"f{index}.bin": 40_000 + 1000 * index for index in range(8)}
    for name, size in sizes.items():
        (root / name).write_bytes(hashlib.sha256(name.encode()).digest() * (size // 32) + b"x" * (size % 32))
    async with Simulator(SimulatorConfig(latency=0.05, processing_time=0.2, seed=5)) as sim:
        # Files over 10 kB go in 8 kB parts: each file is several calls, so the kill lands mid-file.
        env = cli_env(
            tmp_path,
            sim.url,
            UPLOAD__ROOT=str(root),
            UPLOAD__LARGE_FILE_THRESHOLD="10000",
            UPLOAD__PART_SIZE="8000",
            UPLOAD__CONCURRENCY="4",
            **QUICK,
        )
        lines = [
            json.dumps({"datasetId": f"ds{index}", "requestId": f"r{index}", "files": [name]})
            for index, name in enumerate(sizes)
        ]
        assert (
            await run(["enqueue", "--file", "-"], env, tmp_path, stdin="\n".join(lines).encode())
        ).code == 0

        service = await start(["run"], env, tmp_path)

        async def parts_sent() -> bool:
            return sum(n for (endpoint, _), n in sim.stats.calls.items() if endpoint == "files.patch") >= 6

        await until(parts_sent, "the first parts")
        service.signal(signal.SIGKILL)
        assert (await service.wait()).code == -signal.SIGKILL
        assert sim.stats.completed_batches < len(sizes), "the kill came too late to test anything"

        restarted = await run(["run", "--until-idle"], env, tmp_path, timeout=120)
        assert restarted.code == 0, restarted.stderr[-3000:]
        records = (await run(["batches", "--json"], env, tmp_path)).json_lines()

        assert sim.stats.uploads_after_complete == 0
        assert sim.live_duplicates() == {}
        for record, name in zip(records, sizes, strict=True):
            assert (record["state"], record["batchStatus"]) == ("succeeded", "success")
            assert sim.files(record["batchId"]) == digests(root, [name])
