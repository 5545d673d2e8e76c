"""Structured logs: one event per thing that happened, named `component.event`.

JSON (one object per line) by default, readable console output on request. The standard library's
`logging` (aiohttp, SQLAlchemy, Alembic) goes through the same processors, so every line has the same
shape. Keys that could carry a secret are masked here, as a last line of defence: the code never logs
tokens in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset({"token", "access_token", "client_secret", "authorization", "password", "secret"})

# Characters a terminal acts on instead of showing: C0 and C1 controls (ESC starts colour and cursor
# sequences), DEL, the line and paragraph separators, and the bidirectional formatting characters, which
# reorder the text around them ("Trojan Source"). Request ids, AEP's error texts and broker bodies are
# other people's text; a log line or a table row must show them, not obey them.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with every unsafe character (but those in `keep`) written as a `\\x1b` or `\\u202e` escape."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escaped, text)


def _escape_for_terminal(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Strings only: the console renderer shows every other value with repr(), which escapes already.
    for key, value in event.items():
        if isinstance(value, str):
            # A traceback keeps its line breaks and indentation; nothing else may break a line.
            event[key] = escape_controls(value, keep="\n\t" if key == "exception" else "")
    return event


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "***"
    return event


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route stdlib logging through it. Safe to call more than once."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _mask_secrets,
    ]
    renderers: list[structlog.types.Processor]
    if fmt == "console":
        renderers = [
            _escape_for_terminal,
            structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty()),
        ]
    else:
        # ensure_ascii (json.dumps' default, stated here because it matters): every control, C1 and bidi
        # character leaves as a \uXXXX escape, so the line is safe on a terminal and still round-trips.
        renderers = [structlog.processors.JSONRenderer(ensure_ascii=True)]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                *renderers,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at INFO about things our own events already say.
    for noisy in ("aiohttp.access", "sqlalchemy.engine", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        # Filtering first: an event below the level costs a comparison, not the processor chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get(component: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component)
    return logger
