"""The `orchestrator` command: run, enqueue, batches, simulate, demo.

Exit codes: 0 success; 1 a runtime failure or a partly rejected input; 2 a usage or configuration
error, printed one line per problem, with no traceback and no secret values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

from orchestrator import logs
from orchestrator.messages import (
    INPUT_FORMATS,
    InvalidMessage,
    parse_input_format,
    parse_message,
)
from orchestrator.settings import ConfigError, Settings, load_settings
from orchestrator.store.base import State

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from orchestrator.aep import simulator

    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Turns a stream of dataset ids into Adobe Experience Platform batches.",
    )
    parser.add_argument("--config", metavar="PATH", help="a TOML settings file (or ORCH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the service")
    run.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once the queue is empty and no request waits for a call or a retry",
    )

    enqueue = commands.add_parser("enqueue", help="publish requests to the configured queue")
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

    batches = commands.add_parser("batches", help="list the recorded requests")
    batches.add_argument("--state", choices=[state.value for state in State])
    batches.add_argument("--dataset", metavar="ID")
    batches.add_argument("--limit", type=int, metavar="N", help="at most N records")
    batches.add_argument("--json", action="store_true", help="one JSON object per line")

    simulate = commands.add_parser("simulate", help="run the local AEP + IMS simulator")
    simulator.add_arguments(simulate)

    demo = commands.add_parser("demo", help="end to end on the embedded defaults against the simulator")
    demo.add_argument("--count", type=int, default=300, help="how many requests to enqueue (default 300)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _usage_error(exc.problems)
    if args.command != "demo":
        logs.configure(settings.log.format, settings.log.level)
    try:
        if args.command == "run":
            return _run(settings, args.until_idle)
        if args.command == "enqueue":
            return _enqueue(settings, args)
        if args.command == "batches":
            return asyncio.run(_batches(settings, args))
        if args.command == "simulate":
            return _simulate(args)
        from orchestrator import demo

        return demo.main(settings, args.count)
    except ConfigError as exc:
        return _usage_error(exc.problems)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - a runtime failure is one line for the user, not a traceback
        logs.get("cli").debug("cli.failed", exc_info=exc)
        print(f"orchestrator: {args.command} failed: {type(exc).__name__}: {exc}"[:1000], file=sys.stderr)
        return EXIT_FAILURE


def _usage_error(problems: Iterable[str]) -> int:
    for problem in problems:
        print(f"orchestrator: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _run(settings: Settings, until_idle: bool) -> int:
    from orchestrator import service

    problems = settings.aep.credentials_problems()
    if problems:
        raise ConfigError(problems)
    return asyncio.run(service.run(settings, until_idle=until_idle))


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
    return EXIT_FAILURE if rejected else EXIT_OK


def _input_lines(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    for index, dataset_id in enumerate(args.dataset_ids, start=1):
        yield f"argument {index}", dataset_id
    if args.file is None:
        return
    if args.file == "-":
        yield from _numbered(sys.stdin)
        return
    try:
        with open(args.file, encoding="utf-8") as handle:
            yield from _numbered(handle)
    except OSError as exc:
        raise ConfigError([f"--file: cannot read {args.file}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"--file: {args.file} is not UTF-8 text"]) from None


def _numbered(handle: TextIO) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(handle, start=1):
        if line.strip():
            yield f"line {number}", line.strip()


def message_body(text: str, *, request_id: str | None = None, input_format: str | None = None) -> bytes:
    """Validate one input line (a bare dataset id or a JSON message) the way intake will, and turn it
    into the JSON message to publish."""
    parse_message(text.encode("utf-8"), "enqueue")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = text  # a bare dataset id, already validated
    message: dict[str, Any] = {"datasetId": data} if isinstance(data, str) else dict(data)
    if request_id is not None:
        message["requestId"] = request_id
    if input_format is not None and "inputFormat" not in message:
        message["inputFormat"] = {"format": parse_input_format(input_format)}
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    parse_message(body, "enqueue")  # what we add must keep the message valid (size included)
    return body


async def _publish(settings: Settings, bodies: list[bytes]) -> int:
    from orchestrator.queues import open_queue

    queue = open_queue(settings.queue.url, settings.queue.name)
    await queue.open()
    try:
        return await queue.publish(bodies)
    finally:
        await queue.close()


# -- batches -----------------------------------------------------------------------------------


async def _batches(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator.store.sql import SqlBatchStore

    store = SqlBatchStore(settings.store.url)
    await store.open()
    try:
        state = State(args.state) if args.state else None
        records = await store.records(state=state, dataset_id=args.dataset, limit=args.limit)
    finally:
        await store.close()
    if args.json:
        out = sys.stdout
        for record in records:
            out.write(json.dumps(record.to_json()) + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("request", "dataset", "state", "batch", "status", "attempts", "updated", "last error")
    for column in table.columns[:7]:
        column.no_wrap = True
    for record in records:
        row = record.to_json()
        table.add_row(
            *(str(row[key] or "") for key in ("requestId", "datasetId", "state", "batchId", "batchStatus")),
            str(record.attempts),
            str(row["updatedAt"]),
            (record.last_error or "")[:60],
        )
    # Piped output has no terminal width to fit: keep rows whole rather than cut at 80 columns.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    print(f"{len(records)} records")
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
