"""The rate rows of `make bench`: against a simulator enforcing the limit R the orchestrator is configured
with, the rate it achieves and the share of its calls throttled, over several runs (min / median /
max), next to a naive client measured in the same run.

Every run gets a fresh simulator (`orchestrator simulate --rate-limit R --rate-period 1 --latency 0.02
--latency-jitter 0.01 --seed 1`). The orchestrator is driven through its CLI in a temporary directory, as
a user would: `orchestrator enqueue --file ids.txt`, then `orchestrator run --until-idle` (timed). The
baseline is `python bench/rate.py naive ...`, a client written here (not in the product): aiohttp with
the same concurrency, no rate limiter, blind retries of 429/5xx/lost connections after 2**attempt
seconds (Retry-After honoured, as urllib3 does) up to 5 times. What happened is read back from the
simulator (`GET /_sim/stats`), never from the clients; peak RSS and CPU time come from `wait4`.

    .venv/bin/python bench/rate.py naive --url URL --ids FILE --report OUT.json   # the baseline alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    CONCURRENCY,
    CREATE_PATH,
    PY,
    RATE_LATENCY,
    BenchError,
    Context,
    Finished,
    Section,
    SimulatorProcess,
    bench_command,
    bin_path,
    clean_env,
    commands_text,
    enqueue,
    fetch_token,
    log_errors,
    platform_headers,
    run_measured,
    service_env,
    simulator,
    spread,
    tail,
)

TARGET_RATIO = 0.95
MAX_THROTTLED = 0.01
REPEATS = 5  # orchestrator runs per gated rate (2 with --quick)


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
    run: int  # 1, 2, ... among the repeats of this scenario and client
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
        made: list[int] = sorted(int(b["created"]) for b in self.stats["batches"])
        if len(made) < 2 or made[-1] == made[0]:
            return 0.0
        return (len(made) - 1) / ((made[-1] - made[0]) / 1000.0)

    @property
    def lead_in(self) -> float:
        """Seconds from starting the client to the first batch (imports, set-up, token, first call)."""
        made = [int(b["created"]) for b in self.stats["batches"]]
        return min(made) / 1000.0 - self.started_at if made else 0.0

    @property
    def lead_out(self) -> float:
        """Seconds from the last batch to the client's exit (idle detection, shutdown)."""
        made = [int(b["created"]) for b in self.stats["batches"]]
        return self.ended_at - max(made) / 1000.0 if made else 0.0

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

    def figures(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "run": self.run,
            "requests": self.scenario.count,
            "created": self.distinct,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "wall_s": round(self.wall, 3),
            "steady_rate": round(self.steady_rate, 2),
            "steady_rate_x_r": round(self.steady_rate / self.scenario.rate, 4),
            "wall_rate": round(self.wall_rate, 2),
            "platform_calls": self.platform_calls,
            "throttled": self.throttled,
            "throttled_fraction": round(self.throttled_fraction, 5),
            "max_calls_in_1s": self.max_per_second,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "cpu_s": round(self.cpu_s, 3),
            "passes": not self.shortfalls() if self.scenario.gated else None,
            "notes": self.notes,
        }


# -- the two clients under test ----------------------------------------------------------------


def _dataset_ids(scenario: Scenario, run: int) -> list[str]:
    return [f"bench-{scenario.name}-{scenario.rate}-{run}-{index:06d}" for index in range(scenario.count)]


def _timeout(scenario: Scenario) -> float:
    return 60.0 + 4.0 * scenario.count / scenario.rate


def _failed(what: str, done: Finished, timeout: float, err: Path) -> BenchError:
    why = f"timed out after {timeout:.0f} s" if done.timed_out else f"exited {done.exit_code}"
    return BenchError(f"{what} {why}; its stderr ends with:\n{tail(err)}")


