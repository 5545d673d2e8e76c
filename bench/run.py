"""`make bench`: the rate the orchestrator achieves against the simulator enforcing the same limit, with
the throttled calls, duplicates and memory it costs, next to a naive client measured in the same run.

Every run gets a fresh simulator process (`orchestrator simulate --rate-limit R ...`) on a free local
port. The orchestrator is driven through its CLI in a temporary directory, as a user would:
`orchestrator enqueue --file ids.txt`, then `orchestrator run --until-idle` (timed). The baseline is
`python bench/run.py naive ...`, a client written here (not in the product): aiohttp with the same
concurrency, no rate limiter, blind retries of 429/5xx/lost connections after 2**attempt seconds
(Retry-After honoured, as urllib3 does) up to 5 times. What happened is read back from the simulator
(`GET /_sim/stats`), never from the clients; peak RSS and CPU time come from `wait4` on each client.

    .venv/bin/python bench/run.py            # the full set (about 2 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # a third of the requests, a smoke test

The results go to var/bench/RESULTS.md (untracked), so a run leaves the working tree clean. The tracked
record, bench/RESULTS.md, changes only when asked: `make bench BENCH_OUT=bench/RESULTS.md` (or
`--out bench/RESULTS.md`); the text above its marker line is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECORD = HERE / "RESULTS.md"  # the tracked record, rewritten only with --out bench/RESULTS.md
RESULTS = HERE.parent / "var" / "bench" / "RESULTS.md"  # where a run writes by default (var/ is ignored)
MARKER = "<!-- Everything below this line is written by bench/run.py; edit above it. -->"

CLIENT_ID = "sim-client"
CLIENT_SECRET = "sim-secret"  # noqa: S105 (the simulator's public demo credential)
ORG_ID = "SIM0RG0000000000000000@AdobeOrg"
CONCURRENCY = 16  # ORCH_LIMITS__CONCURRENCY's default, given to the baseline too
LATENCY = ("--latency", "0.02", "--latency-jitter", "0.01")
TARGET_RATIO = 0.95
MAX_THROTTLED = 0.01

DEFAULT_HEADER = """# Benchmark results

`make bench` (`.venv/bin/python bench/run.py`) measures the rate the orchestrator achieves against the
local AEP simulator enforcing the same limit it is configured with, and compares it with a baseline
client measured in the same run, against the same simulator settings.
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: int
    count: int
    sim_flags: tuple[str, ...] = ()
    gated: bool = True  # held to the acceptance bar (>= 95 % of R, < 1 % throttled)


@dataclass
class Outcome:
    scenario: Scenario
    client: str  # "orchestrator" or "naive"
    wall: float
    exit_code: int
    peak_rss_mb: float
    cpu_s: float
    stats: dict[str, Any]
    started_at: float  # Unix seconds, when the client process was started
    ended_at: float  # Unix seconds, when it had exited
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return len(self.stats["batches"])

    @property
    def distinct(self) -> int:
        return len(self.stats["batches_per_dataset"])

    @property
    def duplicates(self) -> int:
        # Every dataset id is enqueued once, so each batch beyond the first for a dataset is a duplicate;
        # for the orchestrator the simulator's per-externalId count must agree.
        by_dataset = sum(int(n) - 1 for n in self.stats["batches_per_dataset"].values())
        by_external = sum(int(n) - 1 for n in self.stats["batches_per_external_id"].values())
        return max(by_dataset, by_external)

    @property
    def missing(self) -> int:
        return self.scenario.count - self.distinct

    @property
    def steady_rate(self) -> float:
        """Batches per second between the first and the last creation, as the simulator stamped them."""
        stamps: list[int] = sorted(int(b["created"]) for b in self.stats["batches"])
        if len(stamps) < 2 or stamps[-1] == stamps[0]:
            return 0.0
        return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000.0)

    @property
    def lead_in(self) -> float:
        """Seconds from starting the client to the first batch (imports, set-up, token, first call)."""
        stamps = [int(b["created"]) for b in self.stats["batches"]]
        return min(stamps) / 1000.0 - self.started_at if stamps else 0.0

    @property
    def lead_out(self) -> float:
        """Seconds from the last batch to the client's exit (idle detection, shutdown)."""
        stamps = [int(b["created"]) for b in self.stats["batches"]]
        return self.ended_at - max(stamps) / 1000.0 if stamps else 0.0

    @property
    def wall_rate(self) -> float:
        return self.distinct / self.wall if self.wall > 0 else 0.0

    @property
    def platform_calls(self) -> int:
        return int(self.stats["platform_calls"])

    @property
    def throttled(self) -> int:
        return int(self.stats["throttled"])

    @property
    def throttled_fraction(self) -> float:
        return self.throttled / self.platform_calls if self.platform_calls else 0.0

    @property
    def max_per_second(self) -> int:
        return int(self.stats["max_calls_per_second"])

    def shortfalls(self) -> list[str]:
        """Why the acceptance bar is missed (empty when it is met)."""
        found = []
        ratio = self.steady_rate / self.scenario.rate
        if ratio < TARGET_RATIO:
            found.append(f"rate {ratio:.3f} x R < {TARGET_RATIO}")
        if self.throttled_fraction >= MAX_THROTTLED:
            found.append(f"throttled {_pct(self.throttled_fraction)} >= {MAX_THROTTLED:.0%}")
        if self.duplicates:
            found.append(f"{self.duplicates} duplicates")
        if self.missing:
            found.append(f"{self.missing} not created")
        return found


