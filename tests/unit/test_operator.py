"""The operator commands: `status` (the store at a glance) and `requeue` (failed requests driven
again, one batch each), from the store methods up to the command line; and the `enqueue` bar."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import cli, operator
from orchestrator.messages import BatchRequest
from orchestrator.store import sql
from orchestrator.store.base import Claim, State
from orchestrator.store.sql import SqlBatchStore
from tests.unit import test_cli
from tests.unit.fakes import open_store

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LEASE = 15.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def claim_one(store: SqlBatchStore, now: datetime, request_id: str | None = None) -> Claim:
    """The claim of `request_id` (the others due are given back untouched), or of the first due."""
    claims = await store.claim("test", 100, LEASE, now)
    mine = next(c for c in claims if request_id in (None, c.record.request_id))
    for other in claims:
        if other is not mine:
            assert await store.release(other, now)
    return mine


async def add(store: SqlBatchStore, request_id: str, now: datetime, dataset_id: str = "ds1") -> None:
    await store.add(BatchRequest(request_id=request_id, dataset_id=dataset_id), now)


async def failed(
    store: SqlBatchStore, request_id: str, now: datetime, dataset_id: str = "ds1", error: str = "HTTP 400"
) -> None:
    """A request recorded at `now` that failed at `now` + 1 s."""
    await add(store, request_id, now, dataset_id)
    claim = await claim_one(store, now, request_id)
    assert await store.mark_failed(claim, error, now + timedelta(seconds=1))


async def created(store: SqlBatchStore, request_id: str, now: datetime) -> None:
    await add(store, request_id, now)
    claim = await claim_one(store, now, request_id)
    assert await store.mark_created(claim, f"batch-{request_id}", "loading", now)


# --- requeue in the store --------------------------------------------------------------------------


async def test_requeue_puts_failed_requests_back_to_pending_to_be_looked_up(store: SqlBatchStore) -> None:
    await failed(store, "bad", at(0))
    await created(store, "good", at(10))
    await add(store, "waiting", at(20))
    await store.reject("msg:x", None, "not JSON", at(30))

    assert await store.requeue_failed(at(60)) == ["bad"]

    record = await store.get("bad")
    assert record is not None
    assert (record.state, record.attempts, record.last_error) == (State.PENDING, 0, None)
    assert record.next_attempt_at == at(60)
    for request_id, state in (("good", State.CREATED), ("waiting", State.PENDING), ("msg:x", State.REJECTED)):
        other = await store.get(request_id)
        assert other is not None
        assert other.state is state, request_id
    # The trail keeps why it failed, and says who put it back.
    history = await store.history("bad")
    assert [(change.from_state, change.to_state) for change in history][-2:] == [
        (State.PENDING, State.FAILED),
        (State.FAILED, State.PENDING),
    ]
    assert history[-2].detail == "HTTP 400"
    assert (history[-1].detail, history[-1].attempt, history[-1].at) == ("requeued by operator", 0, at(60))
    # The next attempt is its first again, and looks the batch up before any create.
    claim = await claim_one(store, at(61), "bad")
    assert (claim.attempt, claim.needs_lookup) == (1, True)


async def test_requeue_leaves_a_request_that_is_not_failed_any_more(store: SqlBatchStore) -> None:
    await failed(store, "bad", at(0))
    assert await store.requeue_failed(at(60)) == ["bad"]
    # A second requeue (another operator, a retried command) finds nothing failed: no second trail
    # row, no reset of what the first one started.
    claim = await claim_one(store, at(61))
    assert await store.requeue_failed(at(62)) == []
    assert await store.failed_records() == []
    record = await store.get("bad")
    assert record is not None
    assert record.attempts == 1
    assert await store.mark_created(claim, "b1", "loading", at(63))
    assert [change.detail for change in await store.history("bad")].count("requeued by operator") == 1


async def test_requeue_picks_by_dataset_and_failure_time(store: SqlBatchStore) -> None:
    await failed(store, "early", at(0), dataset_id="ds1")  # failed at 1 s
    await failed(store, "late", at(100), dataset_id="ds1")  # failed at 101 s
    await failed(store, "other", at(200), dataset_id="ds2")  # failed at 201 s

    assert [r.request_id for r in await store.failed_records()] == ["early", "late", "other"]
    assert [r.request_id for r in await store.failed_records(failed_since=at(101))] == ["late", "other"]
    assert [r.request_id for r in await store.failed_records("ds1", at(50))] == ["late"]

    assert await store.requeue_failed(at(300), dataset_id="ds2") == ["other"]
    assert await store.requeue_failed(at(300), failed_since=at(101)) == ["late"]
    assert [r.request_id for r in await store.failed_records()] == ["early"]


# --- status ------------------------------------------------------------------------------------------


async def test_recent_changes_reads_the_trail_back_to_the_window(
    store: SqlBatchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "_TRAIL_CHUNK", 3)  # many chunks from a few rows
    for index in range(12):
        await created(store, f"r{index}", at(index * 20))  # two trail rows each, 20 s apart

    changes = await store.recent_changes(at(150))

    expected = [
        change
        for index in reversed(range(12))
        for change in reversed(await store.history(f"r{index}"))
        if change.at >= at(150)
    ]
    assert changes == expected
    assert [change.at for change in changes] == [at(t) for t in (220, 220, 200, 200, 180, 180, 160, 160)]


async def test_status_counts_the_last_minute_and_finds_the_oldest(store: SqlBatchStore) -> None:
    await created(store, "old-created", at(0))  # outside the window
    await add(store, "oldest-pending", at(5))
    await add(store, "pending", at(30))
    await failed(store, "failed", at(100), error="bad request: HTTP 400")
    await created(store, "created-1", at(110))
    await created(store, "created-2", at(115))
    await add(store, "retrying", at(116))
    claim = await claim_one(store, at(117), "retrying")
    assert await store.mark_retry(claim, "HTTP 503", at(200), ambiguous=False, now=at(118))

    status = await operator.read_status(store, at(150))

    assert status.counts == {
        **dict.fromkeys(State, 0),
        State.PENDING: 2,
        State.RETRYING: 1,
        State.CREATED: 3,
        State.FAILED: 1,
        State.REJECTED: 0,
    }
    assert status.total == 7
    assert status.oldest is not None
    assert status.oldest.request_id == "oldest-pending"
    assert status.oldest_age() == 145.0
    assert (status.created, status.retries, status.failed) == (2, 1, 1)
    assert status.rate == pytest.approx(2 / 60)
    assert [record.request_id for record in status.errors] == ["retrying", "failed"]  # newest first

    as_json = status.to_json()
    assert json.loads(json.dumps(as_json)) == as_json
    assert as_json["counts"] == {
        **{state.value: 0 for state in State},
        **{"pending": 2, "retrying": 1, "created": 3, "failed": 1, "rejected": 0},
    }
    oldest = as_json["oldestUnfinished"]
    assert isinstance(oldest, dict)
    assert (oldest["requestId"], oldest["ageSeconds"]) == ("oldest-pending", 145.0)
    assert as_json["lastMinute"] == {"created": 2, "retries": 1, "failed": 1}
    assert as_json["at"] == "2026-11-28T12:02:30.000Z"
    errors = as_json["lastErrors"]
    assert isinstance(errors, list)
    assert errors[0]["lastError"] == "HTTP 503"


async def test_status_of_an_empty_store(store: SqlBatchStore) -> None:
    status = await operator.read_status(store, at(0))
    assert (status.total, status.oldest, status.created, status.errors) == (0, None, 0, [])
    assert status.to_json()["oldestUnfinished"] is None
    text = render(operator.status_summary(status))
    assert "nothing pending or retrying" in text
    assert "0.00 batches/s" in text


async def test_a_reconciliation_is_not_counted_as_a_batch(store: SqlBatchStore) -> None:
    await add(store, "r", at(0))
    claim = await claim_one(store, at(0))
    assert await store.mark_created(claim, "b1", "loading", at(1), reconcile_at=at(2))
    [again] = await store.claim_reconciliations("test", 1, LEASE, at(3))
    assert await store.finish_reconciliation(again, at(4), detail="reconciled: aborted duplicate batches b2")

    status = await operator.read_status(store, at(30))
    assert status.created == 1


def render(renderable: object, width: int = 120) -> str:
    out = io.StringIO()
    Console(width=width, file=out, color_system=None).print(renderable)
    return out.getvalue()


async def test_the_status_screen_escapes_request_ids_and_says_how_old(store: SqlBatchStore) -> None:
    await add(store, "evil\x1b[2J[bold]x[/]\u202e", at(0))
    status = await operator.read_status(store, at(3725))
    text = render(operator.status_summary(status))
    assert "pending for 1h 2m: evil\\x1b[2J[bold]x[/]\\u202e (dataset ds1)" in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "1: 1 pending · 0 retrying · 0 created · 0 failed · 0 rejected" in text


async def test_the_last_errors_say_how_long_ago_and_are_escaped(store: SqlBatchStore) -> None:
    await failed(store, "evil\u202e", at(0), error="AEP said \x1b[2J" + "x" * 400)
    status = await operator.read_status(store, at(61))
    text = " ".join(render(operator.errors_table(status), width=200).split())
    assert "1m 0s ago failed, 1 try evil\\u202e AEP said \\x1b[2J" in text
    joined = "".join(text.split())  # the error folds over lines
    assert "x" * 286 + "…" in joined  # cut at 300 characters (13 before the x's); `--json` has it all
    assert "x" * 287 not in joined
    assert "\x1b" not in text


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (59.9, "59s"), (60, "1m 0s"), (192, "3m 12s"), (7500, "2h 5m"), (97200, "1d 3h")],
)
def test_duration(seconds: float, expected: str) -> None:
    assert operator.duration(seconds) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T15:00:00Z", datetime(2026, 11, 28, 15, 0, tzinfo=UTC)),
        ("2026-11-28T16:00+01:00", datetime(2026, 11, 28, 15, 0, tzinfo=UTC)),
        ("2026-11-28T15:00:00", datetime(2026, 11, 28, 15, 0, tzinfo=UTC)),  # no zone: UTC
        (" 2026-11-28 ", datetime(2026, 11, 28, tzinfo=UTC)),
    ],
)
def test_since_is_an_iso_8601_time(text: str, expected: datetime) -> None:
    assert operator.parse_since(text) == expected


@pytest.mark.parametrize("text", ["2h", "yesterday", "", "2026-13-01"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="--since: not an ISO 8601 time"):
        operator.parse_since(text)


# --- the commands --------------------------------------------------------------------------------------


# A working directory and settings of its own for every test, and the logging set-up that `main`
# changes put back afterwards (autouse), as for the other commands' tests.
workdir = test_cli.workdir


@pytest.fixture(autouse=True)
def store_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands' store is the file `open_store` makes in the directory."""
    monkeypatch.setenv("ORCH_STORE__URL", f"sqlite:///{workdir}/store.db")


