"""The `orchestrator` command in-process, as a user types it: arguments, exit codes, what it prints."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import structlog
from rich.console import Console

from orchestrator import demo, logs
from orchestrator.cli import batches_table, main, message_body
from orchestrator.messages import InvalidMessage, parse_message
from orchestrator.queues import open_queue
from orchestrator.settings import load_settings
from orchestrator.store.base import BatchRecord, State

DS = "5c8c3c555033b814b69f947f"


@pytest.fixture(autouse=True)
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A working directory of its own, no ORCH_ variable from outside, and the logging set-up that
    `main` changes put back afterwards."""
    for name in list(os.environ):
        if name.upper().startswith("ORCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_QUEUE__URL", f"sqlite:///{tmp_path}/queue.db")
    monkeypatch.setenv("ORCH_STORE__URL", f"sqlite:///{tmp_path}/orchestrator.db")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield tmp_path
    root.handlers[:], level = saved
    root.setLevel(level)
    structlog.reset_defaults()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """argparse refuses the arguments: exit 2 and its message on stderr."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    return capsys.readouterr().err


def queued_datasets() -> list[str]:
    """The dataset ids waiting in the configured queue, as intake will read them."""

    async def read() -> list[str]:
        settings = load_settings()
        queue = open_queue(settings.queue.url, settings.queue.name)
        await queue.open()
        try:
            deliveries = await queue.receive(100, timeout=0)
        finally:
            await queue.close()
        return [parse_message(d.body, d.message_id).dataset_id for d in deliveries]

    return asyncio.run(read())


# --- enqueue --------------------------------------------------------------------------------------------


def test_enqueue_publishes_the_valid_arguments_and_names_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Was: TypeError, nothing published.
    code, out, err = cli(capsys, "enqueue", "good", "null", "good2", "12345", "true", "1e5", "[1]")
    assert code == 1
    assert out == "published 4, rejected 3\n"
    assert [line.split(":")[0] for line in err.splitlines()] == ["argument 2", "argument 5", "argument 7"]
    assert "got null" in err
    assert "Traceback" not in err
    assert queued_datasets() == ["good", "good2", "12345", "1e5"]


def test_enqueue_says_when_the_broker_confirmed_only_some(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def confirmed_one(url: str, name: str, bodies: list[bytes]) -> int:
        return 1

    monkeypatch.setattr("orchestrator.queues.publish_to", confirmed_one)
    code, out, err = cli(capsys, "enqueue", "a", "b", "c")
    assert (code, out) == (1, "published 1\n")
    assert err == "orchestrator: enqueue: the broker confirmed 1 of 3\n"


def test_enqueue_an_argument_that_is_not_utf8(capsys: pytest.CaptureFixture[str]) -> None:
    # The shell passes raw bytes; Python hands them over as surrogate escapes.
    code, out, err = cli(capsys, "enqueue", os.fsdecode(b"\xffab"), DS)
    assert (code, out) == (1, "published 1, rejected 1\n")
    assert err == "argument 1: message is not UTF-8\n"


def test_enqueue_a_file_with_lines_that_are_not_utf8(
    capsys: pytest.CaptureFixture[str], workdir: Path
) -> None:
    # Was: the whole file rejected.
    (workdir / "ids.txt").write_bytes(
        b"\xef\xbb\xbfbom-first\n\xff\xfe\nok-2\r\n\n" + b"caf\xe9\n" + b"null\n"
    )
    code, out, err = cli(capsys, "enqueue", "--file", "ids.txt")
    assert (code, out) == (1, "published 2, rejected 3\n")
    assert [line.split(":")[0] for line in err.splitlines()] == ["line 2", "line 5", "line 6"]
    assert queued_datasets() == ["bom-first", "ok-2"]


def test_enqueue_from_stdin_line_by_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"one\n\x80\ntwo\n")))
    code, out, err = cli(capsys, "enqueue", "--file", "-")
    assert (code, out, err) == (1, "published 2, rejected 1\n", "line 2: message is not UTF-8\n")


def test_message_body_is_what_intake_reads() -> None:
    assert message_body(b"12345") == b'{"datasetId":"12345"}'
    body = message_body(b"1e5", request_id="r-1", input_format="CSV")
    assert json.loads(body) == {"datasetId": "1e5", "requestId": "r-1", "inputFormat": {"format": "csv"}}
    assert parse_message(body, "m").dataset_id == "1e5"
    for raw in (b"null", b"true", b"[1]", b"\xff"):
        with pytest.raises(InvalidMessage):
            message_body(raw)


# --- options --------------------------------------------------------------------------------------------


def test_commands_other_than_simulate_and_demo_do_not_load_the_simulator() -> None:
    # aiohttp's server and the simulator's modules were a third of `enqueue`'s start-up.
    probe = (
        "import sys; from orchestrator.cli import build_parser; build_parser().parse_args(['enqueue', 'x']); "
        "print(sorted(m for m in sys.modules if m.startswith('orchestrator.aep.simulator')))"
    )
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)  # noqa: S603
    assert done.stdout.strip() == "['orchestrator.aep.simulator_config']"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"orchestrator {metadata.version('aep-orchestrator')}\n"


@pytest.mark.parametrize("position", ["before", "after"])
def test_config_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, workdir: Path, position: str
) -> None:
    monkeypatch.delenv("ORCH_QUEUE__URL")
    (workdir / "c.toml").write_text(f'[queue]\nurl = "sqlite:///{workdir}/from-toml.db"\n')
    args = (
        ["--config", "c.toml", "enqueue", DS]
        if position == "before"
        else ["enqueue", DS, "--config", "c.toml"]
    )
    assert cli(capsys, *args)[:2] == (0, "published 1\n")
    assert (workdir / "from-toml.db").is_file()
    assert not (workdir / "var").exists()


def test_config_after_the_command_wins_over_before(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    (workdir / "good.toml").write_text("[limits]\nrate = 5\n")
    (workdir / "bad.toml").write_text("[limitz]\nrate = 5\n")
    code, _, err = cli(capsys, "--config", "good.toml", "enqueue", DS, "--config", "bad.toml")
    assert code == 2
    assert err.startswith("orchestrator: ORCH_CONFIG: bad.toml: [limitz] is not a section")


@pytest.mark.parametrize("value", ["-1", "0", "x", "1.5"])
def test_limit_is_a_positive_whole_number(capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert "argument --limit:" in usage_error(capsys, "batches", "--limit", value)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_demo_count_is_at_least_one(capsys: pytest.CaptureFixture[str], value: str) -> None:
    # Was: IndexError.
    assert "argument --count: must be 1 or more" in usage_error(capsys, "demo", "--count", value)


# --- configuration through the command ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCH_QUEUE__URL", "sqlite://"),
        ("ORCH_QUEUE__URL", "sqlite:///:memory:"),
        ("ORCH_AEP__TIMEOUT", "inf"),
        ("ORCH_LIMITS__PERIOD", "nan"),
        ("ORCH_LIMIT__RATE", "5"),
        ("ORCH_AEP__BASE_URL", "https://zq1user:zq1pass@aep.example.test"),
    ],
)
def test_a_bad_setting_stops_enqueue_before_it_publishes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # Was: "published 2" into an in-memory queue that vanished with the command.
    monkeypatch.setenv(variable, value)
    code, out, err = cli(capsys, "enqueue", DS, "other")
    assert (code, out) == (2, "")
    [line] = err.splitlines()
    assert line.startswith(f"orchestrator: {variable}: ")
    assert "zq1pass" not in err


# --- batches --------------------------------------------------------------------------------------------


def test_batches_on_a_missing_store_creates_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, workdir: Path
) -> None:
    # Was: an empty store created at the mistyped path, and "0 records".
    monkeypatch.setenv("ORCH_STORE__URL", "sqlite:///typo/orchestrator.db")
    code, out, err = cli(capsys, "batches")
    assert (code, out) == (2, "")
    assert err == (
        f"orchestrator: ORCH_STORE__URL: no store at {workdir / 'typo' / 'orchestrator.db'}"
        " (`orchestrator run` creates it)\n"
    )
    assert list(workdir.iterdir()) == []


NOW = datetime(2026, 11, 28, 15, 0, 1)
RECORDS = [
    BatchRecord(
        "msg:57fdfbd9279a4a94bd12432c729c4bce", DS, State.CREATED, 1, NOW, NOW,
        batch_id="52c472ab71e249b006d6e8f21d7c2a41", batch_status="loading",
    ),
    BatchRecord(
        "crm-2026-11-28", "5c8c3c555033b814b69f9480", State.FAILED, 8, NOW, NOW,
        last_error="bad request: batches.create HTTP 400 BadRequestError Dataset 5c8c3c555033b814b69f9480 "
        "not found",
    ),
    BatchRecord(
        "msg:bf00579f3f204771b937c64aff072b4f", "0123456789abcdef01234567", State.RETRYING, 3, NOW, NOW,
        last_error="server error: batches.create HTTP 503 Service Unavailable (Retry-After 1)",
    ),
    BatchRecord("req-4", "dataset_with-underscore", State.PENDING, 0, NOW, NOW),
    BatchRecord("msg:0d1f", "x", State.REJECTED, 0, NOW, NOW, last_error="datasetId is missing"),
]  # fmt: skip


def render(records: list[BatchRecord], width: int) -> str:
    out = io.StringIO()
    Console(width=width, file=out, color_system=None).print(batches_table(records, width))
    return out.getvalue()


@pytest.mark.parametrize("width", [100, 120])
def test_batches_table_fits_a_100_to_120_column_terminal(width: int) -> None:
    # Was: dataset, state and error cut to "…" at these widths.
    text = render(RECORDS, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    assert "…" not in text
    for record in RECORDS:
        assert any(record.dataset_id in line.split() for line in lines), record.dataset_id
        assert any(record.state.value in line.split() for line in lines), record.state
    words = " ".join(text.split())
    for phrase in ("BadRequestError Dataset", "Service Unavailable", "datasetId is missing", "8 tries"):
        assert phrase in words
    # Folded, not cut: every id is there, whole or in pieces on consecutive lines.
    for value in ("52c472ab71e249b006d6e8f21d7c2a41", *(record.request_id for record in RECORDS)):
        assert appears_folded(lines, value), value


def appears_folded(lines: list[str], value: str) -> bool:
    """Whether `value` is a word of one line, or starts as a word of one line and goes on as a word
    of each line below it."""
    for index, line in enumerate(lines):
        for word in line.split():
            rest, below = value.removeprefix(word), index + 1
            if not word or rest == value:
                continue
            while rest and below < len(lines):
                piece = next((w for w in lines[below].split() if rest.startswith(w)), "")
                if not piece:
                    break
                rest, below = rest.removeprefix(piece), below + 1
            if not rest:
                return True
    return False


def test_batches_table_keeps_each_value_on_one_line_when_there_is_room() -> None:
    text = render(RECORDS, 240)
    for record in RECORDS:
        assert record.request_id in text
        assert record.last_error is None or record.last_error in text
    assert "52c472ab71e249b006d6e8f21d7c2a41" in text
    assert "2026-11-28" in text


def test_batches_table_escapes_control_characters_and_markup() -> None:
    record = BatchRecord(
        "evil\x1b[31m[bold]x[/]\u202egnp.exe",
        DS,
        State.FAILED,
        1,
        NOW,
        NOW,
        last_error="AEP said \x9b2J\u2066",
    )
    text = render([record], 240)
    assert "evil\\x1b[31m[bold]x[/]\\u202egnp.exe" in text
    assert "AEP said \\x9b2J\\u2066" in text
    assert not any(char in text for char in "\x1b\u202e\x9b\u2066")


# --- logs -----------------------------------------------------------------------------------------------

HOSTILE = "evil\x1b[2J\x9b31m\u202egnp.exe\u2028x"


def test_console_logs_escape_control_and_bidi_characters() -> None:
    out = io.StringIO()
    logs.configure("console", "info", stream=out)
    logs.get("test").info("intake.accepted", request_id=HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logs.get("test").exception("service.crashed")
    text = out.getvalue()
    assert "request_id=evil\\x1b[2J\\x9b31m\\u202egnp.exe\\u2028x" in text
    assert not any(char in text for char in "\x1b\x9b\u202e\u2028")
    assert "Traceback (most recent call last):\n" in text  # a traceback keeps its lines


def test_json_logs_escape_control_and_bidi_characters() -> None:
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    logs.get("test").info("intake.accepted", request_id=HOSTILE)
    text = out.getvalue()
    assert not any(char in text for char in "\x1b\x9b\u202e\u2028")
    assert json.loads(text)["request_id"] == HOSTILE  # escaped, not altered


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain é ✓", "plain é ✓"),
        ("a\x00b\x7f\x85", "a\\x00b\\x7f\\x85"),
        ("\u061c\u200e\u200f\u202a\u202e\u2066\u2069", "\\u061c\\u200e\\u200f\\u202a\\u202e\\u2066\\u2069"),
        ("tab\tnew\nline", "tab\\x09new\\x0aline"),
    ],
)
def test_escape_controls(text: str, expected: str) -> None:
    assert logs.escape_controls(text) == expected


# --- demo -----------------------------------------------------------------------------------------------


def test_demo_messages_for_one_request() -> None:
    assert demo.demo_messages(1) == [demo.dataset_id(0).encode()]
    two = demo.demo_messages(2)
    assert len(two) == 3
    assert two[2] == two[1]  # the request sent twice
    with pytest.raises(ValueError, match="at least one"):
        demo.demo_messages(0)


def test_demo_hint_names_a_command_the_user_can_run(workdir: Path) -> None:
    venv_script = workdir / ".venv" / "bin" / "orchestrator"
    venv_script.parent.mkdir(parents=True)
    venv_script.touch()

    def on_path(found: str | None) -> demo.Which:
        return lambda name: found

    # Not on PATH (make demo): the path that was run, relative to here.
    assert demo.command_name(str(venv_script), "/usr/bin/python3", on_path(None)) == ".venv/bin/orchestrator"
    # On PATH, and the same program: its name.
    assert (
        demo.command_name(str(venv_script), "/usr/bin/python3", on_path(str(venv_script))) == "orchestrator"
    )
    # Another `orchestrator` first on PATH: the path, so the hint runs this one.
    assert (
        demo.command_name(str(venv_script), "/x", on_path("/usr/bin/orchestrator"))
        == ".venv/bin/orchestrator"
    )
    # python -m orchestrator
    main_py = "/site-packages/orchestrator/__main__.py"
    assert (
        demo.command_name(main_py, str(workdir / "py" / "python"), on_path(None))
        == "py/python -m orchestrator"
    )
    assert (
        demo.command_name(main_py, "/opt/py/bin/python", on_path(None))
        == "/opt/py/bin/python -m orchestrator"
    )
    # A path with a space is quoted for the shell.
    assert (
        demo.command_name("/opt/my tools/orchestrator", "/x", on_path(None)) == "'/opt/my tools/orchestrator'"
    )


@pytest.mark.parametrize(
    "line", [b"abc", b" 5c8c3c555033b814b69f947f\r", b"12345", b"1e5", b"a" * 128, b"A-b_9", b"x" * 40]
)
def test_a_bare_id_line_becomes_the_message_the_general_path_makes(line: bytes) -> None:
    # The fast path for bare ids gives byte for byte what validating and serialising the JSON gives.
    general = json.dumps({"datasetId": line.strip().decode()}, separators=(",", ":")).encode()
    assert message_body(line) == general
    assert message_body(line, input_format="csv") == general[:-1] + b',"inputFormat":{"format":"csv"}}'


@pytest.mark.parametrize("line", [b"null", b"true", b"false", b"a" * 129, b"-x", b"a b"])
def test_lines_that_are_not_bare_ids_are_still_judged_in_full(line: bytes) -> None:
    with pytest.raises(InvalidMessage):
        message_body(line)


def test_run_has_the_service_freeze_its_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's process is the service's alone: it asks the service to freeze what start-up made
    (`service._freeze_start_up`); in-process callers, like the tests, do not."""
    from orchestrator import service

    asked: list[dict[str, object]] = []

    async def run(settings: object, **options: object) -> int:
        asked.append(options)
        return 0

    monkeypatch.setattr(service, "run", run)
    for name, value in {"CLIENT_ID": "cid", "CLIENT_SECRET": "secret", "ORG_ID": "ORG@AdobeOrg"}.items():
        monkeypatch.setenv(f"ORCH_AEP__{name}", value)

    assert main(["run", "--until-idle"]) == 0
    assert asked == [{"until_idle": True, "freeze_start_up": True}]
