"""The throughput row of `make bench`: end to end, with no simulated latency and no rate limit, how many
requests a second `orchestrator run --until-idle` turns into batches, beside the ceiling (a bare
aiohttp loop making the same calls at the same concurrency, `bench/ceiling.py`), on the embedded
default (SQLite queue + SQLite store) and on RabbitMQ + PostgreSQL.

Each run gets a fresh `orchestrator simulate --rate-limit 1000000 --latency 0 --latency-jitter 0`; the
rate is the simulator's: batches / (last - first creation stamp). The service's CPU time (wait4, every
thread) over its requests is the CPU section's per-request figure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    BROKERED,
    CONCURRENCY,
    EMBEDDED,
    NO_LATENCY,
    NO_LIMIT,
    PY,
    Backend,
    Context,
    RunFigures,
    Section,
    backend_missing,
    backend_settings,
    bench_command,
    commands_text,
    measure_client,
    measure_service,
    simulator,
)

COUNT, QUICK_COUNT = 5000, 1000
# Pairs of runs (the bare loop, then the service) per backend; the figure is the median pair's ratio.
# This machine's speed drifts by 10-30 % within minutes, and one pair moved the embedded ratio
# between 0.24 and 0.26 across two records of the same code.
PAIRS, QUICK_PAIRS = 3, 1
# The bare loop is fast: more calls give it a steady stretch of a few seconds (a rate is a rate).
CEILING_COUNT, QUICK_CEILING_COUNT = 15_000, 3000
BACKENDS = (EMBEDDED, BROKERED)


def service_settings(backend: dict[str, str]) -> dict[str, str]:
    """The service with no rate limit of its own, the default concurrency, a short catalog settle window
    (the simulator lists a batch at once), on the queue and store of `backend`."""
    return {
        "LIMITS__RATE": str(NO_LIMIT),
        "LIMITS__PERIOD": "1",
        "LIMITS__CONCURRENCY": str(CONCURRENCY),
        "AEP__CATALOG_SETTLE": "2",
    } | backend


def run_ceiling(count: int) -> RunFigures:
    with (
        tempfile.TemporaryDirectory(prefix="orch-ceiling-") as tmp,
        simulator(Path(tmp), NO_LIMIT, latency=NO_LATENCY) as sim,
    ):
        return measure_client("bare aiohttp loop", Path(tmp), sim, count, "ceiling.py", CONCURRENCY)


def run_service(backend: Backend, count: int, label: str = "orchestrator", **settings: str) -> RunFigures:
    """The service on `backend` under this section's conditions; `settings`: more ORCH_ variables
    (without the prefix), over those."""
    with tempfile.TemporaryDirectory(prefix="orch-throughput-") as tmp:
        workdir = Path(tmp)
        with (
            simulator(workdir, NO_LIMIT, latency=NO_LATENCY) as sim,
            backend_settings(backend, workdir) as where,
        ):
            return measure_service(label, workdir, sim, count, service_settings(where) | settings)


def _row(backend: str, o: RunFigures, ceiling: RunFigures | None) -> str:
    ratio = f"{o.steady_rate / ceiling.steady_rate:.3f}" if ceiling and ceiling.steady_rate else "-"
    wall_ratio = f"{o.wall_rate / ceiling.wall_rate:.3f}" if ceiling and ceiling.wall_rate else "-"
    return (
        f"| {backend} | {o.label} | {o.requests} | {o.created} | {o.duplicates} | {o.wall_s:.1f} "
        f"| {o.steady_rate:.0f} | {o.wall_rate:.0f} | {ratio} | {wall_ratio} | {o.cpu_s:.2f} "
        f"| {o.cpu_ms_per_request:.2f} | {o.peak_rss_mb:.0f} | {o.errors_logged} |"
    )


def section(ctx: Context) -> Section:
    count = QUICK_COUNT if ctx.quick else COUNT
    ceiling_count = QUICK_CEILING_COUNT if ctx.quick else CEILING_COUNT
    pairs = QUICK_PAIRS if ctx.quick else PAIRS
    rows = [
        "| backend | client | requests | created | duplicates | wall s | steady req/s | wall req/s "
        "| x ceiling (steady) | x ceiling (wall) | CPU s | CPU s / 1,000 req | peak RSS MB | errors logged |",
        "|" + "---|" * 14,
    ]
    backends: dict[str, Any] = {}
    for backend in BACKENDS:
        missing = backend_missing(backend)
        if missing:
            print(f"  {backend.label}: skipped ({missing})")
            backends[backend.key] = {"label": backend.label, "skipped": missing}
            rows.append(f"| {backend.label} | skipped: {missing} |" + " |" * 12)
            continue
        measured: list[tuple[float, RunFigures, RunFigures]] = []
        for pair in range(1, pairs + 1):
            which = f"  {backend.label}, pair {pair} of {pairs}:"
            print(f"{which} the bare aiohttp loop, {ceiling_count} requests ...")
            ceiling = run_ceiling(ceiling_count)
            print(
                f"    {ceiling.created} created, steady {ceiling.steady_rate:.0f}/s, CPU {ceiling.cpu_s:.2f}"
            )
            print(f"{which} orchestrator run --until-idle, {count} requests ...")
            service = run_service(backend, count)
            ratio = service.steady_rate / ceiling.steady_rate if ceiling.steady_rate else 0.0
            print(
                f"    {service.created} created, steady {service.steady_rate:.0f}/s ({ratio:.3f} x ceiling), "
                f"CPU {service.cpu_s:.2f} s ({service.cpu_ms_per_request:.2f} ms/request)",
                flush=True,
            )
            measured.append((ratio, ceiling, service))
            rows += [_row(backend.label, ceiling, None), _row(backend.label, service, ceiling)]
        # The median pair stands for the backend: its runs are the figures the other sections use.
        measured.sort(key=lambda item: item[0])
        ratio, ceiling, service = measured[len(measured) // 2]
        ratios = [each for each, _, _ in measured]
        if backend is EMBEDDED:
            ctx.shared["throughput.embedded"] = service
        ctx.shared[f"throughput.{backend.key}"] = service
        backends[backend.key] = {
            "label": backend.label,
            "ceiling": ceiling.as_dict(),
            "service": service.as_dict(),
            "ratio_steady": round(ratio, 4),
            "ratios_steady": [round(each, 4) for each in ratios],
            "ratio_wall": round(service.wall_rate / ceiling.wall_rate, 4) if ceiling.wall_rate else None,
        }
    commands = [
        bench_command("throughput", ctx.quick),
        "# by hand:",
        ".venv/bin/orchestrator simulate --port 8081 --rate-limit 1000000 --rate-period 1 "
        "--latency 0 --latency-jitter 0 --seed 1 &",
        f"{PY} bench/ceiling.py --url http://127.0.0.1:8081 --ids ids.txt --concurrency {CONCURRENCY}",
        "# (restart the simulator) the service, the simulator's address and credentials as in the README:",
        f"export ORCH_LIMITS__RATE={NO_LIMIT} ORCH_LIMITS__CONCURRENCY={CONCURRENCY} "
        "ORCH_AEP__CATALOG_SETTLE=2",
        ".venv/bin/orchestrator enqueue --file ids.txt && time .venv/bin/orchestrator run --until-idle",
        "# RabbitMQ + PostgreSQL: ORCH_QUEUE__URL=amqp://guest:guest@127.0.0.1:5672/ "
        "ORCH_QUEUE__NAME=<fresh> "
        "ORCH_STORE__URL=postgresql://postgres@127.0.0.1:5432/<fresh database>",
    ]
    method = (
        f"{pairs} pair(s) of runs per backend, the ceiling then the service, the figure the median pair's "
        "ratio (each pair's rows below). "
        f"{count} requests per run of the service ({ceiling_count} for the ceiling, which needs more to "
        "run steadily for a few seconds), a fresh simulator per run with no latency and no limit "
        "(`--rate-limit 1000000 --latency 0 --latency-jitter 0`). *Ceiling*: `bench/ceiling.py`, a bare "
        f"aiohttp loop of {CONCURRENCY} workers making the service's create call (same body and headers, "
        "one token), nothing else. *Orchestrator*: `orchestrator enqueue --file ids.txt` (not timed), then "
        f"`orchestrator run --until-idle` with `ORCH_LIMITS__RATE={NO_LIMIT}`, concurrency {CONCURRENCY}, "
        "on a "
        "fresh queue and store (a scratch RabbitMQ queue and PostgreSQL database for the second backend). "
        "*Steady* = (batches - 1) / (last - first `created` stamp of the simulator); *wall* = created / "
        "the process's wall time (start-up and idle detection included). CPU s = user + system of the "
        "process (every thread), from `wait4`; per 1,000 requests that is also ms per request. The "
        "simulator shares the cores with the client, so the ratio to the ceiling is the figure."
    )
    text = "\n\n".join([method, "\n".join(rows), commands_text(commands)])
    figures = {
        "requests": count,
        "ceiling_requests": ceiling_count,
        "pairs": pairs,
        "concurrency": CONCURRENCY,
        "backends": backends,
    }
    return Section(
        "throughput",
        "Throughput with no latency and no limit, beside a bare aiohttp loop",
        text,
        figures,
        commands,
    )
