"""The scaling row of `make bench`: throughput of 1, 2 and 3 replicas sharing one queue and one store,
against the simulator answering every call after 200 ms with no rate limit, so that AEP's latency,
not the CPU, is what each replica is bound by. Each figure is a ratio to one replica, measured in
the same run.

The replicas are separate `orchestrator run --until-idle` processes on one embedded queue file and one
store: PostgreSQL (a database made for the run and dropped after) when it answers on 127.0.0.1:5432,
else one SQLite file. Throughput is read from the simulator's own record: requests divided by the
time from the first batch made to the last.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # a script's neighbour, not a package
    BenchError,
    Context,
    Section,
    SimulatorProcess,
    bench_command,
    bin_path,
    commands_text,
    postgres_answers,
    scratch_database,
    service_env,
    tail,
)

LATENCY = "0.2"
REPLICAS = (1, 2, 3)


@dataclass
class ScaleOutcome:
    replicas: int
    count: int
    batches: int
    duplicates: int
    seconds: float
    store: str

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def run_replicas(replicas: int, count: int, workdir: Path, store_url: str, store: str) -> ScaleOutcome:
    sim = SimulatorProcess(workdir, 100_000, ("--latency", LATENCY, "--latency-jitter", "0"))
    try:
        sim.wait_ready()
        env = service_env(sim, workdir, STORE__URL=store_url, LIMITS__RATE="100000")
        ids = "\n".join(f"scale-{replicas}-{index:06d}" for index in range(count)) + "\n"
        subprocess.run(  # noqa: S603
            [bin_path("orchestrator"), "enqueue", "--file", "-"],
            input=ids.encode(),
            env=env,
            cwd=workdir,
            check=True,
            capture_output=True,
            timeout=120,
        )
        logs = [workdir / f"replica-{index}.log" for index in range(replicas)]
        procs = [
            subprocess.Popen(  # noqa: S603
                [bin_path("orchestrator"), "run", "--until-idle"],
                env=env,
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
            )
            for log in logs
        ]
        for proc, log in zip(procs, logs, strict=True):
            if proc.wait(timeout=60 + 4 * count / 80) != 0:
                raise BenchError(f"a replica exited with {proc.returncode}:\n{tail(log)}")
        stats = sim.stats()
    finally:
        sim.close()
    made = [batch["created"] for batch in stats["batches"]]
    seconds = (max(made) - min(made)) / 1000 + float(LATENCY) if made else 0.0
    return ScaleOutcome(
        replicas=replicas,
        count=count,
        batches=len(made),
        duplicates=len(stats["duplicate_external_ids"]),
        seconds=seconds,
        store=store,
    )


def scaling(quick: bool) -> list[ScaleOutcome]:
    """1, 2 and 3 replicas, each on a fresh queue, store and simulator."""
    count = 400 if quick else 1200
    outcomes = []
    for replicas in REPLICAS:
        with tempfile.TemporaryDirectory(prefix="orch-scale-") as tmp:
            workdir = Path(tmp)
            if postgres_answers():
                with scratch_database("orch_scale") as url:
                    outcomes.append(run_replicas(replicas, count, workdir, url, "PostgreSQL"))
            else:
                url = f"sqlite:///{workdir}/store.db"
                outcomes.append(run_replicas(replicas, count, workdir, url, "SQLite"))
        print(
            f"  {replicas} replica(s): {outcomes[-1].batches} batches in {outcomes[-1].seconds:.1f} s, "
            f"{outcomes[-1].rate:.1f}/s",
            flush=True,
        )
    return outcomes


def scaling_table(outcomes: list[ScaleOutcome]) -> str:
    base = outcomes[0].rate if outcomes else 0.0
    lines = [
        f"### Scaling: replicas on one queue and one {outcomes[0].store if outcomes else ''} store",
        "",
        f"The simulator answers every call after {float(LATENCY) * 1000:.0f} ms, with no rate limit; each "
        "replica runs 16 calls at a time. Throughput from the simulator's record (first batch to last).",
        "",
        "| replicas | requests | batches | duplicates | seconds | batches/s | x one replica |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        ratio = f"{o.rate / base:.2f}x" if base else "-"
        cells = (o.replicas, o.count, o.batches, o.duplicates, f"{o.seconds:.1f}", f"{o.rate:.1f}", ratio)
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def section(ctx: Context) -> Section:
    rows = scaling(ctx.quick)
    base = rows[0].rate if rows else 0.0
    figures: dict[str, Any] = {
        "latency_s": float(LATENCY),
        "store": rows[0].store if rows else None,
        "rows": [
            asdict(o) | {"rate": round(o.rate, 2), "x_one": round(o.rate / base, 3) if base else None}
            for o in rows
        ],
    }
    commands = [
        bench_command("scaling", ctx.quick),
        f".venv/bin/python bench/scaling.py{' --quick' if ctx.quick else ''}",
    ]
    text = scaling_table(rows).split("\n", 2)[2] + "\n\n" + commands_text(commands)
    title = f"Scaling: replicas on one queue and one {figures['store'] or ''} store"
    return Section("scaling", title, text, figures, commands)


if __name__ == "__main__":
    rows = scaling("--quick" in sys.argv[1:])
    print(scaling_table(rows))
    sys.exit(0 if all(o.duplicates == 0 and o.batches == o.count for o in rows) else 1)
