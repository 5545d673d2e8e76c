"""`orchestrator demo`: the whole path on the embedded defaults against the local simulator.

It starts the simulator (with a little latency and a few injected faults, so retries and lookups show),
enqueues a few hundred requests into the SQLite queue, runs the service until idle with a progress
bar, and prints a summary checked against what the simulator itself saw.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import AnyHttpUrl, SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator import eventloop, logs, service
from orchestrator.aep.simulator import Simulator, SimulatorConfig
from orchestrator.queues import publish_to
from orchestrator.settings import Settings
from orchestrator.store.base import State
from orchestrator.store.sql import SqlBatchStore

DEMO_DIR = Path("var/demo")
Which = Callable[[str], str | None]  # shutil.which's shape: where PATH finds a command, if anywhere


def dataset_id(index: int) -> str:
    return hashlib.sha256(f"demo-dataset-{index}".encode()).hexdigest()[:24]


# One request in this many names two files (written under `files_root`), which are uploaded, the batch
# completed and followed to AEP's final word.
FILES_EVERY = 30


def demo_messages(count: int, files_root: Path | None = None) -> list[bytes]:
    """Bare ids, JSON messages with requestIds and formats, and (given two or more) one request sent
    twice: the second message, the first with a requestId. With `files_root`, one request in
    FILES_EVERY also names two files, written there."""
    if count < 1:
        raise ValueError("the demo needs at least one request")
    bodies: list[bytes] = []
    for index in range(count):
        if index % 3 == 0:
            bodies.append(dataset_id(index).encode())
        else:
            message = {
                "datasetId": dataset_id(index),
                "requestId": f"demo-{index}",
                "inputFormat": {"format": ("json", "parquet", "csv")[index % 3]},
                "tags": {"source": ["demo"]},
            }
            if files_root is not None and index % FILES_EVERY == 4:
                message["inputFormat"] = {"format": "json"}
                message["files"] = _demo_files(files_root, index)
            bodies.append(json.dumps(message).encode())
    if count > 1:
        bodies.append(bodies[1])  # the same request again: still one batch
    return bodies


def _demo_files(root: Path, index: int) -> list[str]:
    """Two small JSON files of request `index`, in partition folders (their names in AEP)."""
    names = []
    for part, rows in (("a", 3), ("b", 2)):
        name = f"request-{index}/part={part}/rows.json"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"request": index, "row": row}) + "\n" for row in range(rows)))
        names.append(name)
    return names


def command_name(
    argv0: str | None = None,
    executable: str | None = None,
    which: Which = shutil.which,
) -> str:
    """How the user can run `orchestrator` again from here: the bare name when that is what PATH finds,
    else the path that was run (`.venv/bin/orchestrator` after `make demo`), or `python -m orchestrator`."""
    script = Path(argv0 or sys.argv[0])
    if script.name == "__main__.py":  # python -m orchestrator
        return f"{_shown(Path(executable or sys.executable))} -m orchestrator"
    found = which(script.name)
    if found is not None and Path(found).resolve() == script.resolve():
        return script.name
    return _shown(script)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is inside it, quoted for a shell."""
    absolute = path.absolute()
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    return shlex.quote(shown if "/" in shown else f"./{shown}")


def _fresh_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def main(settings: Settings, count: int) -> int:
    return eventloop.run(_demo(settings, count))


