"""The memory row of `make bench`: the service's peak RSS while it works through a backlog of 50,000 and
of 500,000 requests.

For each backlog: a fresh embedded queue filled with `orchestrator enqueue --file` (50,000 ids per call),
a simulator at a realistic rate (`--rate-limit 200 --latency 0.02 --latency-jitter 0.01`), then
`orchestrator run` with `ORCH_LIMITS__RATE=200`, stopped with SIGTERM after 20 s (it need not finish).
Peak RSS is the process's high-water mark: the larger of `wait4`'s ru_maxrss and the VmHWM read from
/proc/<pid>/status every 0.25 s (VmRSS is sampled too, to show the curve).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    CONCURRENCY,
    RATE_LATENCY,
    BenchError,
    Context,
    Section,
    bench_command,
    bin_path,
    commands_text,
    distinct,
    enqueue,
    log_errors,
    run_measured,
    service_env,
    simulator,
    tail,
    write_ids,
)

BACKLOGS, QUICK_BACKLOGS = (50_000, 500_000), (5_000, 50_000)
RUN_FOR, QUICK_RUN_FOR = 20.0, 6.0
CHUNK = 50_000  # ids per `orchestrator enqueue --file` call
RATE = 200
SAMPLE_EVERY = 0.25


def run_backlog(backlog: int, run_for: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orch-memory-") as tmp:
        workdir = Path(tmp)
        with simulator(workdir, RATE, latency=RATE_LATENCY) as sim:
            env = service_env(
                sim,
                workdir,
                LIMITS__RATE=str(RATE),
                LIMITS__PERIOD="1",
                LIMITS__CONCURRENCY=str(CONCURRENCY),
                STORE__URL=f"sqlite:///{workdir / 'store.db'}",
                AEP__CATALOG_SETTLE="2",
                SHUTDOWN__GRACE="5",
            )
            prefix, enqueue_s = f"mem-{uuid4().hex[:8]}", 0.0
            for start in range(0, backlog, CHUNK):
                chunk = write_ids(workdir / "chunk.txt", prefix, min(CHUNK, backlog - start), start)
                enqueue_s += enqueue(env, workdir, chunk)
            queue_mb = sum(p.stat().st_size for p in workdir.glob("queue.db*")) / 2**20
            out, err = workdir / "run.out", workdir / "run.err"
            done = run_measured(
                [bin_path("orchestrator"), "run"],
                cwd=workdir,
                env=env,
                out=out,
                err=err,
                timeout=run_for + 60,
                stop_after=run_for,
                sample_every=SAMPLE_EVERY,
            )
            if done.timed_out or done.exit_code not in (0, -15, 143):
                raise BenchError(
                    f"orchestrator run exited {done.exit_code}; its stderr ends with:\n{tail(err)}"
                )
            stats = sim.stats()
    before_stop = [mb for at, mb in done.rss_samples if at <= run_for]
    curve = {
        f"{at:.0f}": round(mb, 1) for at, mb in done.rss_samples if abs(at - round(at)) < SAMPLE_EVERY / 2
    }
    return {
        "backlog": backlog,
        "enqueue_s": round(enqueue_s, 2),
        "queue_file_mb": round(queue_mb, 1),
        "run_for_s": run_for,
        "wall_s": round(done.wall, 2),
        "exit_code": done.exit_code,
        "created": distinct(stats),
        "peak_rss_mb": round(done.peak_rss_mb, 1),
        "rss_at_stop_mb": round(before_stop[-1], 1) if before_stop else None,
        "rss_curve_mb": curve,  # VmRSS by whole second since start
        "errors_logged": log_errors(err),
    }


def section(ctx: Context) -> Section:
    backlogs = QUICK_BACKLOGS if ctx.quick else BACKLOGS
    run_for = QUICK_RUN_FOR if ctx.quick else RUN_FOR
    results = []
    for backlog in backlogs:
        print(f"  backlog {backlog}: enqueue, then orchestrator run for {run_for:.0f} s ...", flush=True)
        found = run_backlog(backlog, run_for)
        print(
            f"    enqueued in {found['enqueue_s']:.1f} s; {found['created']} created; "
            f"peak RSS {found['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        results.append(found)
    rows = [
        "| backlog | enqueue s | queue file MB | ran s | created | RSS at 5 s / 10 s / at SIGTERM MB "
        "| peak RSS MB | errors logged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        curve = r["rss_curve_mb"]
        points = " / ".join(str(curve.get(key, "-")) for key in ("5", "10")) + f" / {r['rss_at_stop_mb']}"
        rows.append(
            f"| {r['backlog']} | {r['enqueue_s']:.1f} | {r['queue_file_mb']:.0f} | {r['run_for_s']:.0f} "
            f"| {r['created']} | {points} | {r['peak_rss_mb']:.0f} | {r['errors_logged']} |"
        )
    commands = [
        bench_command("memory", ctx.quick),
        "# by hand: fill the queue 50,000 ids at a time, then",
        f".venv/bin/orchestrator simulate --port 8081 --rate-limit {RATE} --rate-period 1 "
        f"{' '.join(RATE_LATENCY)} --seed 1 &",
        f"ORCH_LIMITS__RATE={RATE} .venv/bin/orchestrator run & sleep {run_for:.0f}; "
        "grep VmHWM /proc/$!/status; kill -TERM $!",
    ]
    method = (
        f"Backlogs of {' and '.join(f'{b:,}' for b in backlogs)} requests in a fresh embedded queue "
        f"(`orchestrator enqueue --file`, {CHUNK:,} ids per call), then `orchestrator run` against the "
        f"simulator at R={RATE}/s (`--rate-limit {RATE} {' '.join(RATE_LATENCY)}`, "
        f"`ORCH_LIMITS__RATE={RATE}`), "
        f"SIGTERM after {run_for:.0f} s. Peak RSS = the larger of `wait4`'s ru_maxrss and VmHWM sampled "
        f"from /proc/<pid>/status every {SAMPLE_EVERY} s."
    )
    text = "\n\n".join([method, "\n".join(rows), commands_text(commands)])
    figures = {"rate": RATE, "run_for_s": run_for, "backlogs": {str(r["backlog"]): r for r in results}}
    return Section("memory", "Peak RSS with a backlog", text, figures, commands)
