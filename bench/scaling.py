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

import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # run.py is a script beside this one, not a package
    BenchError,
    SimulatorProcess,
    _bin,
    _tail,
    service_env,
)

LATENCY = "0.2"
REPLICAS = (1, 2, 3)
POSTGRES = ("127.0.0.1", 5432)


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


def _postgres_answers() -> bool:
    try:
        with socket.create_connection(POSTGRES, timeout=1.0):
            return True
    except OSError:
        return False


def _psql(sql: str) -> None:
    subprocess.run(  # noqa: S603 - fixed arguments, a name made here
        [_bin("psql"), "-h", POSTGRES[0], "-U", "postgres", "-d", "test", "-q", "-c", sql],
        check=True,
        capture_output=True,
        timeout=30,
    )


def run_replicas(replicas: int, count: int, workdir: Path, store_url: str, store: str) -> ScaleOutcome:
    sim = SimulatorProcess(workdir, 100_000, ("--latency", LATENCY, "--latency-jitter", "0"))
    try:
        sim.wait_ready()
        env = service_env(sim, workdir, STORE__URL=store_url, LIMITS__RATE="100000")
        ids = "\n".join(f"scale-{replicas}-{index:06d}" for index in range(count)) + "\n"
        subprocess.run(  # noqa: S603
            [_bin("orchestrator"), "enqueue", "--file", "-"],
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
                [_bin("orchestrator"), "run", "--until-idle"],
                env=env,
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
            )
            for log in logs
        ]
        for proc, log in zip(procs, logs, strict=True):
            if proc.wait(timeout=60 + 4 * count / 80) != 0:
                raise BenchError(f"a replica exited with {proc.returncode}:\n{_tail(log)}")
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
            if _postgres_answers():
                database = f"orch_scale_{uuid4().hex[:12]}"
                _psql(f"CREATE DATABASE {database}")
                try:
                    url = f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{database}"
                    outcomes.append(run_replicas(replicas, count, workdir, url, "PostgreSQL"))
                finally:
                    _psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
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


if __name__ == "__main__":
    rows = scaling("--quick" in sys.argv[1:])
    print(scaling_table(rows))
    sys.exit(0 if all(o.duplicates == 0 and o.batches == o.count for o in rows) else 1)
