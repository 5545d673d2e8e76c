"""The enqueue row of `make bench`: how fast `orchestrator enqueue --file ids.txt` fills the embedded
queue (SQLite), in ids a second of the whole command (start-up included), and beyond start-up (minus
the wall time of enqueueing one id into a fresh queue).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    CLIENT_ID,
    CLIENT_SECRET,
    ORG_ID,
    BenchError,
    Context,
    Finished,
    Section,
    bench_command,
    bin_path,
    clean_env,
    commands_text,
    run_measured,
    tail,
    write_ids,
)

COUNT, QUICK_COUNT = 100_000, 20_000


def enqueue_file(count: int) -> Finished:
    """`orchestrator enqueue --file` of `count` fresh ids into a fresh embedded queue, measured."""
    with tempfile.TemporaryDirectory(prefix="orch-enqueue-") as tmp:
        workdir = Path(tmp)
        ids = write_ids(workdir / "ids.txt", f"enq-{uuid4().hex[:8]}", count)
        env = clean_env() | {
            "ORCH_QUEUE__URL": f"sqlite:///{workdir / 'queue.db'}",
            "ORCH_LOG__LEVEL": "warning",
            "ORCH_AEP__CLIENT_ID": CLIENT_ID,
            "ORCH_AEP__CLIENT_SECRET": CLIENT_SECRET,
            "ORCH_AEP__ORG_ID": ORG_ID,
        }
        out, err = workdir / "enqueue.out", workdir / "enqueue.err"
        argv = [bin_path("orchestrator"), "enqueue", "--file", str(ids)]
        done = run_measured(argv, cwd=workdir, env=env, out=out, err=err, timeout=120 + count / 500)
        said = out.read_text(encoding="utf-8", errors="replace").strip()
        if done.timed_out or done.exit_code != 0 or said != f"published {count}":
            raise BenchError(f"orchestrator enqueue exited {done.exit_code}, said {said!r}:\n{tail(err)}")
        return done


def section(ctx: Context) -> Section:
    count = QUICK_COUNT if ctx.quick else COUNT
    print("  orchestrator enqueue of 1 id (start-up) ...")
    one = enqueue_file(1)
    print(f"  orchestrator enqueue --file of {count} ids ...", flush=True)
    done = enqueue_file(count)
    rate = count / done.wall
    beyond = count / (done.wall - one.wall) if done.wall > one.wall else 0.0
    print(f"    {done.wall:.2f} s: {rate:.0f} ids/s ({beyond:.0f} beyond start-up)")
    figures: dict[str, Any] = {
        "ids": count,
        "wall_s": round(done.wall, 3),
        "ids_per_s": round(rate, 1),
        "startup_wall_s": round(one.wall, 3),
        "ids_per_s_beyond_startup": round(beyond, 1),
        "cpu_s": round(done.cpu_s, 3),
        "peak_rss_mb": round(done.peak_rss_mb, 1),
    }
    rows = [
        "| ids | wall s | ids/s | one id (start-up) s | ids/s beyond start-up | CPU s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
        f"| {count} | {done.wall:.2f} | {rate:.0f} | {one.wall:.2f} | {beyond:.0f} | {done.cpu_s:.2f} "
        f"| {done.peak_rss_mb:.0f} |",
    ]
    commands = [
        bench_command("enqueue", ctx.quick),
        "# by hand:",
        f"seq -f 'ds-%07g' 1 {count} > ids.txt",
        "time ORCH_QUEUE__URL=sqlite:///var/bench-queue.db .venv/bin/orchestrator enqueue --file ids.txt",
    ]
    method = (
        f"`orchestrator enqueue --file ids.txt` of {count:,} distinct ids into a fresh embedded queue "
        "(SQLite file); ids/s = ids / the command's wall time (start-up included); beyond start-up = ids / "
        "(that wall time - the wall time of enqueueing 1 id). CPU and peak RSS from `wait4`."
    )
    text = "\n\n".join([method, "\n".join(rows), commands_text(commands)])
    return Section("enqueue", "Enqueue rate from a file", text, figures, commands)