def cli_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def with_store(workdir: Path, fill: bool = True) -> None:
    """The command's store (`orchestrator.db` in `workdir`, as `workdir` configures it): two failed
    requests of two datasets and a created one."""

    async def build() -> None:
        store = await open_store(workdir)
        try:
            if fill:
                await failed(store, "bad-1", at(0), dataset_id="ds1", error="AEP said \x1b[31mno")
                await failed(store, "bad-2", at(100), dataset_id="ds2")
                await created(store, "good", at(200))
        finally:
            await store.close()

    asyncio.run(build())


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["requeue", "--state", "failed"]])
def test_commands_on_a_missing_store_create_nothing(
    capsys: pytest.CaptureFixture[str], workdir: Path, command: list[str]
) -> None:
    code, out, err = cli_run(capsys, *command)
    assert (code, out) == (2, "")
    missing = workdir / "store.db"
    assert err == f"orchestrator: ORCH_STORE__URL: no store at {missing} (`orchestrator run` creates it)\n"
    assert list(workdir.iterdir()) == []


def test_status_prints_a_screen_and_json(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    with_store(workdir)

    code, out, err = cli_run(capsys, "status")
    assert (code, err) == (0, "")
    words = " ".join(out.split())
    assert "requests 3: 0 pending · 0 retrying · 1 created · 2 failed · 0 rejected" in words
    assert "oldest nothing pending or retrying" in words
    assert "AEP said \\x1b[31mno" in out
    assert "\x1b" not in out
    assert out.index("bad-2") < out.index("bad-1")  # the latest error first

    code, out, err = cli_run(capsys, "status", "--json")
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    status = json.loads(line)
    assert status["counts"]["failed"] == 2
    assert [record["requestId"] for record in status["lastErrors"]] == ["bad-2", "bad-1"]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            "created",
            "--state created: created requests are not requeued; only failed requests can be requeued",
        ),
        (
            "Pending",
            "--state pending: pending requests are not requeued; only failed requests can be requeued",
        ),
        ("bogus\x1b", "--state bogus\\x1b: bogus\\x1b is not a state; only failed requests can be requeued"),
    ],
)
def test_requeue_takes_only_failed(
    capsys: pytest.CaptureFixture[str], workdir: Path, state: str, message: str
) -> None:
    with_store(workdir)
    code, out, err = cli_run(capsys, "requeue", "--state", state)
    assert (code, out, err) == (2, "", f"orchestrator: requeue: {message}\n")
    assert asyncio.run(failed_ids(workdir)) == ["bad-1", "bad-2"]