async def _demo(base: Settings, count: int) -> int:
    console = Console()
    _fresh_directory(DEMO_DIR)
    log_path = DEMO_DIR / "orchestrator.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        logs.configure("json", "info", stream=log_file)
        sim_config = SimulatorConfig(
            latency=0.02,
            latency_jitter=0.02,
            error_rate=0.03,
            drop_after_rate=0.01,
            upload_error_rate=0.05,
            processing_time=0.3,
            catalog_lag=0.5,  # the catalog lists a new batch half a second late, as AEP's does (later)
            seed=7,
        )
        simulator = Simulator(sim_config)
        url = await simulator.start()
        try:
            settings = _demo_settings(base, url, sim_config)
            bodies = demo_messages(count, settings.upload.root)
            await publish_to(settings.queue.url, settings.queue.name, bodies)
            console.print(
                f"[bold]Simulator[/] at {url}; enqueued {len(bodies)} messages "
                f"({count} distinct requests{', one sent twice' if len(bodies) > count else ''}); "
                f"rate {settings.limits.rate}/"
                f"{settings.limits.period:g}s"
            )
            started = time.monotonic()
            with Progress(
                TextColumn("creating batches"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                bar = progress.add_task("batches", total=count)

                def show(parts: service.Components) -> None:
                    stats = parts.dispatcher.stats
                    progress.update(bar, completed=stats.created + stats.adopted + stats.failed)

                code = await service.run(settings, until_idle=True, on_progress=show)
            elapsed = time.monotonic() - started
            return await _summary(console, settings, simulator, elapsed, code, log_path)
        finally:
            await simulator.stop()


def _demo_settings(base: Settings, url: str, sim: SimulatorConfig) -> Settings:
    aep = base.aep.model_copy(
        update={
            "base_url": AnyHttpUrl(url),
            "ims_url": AnyHttpUrl(url),
            "client_id": sim.client_id,
            "client_secret": SecretStr(sim.client_secret),
            "org_id": sim.org_id,
            "access_token": None,
            "timeout": 5.0,
            # Above the simulator's lag, far below the 30 s default meant for AEP's: after a lost
            # answer, no second create for 2 s, then reconciliation 2 s after the batch is recorded.
            "catalog_settle": 2.0,
        }
    )
    queue = base.queue.model_copy(update={"url": f"sqlite:///{DEMO_DIR}/queue.db"})
    store = base.store.model_copy(update={"url": f"sqlite:///{DEMO_DIR}/orchestrator.db"})
    http = base.http.model_copy(update={"port": 0})
    files = DEMO_DIR / "files"
    files.mkdir(parents=True, exist_ok=True)
    upload = base.upload.model_copy(update={"root": files})
    track = base.track.model_copy(update={"poll_min": 0.2, "poll_max": 1.0})
    return base.model_copy(
        update={"aep": aep, "queue": queue, "store": store, "http": http, "upload": upload, "track": track}
    )


async def _summary(
    console: Console, settings: Settings, simulator: Simulator, elapsed: float, code: int, log_path: Path
) -> int:
    store = SqlBatchStore(settings.store.url)
    await store.open()
    try:
        counts = await store.counts()
    finally:
        await store.close()
    stats = simulator.stats
    with_files = counts[State.UPLOADING] + counts[State.PROCESSING] + counts[State.SUCCEEDED]
    created = counts.get(State.CREATED, 0) + with_files
    batches = len(stats.batches)
    duplicates = sum(1 for n in stats.batches_per_external_id.values() if n > 1)
    console.print(
        f"[bold green]created {created}[/], failed {counts.get(State.FAILED, 0)}, "
        f"rejected {counts.get(State.REJECTED, 0)} in {elapsed:.1f}s "
        f"({created / elapsed if elapsed else 0:.1f} batches/s)"
    )
    stored = sum(len(simulator.files_of(batch.id)) for batch in stats.batches)
    console.print(
        f"[bold green]{counts[State.SUCCEEDED]} of them named files[/]: {stored} files uploaded, "
        f"their batches completed and ingested by AEP (state succeeded); the others are left loading "
        f"for the upload steps"
    )
    console.print(
        f"AEP saw {batches} batches for {created} requests, {duplicates} created twice; "
        f"{stats.tokens_issued} token fetched; "
        f"{sum(stats.faults.values())} faults injected and recovered from"
    )
    # soft_wrap: a command broken over two lines cannot be copied and pasted.
    console.print(
        f"Records: ORCH_STORE__URL=sqlite:///{DEMO_DIR}/orchestrator.db {command_name()} batches\n"
        f"Logs:    {log_path}",
        soft_wrap=True,
    )
    ok = (
        code == 0
        and created == len(stats.batches)
        and duplicates == 0
        and with_files == counts[State.SUCCEEDED]
    )
    return 0 if ok else 1
