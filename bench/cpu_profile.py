"""The CPU row of `make bench`: CPU seconds per 1,000 requests of `orchestrator run --until-idle`, and
where they go.

- **Per request**: the throughput section's embedded run (no latency, no limit, SQLite queue and store;
  run here when that section is not), its user + system time from `wait4` (every thread) over its
  requests. The start-up share is an `orchestrator run --until-idle` on an empty queue.
- **Where it goes**: the same run once more under pyinstrument (`python bench/cpu_profile.py child`,
  which starts `pyinstrument.Profiler(async_mode="disabled")` and calls the CLI's
  `main(["run", "--until-idle"])`). Each frame's self time is summed by the area its file belongs to
  (orchestrator.store, sqlalchemy, aiosqlite + sqlite3, aiohttp, structlog + logging,
  orchestrator.pipeline, queues, the asyncio event loop, ...). Standard-library helpers (json, re,
  contextlib, ...) and C built-ins count toward the area that called them; code run while importing
  counts as start-up; the event loop's wait in `epoll.poll` is idle, not CPU (uvloop's, which
  pyinstrument cannot see, is the samples beyond the main thread's CPU time, taken off the loop's).
  pyinstrument samples the main thread only, so the other threads' CPU (aiosqlite runs each SQLite
  call in its own thread) is the process's CPU minus the main thread's (`time.thread_time()`), shown
  as its own line. Shares are of the profiled run's CPU; ms per request apply them to the unprofiled
  run's figure (the profiler's own cost, about 1x more CPU, falls on the areas that make the most
  Python calls).

The raw profile (pyinstrument's JSON, unprocessed) is written to var/bench/profile.json.

    .venv/bin/python -m pyinstrument -r html -o profile.html -m orchestrator run --until-idle  # by hand
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    EMBEDDED,
    HERE,
    NO_LATENCY,
    NO_LIMIT,
    PY,
    ROOT,
    BenchError,
    Context,
    RunFigures,
    Section,
    backend_settings,
    bench_command,
    bin_path,
    commands_text,
    measure_service,
    simulator,
)
from throughput import COUNT, QUICK_COUNT, run_service, service_settings

PROFILE_COPY = ROOT / "var" / "bench" / "profile.json"
INTERVAL = 0.001

IDLE = "idle (epoll wait, not CPU)"
LOOP = "asyncio event loop"
IMPORTS = "start-up (imports)"
OTHER_THREADS = "other threads (aiosqlite's SQLite calls)"
AREAS = (
    "orchestrator.store",
    "sqlalchemy",
    "aiosqlite + sqlite3",
    "aiohttp (client)",
    "orchestrator.aep (client, auth)",
    "structlog + logging",
    "orchestrator.pipeline",
    "queues",
    "metrics (prometheus_client)",
    LOOP,
    IMPORTS,
    "orchestrator (other)",
    "other",
)
PACKAGES = {
    "sqlalchemy": "sqlalchemy",
    "alembic": "sqlalchemy",
    "aiosqlite": "aiosqlite + sqlite3",
    "asyncpg": "aiosqlite + sqlite3",
    "aiohttp": "aiohttp (client)",
    "yarl": "aiohttp (client)",
    "multidict": "aiohttp (client)",
    "aiohappyeyeballs": "aiohttp (client)",
    "aiosignal": "aiohttp (client)",
    "frozenlist": "aiohttp (client)",
    "propcache": "aiohttp (client)",
    "structlog": "structlog + logging",
    "aio_pika": "queues",
    "aiormq": "queues",
    "pamqp": "queues",
    "prometheus_client": "metrics (prometheus_client)",
    "asyncio_throttle": "orchestrator.pipeline",
    "uvloop": LOOP,
}
ORCHESTRATOR = {
    "store": "orchestrator.store",
    "pipeline": "orchestrator.pipeline",
    "queues": "queues",
    "aep": "orchestrator.aep (client, auth)",
    "logs.py": "structlog + logging",
    "metrics.py": "metrics (prometheus_client)",
}
STDLIB = {
    "asyncio": LOOP,
    "selectors.py": LOOP,
    "logging": "structlog + logging",
    "sqlite3": "aiosqlite + sqlite3",
}


# -- the child: the service under the profiler ---------------------------------------------------


def child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/cpu_profile.py child")
    parser.add_argument("--json", required=True, type=Path, help="pyinstrument's JSON, unprocessed")
    parser.add_argument("--stats", required=True, type=Path, help="CPU times of the run")
    parser.add_argument("--interval", type=float, default=INTERVAL)
    args = parser.parse_args(argv)
    # This directory is on sys.path as the script's; none of its modules must shadow one the service uses.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

    from pyinstrument import Profiler
    from pyinstrument.renderers import JSONRenderer

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    profiler = Profiler(interval=args.interval, async_mode="disabled")
    process_cpu, main_cpu = cpu(), time.thread_time()
    profiler.start()
    from orchestrator.cli import main  # imported under the profiler: start-up is part of the run

    code = main(["run", "--until-idle"])
    session = profiler.stop()
    process_cpu, main_cpu = cpu() - process_cpu, time.thread_time() - main_cpu
    renderer = JSONRenderer()
    renderer.processors = []  # every frame as sampled: the summary sums self time itself
    args.json.write_text(renderer.render(session), encoding="utf-8")
    stats = {
        "exit_code": code,
        "process_cpu_s": process_cpu,
        "main_thread_cpu_s": main_cpu,
        "duration_s": session.duration,
        "samples": session.sample_count,
        "interval_s": args.interval,
    }
    args.stats.write_text(json.dumps(stats), encoding="utf-8")
    return int(code)


# -- the summary -------------------------------------------------------------------------------


def _area(path: str, function: str) -> str | None:
    """The area of a frame by its file; None: count it toward the caller's area."""
    if path.startswith("<frozen importlib"):
        return IMPORTS
    if path in ("<built-in>", "<string>", "") or path.startswith("<"):
        return IDLE if function in ("epoll.poll", "poll.poll", "select.select") else None
    parts = Path(path).parts
    if "site-packages" in parts:
        after = parts[parts.index("site-packages") + 1 :]
        package = after[0].removesuffix(".py") if after else ""
        if package == "pyinstrument":
            return "other"
        return PACKAGES.get(package, "other")
    if "orchestrator" in parts:  # the service's own package (a source tree, not site-packages)
        below = parts[len(parts) - parts[::-1].index("orchestrator") :]
        return ORCHESTRATOR.get(below[0], "orchestrator (other)") if below else "orchestrator (other)"
    for index, part in enumerate(parts):
        if part.startswith("python3") and index + 1 < len(parts):  # the standard library
            if parts[index + 1] == "importlib":
                return IMPORTS
            return STDLIB.get(parts[index + 1])
    return "other"


