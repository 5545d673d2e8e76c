"""What every section of `make bench` shares: the simulator process, the service's environment, a child
process run to its end (or stopped) and measured with `wait4`, scratch PostgreSQL databases and RabbitMQ
queues, the machine's description, and the shape of a section's result.

Figures are never taken from the clients under test: what was created, when and how often it was
throttled comes from the simulator (`GET /_sim/stats`); CPU time and peak RSS come from the kernel
(`wait4`'s rusage, `/proc/<pid>/status`).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = ".venv/bin/python"  # how commands are shown to the reader (relative to the repository)

CLIENT_ID = "sim-client"
CLIENT_SECRET = "sim-secret"  # noqa: S105 (the simulator's public demo credential)
ORG_ID = "SIM0RG0000000000000000@AdobeOrg"
# The simulator's client-credentials form, and the path of a create.
TOKEN_FORM = {
    "grant_type": "client_credentials",
    "client_id": CLIENT_ID,
    "client_secret": CLIENT_SECRET,
    "scope": "openid",
}
CREATE_PATH = "/data/foundation/import/batches"
CONCURRENCY = 16  # ORCH_LIMITS__CONCURRENCY's default, given to every client measured beside it
RATE_LATENCY = ("--latency", "0.02", "--latency-jitter", "0.01")  # the rate rows' simulated AEP
NO_LATENCY = ("--latency", "0", "--latency-jitter", "0")
NO_LIMIT = 1_000_000  # "no limit": a rate neither the simulator nor the service ever reaches
POSTGRES = ("127.0.0.1", 5432)
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


class BenchError(Exception):
    pass


# -- the result of a section -------------------------------------------------------------------


@dataclass
class Context:
    """What a section is given: the size of the run, and what earlier sections left for later ones
    (the throughput section's embedded run is the CPU section's unprofiled run)."""

    quick: bool
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    name: str  # the --only name
    title: str
    text: str  # markdown: what was measured and how, then the tables
    figures: dict[str, Any]  # every figure, JSON-ready (results.json)
    commands: list[str]  # how to reproduce it
    seconds: float = 0.0


def bench_command(section: str, quick: bool) -> str:
    return f"{PY} bench/run.py --only {section}" + (" --quick" if quick else "")


def commands_text(commands: list[str]) -> str:
    return "Reproduce:\n\n```sh\n" + "\n".join(commands) + "\n```"


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max (the repeated rows' summary)."""
    if not values:
        return {"min": 0.0, "median": 0.0, "max": 0.0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- processes ---------------------------------------------------------------------------------


def bin_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"cannot find the {name!r} command next to {sys.executable} or on PATH")
    return found


def clean_env() -> dict[str, str]:
    """The caller's environment without any ORCH_ setting (a stray ORCH_CONFIG would change the run)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("ORCH_")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def log_errors(path: Path) -> int:
    """Lines the service logged at level error (its log is one JSON object per line)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return text.count('"level": "error"') + text.count('"level":"error"')


@dataclass
class Finished:
    exit_code: int
    wall: float
    peak_rss_mb: float  # ru_maxrss, or the highest VmHWM sampled if higher
    cpu_s: float  # user + system, every thread
    timed_out: bool
    started_at: float  # Unix seconds
    ended_at: float
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds from start, VmRSS MB)
    stopped: bool = False  # sent SIGTERM after `stop_after`


def _proc_status_mb(pid: int) -> dict[str, float]:
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return found