def test_requeue_refuses_a_since_that_is_not_a_time(
    capsys: pytest.CaptureFixture[str], workdir: Path
) -> None:
    with_store(workdir)
    code, out, err = cli_run(capsys, "requeue", "--state", "failed", "--since", "2h")
    assert (code, out) == (2, "")
    assert err == "orchestrator: requeue: --since: not an ISO 8601 time: '2h' (e.g. 2026-11-28T15:00:00Z)\n"


async def failed_ids(workdir: Path) -> list[str]:
    store = SqlBatchStore(f"sqlite:///{workdir}/store.db")
    await store.open()
    try:
        return [record.request_id for record in await store.failed_records()]
    finally:
        await store.close()


def test_requeue_dry_run_lists_and_changes_nothing(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    with_store(workdir)
    code, out, err = cli_run(capsys, "requeue", "--state", "failed", "--dry-run")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "bad-1  ds1  failed 2026-11-28T12:00:01.000Z  AEP said \\x1b[31mno"
    assert lines[1].startswith("bad-2  ds2  failed 2026-11-28T12:01:41.000Z")
    assert lines[2] == "would requeue 2 (dry run: nothing changed)"
    assert asyncio.run(failed_ids(workdir)) == ["bad-1", "bad-2"]


def test_requeue_by_dataset_and_time(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    with_store(workdir)
    assert cli_run(capsys, "requeue", "--state", "failed", "--since", "2026-11-28T13:00:00Z") == (
        0,
        "requeued 0\n",
        "",
    )
    assert cli_run(capsys, "requeue", "--state", "failed", "--dataset", "ds2") == (0, "requeued 1\n", "")
    assert asyncio.run(failed_ids(workdir)) == ["bad-1"]
    assert cli_run(capsys, "requeue", "--state", "failed", "--since", "2026-11-28T12:00:01Z") == (
        0,
        "requeued 1\n",
        "",
    )
    assert cli_run(capsys, "requeue", "--state", "failed") == (0, "requeued 0\n", "")


# --- the enqueue progress bar ------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_for_long_inputs_at_a_terminal() -> None:
    assert cli.show_progress(1001, Terminal())
    assert not cli.show_progress(1000, Terminal())
    assert not cli.show_progress(100_000, io.StringIO())  # a pipe, a file, a test's capture


def test_enqueue_in_a_pipe_shows_no_bar(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    (workdir / "ids.txt").write_text("".join(f"{index:024x}\n" for index in range(1500)))
    code, out, err = cli_run(capsys, "enqueue", "--file", "ids.txt")
    assert (code, out, err) == (0, "published 1500\n", "")


def test_enqueue_at_a_terminal_shows_a_bar(
    capsys: pytest.CaptureFixture[str], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    (workdir / "ids.txt").write_text("".join(f"{index:024x}\n" for index in range(2500)))
    code = cli.main(["enqueue", "--file", "ids.txt"])
    assert (code, capsys.readouterr().out) == (0, "published 2500\n")
    assert "publishing" in terminal.getvalue()


async def test_publishing_in_chunks_moves_the_bar_and_says_how_far_it_got() -> None:
    sent: list[int] = []
    moved: list[int] = []

    async def publish(bodies: Sequence[bytes]) -> int:
        if len(sent) == 2:
            raise ConnectionError("broker gone")
        sent.append(len(bodies))
        return len(bodies)

    bodies = [b"x"] * 2500
    with pytest.raises(
        cli.PublishInterrupted, match=r"ConnectionError: broker gone \(published 2000 of 2500"
    ):
        await cli.publish_chunks(publish, bodies, moved.append)
    assert sent == moved == [1000, 1000]
    sent.clear()
    moved.clear()
    assert await cli.publish_chunks(publish, bodies[:1500], moved.append) == 1500
    assert moved == [1000, 500]


async def test_publishing_stops_at_a_chunk_the_broker_took_only_partly() -> None:
    calls: list[int] = []

    async def publish(bodies: Sequence[bytes]) -> int:
        calls.append(len(bodies))
        return len(bodies) - 10 if len(calls) == 2 else len(bodies)

    # The confirmed ones stay the first lines, as `enqueue` reports them ("confirmed N of M").
    assert await cli.publish_chunks(publish, [b"x"] * 3500, lambda _: None) == 1990
    assert calls == [1000, 1000]
