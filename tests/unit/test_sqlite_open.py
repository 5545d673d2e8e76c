"""Opening SQLite files that do not exist yet, from many connections and processes at once.

Switching a new file to WAL is the one step of an open where SQLite fails at once ("database is
locked") instead of waiting `busy_timeout`: `orchestrator.store.engine.use_wal` retries it. The
store's migration and the queue's `CREATE TABLE` run in `BEGIN IMMEDIATE`, so openers take turns.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from orchestrator.queues.sqlite import SqliteQueue
from orchestrator.store.engine import BUSY_TIMEOUT_MS, use_wal
from orchestrator.store.sql import SqlBatchStore, alembic_config

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 3
CONNECTIONS = 3  # openers in each process, concurrently on one event loop
ROUNDS = 3  # new files for each of store and queue


@contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection holding the write lock of `path` (a new file while it is in rollback mode), as
    another process switching it to WAL would."""
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
        if holder.in_transaction:
            holder.execute("ROLLBACK")


def journal_mode(path: Path) -> str:
    with closing(sqlite3.connect(path)) as connection:
        mode: str = connection.execute("PRAGMA journal_mode").fetchone()[0]
        return mode


# --- use_wal, against a lock held on purpose (no timing) -----------------------------------------


def test_use_wal_waits_for_a_lock_sqlite_will_not_wait_for(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    pauses: list[float] = []
    windows: list[tuple[float, float]] = []
    with write_locked(path) as holder:
        plain = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        # Without a retry this fails at once, busy_timeout or not.
        with closing(plain), pytest.raises(sqlite3.OperationalError, match="database is locked"):
            plain.execute("PRAGMA journal_mode=WAL")

        def pause(seconds: float) -> None:
            pauses.append(seconds)
            if len(pauses) == 2:
                holder.execute("COMMIT")  # the other opener is done

        def jitter(low: float, high: float) -> float:
            windows.append((low, high))
            return high / 2

        use_wal(path, sleep=pause, uniform=jitter)

    assert journal_mode(path) == "wal"
    assert windows == [(0.0, 0.002), (0.0, 0.004)]  # a jittered pause in a window that doubles
    assert pauses == [0.001, 0.002]


def test_use_wal_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    now = [0.0]
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    with write_locked(path), pytest.raises(sqlite3.OperationalError, match="database is locked"):
        use_wal(path, sleep=pause, monotonic=lambda: now[0], uniform=lambda _low, high: high)

    assert now[0] == pytest.approx(BUSY_TIMEOUT_MS / 1000)  # waited the busy timeout, not more
    assert max(pauses) == 0.05  # the window stops doubling at 50 ms
    assert len(pauses) > 90


def test_use_wal_raises_other_errors_at_once(tmp_path: Path) -> None:
    pauses: list[float] = []
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        use_wal(tmp_path, sleep=pauses.append)  # a directory
    assert pauses == []


def test_use_wal_on_a_wal_file_takes_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    use_wal(path)
    pauses: list[float] = []
    # An open beside a running writer (enqueue while the service works) does not wait for it.
    with write_locked(path):
        use_wal(path, sleep=pauses.append, timeout=0)
    assert pauses == []
    assert journal_mode(path) == "wal"


# --- many openers on new files: processes x connections, in rounds -------------------------------


async def _open_together(kind: str, path: str, count: int) -> list[str]:
    """Open `count` stores or queues on `path` at once, close them; the errors, one line each."""
    url = f"sqlite:///{path}"
    openers = [SqlBatchStore(url) if kind == "store" else SqliteQueue(url) for _ in range(count)]
    try:
        results = await asyncio.gather(*(opener.open() for opener in openers), return_exceptions=True)
    finally:
        for opener in openers:
            await opener.close()
    return [f"{type(result).__name__}: {result}".splitlines()[0] for result in results if result is not None]


def serve_opens(count: int) -> None:
    """A child process: for each line `KIND PATH` on stdin, open `count` at once and answer `ok` or
    the first error, one line. Started once for all rounds, so a round costs no interpreter start."""
    answers, sys.stdout = sys.stdout, sys.stderr  # whatever else prints cannot garble the answers
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        kind, path = line.rstrip("\n").split(" ", 1)
        errors = asyncio.run(_open_together(kind, path, count))
        print(errors[0] if errors else "ok", file=answers, flush=True)


@pytest.fixture
def openers() -> Iterator[list[subprocess.Popen[str]]]:
    code = f"from tests.unit.test_sqlite_open import serve_opens; serve_opens({CONNECTIONS})"
    children = [
        subprocess.Popen(  # noqa: S603 - this interpreter, running this module
            [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(PROCESSES)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        yield children
    finally:
        for child in children:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()


def test_many_processes_open_new_files_together(openers: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    for round_ in range(ROUNDS):
        for kind in ("store", "queue"):
            path = tmp_path / f"{kind}-{round_}.db"
            for child in openers:  # every child is blocked reading: they start within microseconds
                assert child.stdin is not None
                child.stdin.write(f"{kind} {path}\n")
                child.stdin.flush()
            answers = []
            for child in openers:
                assert child.stdout is not None
                answers.append(child.stdout.readline().rstrip("\n"))

            assert answers == ["ok"] * PROCESSES, f"{kind}, round {round_}"
            assert journal_mode(path) == "wal"
            with closing(sqlite3.connect(path)) as connection:
                if kind == "store":  # migrated once: one version row, the newest
                    assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
                        (head,)
                    ]
                    assert connection.execute("SELECT count(*) FROM batch_request").fetchone() == (0,)
                else:
                    assert connection.execute("SELECT count(*) FROM queue_message").fetchone() == (0,)


async def test_many_connections_open_a_new_file_together(tmp_path: Path) -> None:
    # Within one process too: each open switches the file on its own worker thread.
    for round_ in range(ROUNDS):
        for kind in ("store", "queue"):
            path = tmp_path / f"{kind}-{round_}.db"
            assert await _open_together(kind, str(path), 2 * CONNECTIONS) == []
            assert journal_mode(path) == "wal"