def run_orchestrator(scenario: Scenario, run: int, workdir: Path, sim: SimulatorProcess) -> Outcome:
    ids = workdir / "ids.txt"
    ids.write_text("\n".join(_dataset_ids(scenario, run)) + "\n", encoding="utf-8")
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
    enqueue(env, workdir, ids, timeout=120)
    out, err = workdir / "run.out", workdir / "run.err"
    argv = [bin_path("orchestrator"), "run", "--until-idle"]
    done = run_measured(argv, cwd=workdir, env=env, out=out, err=err, timeout=_timeout(scenario))
    if done.timed_out or done.exit_code != 0:
        raise _failed("orchestrator run --until-idle", done, _timeout(scenario), err)
    log = err.read_text(encoding="utf-8", errors="replace")
    notes = {
        "pauses": log.count('"limiter.paused"'),
        "rate_decreases": log.count('"limiter.rate_decreased"'),
        "errors_logged": log_errors(err),
    }
    return _outcome(scenario, "orchestrator", run, done, sim.stats(), notes)


def run_naive(scenario: Scenario, run: int, workdir: Path, sim: SimulatorProcess) -> Outcome:
    ids = workdir / "ids.txt"
    ids.write_text("\n".join(_dataset_ids(scenario, run)) + "\n", encoding="utf-8")
    report = workdir / "naive.json"
    out, err = workdir / "naive.out", workdir / "naive.err"
    argv = [sys.executable, str(Path(__file__).resolve()), "naive", "--url", sim.url, "--ids", str(ids)]
    argv += ["--concurrency", str(CONCURRENCY), "--report", str(report)]
    done = run_measured(argv, cwd=workdir, env=clean_env(), out=out, err=err, timeout=_timeout(scenario))
    if done.timed_out or done.exit_code != 0:
        raise _failed("the naive client", done, _timeout(scenario), err)
    notes: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    return _outcome(scenario, "naive", run, done, sim.stats(), notes)


