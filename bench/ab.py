"""Compare the service at another commit with the working tree, runs interleaved.

This machine's speed drifts by 10-30 % over minutes (a shared virtual machine), so the same build
measured twice a few minutes apart can differ by more than a change under test. Here both builds
run in turns (A B, B A, A B, ...) under the throughput section's conditions (a fresh simulator with
no latency and no limit, `orchestrator run --until-idle` on fresh ids), and each is summed up by its
median: a drift touches both alike. Each pair also runs both builds on an empty queue, so that CPU
per request is also given beyond start-up (the run's CPU less the median start-up's, per request),
as `make bench` judges it, and B's figures as ratios to A's.

    .venv/bin/python bench/ab.py REV [--pairs 6] [--count 5000] [--backend embedded|brokered] \
        [--set LOG__LEVEL=info ...]

The other commit is checked out in a temporary git worktree and run from there (PYTHONPATH ahead of
this checkout's editable install); both use this checkout's virtualenv and bench harness.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    BROKERED,
    EMBEDDED,
    ROOT,
    Backend,
    RunFigures,
    backend_missing,
    bin_path,
)
from throughput import run_service


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/ab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with the working tree (A)")
    parser.add_argument("--pairs", type=int, default=6, help="runs of each build (default 6)")
    parser.add_argument("--count", type=int, default=5000, help="requests per run (default 5000)")
    parser.add_argument("--backend", choices=["embedded", "brokered"], default="embedded")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an ORCH_ setting (without the prefix) for both builds' runs, e.g. LOG__LEVEL=info",
    )
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(settings) != len(args.set):
        parser.error("--set takes NAME=VALUE")
    backend = EMBEDDED if args.backend == "embedded" else BROKERED
    missing = backend_missing(backend)
    if missing:
        print(f"bench/ab.py: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="orch-ab-") as tmp:
        tree = Path(tmp) / "a"
        _git("worktree", "add", "--detach", str(tree), args.rev)
        try:
            runs = _interleaved(tree, backend, args.pairs, args.count, settings)
        finally:
            _git("worktree", "remove", "--force", str(tree))
    given = "".join(f", ORCH_{name}={value}" for name, value in settings.items())
    print(f"\n{args.pairs} runs each of {args.count} requests, {backend.label}{given}, interleaved:")
    print(
        "| build | CPU ms / request (median, min) | start-up CPU s (median) "
        "| CPU ms / request beyond start-up (median) | steady req/s (median, max) |"
    )
    print("| --- | --- | --- | --- | --- |")
    medians: dict[str, tuple[float, float]] = {}
    for side, label in (("A", args.rev), ("B", "working tree")):
        cpu = [run.cpu_ms_per_request for run in runs[side]]
        rate = [run.steady_rate for run in runs[side]]
        startup = statistics.median(run.cpu_s for run in runs[f"{side} empty"])
        beyond = statistics.median(1000 * (run.cpu_s - startup) / run.requests for run in runs[side])
        medians[side] = (beyond, statistics.median(rate))
        print(
            f"| {side}: {label} | {statistics.median(cpu):.3f}, {min(cpu):.3f} | {startup:.2f} "
            f"| {beyond:.3f} | {statistics.median(rate):.0f}, {max(rate):.0f} |"
        )
    (beyond_a, rate_a), (beyond_b, rate_b) = medians["A"], medians["B"]
    cpu_ratio, rate_ratio = beyond_b / beyond_a, rate_b / rate_a
    print(f"\nB / A: CPU per request beyond start-up {cpu_ratio:.2f} x, steady rate {rate_ratio:.2f} x")
    return 0


def _git(*args: str) -> None:
    subprocess.run([bin_path("git"), "-C", str(ROOT), *args], check=True)  # noqa: S603 - our arguments


def _interleaved(
    tree: Path, backend: Backend, pairs: int, count: int, settings: dict[str, str]
) -> dict[str, list[RunFigures]]:
    runs: dict[str, list[RunFigures]] = {"A": [], "B": [], "A empty": [], "B empty": []}
    saved = os.environ.get("PYTHONPATH")
    try:
        for index in range(pairs):
            for side in ("A", "B") if index % 2 == 0 else ("B", "A"):
                if side == "A":
                    os.environ["PYTHONPATH"] = str(tree)
                else:
                    os.environ.pop("PYTHONPATH", None)
                run = run_service(backend, count, **settings)
                runs[side].append(run)
                runs[f"{side} empty"].append(run_service(backend, 0, "start-up", **settings))
                print(
                    f"{side}: {run.cpu_ms_per_request:.3f} ms/request, {run.steady_rate:.0f} req/s, "
                    f"{run.created} created, {run.duplicates} duplicates",
                    flush=True,
                )
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return runs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