def _synthetic(frame: dict[str, Any]) -> bool:
    return not frame["file_path"] and str(frame["function"]).startswith("[")


def summarise(profile: dict[str, Any]) -> tuple[Counter[str], Counter[tuple[str, str, str]]]:
    """Self time (s) by area, and by (area, function, file) for the top list."""
    by_area: Counter[str] = Counter()
    by_function: Counter[tuple[str, str, str]] = Counter()
    stack: list[tuple[dict[str, Any], str, bool]] = [(profile["root_frame"], "other", False)]
    while stack:  # iteratively: profiles can be deeper than Python's recursion limit
        frame, caller, importing = stack.pop()
        own = _area(frame["file_path"], frame["function"])
        importing = importing or own == IMPORTS
        area = IMPORTS if importing and own != IDLE else (own or caller)
        children = [c for c in frame["children"] if not _synthetic(c)]
        self_time = frame["time"] - sum(c["time"] for c in children)
        by_area[area] += self_time
        short = frame.get("file_path_short") or frame["file_path"]
        by_function[(area, frame["function"], short)] += self_time
        # An idle frame's callees (none, in practice) are still idle; everyone else passes on its area.
        stack.extend((c, area, importing) for c in children)
    return by_area, by_function


def breakdown(profile: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    areas, by_function = summarise(profile)
    by_area: dict[str, float] = dict(areas)
    idle = by_area.pop(IDLE, 0.0)
    process_cpu = float(stats["process_cpu_s"])
    main_cpu = min(float(stats["main_thread_cpu_s"]), process_cpu)
    # pyinstrument samples the wall clock. The standard loop's wait shows as its `epoll.poll` frame,
    # but uvloop waits in C, inside the loop's own frame (`run`): the samples beyond the main
    # thread's CPU time are that wait, taken off the loop's share instead of counted as its CPU.
    hidden = min(max(0.0, sum(by_area.values()) - main_cpu), by_area.get(LOOP, 0.0))
    if hidden:
        by_area[LOOP] -= hidden
        idle += hidden
        loop_frame = max((key for key in by_function if key[0] == LOOP), key=by_function.__getitem__)
        by_function[loop_frame] -= hidden  # type: ignore[assignment]  # seconds, not counts
    busy = sum(by_area.values())
    other_threads = process_cpu - main_cpu
    shares: dict[str, float] = {}
    for area in (*AREAS, *sorted(set(by_area) - set(AREAS))):
        if by_area.get(area, 0.0) > 0:
            shares[area] = by_area[area] / busy * main_cpu / process_cpu if busy and process_cpu else 0.0
    shares[OTHER_THREADS] = other_threads / process_cpu if process_cpu else 0.0
    top = [
        {"area": area, "function": function, "file": file, "self_s": round(seconds, 4)}
        for (area, function, file), seconds in by_function.most_common(40)
        if area != IDLE
    ][:20]
    return {
        "profiled_process_cpu_s": round(process_cpu, 3),
        "profiled_main_thread_cpu_s": round(main_cpu, 3),
        "profiled_wall_s": round(float(stats["duration_s"]), 3),
        "samples": stats["samples"],
        "main_thread_busy_s": round(busy, 3),
        "main_thread_idle_s": round(idle, 3),
        "shares": {area: round(share, 4) for area, share in shares.items()},
        "top_functions": top,
    }


# -- the section -------------------------------------------------------------------------------


def run_profiled(count: int) -> tuple[dict[str, Any], RunFigures, Path]:
    """The throughput section's embedded run, once, under pyinstrument; the breakdown, the run as the
    simulator saw it, and where the raw profile was kept."""
    with tempfile.TemporaryDirectory(prefix="orch-profile-") as tmp:
        workdir = Path(tmp)
        raw, stats_path = workdir / "profile.json", workdir / "profile-stats.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "child",
            "--json",
            str(raw),
            "--stats",
            str(stats_path),
        ]
        with (
            simulator(workdir, NO_LIMIT, latency=NO_LATENCY) as sim,
            backend_settings(EMBEDDED, workdir) as where,
        ):
            run = measure_service(
                "orchestrator under pyinstrument", workdir, sim, count, service_settings(where), argv=argv
            )
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if stats["exit_code"] != 0:
            raise BenchError(f"the profiled run exited {stats['exit_code']}")
        result = breakdown(json.loads(raw.read_text(encoding="utf-8")), stats)
        PROFILE_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw, PROFILE_COPY)
    return result, run, PROFILE_COPY


