"""The `orchestrator` command: run, enqueue, batches, status, requeue, simulate, demo.

Exit codes: 0 success; 1 a runtime failure or a partly rejected input; 2 a usage or configuration
error, printed one line per problem, with no traceback and no secret values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING

from orchestrator import eventloop, logs
from orchestrator.messages import (
    DATASET_ID,
    INPUT_FORMATS,
    InvalidMessage,
    message_object,
    parse_input_format,
    parse_message,
    request_from_json,
)
from orchestrator.operator import SINCE_EXAMPLE
from orchestrator.settings import ConfigError, Settings, load_settings
from orchestrator.store.base import BatchRecord, State

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.store.sql import SqlBatchStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DISTRIBUTION = "aep-orchestrator"
CONFIG_HELP = "a TOML settings file (or ORCH_CONFIG)"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count or a limit of 0 or less means nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # The simulator's options only: the simulator itself (aiohttp's server) is imported by the
    # commands that run it, not by every command's start-up.
    from orchestrator.aep import simulator_config

    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Turns a stream of dataset ids into Adobe Experience Platform batches.",
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {version()}")
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    # `--config` after the command too (`orchestrator run --config x.toml`). SUPPRESS: a command that is
    # not given it leaves the value given before the command in place.
    config_after = argparse.ArgumentParser(add_help=False)
    config_after.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, parents=[config_after])
        return sub

    run = command("run", "run the service")
    run.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once the queue is empty and no request waits for a call or a retry",
    )

    enqueue = command("enqueue", "publish requests to the configured queue")
    enqueue.add_argument("dataset_ids", nargs="*", metavar="DATASET_ID")
    enqueue.add_argument(
        "--file", metavar="PATH", help="one dataset id or JSON message per line; - for stdin"
    )
    enqueue.add_argument("--request-id", metavar="ID", help="the idempotency key (with one DATASET_ID)")
    enqueue.add_argument(
        "--input-format",
        choices=sorted(INPUT_FORMATS),
        type=str.lower,
        help="inputFormat.format for messages that give none",
    )

    batches = command("batches", "list the recorded requests")
    batches.add_argument("--state", choices=[state.value for state in State])
    batches.add_argument("--dataset", metavar="ID")
    batches.add_argument("--limit", type=positive_int, metavar="N", help="at most N records")
    batches.add_argument("--json", action="store_true", help="one JSON object per line")

    status = command(
        "status", "counts by state, the oldest unfinished request, the effective rate, the last errors"
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    requeue = command("requeue", "re-drive failed requests (the cause fixed): still one batch each")
    requeue.add_argument(
        "--state", required=True, type=str.lower, help="failed: the only state that is requeued"
    )
    requeue.add_argument("--dataset", metavar="ID", help="only this dataset's requests")
    requeue.add_argument(
        "--since",
        metavar="TIME",
        help=f"only requests that failed at or after an ISO 8601 time ({SINCE_EXAMPLE})",
    )
    requeue.add_argument("--dry-run", action="store_true", help="list what would be requeued, change nothing")

    simulate = command("simulate", "run the local AEP + IMS simulator")
    simulator_config.add_arguments(simulate)

    demo = command("demo", "end to end on the embedded defaults against the simulator")
    demo.add_argument(
        "--count", type=positive_int, default=300, help="how many requests to enqueue (default 300)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here when the output fitted in the buffer
    except BrokenPipeError:
        # The reader closed the pipe (`batches --json | head -1`): it has what it wanted, and there is no
        # one left to tell. stdout goes to devnull so the interpreter's own flush at exit cannot raise the
        # same error again (the recipe of the Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _usage_error(exc.problems)
    logs.register_secrets(configured_secrets(settings))
    if args.command != "demo":
        logs.configure(settings.log.format, settings.log.level)
    try:
        if args.command == "run":
            return _run(settings, args.until_idle)
        if args.command == "enqueue":
            return _enqueue(settings, args)
        if args.command == "batches":
            return asyncio.run(_batches(settings, args))
        if args.command == "status":
            return asyncio.run(_status(settings, args.json))
        if args.command == "requeue":
            return _requeue(settings, args)
        if args.command == "simulate":
            return _simulate(args)
        from orchestrator import demo

        return demo.main(settings, args.count)
    except ConfigError as exc:
        return _usage_error(exc.problems)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        raise  # not a failure of the command: `main` ends quietly
    except Exception as exc:  # noqa: BLE001 - a runtime failure is one line for the user, not a traceback
        logs.get("cli").debug("cli.failed", exc_info=exc)
        message = f"orchestrator: {args.command} failed: {type(exc).__name__}: {exc}"[:1000]
        print(logs.escape_controls(message), file=sys.stderr)
        return EXIT_FAILURE


def configured_secrets(settings: Settings) -> list[str]:
    """The secret values of the settings (the AEP credentials, the passwords in URLs), for the logs to
    mask wherever they turn up, even in a library's message."""
    from urllib.parse import urlsplit

    values = [
        secret.get_secret_value()
        for secret in (settings.aep.client_secret, settings.aep.access_token)
        if secret
    ]
    for url in (settings.store.url, settings.queue.url, settings.events.url, settings.limits.redis_url):
        try:
            password = urlsplit(url).password if url else None
        except ValueError:  # settings validated the URLs they parse; any other is not ours to judge
            password = None
        if password:
            values.append(password)
    return values