def _outcome(
    scenario: Scenario, client: str, run: int, done: Finished, stats: dict[str, Any], notes: dict[str, Any]
) -> Outcome:
    return Outcome(
        scenario=scenario,
        client=client,
        run=run,
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
        headers = platform_headers(await fetch_token(session, url))
        create_url = url + CREATE_PATH
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
    parser = argparse.ArgumentParser(prog="bench/rate.py naive")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    ids = [line.strip() for line in Path(args.ids).read_text(encoding="utf-8").splitlines() if line.strip()]
    outcomes = asyncio.run(naive_client(args.url, ids, args.concurrency))
    Path(args.report).write_text(json.dumps(outcomes), encoding="utf-8")
    return 0


# -- the section -------------------------------------------------------------------------------


def scenarios(quick: bool) -> list[Scenario]:
    scale = 3 if quick else 1
    return [
        Scenario("rate-held", 50, 750 // scale),
        Scenario("rate-held", 200, 2400 // scale),
        Scenario(
            "faults", 100, 500 // scale, ("--error-rate", "0.1", "--drop-after-rate", "0.05"), gated=False
        ),
    ]


def run_one(scenario: Scenario, client: str, run: int) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"bench-{client}-") as tmp:
        workdir = Path(tmp)
        with simulator(workdir, scenario.rate, scenario.sim_flags) as sim:
            runner = run_orchestrator if client == "orchestrator" else run_naive
            return runner(scenario, run, workdir, sim)


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a" if a == 0 else "inf"
    return f"{a / b:.2f}"


def table(outcomes: list[Outcome]) -> str:
    head = (
        "| scenario | client | run | R/s | N | created | duplicates | missing | wall s | steady rate (x R) "
        "| wall rate (x R) | throttled / calls | max calls in 1 s | peak RSS MB | CPU s |"
    )
    rows = [head, "|" + "---|" * 15]
    for o in outcomes:
        s = o.scenario
        rows.append(
            f"| {s.name} | {o.client} | {o.run} | {s.rate} | {s.count} | {o.distinct} | {o.duplicates} "
            f"| {o.missing} | {o.wall:.1f} | {o.steady_rate:.1f} ({o.steady_rate / s.rate:.3f}) "
            f"| {o.wall_rate:.1f} ({o.wall_rate / s.rate:.3f}) "
            f"| {o.throttled}/{o.platform_calls} ({_pct(o.throttled_fraction)}) "
            f"| {o.max_per_second} | {o.peak_rss_mb:.0f} | {o.cpu_s:.1f} |"
        )
    return "\n".join(rows)


def repeats_summary(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per gated rate, over the orchestrator's runs: min / median / max of the rate (x R) and of the
    throttled share, and how many runs met the bar."""
    found: dict[str, dict[str, Any]] = {}
    for scenario in dict.fromkeys(o.scenario for o in outcomes if o.scenario.gated):
        runs = [o for o in outcomes if o.scenario == scenario and o.client == "orchestrator"]
        found[str(scenario.rate)] = {
            "rate": scenario.rate,
            "requests_per_run": scenario.count,
            "runs": len(runs),
            "steady_rate_x_r": spread([o.steady_rate / scenario.rate for o in runs]),
            "steady_rate": spread([o.steady_rate for o in runs]),
            "throttled_fraction": spread([o.throttled_fraction for o in runs]),
            "passes": sum(1 for o in runs if not o.shortfalls()),
            "throttled_under_1pct": sum(1 for o in runs if o.throttled_fraction < MAX_THROTTLED),
        }
    return found


def repeats_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| R/s | N per run | runs | rate x R min / median / max | throttled min / median / max "
        "| runs < 1 % throttled | runs meeting the bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        r, t = s["steady_rate_x_r"], s["throttled_fraction"]
        rows.append(
            f"| {s['rate']} | {s['requests_per_run']} | {s['runs']} "
            f"| {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f} "
            f"| {_pct(t['min'])} / {_pct(t['median'])} / {_pct(t['max'])} "
            f"| {s['throttled_under_1pct']}/{s['runs']} | {s['passes']}/{s['runs']} |"
        )
    return "\n".join(rows)


def _median_run(runs: list[Outcome]) -> Outcome:
    ordered = sorted(runs, key=lambda o: o.steady_rate)
    return ordered[(len(ordered) - 1) // 2]


def comparison(outcomes: list[Outcome]) -> str:
    head = (
        "| scenario | R/s | steady rate orch/naive | throttled fraction orch/naive "
        "| duplicates orch vs naive | peak RSS orch/naive | acceptance (orchestrator, this run) |"
    )
    rows = [head, "|" + "---|" * 7]
    for s in dict.fromkeys(o.scenario for o in outcomes):
        orchs = [o for o in outcomes if o.scenario == s and o.client == "orchestrator"]
        naives = [o for o in outcomes if o.scenario == s and o.client == "naive"]
        if not orchs or not naives:
            continue
        orch, naive = _median_run(orchs), naives[0]
        if s.gated:
            missed = orch.shortfalls()
            verdict = "MISS: " + "; ".join(missed) if missed else "PASS"
        else:
            verdict = "not gated (faults)" + (", no duplicates" if orch.duplicates == 0 else ", DUPLICATES")
        which = f" (run {orch.run}, the median of {len(orchs)})" if len(orchs) > 1 else ""
        rows.append(
            f"| {s.name} | {s.rate} | {_ratio(orch.steady_rate, naive.steady_rate)}{which} "
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
            f"- {o.scenario.name} R={o.scenario.rate} {o.client} run {o.run}: {extra}; early retries "
            f"{s['early_retries']}; faults: {faults}; calls: {calls}"
        )
    return "\n".join(lines)


METHOD = f"""Against a fresh `orchestrator simulate --rate-limit R --rate-period 1 {" ".join(RATE_LATENCY)}
--seed 1` per run, N distinct dataset ids: `orchestrator enqueue --file ids.txt`, then `orchestrator run
--until-idle` with `ORCH_LIMITS__RATE=R ORCH_LIMITS__PERIOD=1`, concurrency {CONCURRENCY}, SQLite queue and
store. The orchestrator runs {REPEATS} times per gated R (2 with `--quick`); the naive baseline
(`bench/rate.py naive`: aiohttp, a semaphore of {CONCURRENCY}, no limiter, blind retries) once per row.
*Steady rate* = (batches - 1) / (last - first `created` stamp of the simulator); *throttled* = 429s /
Platform calls; *max calls in 1 s* = most arrivals in any sliding second; duplicates = batches beyond
the first per dataset (and per externalId); peak RSS and CPU from `wait4`. The bar: steady rate >=
{TARGET_RATIO:.0%} of R, < {MAX_THROTTLED:.0%} of calls throttled, no duplicate, every request created. The
`faults` row adds `--error-rate 0.1 --drop-after-rate 0.05` and is not held to the bar."""


def section(ctx: Context) -> Section:
    repeats = 2 if ctx.quick else REPEATS
    outcomes: list[Outcome] = []
    for scenario in scenarios(ctx.quick):
        runs = repeats if scenario.gated else 1
        for client, times in (("orchestrator", runs), ("naive", 1)):
            for run in range(1, times + 1):
                print(f"  {scenario.name} R={scenario.rate}/s N={scenario.count} {client} run {run} ...")
                o = run_one(scenario, client, run)
                print(
                    f"    {o.distinct} created in {o.wall:.1f} s, steady {o.steady_rate:.1f}/s "
                    f"({o.steady_rate / scenario.rate:.3f} x R), throttled {o.throttled}/{o.platform_calls}, "
                    f"duplicates {o.duplicates}",
                    flush=True,
                )
                outcomes.append(o)
    summary = repeats_summary(outcomes)
    commands = [
        bench_command("rate", ctx.quick),
        "# one run by hand, R=200:",
        ".venv/bin/orchestrator simulate --port 8081 --rate-limit 200 --rate-period 1 "
        f"{' '.join(RATE_LATENCY)} --seed 1 &",
        "ORCH_LIMITS__RATE=200 ORCH_LIMITS__PERIOD=1 ORCH_AEP__CATALOG_SETTLE=2 "
        ".venv/bin/orchestrator enqueue --file ids.txt  # then, same settings: orchestrator run --until-idle",
        f"{PY} bench/rate.py naive --url http://127.0.0.1:8081 --ids ids.txt --report naive.json",
    ]
    text = "\n\n".join(
        [
            METHOD,
            "Rate held, over the orchestrator's runs:",
            repeats_table(summary),
            "Every run:",
            table(outcomes),
            "Orchestrator against the baseline (same run, same simulator settings):",
            comparison(outcomes),
            "What the simulator saw:",
            details(outcomes),
            commands_text(commands),
        ]
    )
    scenario_figures = []
    for scenario in dict.fromkeys(o.scenario for o in outcomes):
        scenario_figures.append(
            {
                "name": scenario.name,
                "rate": scenario.rate,
                "requests": scenario.count,
                "simulator_flags": list(scenario.sim_flags),
                "gated": scenario.gated,
                "runs": [o.figures() for o in outcomes if o.scenario == scenario],
            }
        )
    figures = {"repeats": summary, "scenarios": scenario_figures, "target": _target()}
    return Section(
        "rate", "Rate held against the simulator's limit (R=50, R=200), and faults", text, figures, commands
    )


def _target() -> dict[str, Any]:
    return {"steady_rate_x_r_min": TARGET_RATIO, "throttled_fraction_below": MAX_THROTTLED}


def gated_misses(figures: dict[str, Any]) -> int:
    """How many gated orchestrator runs missed the bar (for --strict)."""
    return sum(s["runs"] - s["passes"] for s in figures.get("repeats", {}).values())


if __name__ == "__main__":
    if sys.argv[1:2] == ["naive"]:
        sys.exit(naive_main(sys.argv[2:]))
    print("usage: bench/rate.py naive --url URL --ids FILE --report OUT.json", file=sys.stderr)
    sys.exit(2)