def section(ctx: Context) -> Section:
    count = QUICK_COUNT if ctx.quick else COUNT
    measured = ctx.shared.get("throughput.embedded")
    if not isinstance(measured, RunFigures) or measured.requests != count:
        print(f"  orchestrator run --until-idle, {count} requests (embedded, no latency, no limit) ...")
        measured = run_service(EMBEDDED, count)
    else:
        print(f"  the throughput section's embedded run: {count} requests, CPU {measured.cpu_s:.2f} s")
    print("  orchestrator run --until-idle on an empty queue (start-up) ...")
    empty = run_service(EMBEDDED, 0, label="orchestrator, empty queue")
    print(f"    CPU {empty.cpu_s:.2f} s")
    # The bench's runs log warnings only; the service's default, info, writes two lines a request
    # (intake.accepted, batch.created): what they cost is this run's difference.
    print(f"  the same {count} requests at ORCH_LOG__LEVEL=info (the default) ...")
    logged = run_service(EMBEDDED, count, label="orchestrator, info lines", LOG__LEVEL="info")
    logged_marginal = 1000 * (logged.cpu_s - empty.cpu_s) / count
    print(f"    {logged_marginal:.2f} CPU s per 1,000 requests beyond start-up")
    print(f"  the same {count} requests under pyinstrument ...", flush=True)
    profile, profiled_run, kept = run_profiled(count)
    per_request = measured.cpu_ms_per_request  # ms per request = s per 1,000 requests
    marginal = 1000 * (measured.cpu_s - empty.cpu_s) / count
    brokered = ctx.shared.get("throughput.rabbitmq_postgresql")
    print(f"    {per_request:.2f} CPU s per 1,000 requests ({marginal:.2f} beyond start-up)")

    rows = [
        "| run | requests | CPU s | CPU s / 1,000 requests | beyond start-up, per 1,000 | wall s |",
        "|---|---|---|---|---|---|",
        f"| embedded (SQLite queue + store) | {count} | {measured.cpu_s:.2f} | {per_request:.2f} "
        f"| {marginal:.2f} | {measured.wall_s:.1f} |",
        f"| embedded, at ORCH_LOG__LEVEL=info (the default: two lines a request) | {count} "
        f"| {logged.cpu_s:.2f} | {logged.cpu_ms_per_request:.2f} | {logged_marginal:.2f} "
        f"| {logged.wall_s:.1f} |",
        f"| empty queue (start-up, idle detection, exit) | 0 | {empty.cpu_s:.2f} | - | - "
        f"| {empty.wall_s:.1f} |",
    ]
    if isinstance(brokered, RunFigures):
        rows.append(
            f"| RabbitMQ + PostgreSQL (throughput section) | {brokered.requests} | {brokered.cpu_s:.2f} "
            f"| {brokered.cpu_ms_per_request:.2f} | - | {brokered.wall_s:.1f} |"
        )
    area_rows = [
        "| area | share of the run's CPU | ms per request | share without import time |",
        "|---|---|---|---|",
    ]
    running = 1.0 - profile["shares"].get(IMPORTS, 0.0)
    for area, share in sorted(profile["shares"].items(), key=lambda item: -item[1]):
        steady = "-" if area == IMPORTS or running <= 0 else f"{100 * share / running:.1f} %"
        area_rows.append(f"| {area} | {100 * share:.1f} % | {share * per_request:.3f} | {steady} |")
    top_rows = ["| self s | area | function | file |", "|---|---|---|---|"]
    for item in profile["top_functions"][:15]:
        top_rows.append(f"| {item['self_s']:.3f} | {item['area']} | `{item['function']}` | {item['file']} |")
    commands = [
        bench_command("cpu", ctx.quick),
        "# by hand, with the throughput section's simulator and settings:",
        f"{PY} bench/cpu_profile.py child --json profile.json --stats cpu.json  # under pyinstrument",
        ".venv/bin/python -m pyinstrument -r html -o profile.html -m orchestrator run --until-idle",
    ]
    text = "\n\n".join(
        [
            f"{count} requests, no latency, no limit, embedded queue and store (the throughput section's "
            "run, which logs warnings only; the row at info shows what the default log level adds). "
            "CPU = user + system of `orchestrator run --until-idle` from `wait4`, every thread; CPU s per "
            "1,000 requests is also ms per request.",
            "\n".join(rows),
            f"Where it goes: the same run under pyinstrument (interval {INTERVAL * 1000:.0f} ms, async mode "
            f"off); it took {profile['profiled_process_cpu_s']:.1f} CPU s against {measured.cpu_s:.1f} "
            f"unprofiled ({profile['samples']} samples; the main thread was busy "
            f"{profile['main_thread_busy_s']:.1f} s and "
            f"waited in epoll {profile['main_thread_idle_s']:.1f} s). Self time by area (standard-library "
            "helpers and C built-ins count toward their caller; import-time code is start-up; other threads' "
            "CPU is the process's minus the main thread's):",
            "\n".join(area_rows),
            "The main thread's 15 frames with the most self time:",
            "\n".join(top_rows),
            f"Raw profile: `{kept.relative_to(ROOT)}` (pyinstrument JSON, unprocessed; kept out of git).",
            commands_text(commands),
        ]
    )
    figures = {
        "requests": count,
        "cpu_s": round(measured.cpu_s, 3),
        "cpu_s_per_1000_requests": round(per_request, 3),
        "startup_cpu_s": round(empty.cpu_s, 3),
        "cpu_s_per_1000_requests_beyond_startup": round(marginal, 3),
        "cpu_s_per_1000_requests_beyond_startup_at_info": round(logged_marginal, 3),
        "rabbitmq_postgresql_cpu_s_per_1000_requests": (
            round(brokered.cpu_ms_per_request, 3) if isinstance(brokered, RunFigures) else None
        ),
        "run": measured.as_dict(),
        "empty_run": empty.as_dict(),
        "info_run": logged.as_dict(),
        "profiled_run": profiled_run.as_dict(),
        "profile": profile
        | {"ms_per_request": {a: round(s * per_request, 4) for a, s in profile["shares"].items()}},
    }
    return Section("cpu", "CPU per 1,000 requests, and where it goes", text, figures, commands)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        sys.exit(child(sys.argv[2:]))
    print("usage: bench/cpu_profile.py child --json PROFILE.json --stats CPU.json", file=sys.stderr)
    print(
        f"(the service's settings come from ORCH_ variables; `{bin_path('orchestrator')}` --help)",
        file=sys.stderr,
    )
    sys.exit(2)