def _usage_error(problems: Iterable[str]) -> int:
    for problem in problems:
        print(f"orchestrator: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _run(settings: Settings, until_idle: bool) -> int:
    from orchestrator import service

    problems = settings.aep.credentials_problems()
    if problems:
        raise ConfigError(problems)
    return eventloop.run(service.run(settings, until_idle=until_idle, freeze_start_up=True))


# -- enqueue -----------------------------------------------------------------------------------


def _enqueue(settings: Settings, args: argparse.Namespace) -> int:
    if not args.dataset_ids and args.file is None:
        return _usage_error(["enqueue: give DATASET_ID arguments or --file PATH (- for stdin)"])
    if args.request_id is not None and (len(args.dataset_ids) != 1 or args.file is not None):
        return _usage_error(["enqueue: --request-id goes with exactly one DATASET_ID"])
    bodies: list[bytes] = []
    rejected = 0
    for where, line in _input_lines(args):
        try:
            bodies.append(message_body(line, request_id=args.request_id, input_format=args.input_format))
        except InvalidMessage as exc:
            rejected += 1
            print(f"{where}: {exc}", file=sys.stderr)
    published = asyncio.run(_publish(settings, bodies)) if bodies else 0
    print(f"published {published}" + (f", rejected {rejected}" if rejected else ""))
    if published < len(bodies):
        # The broker confirmed only the first ones: say so, so the rest can be sent again.
        print(f"orchestrator: enqueue: the broker confirmed {published} of {len(bodies)}", file=sys.stderr)
    return EXIT_FAILURE if rejected or published < len(bodies) else EXIT_OK


def _input_lines(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    """Each input as the bytes a producer would send: undecodable text is then named like any other
    invalid line, by `message_body`, instead of failing the whole input."""
    for index, dataset_id in enumerate(args.dataset_ids, start=1):
        yield f"argument {index}", os.fsencode(dataset_id)  # the argument's bytes, as the shell gave them
    if args.file is None:
        return
    if args.file == "-":
        yield from _numbered(sys.stdin.buffer)
        return
    try:
        with open(args.file, "rb") as handle:
            yield from _numbered(handle)
    except OSError as exc:
        raise ConfigError([f"--file: cannot read {args.file}: {exc.strerror}"]) from None


def _numbered(handle: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    for number, line in enumerate(handle, start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # the byte order mark some editors write
        if line.strip():
            yield f"line {number}", line.strip()


# A line that is a dataset id (messages.DATASET_ID, as bytes), and JSON's names, which are not.
_BARE_ID = re.compile(DATASET_ID.pattern.encode())
_JSON_NAMES = frozenset({b"null", b"true", b"false"})


def message_body(raw: bytes, *, request_id: str | None = None, input_format: str | None = None) -> bytes:
    """Validate one input line (a bare dataset id or a JSON message) the way intake will, and turn it
    into the JSON message to publish."""
    if request_id is None and input_format is None:
        bare = raw.strip()
        if _BARE_ID.fullmatch(bare) and bare not in _JSON_NAMES:
            # The common line, a bare dataset id: the message the general path below would make
            # (letters, digits, '-' and '_' need no escaping), without three JSON round trips.
            return b'{"datasetId":"' + bare + b'"}'
    message = message_object(raw)
    request_from_json(message, "enqueue")
    if request_id is not None:
        message["requestId"] = request_id
    if input_format is not None and "inputFormat" not in message:
        message["inputFormat"] = {"format": parse_input_format(input_format)}
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    parse_message(body, "enqueue")  # what we add must keep the message valid (size included)
    return body


# A progress bar for longer inputs than this, at a terminal only (never in a pipe or a log file).
PROGRESS_FROM = 1000
# With a bar, messages go to the broker in chunks of this many, so that the bar moves.
PUBLISH_CHUNK = 1000


async def _publish(settings: Settings, bodies: list[bytes]) -> int:
    from orchestrator.queues import open_publisher, publish_to

    if not show_progress(len(bodies), sys.stderr):
        # One call: on the embedded queue one transaction, so a failure publishes nothing.
        return await publish_to(settings.queue.url, settings.queue.name, bodies)
    publisher = open_publisher(settings.queue.url, settings.queue.name)
    await publisher.open()
    try:
        with progress_bar(len(bodies), "publishing") as advance:
            return await publish_chunks(publisher.publish, bodies, advance)
    finally:
        await publisher.close()


def show_progress(count: int, stream: IO[str]) -> bool:
    return count > PROGRESS_FROM and stream.isatty()


async def publish_chunks(
    publish: Callable[[Sequence[bytes]], Awaitable[int]], bodies: list[bytes], advance: Callable[[int], None]
) -> int:
    """Publish `bodies` PUBLISH_CHUNK at a time. Chunks are separate publishes: should one fail, the
    error says how many went before it (lines without a `requestId` would be new requests if sent again)."""
    published = 0
    for start in range(0, len(bodies), PUBLISH_CHUNK):
        chunk = bodies[start : start + PUBLISH_CHUNK]
        try:
            accepted = await publish(chunk)
        except Exception as exc:
            raise PublishInterrupted(published, len(bodies), exc) from exc
        published += accepted
        advance(len(chunk))
        if accepted < len(chunk):
            break  # the broker took only the first ones: what was confirmed stays the first N lines
    return published


class PublishInterrupted(Exception):
    def __init__(self, published: int, total: int, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause} (published {published} of {total} before it)")


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A bar on stderr; yields the function that moves it on."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,  # the count printed after it says what happened
    ) as progress:
        task = progress.add_task(what, total=total)
        yield lambda done: progress.advance(task, done)


# -- batches -----------------------------------------------------------------------------------


async def _batches(settings: Settings, args: argparse.Namespace) -> int:
    async with _existing_store(settings) as store:
        state = State(args.state) if args.state else None
        records = await store.records(state=state, dataset_id=args.dataset, limit=args.limit)
    if args.json:
        out = sys.stdout
        for record in records:
            out.write(json.dumps(record.to_json()) + "\n")
        return EXIT_OK
    console = _stdout_console()
    console.print(batches_table(records, console.width))
    print(f"{len(records)} records")
    return EXIT_OK


def _stdout_console() -> Console:
    from rich.console import Console

    # Piped output has no terminal width to fit: keep rows whole rather than cut at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 240)


@asynccontextmanager
async def _existing_store(settings: Settings) -> AsyncIterator[SqlBatchStore]:
    """The configured store, for a command that reads it (or changes records in it): never created."""
    from orchestrator.store.sql import SqlBatchStore

    _require_store(settings.store.url)
    store = SqlBatchStore(settings.store.url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _require_store(url: str) -> None:
    """A read command must find the store, not create an empty one where a mistyped path points."""
    from orchestrator.store.engine import async_url

    target = async_url(url)
    if target.get_backend_name() == "sqlite" and not Path(target.database or "").is_file():
        raise ConfigError([f"ORCH_STORE__URL: no store at {target.database} (`orchestrator run` creates it)"])


# When the terminal is too narrow for whole ids on one line, request ids fold at 19 columns and batch
# ids at 16: two lines hold a `msg:` request id (36 characters) or a batch id (32), and leave the error
# column room to wrap. Below 110 columns the update time goes too (`--json` has it).
NARROW_REQUEST, NARROW_BATCH, WITH_UPDATED = 19, 16, 110
ERROR_CHARS = 300  # the table shows this much of an error; `--json` has all of it


def batches_table(records: Sequence[BatchRecord], width: int) -> Table:
    """The records as a table that fits `width` columns without cutting a dataset id or a state: each
    record takes two lines (attempts under the state, AEP's status under the batch id, the time under
    the date), ids fold and errors wrap when the terminal is narrow. Other people's text (request ids,
    errors) is shown with its control characters escaped, and never read as markup."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def cell(first: str | None, second: str | None = None) -> Text:
        text = Text(logs.escape_controls(first or ""))
        if second:
            text.append("\n" + logs.escape_controls(second), style="dim")
        return text

    rows = []
    for record in records:
        error = record.last_error or ""
        updated = record.updated_at  # UTC, as the store keeps every time
        tries = f"{record.attempts} {'try' if record.attempts == 1 else 'tries'}" if record.attempts else ""
        life = record.lifecycle
        if life is not None and life.files_total:
            # The upload stage: its step while under way, the files in of total.
            step = "" if life.step == "done" else f"{life.step}, "
            tries = f"{tries} · {step}files {life.files_done}/{life.files_total}".lstrip(" ·")
        rows.append(
            [
                cell(record.request_id),
                cell(record.dataset_id),
                cell(record.state.value, tries),
                cell(record.batch_id, record.batch_status),
                cell(f"{updated:%Y-%m-%d}", f"{updated:%H:%M:%S}Z"),
                cell(error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 1] + "…"),
            ]
        )
    headers = ("request", "dataset", "state", "batch", "updated", "last error")
    widths = [
        max([len(header)] + [len(line) for row in rows for line in row[index].plain.split("\n")])
        for index, header in enumerate(headers)
    ]
    # Two columns between cells, and up to 40 for the error to start on the same line.
    narrow = sum(widths[:5]) + 2 * 5 + min(widths[5], 40) > width
    with_updated = not narrow or width >= WITH_UPDATED
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    # A fixed width (not a maximum) keeps rich from squeezing the ids before the error when it fits.
    table.add_column(headers[0], overflow="fold", width=min(widths[0], NARROW_REQUEST) if narrow else None)
    table.add_column(headers[1], no_wrap=True, overflow="fold")
    table.add_column(headers[2], no_wrap=True)
    table.add_column(headers[3], overflow="fold", width=min(widths[3], NARROW_BATCH) if narrow else None)
    if with_updated:
        table.add_column(headers[4], no_wrap=True)
    table.add_column(headers[5], overflow="fold")
    for row in rows:
        table.add_row(*(row if with_updated else row[:4] + row[5:]))
    return table


# -- status and requeue ------------------------------------------------------------------------


async def _status(settings: Settings, as_json: bool) -> int:
    from orchestrator import operator

    async with _existing_store(settings) as store:
        status = await operator.read_status(store, datetime.now(UTC))
    if as_json:
        print(json.dumps(status.to_json()))
        return EXIT_OK
    console = _stdout_console()
    console.print(operator.status_summary(status))
    if status.errors:
        console.print(operator.errors_table(status))
    return EXIT_OK


def _requeue(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator import operator

    if args.state != State.FAILED.value:
        known = args.state in {state.value for state in State}
        state = logs.escape_controls(args.state)
        what = f"{state} requests are not requeued" if known else f"{state} is not a state"
        return _usage_error([f"requeue: --state {state}: {what}; only failed requests can be requeued"])
    try:
        since = operator.parse_since(args.since) if args.since is not None else None
    except ValueError as exc:
        return _usage_error([f"requeue: {logs.escape_controls(str(exc))}"])
    return asyncio.run(_requeue_failed(settings, args.dataset, since, args.dry_run))


async def _requeue_failed(
    settings: Settings, dataset_id: str | None, since: datetime | None, dry_run: bool
) -> int:
    from orchestrator import operator

    async with _existing_store(settings) as store:
        if dry_run:
            records = await store.failed_records(dataset_id, since)
            for record in records:
                print(operator.requeue_line(record))
            print(f"would requeue {len(records)} (dry run: nothing changed)")
            return EXIT_OK
        requeued = await store.requeue_failed(datetime.now(UTC), dataset_id=dataset_id, failed_since=since)
    print(f"requeued {len(requeued)}")
    return EXIT_OK


# -- simulate ----------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from orchestrator.aep import simulator

    try:
        config = simulator.config_from_args(args)
    except ValueError as exc:
        return _usage_error([str(exc)])
    asyncio.run(simulator.serve(config, args.host, args.port))
    return EXIT_OK