def run_measured(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    out: Path,
    err: Path,
    timeout: float,
    stop_after: float | None = None,
    sample_every: float | None = None,
) -> Finished:
    """Run a child to its end (or SIGTERM it after `stop_after` seconds); its wall time, and its own peak
    RSS and CPU time from wait4 (not the simulator's, which is still running). With `sample_every`,
    VmRSS and VmHWM are read from /proc/<pid>/status that often while it runs."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        started_at = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)  # noqa: S603
        timed_out, stopped, exited = threading.Event(), threading.Event(), threading.Event()
        samples: list[tuple[float, float]] = []
        hwm = [0.0]

        def expire() -> None:
            timed_out.set()
            proc.kill()

        def terminate() -> None:
            stopped.set()
            proc.send_signal(signal.SIGTERM)

        def sample() -> None:
            assert sample_every is not None
            while not exited.wait(sample_every):
                seen = _proc_status_mb(proc.pid)
                if "VmRSS" in seen:
                    samples.append((time.perf_counter() - started, seen["VmRSS"]))
                hwm[0] = max(hwm[0], seen.get("VmHWM", 0.0))

        timers = [threading.Timer(timeout, expire)]
        if stop_after is not None:
            timers.append(threading.Timer(stop_after, terminate))
        sampler = threading.Thread(target=sample, daemon=True) if sample_every else None
        for timer in timers:
            timer.start()
        if sampler is not None:
            sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            exited.set()
            for timer in timers:
                timer.cancel()
            if sampler is not None:
                sampler.join()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(
        exit_code=proc.returncode,
        wall=wall,
        peak_rss_mb=max(usage.ru_maxrss / 1024, hwm[0]),  # ru_maxrss is in KiB on Linux
        cpu_s=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out.is_set(),
        started_at=started_at,
        ended_at=started_at + wall,
        rss_samples=samples,
        stopped=stopped.is_set(),
    )


class SimulatorProcess:
    """`orchestrator simulate` on a free port, until `close()`."""

    def __init__(
        self, workdir: Path, rate: int, flags: tuple[str, ...] = (), latency: tuple[str, ...] = RATE_LATENCY
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "simulator.log"
        self.argv = ["orchestrator", "simulate", "--rate-limit", str(rate), "--rate-period", "1"]
        self.argv += [*latency, "--seed", "1", *flags]
        argv = [bin_path("orchestrator"), *self.argv[1:], "--port", str(self.port)]
        env = clean_env() | {"ORCH_LOG__LEVEL": "warning"}
        with self.log.open("wb") as sink:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603
                argv, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT
            )

    @property
    def shown(self) -> str:
        """The command line, as a reader would type it."""
        return ".venv/bin/" + " ".join(self.argv) + " --port 8081"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the simulator exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                self.stats()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        raise BenchError(f"the simulator did not answer on {self.url} within {timeout:.0f} s")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=30) as resp:  # noqa: S310 (local)
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def close(self) -> None:
        stop(self.proc)


@contextmanager
def simulator(
    workdir: Path, rate: int, flags: tuple[str, ...] = (), latency: tuple[str, ...] = RATE_LATENCY
) -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(workdir, rate, flags, latency)
    try:
        sim.wait_ready()
        yield sim
    finally:
        sim.close()


def stamps(stats: dict[str, Any]) -> list[int]:
    """The simulator's creation stamps (ms), in order."""
    return sorted(int(b["created"]) for b in stats["batches"])


def steady_rate(stats: dict[str, Any]) -> float:
    """Batches per second between the first and the last creation, as the simulator stamped them."""
    made = stamps(stats)
    if len(made) < 2 or made[-1] == made[0]:
        return 0.0
    return (len(made) - 1) / ((made[-1] - made[0]) / 1000.0)


def duplicates(stats: dict[str, Any]) -> int:
    """Batches beyond the first per dataset (each dataset id is enqueued once)."""
    return sum(int(n) - 1 for n in stats["batches_per_dataset"].values())


def distinct(stats: dict[str, Any]) -> int:
    return len(stats["batches_per_dataset"])


# -- the service -------------------------------------------------------------------------------