class BenchError(Exception):
    pass


# -- processes ---------------------------------------------------------------------------------


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"cannot find the {name!r} command next to {sys.executable} or on PATH")
    return found


def _clean_env() -> dict[str, str]:
    """The caller's environment without any ORCH_ setting (a stray ORCH_CONFIG would change the run)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("ORCH_")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass
class Finished:
    exit_code: int
    wall: float
    peak_rss_mb: float
    cpu_s: float
    timed_out: bool
    started_at: float
    ended_at: float


def _run_measured(
    argv: list[str], *, cwd: Path, env: dict[str, str], out: Path, err: Path, timeout: float
) -> Finished:
    """Run a child to the end; its wall time, and its own peak RSS and CPU time from wait4 (not the
    simulator's, which is still running)."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        started_at = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)  # noqa: S603
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux.
    return Finished(
        exit_code=proc.returncode,
        wall=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out.is_set(),
        started_at=started_at,
        ended_at=started_at + wall,
    )


class SimulatorProcess:
    """`orchestrator simulate` on a free port, until `close()`."""

    def __init__(self, workdir: Path, rate: int, flags: tuple[str, ...]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "simulator.log"
        argv = [_bin("orchestrator"), "simulate", "--port", str(self.port), "--rate-limit", str(rate)]
        argv += ["--rate-period", "1", *LATENCY, "--seed", "1", *flags]
        env = _clean_env() | {"ORCH_LOG__LEVEL": "warning"}
        with self.log.open("wb") as sink:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603
                argv, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the simulator exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                self.stats()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise BenchError(f"the simulator did not answer on {self.url} within {timeout:.0f} s")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=10) as resp:  # noqa: S310 (local)
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def close(self) -> None:
        _stop(self.proc)


# -- the two clients under test ----------------------------------------------------------------


def _dataset_ids(scenario: Scenario) -> list[str]:
    return [f"bench-{scenario.name}-{scenario.rate}-{index:06d}" for index in range(scenario.count)]


def _timeout(scenario: Scenario) -> float:
    return 60.0 + 4.0 * scenario.count / scenario.rate


def service_env(sim: SimulatorProcess, workdir: Path, **settings: str) -> dict[str, str]:
    """The environment of an orchestrator run against `sim`, its queue in `workdir`; `settings` are
    more ORCH_ variables (names without the prefix)."""
    return (
        _clean_env()
        | {
            "ORCH_AEP__BASE_URL": sim.url,
            "ORCH_AEP__IMS_URL": sim.url,
            "ORCH_AEP__CLIENT_ID": CLIENT_ID,
            "ORCH_AEP__CLIENT_SECRET": CLIENT_SECRET,
            "ORCH_AEP__ORG_ID": ORG_ID,
            "ORCH_QUEUE__URL": f"sqlite:///{workdir / 'queue.db'}",
            "ORCH_HTTP__PORT": "0",
            "ORCH_LOG__LEVEL": "warning",
        }
        | {f"ORCH_{name}": value for name, value in settings.items()}
    )


def run_orchestrator(scenario: Scenario, workdir: Path, sim: SimulatorProcess) -> Outcome:
    ids = workdir / "ids.txt"
    ids.write_text("\n".join(_dataset_ids(scenario)) + "\n", encoding="utf-8")
    env = service_env(
        sim,
        workdir,
        LIMITS__RATE=str(scenario.rate),
        LIMITS__PERIOD="1",
        LIMITS__CONCURRENCY=str(CONCURRENCY),
        STORE__URL=f"sqlite:///{workdir / 'orchestrator.db'}",
        # The simulator's catalog lists a batch at once (no --catalog-lag here): a 2 s settle window
        # is ample, where the 30 s default would measure the window rather than the service.
        AEP__CATALOG_SETTLE="2",
    )
    orchestrator = _bin("orchestrator")
    enqueue = subprocess.run(  # noqa: S603
        [orchestrator, "enqueue", "--file", str(ids)], cwd=workdir, env=env, capture_output=True, timeout=120
    )
    if enqueue.returncode != 0:
        tail = enqueue.stderr.decode(errors="replace")[-3000:]
        raise BenchError(f"orchestrator enqueue exited with {enqueue.returncode}:\n{tail}")
    out, err = workdir / "run.out", workdir / "run.err"
    done = _run_measured(
        [orchestrator, "run", "--until-idle"],
        cwd=workdir,
        env=env,
        out=out,
        err=err,
        timeout=_timeout(scenario),
    )
    if done.timed_out or done.exit_code != 0:
        why = f"timed out after {_timeout(scenario):.0f} s" if done.timed_out else f"exited {done.exit_code}"
        raise BenchError(f"orchestrator run --until-idle {why}; its stderr ends with:\n{_tail(err)}")
    log = err.read_text(encoding="utf-8", errors="replace")
    notes = {
        "pauses": log.count('"limiter.paused"'),
        "rate_decreases": log.count('"limiter.rate_decreased"'),
    }
    return _outcome(scenario, "orchestrator", done, sim.stats(), notes)


def run_naive(scenario: Scenario, workdir: Path, sim: SimulatorProcess) -> Outcome:
    ids = workdir / "ids.txt"
    ids.write_text("\n".join(_dataset_ids(scenario)) + "\n", encoding="utf-8")
    report = workdir / "naive.json"
    out, err = workdir / "naive.out", workdir / "naive.err"
    argv = [sys.executable, str(Path(__file__).resolve()), "naive", "--url", sim.url, "--ids", str(ids)]
    argv += ["--concurrency", str(CONCURRENCY), "--report", str(report)]
    done = _run_measured(argv, cwd=workdir, env=_clean_env(), out=out, err=err, timeout=_timeout(scenario))
    if done.timed_out or done.exit_code != 0:
        why = f"timed out after {_timeout(scenario):.0f} s" if done.timed_out else f"exited {done.exit_code}"
        raise BenchError(f"the naive client {why}; its stderr ends with:\n{_tail(err)}")
    notes: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    return _outcome(scenario, "naive", done, sim.stats(), notes)


def _outcome(
    scenario: Scenario, client: str, done: Finished, stats: dict[str, Any], notes: dict[str, Any]
) -> Outcome:
    return Outcome(
        scenario=scenario,
        client=client,
        wall=done.wall,
        exit_code=done.exit_code,
        peak_rss_mb=done.peak_rss_mb,
        cpu_s=done.cpu_s,
        stats=stats,
        started_at=done.started_at,
        ended_at=done.ended_at,
        notes=notes,
    )


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({413, 429, 503})  # the ones urllib3 honours Retry-After for
MAX_RETRIES = 5


def _retry_delay(attempt: int, status: int | None, retry_after: str | None) -> float:
    if status in RETRY_AFTER_STATUSES and retry_after:
        value = retry_after.strip()
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            pass
    return float(2**attempt)


async def naive_client(url: str, dataset_ids: list[str], concurrency: int) -> dict[str, int]:
    """The baseline: what a script over a synchronous SDK with a thread pool does, in asyncio. A worker
    holds its slot while it sleeps before a retry, as a pool thread would."""
    import aiohttp

    outcomes = {"created": 0, "failed": 0, "gave_up": 0, "attempts": 0}
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        form = {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "openid",
        }
        async with session.post(url + "/ims/token/v3", data=form) as resp:
            resp.raise_for_status()
            token = (await resp.json())["access_token"]
        headers = {
            "Authorization": f"Bearer {token}",
            "x-api-key": CLIENT_ID,
            "x-gw-ims-org-id": ORG_ID,
            "x-sandbox-name": "prod",
            "Accept": "application/json",
        }
        create_url = url + "/data/foundation/import/batches"
        slots = asyncio.Semaphore(concurrency)

        async def one(dataset_id: str) -> str:
            body = {"datasetId": dataset_id, "inputFormat": {"format": "json"}}
            async with slots:
                for attempt in range(MAX_RETRIES + 1):
                    outcomes["attempts"] += 1
                    status: int | None = None
                    retry_after: str | None = None
                    try:
                        async with session.post(create_url, json=body, headers=headers) as resp:
                            await resp.read()
                            status, retry_after = resp.status, resp.headers.get("Retry-After")
                    except (aiohttp.ClientError, TimeoutError):
                        status = None  # a lost connection: retried blindly too
                    if status == 201:
                        return "created"
                    if status is not None and status not in RETRY_STATUSES:
                        return "failed"
                    if attempt < MAX_RETRIES:
                        await asyncio.sleep(_retry_delay(attempt, status, retry_after))
                return "gave_up"

        for result in await asyncio.gather(*(one(d) for d in dataset_ids)):
            outcomes[result] += 1
    return outcomes


def naive_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py naive")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    ids = [line.strip() for line in Path(args.ids).read_text(encoding="utf-8").splitlines() if line.strip()]
    outcomes = asyncio.run(naive_client(args.url, ids, args.concurrency))
    Path(args.report).write_text(json.dumps(outcomes), encoding="utf-8")
    return 0


# -- the run and its report --------------------------------------------------------------------


def scenarios(quick: bool) -> list[Scenario]:
    scale = 3 if quick else 1
    return [
        Scenario("rate-held", 50, 750 // scale),
        Scenario("rate-held", 200, 2400 // scale),
        Scenario(
            "faults", 100, 500 // scale, ("--error-rate", "0.1", "--drop-after-rate", "0.05"), gated=False
        ),
    ]


def run_one(scenario: Scenario, client: str) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"bench-{client}-") as tmp:
        workdir = Path(tmp)
        sim = SimulatorProcess(workdir, scenario.rate, scenario.sim_flags)
        try:
            sim.wait_ready()
            runner = run_orchestrator if client == "orchestrator" else run_naive
            return runner(scenario, workdir, sim)
        finally:
            sim.close()


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a" if a == 0 else "inf"
    return f"{a / b:.2f}"


def table(outcomes: list[Outcome]) -> str:
    head = (
        "| scenario | client | R/s | N | created | duplicates | missing | wall s | steady rate (x R) "
        "| wall rate (x R) | throttled / calls | max calls in 1 s | peak RSS MB | CPU s |"
    )
    rows = [head, "|" + "---|" * 14]
    for o in outcomes:
        s = o.scenario
        rows.append(
            f"| {s.name} | {o.client} | {s.rate} | {s.count} | {o.distinct} | {o.duplicates} | {o.missing} "
            f"| {o.wall:.1f} | {o.steady_rate:.1f} ({o.steady_rate / s.rate:.3f}) "
            f"| {o.wall_rate:.1f} ({o.wall_rate / s.rate:.3f}) "
            f"| {o.throttled}/{o.platform_calls} ({_pct(o.throttled_fraction)}) "
            f"| {o.max_per_second} | {o.peak_rss_mb:.0f} | {o.cpu_s:.1f} |"
        )
    return "\n".join(rows)


def comparison(outcomes: list[Outcome]) -> str:
    head = (
        "| scenario | R/s | steady rate orch/naive | throttled fraction orch/naive "
        "| duplicates orch vs naive | peak RSS orch/naive | acceptance (orchestrator) |"
    )
    rows = [head, "|" + "---|" * 7]
    pairs: dict[Scenario, dict[str, Outcome]] = {}
    for o in outcomes:
        pairs.setdefault(o.scenario, {})[o.client] = o
    for s, pair in pairs.items():
        orch, naive = pair.get("orchestrator"), pair.get("naive")
        if orch is None or naive is None:
            continue
        if s.gated:
            missed = orch.shortfalls()
            verdict = "MISS: " + "; ".join(missed) if missed else "PASS"
        else:
            verdict = "not gated (faults)" + (", no duplicates" if orch.duplicates == 0 else ", DUPLICATES")
        rows.append(
            f"| {s.name} | {s.rate} | {_ratio(orch.steady_rate, naive.steady_rate)} "
            f"| {_ratio(orch.throttled_fraction, naive.throttled_fraction)} "
            f"({_pct(orch.throttled_fraction)} vs {_pct(naive.throttled_fraction)}) "
            f"| {orch.duplicates} vs {naive.duplicates} "
            f"| {_ratio(orch.peak_rss_mb, naive.peak_rss_mb)} | {verdict} |"
        )
    return "\n".join(rows)


def details(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        s = o.stats
        faults = ", ".join(f"{k} {v}" for k, v in sorted(s["faults"].items())) or "none"
        calls = "; ".join(
            f"{endpoint} " + ", ".join(f"{status}: {n}" for status, n in by_status.items())
            for endpoint, by_status in s["calls"].items()
        )
        extra = ", ".join(f"{k} {v}" for k, v in o.notes.items())
        extra += f"; first batch {o.lead_in:.2f} s after start, exit {o.lead_out:.2f} s after the last"
        lines.append(
            f"- {o.scenario.name} R={o.scenario.rate} {o.client}: {extra}; early retries "
            f"{s['early_retries']}; faults: {faults}; calls: {calls}"
        )
    return "\n".join(lines)


def write_results(text: str, path: Path) -> None:
    """Write the report below the marker line of `path`, keeping what is above it (or a default header
    for a new file)."""
    header = DEFAULT_HEADER
    if path.exists():
        existing = path.read_text(encoding="utf-8")
        if MARKER in existing:
            header = existing.split(MARKER, 1)[0].rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{header}\n{MARKER}\n\n{text}\n", encoding="utf-8")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a third of the requests (smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        metavar="PATH",
        help=f"where the results go (default {_shown(RESULTS)}; {_shown(RECORD)} updates the tracked record)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a gated scenario misses the bar")
    return parser.parse_args(argv)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    if argv[:1] == ["naive"]:
        return naive_main(argv[1:])
    args = parse_args(argv)

    # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwind through the finally
    # blocks that stop the simulator and the client under test.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also under make
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    outcomes: list[Outcome] = []
    try:
        for scenario in scenarios(args.quick):
            for client in ("orchestrator", "naive"):
                print(f"running {scenario.name} R={scenario.rate}/s N={scenario.count} {client} ...")
                o = run_one(scenario, client)
                print(
                    f"  {o.distinct} created in {o.wall:.1f} s, steady {o.steady_rate:.1f}/s, "
                    f"throttled {o.throttled}/{o.platform_calls}, duplicates {o.duplicates}",
                    flush=True,
                )
                outcomes.append(o)
        from scaling import scaling, scaling_table  # beside this script; it imports from this one

        print("running the scaling row: 1, 2 and 3 replicas ...")
        scaled = scaling_table(scaling(args.quick))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 1
    total = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    command = ".venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
    machine = (
        f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; 1-minute load average {load_before:.2f} before the run, "
        f"{load_after:.2f} after (other work on the machine skews the figures)"
    )
    report = "\n\n".join(
        [
            f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"- command: `{command}` ({total:.0f} s in all)\n- machine: {machine}\n"
            f"- simulator: `--rate-limit R --rate-period 1 {' '.join(LATENCY)} --seed 1`, a fresh process "
            f"per row; concurrency {CONCURRENCY} for both clients",
            "### Per run",
            table(outcomes),
            "### Orchestrator against the baseline (same run, same simulator settings)",
            f"Acceptance, for the rate-held rows: steady rate >= {TARGET_RATIO:.0%} of R, "
            f"< {MAX_THROTTLED:.0%} of calls throttled, no duplicate, every request created.",
            comparison(outcomes),
            "### What the simulator saw",
            details(outcomes),
            scaled,
        ]
    )
    print()
    print(report)
    if not args.no_write:
        write_results(report, args.out)
        print(f"\nwritten to {_shown(args.out)}")
    missed = [o for o in outcomes if o.client == "orchestrator" and o.scenario.gated and o.shortfalls()]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
