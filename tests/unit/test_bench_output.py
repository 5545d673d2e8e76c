"""Where `make bench` writes its results: an ignored file by default, the tracked record only on request."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_a_run_writes_to_an_ignored_file_by_default(bench: ModuleType) -> None:
    # `make bench` rewrote the tracked bench/RESULTS.md on every run.
    out = bench.parse_args([]).out
    assert out == ROOT / "var" / "bench" / "RESULTS.md"
    assert "var/" in (ROOT / ".gitignore").read_text().splitlines()
    assert out != bench.RECORD
    assert bench.RECORD == ROOT / "bench" / "RESULTS.md"


def test_the_record_is_written_only_when_named(bench: ModuleType) -> None:
    assert bench.parse_args(["--out", "bench/RESULTS.md", "--quick"]).out == Path("bench/RESULTS.md")


@pytest.mark.parametrize(("given", "expected"), [(None, "var/bench/RESULTS.md"), ("bench/RESULTS.md", None)])
def test_make_bench_passes_the_output(given: str | None, expected: str | None) -> None:
    command = ["make", "-n", "-C", str(ROOT), "bench"] + ([f"BENCH_OUT={given}"] if given else [])
    dry_run = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)  # noqa: S603
    [line] = [line for line in dry_run.stdout.splitlines() if "bench/run.py" in line]
    assert line.endswith(f"bench/run.py --out {expected or given}")


def test_write_results_keeps_the_text_above_the_marker(bench: ModuleType, tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "dir" / "RESULTS.md"
    bench.write_results("## Run 1", fresh)
    assert fresh.read_text() == f"{bench.DEFAULT_HEADER}\n{bench.MARKER}\n\n## Run 1\n"

    fresh.write_text(f"# My notes\n\nkept\n{bench.MARKER}\n\n## Run 1\n")
    bench.write_results("## Run 2", fresh)
    assert fresh.read_text() == f"# My notes\n\nkept\n\n{bench.MARKER}\n\n## Run 2\n"


def test_the_cpu_row_sets_the_figure_beside_the_bare_loop_of_the_same_run(bench: ModuleType) -> None:
    cpu = {
        "requests": 5000,
        "cpu_s_per_1000_requests_beyond_startup": 0.53,
        "cpu_s_per_1000_requests": 0.77,
        "startup_cpu_s": 1.2,
        "profile": {"shares": {"asyncio event loop": 0.23, "aiohttp (client)": 0.22}},
    }
    ceiling = {"steady_rate": 4851.0, "cpu_s_per_1000_requests": 0.206}
    service = {"steady_rate": 1752.0, "requests": 5000}
    embedded = {"label": "embedded", "ceiling": ceiling, "service": service, "ratio_steady": 0.361}
    throughput = {"backends": {"embedded": embedded}}
    alone = bench.summary_rows({"cpu": {"figures": cpu}})
    both = bench.summary_rows({"cpu": {"figures": cpu}, "throughput": {"figures": throughput}})

    [row] = [row for row in alone if row["section"] == "cpu"]
    assert row["value"].startswith("0.53 beyond start-up (0.77 with")
    assert row["met"] is False
    [row] = [row for row in both if row["section"] == "cpu"]
    assert row["value"].startswith("0.53 beyond start-up = 2.6 x the bare aiohttp loop's 0.21 (0.77 with")
    assert "info" not in row["value"]  # a record from before the row at info existed

    at_info = cpu | {"cpu_s_per_1000_requests_beyond_startup_at_info": 0.6}
    logged = bench.summary_rows({"cpu": {"figures": at_info}})
    [row] = [row for row in logged if row["section"] == "cpu"]
    assert "; at the default log level, info, 0.60 beyond start-up)" in row["value"]
    assert row["met"] is False


def test_the_throughput_row_gives_the_median_pair_and_the_spread(bench: ModuleType) -> None:
    ceiling = {"steady_rate": 9596.0}
    service = {"steady_rate": 2400.0, "requests": 5000}
    pairs = {"ratio_steady": 0.25, "ratios_steady": [0.23, 0.25, 0.26]}
    embedded = {"label": "embedded", "ceiling": ceiling, "service": service} | pairs
    [row] = bench.summary_rows({"throughput": {"figures": {"backends": {"embedded": embedded}}}})
    assert row["value"] == (
        "2400 req/s = 0.25 x a bare aiohttp loop (9596 req/s), "
        "the median of 3 pairs (0.23-0.26); 5000 requests"
    )
    assert row["met"] is True

    single = embedded | {"ratio_steady": 0.24, "ratios_steady": [0.24]}
    [row] = bench.summary_rows({"throughput": {"figures": {"backends": {"embedded": single}}}})
    assert "median" not in row["value"]
    assert row["met"] is False


def _frame(function: str, path: str, time: float, *children: dict[str, object]) -> dict[str, object]:
    return {
        "function": function,
        "file_path": path,
        "file_path_short": path,
        "time": time,
        "children": list(children),
    }


def test_the_cpu_breakdown_takes_uvloop_s_hidden_wait_off_the_event_loop() -> None:
    spec = importlib.util.spec_from_file_location("bench_cpu_profile", ROOT / "bench" / "cpu_profile.py")
    assert spec is not None
    assert spec.loader is not None
    profile = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = profile
    spec.loader.exec_module(profile)
    lib = "/v/lib/python3.11"
    # 3 s of wall-clock samples: 2 s in the loop's own frame (uvloop: its wait and its work), 1 s in
    # aiohttp. The main thread used 1.5 s of CPU, so 1.5 s of the loop's 2 s were the wait.
    client = _frame("_request", f"{lib}/site-packages/aiohttp/client.py", 1.0)
    loop = _frame("run", f"{lib}/asyncio/runners.py", 3.0, client)
    stats = {"process_cpu_s": 1.5, "main_thread_cpu_s": 1.5, "duration_s": 3.0, "samples": 3000}

    result = profile.breakdown({"root_frame": loop}, stats)

    assert result["main_thread_idle_s"] == 1.5
    assert result["main_thread_busy_s"] == 1.5
    assert result["shares"][profile.LOOP] == round(0.5 / 1.5, 4)
    assert result["shares"]["aiohttp (client)"] == round(1.0 / 1.5, 4)