def service_env(sim: SimulatorProcess, workdir: Path, **settings: str) -> dict[str, str]:
    """The environment of an orchestrator run against `sim`, its queue in `workdir`; `settings` are
    more ORCH_ variables (names without the prefix)."""
    return (
        clean_env()
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


def write_ids(path: Path, prefix: str, count: int, start: int = 0) -> Path:
    path.write_text("".join(f"{prefix}-{index:07d}\n" for index in range(start, start + count)), "utf-8")
    return path


def enqueue(env: dict[str, str], workdir: Path, ids: Path, timeout: float = 600) -> float:
    """`orchestrator enqueue --file ids`; its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [bin_path("orchestrator"), "enqueue", "--file", str(ids)],
        cwd=workdir,
        env=env,
        capture_output=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        tail_text = done.stderr.decode(errors="replace")[-3000:]
        raise BenchError(f"orchestrator enqueue exited with {done.returncode}:\n{tail_text}")
    return time.perf_counter() - started


# -- PostgreSQL and RabbitMQ scratch resources ---------------------------------------------------


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def postgres_answers() -> bool:
    return answers(*POSTGRES)


def rabbitmq_answers() -> bool:
    return answers("127.0.0.1", 5672)


def psql(sql: str) -> None:
    subprocess.run(  # noqa: S603 - fixed arguments, a name made here
        [bin_path("psql"), "-h", POSTGRES[0], "-U", "postgres", "-d", "test", "-q", "-c", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


@contextmanager
def scratch_database(prefix: str = "orch_bench") -> Iterator[str]:
    """A PostgreSQL database made for the run and dropped after; its URL."""
    database = f"{prefix}_{uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {database}")
    try:
        yield f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{database}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


async def _delete_queues(names: list[str]) -> None:
    import aio_pika  # the service's own RabbitMQ client, installed with it

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except Exception as exc:  # noqa: BLE001 - absent already: nothing to clean
                print(f"  (RabbitMQ queue {name} not deleted: {exc})")
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()


@contextmanager
def scratch_queue(prefix: str = "bench") -> Iterator[str]:
    """A RabbitMQ queue name for the run; the queue and its dead-letter queue are deleted after."""
    name = f"{prefix}.{uuid4().hex[:12]}"
    try:
        yield name
    finally:
        asyncio.run(_delete_queues([name, f"{name}.dead"]))


@dataclass(frozen=True)
class Backend:
    key: str  # results.json key
    label: str  # for people


EMBEDDED = Backend("embedded", "embedded: SQLite queue + SQLite store")
BROKERED = Backend("rabbitmq_postgresql", "RabbitMQ queue + PostgreSQL store")


def backend_missing(backend: Backend) -> str | None:
    if backend is BROKERED:
        absent = [
            what
            for what, up in (
                ("RabbitMQ on 127.0.0.1:5672", rabbitmq_answers()),
                ("PostgreSQL", postgres_answers()),
            )
            if not up
        ]
        return " and ".join(absent) + " not answering" if absent else None
    return None


@contextmanager
def backend_settings(backend: Backend, workdir: Path) -> Iterator[dict[str, str]]:
    """ORCH_ settings (without the prefix) putting the queue and the store on `backend`, fresh for the run."""
    if backend is EMBEDDED:
        yield {
            "QUEUE__URL": f"sqlite:///{workdir / 'queue.db'}",
            "STORE__URL": f"sqlite:///{workdir / 'store.db'}",
        }
        return
    with scratch_database() as store_url, scratch_queue() as queue_name:
        yield {"QUEUE__URL": RABBITMQ_URL, "QUEUE__NAME": queue_name, "STORE__URL": store_url}


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source() -> dict[str, Any]:
    """The commit measured, and whether the service's files differ from it (work in progress)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(  # noqa: S603
                [bin_path("git"), "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, BenchError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "orchestrator", "pyproject.toml")
    return {"commit": git("rev-parse", "HEAD") or None, "service_files_changed": len(changed.splitlines())}


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
    }


# -- one measured run of the service or of a client, as the simulator saw it ---------------------


@dataclass
class RunFigures:
    label: str
    requests: int
    created: int  # distinct datasets with a batch
    batches: int
    duplicates: int
    wall_s: float  # the process, start to exit
    steady_rate: float  # from the simulator's stamps, first batch to last
    cpu_s: float  # the process's user + system time, from wait4
    peak_rss_mb: float
    lead_in_s: float  # process start to the first batch
    calls: dict[str, Any] = field(default_factory=dict)  # the simulator's calls by endpoint and status
    enqueue_s: float | None = None
    errors_logged: int = 0

    @property
    def wall_rate(self) -> float:
        return self.created / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "requests": self.requests,
            "created": self.created,
            "batches": self.batches,
            "duplicates": self.duplicates,
            "wall_s": round(self.wall_s, 3),
            "steady_rate": round(self.steady_rate, 2),
            "wall_rate": round(self.wall_rate, 2),
            "cpu_s": round(self.cpu_s, 3),
            "cpu_s_per_1000_requests": round(self.cpu_ms_per_request, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "lead_in_s": round(self.lead_in_s, 3),
            "enqueue_s": None if self.enqueue_s is None else round(self.enqueue_s, 3),
            "errors_logged": self.errors_logged,
            "calls": self.calls,
        }


def _figures(
    label: str, count: int, done: Finished, stats: dict[str, Any], enqueue_s: float | None, errors: int
) -> RunFigures:
    made = stamps(stats)
    return RunFigures(
        label=label,
        requests=count,
        created=distinct(stats),
        batches=len(made),
        duplicates=duplicates(stats),
        wall_s=done.wall,
        steady_rate=steady_rate(stats),
        cpu_s=done.cpu_s,
        peak_rss_mb=done.peak_rss_mb,
        lead_in_s=made[0] / 1000.0 - done.started_at if made else 0.0,
        calls=stats.get("calls", {}),
        enqueue_s=enqueue_s,
        errors_logged=errors,
    )


def _check(what: str, done: Finished, timeout: float, err: Path) -> None:
    if done.timed_out or done.exit_code != 0:
        why = f"timed out after {timeout:.0f} s" if done.timed_out else f"exited {done.exit_code}"
        raise BenchError(f"{what} {why}; its stderr ends with:\n{tail(err)}")


def measure_service(
    label: str,
    workdir: Path,
    sim: SimulatorProcess,
    count: int,
    settings: dict[str, str],
    *,
    argv: list[str] | None = None,
    timeout: float | None = None,
) -> RunFigures:
    """Enqueue `count` fresh ids, then `orchestrator run --until-idle` (or `argv`) to its end, timed and
    measured; `settings` are ORCH_ variables without the prefix."""
    env = service_env(sim, workdir, **settings)
    enqueue_s = None
    if count:
        enqueue_s = enqueue(env, workdir, write_ids(workdir / "ids.txt", f"bench-{uuid4().hex[:8]}", count))
    timeout = timeout if timeout is not None else 90.0 + count / 50
    out, err = workdir / "run.out", workdir / "run.err"
    argv = argv or [bin_path("orchestrator"), "run", "--until-idle"]
    done = run_measured(argv, cwd=workdir, env=env, out=out, err=err, timeout=timeout)
    _check(f"{label}: {' '.join(Path(a).name for a in argv[:3])}", done, timeout, err)
    return _figures(label, count, done, sim.stats(), enqueue_s, log_errors(err))


def measure_client(
    label: str, workdir: Path, sim: SimulatorProcess, count: int, script: str, concurrency: int | None
) -> RunFigures:
    """`python bench/<script> --url SIM --ids ids.txt [--concurrency C] --report X` to its end, measured."""
    ids = write_ids(workdir / "ids.txt", f"bench-{uuid4().hex[:8]}", count)
    argv = [sys.executable, str(HERE / script), "--url", sim.url, "--ids", str(ids)]
    argv += ["--report", str(workdir / "client.json")]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    out, err = workdir / "client.out", workdir / "client.err"
    timeout = 90.0 + count / 10
    done = run_measured(argv, cwd=workdir, env=clean_env(), out=out, err=err, timeout=timeout)
    _check(f"{label}: bench/{script}", done, timeout, err)
    return _figures(label, count, done, sim.stats(), None, 0)


# --- the clients measured beside the service (ceiling, naive, peer) ---------------------------------


def platform_headers(token: str) -> dict[str, str]:
    """The headers of a Platform call with `token`, as the simulator wants them."""
    return {
        "Authorization": f"Bearer {token}",
        "x-api-key": CLIENT_ID,
        "x-gw-ims-org-id": ORG_ID,
        "x-sandbox-name": "prod",
        "Accept": "application/json",
    }


async def fetch_token(session: Any, url: str) -> str:
    """A token from the simulator's IMS endpoint (`session`: an aiohttp ClientSession)."""
    async with session.post(url + "/ims/token/v3", data=TOKEN_FORM) as resp:
        resp.raise_for_status()
        token: str = (await resp.json())["access_token"]
    return token


def read_ids(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def report_outcomes(outcomes: dict[str, int], path: str | None) -> int:
    """Write a client's own counts to `path` (or print them); exit 1 when some create failed."""
    if path:
        Path(path).write_text(json.dumps(outcomes), encoding="utf-8")
    else:
        print(json.dumps(outcomes))
    return 0 if outcomes["failed"] == 0 else 1
