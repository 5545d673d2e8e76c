"""Structured logs: one event per thing that happened, named `component.event`.

JSON (one object per line) by default, readable console output on request. The standard library's
`logging` (aiohttp, SQLAlchemy, Alembic) goes through the same processors, so every line has the same
shape. The code never logs tokens or secrets; `redact` is the last line of defence for what a library
(or a mistake) puts in a line anyway: it runs on every line, ours and the libraries', just before it
is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

MASK = "***"
# Keys whose value is a secret whatever it holds (compared lower-case).
SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "authorization",
        "proxy-authorization",
        "password",
        "secret",
    }
)

# The keys of the request at hand (bound by intake and the dispatcher for the task that serves it).
REQUEST_KEYS = ("request_id", "dataset_id", "batch_id", "attempt", "message_id")
# Components whose events are about the process, never about one request. A task inherits the
# context of the task that started it, so a token fetch, a limiter pause or a store writer started
# while serving a request would otherwise carry that request's keys: wrong, and misleading when
# searching the logs for one request.
PROCESS_COMPONENTS = frozenset({"auth", "limiter", "service", "http", "events"})
# Third-party loggers kept at WARNING even at ORCH_LOG__LEVEL=debug: at debug their internals were
# most of the output (92 % of the lines were aiosqlite's), and our own events say what happened.
QUIET_LIBRARIES = (
    "aiosqlite",
    "sqlalchemy",
    "alembic",
    "asyncio",
    "aiohttp.access",
    "aio_pika",
    "aiormq",
    "redis",
    "nats",
    "urllib3",
)

# Characters a terminal acts on instead of showing: C0 and C1 controls (ESC starts colour and cursor
# sequences), DEL, the line and paragraph separators, and the bidirectional formatting characters, which
# reorder the text around them ("Trojan Source"). Request ids, AEP's error texts and broker bodies are
# other people's text; a log line or a table row must show them, not obey them.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# Secrets in text, whatever shape a library gives them: each pattern keeps its first group (the name)
# and masks what follows it.
_SECRET_PATTERNS = (
    # An Authorization header however it is rendered: `Authorization: Bearer x`, `'Authorization':
    # 'Basic x'` (a dict's or a CIMultiDict's repr), `authorization=x`. The whole value goes, scheme too,
    # up to what ends a value in those renderings (a quote, a line end, a separator, a bracket).
    re.compile(r"(?i)(\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,;&})\]>]+"),
    # A bearer token wherever it stands.
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/-]+=*"),
    # Fields of an OAuth form, a query string, JSON or a repr: `client_secret=x`, `"access_token": "x"`.
    re.compile(
        r"(?i)(\b(?:client_secret|access_token|refresh_token|id_token|password|token)"
        r"['\"]?\s*[:=]\s*['\"]?)[^'\"\s&,;}]+"
    ),
    # A JWT (IMS access tokens are JWTs): three base64url parts, the first a JSON object ("eyJ").
    re.compile(r"()\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
)
# What each of those patterns needs in the text, lower-cased: looking for these rules most strings out
# (ids, names, times), which keeps redaction from costing more than rendering the line. Plain substring
# tests of the lower-cased text: a case-insensitive regex of the same words took 50 ns a character.
_SUSPECT_WORDS = ("authorization", "bearer", "secret", "token", "password", "eyj")
_secret_values: set[str] = set()
_secret_value_pattern: re.Pattern[str] | None = None
# Keys this module writes from nothing a caller gave it: no secret can be in them.
_OWN_KEYS = frozenset({"timestamp", "level"})


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with every unsafe character (but those in `keep`) written as a `\\x1b` or `\\u202e` escape."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escaped, text)


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values (the configured client secret, a fixed access token) wherever they appear
    in a log line, even inside a library's message."""
    global _secret_value_pattern
    _secret_values.update(value for value in values if value)
    if _secret_values:
        # Longest first: a secret that contains another is masked whole.
        ordered = sorted(_secret_values, key=len, reverse=True)
        _secret_value_pattern = re.compile("|".join(re.escape(value) for value in ordered))


def _suspect(text: str) -> bool:
    """Whether `text` may hold what a pattern of `_SECRET_PATTERNS` masks."""
    lowered = text.lower()
    return any(word in lowered for word in _SUSPECT_WORDS)


def _may_hold_secrets(text: str) -> bool:
    """Whether `redact_text` may have anything to mask in `text` (False: certainly not)."""
    return _suspect(text) or any(value in text for value in _secret_values)


def redact_text(text: str) -> str:
    """`text` with tokens and secrets masked (see `_SECRET_PATTERNS` and `register_secrets`)."""
    if not _may_hold_secrets(text):
        return text  # most strings (ids, names, times): no substitution
    if _secret_value_pattern is not None:
        text = _secret_value_pattern.sub(MASK, text)
    if not _suspect(text):
        return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + MASK, text)
    return text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, dict):
        return {
            key: MASK if str(key).lower() in SECRET_KEYS else _redacted(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    # Any other object is rendered by its repr (JSON and console alike): redact that text instead,
    # since a header mapping or a URL with credentials shows them in its repr.
    return redact_text(repr(value))


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor: mask tokens and secrets in every value, by key (SECRET_KEYS) and by content.

    The line's strings (most of its values: ids, names, states) are looked at together, once, in
    one text that joins them: whatever one of them holds, the join holds too (a find made up by the
    join only costs the slower path). Only when that finds something is each string redacted on
    its own."""
    strings: list[str] = []
    for key, value in event.items():
        if key in _OWN_KEYS:
            continue
        if key.lower() in SECRET_KEYS:
            event[key] = MASK
        elif isinstance(value, str):
            strings.append(value)
        elif not (isinstance(value, bool | int | float) or value is None):
            event[key] = _redacted(value)
    if strings and _may_hold_secrets("\n".join(strings)):
        for key, value in event.items():
            if isinstance(value, str) and key not in _OWN_KEYS:
                event[key] = redact_text(value)
    return event


def _component(event: MutableMapping[str, Any]) -> str | None:
    """The component an event of ours belongs to (`auth` of `auth.token_fetched`); None for a line
    from a library (the stdlib path marks it with `_record`)."""
    if "_record" in event:
        return None
    name = event.get("event")
    return name.split(".", 1)[0] if isinstance(name, str) else None


def merge_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's `merge_contextvars`, but the request's keys go only to events that can belong to a
    request: not to a process-wide component's, nor to a library's (which cannot say which request it
    served, and whose task may have been started by any request). Keys given in the call itself are
    always kept."""
    context = structlog.contextvars.get_contextvars()
    if not context:
        return event
    component = _component(event)
    unrelated = component is None or component in PROCESS_COMPONENTS
    for key, value in context.items():
        if not (unrelated and key in REQUEST_KEYS):
            event.setdefault(key, value)
    return event


def _escape_for_terminal(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Strings only: the console renderer shows every other value with repr(), which escapes already.
    for key, value in event.items():
        if isinstance(value, str):
            # A traceback keeps its line breaks and indentation; nothing else may break a line.
            event[key] = escape_controls(value, keep="\n\t" if key == "exception" else "")
    return event


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route stdlib logging through it. Safe to call more than once."""
    shared: list[structlog.types.Processor] = [
        merge_context,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
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
    output = stream or sys.stderr
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            # The libraries' records end here, so redaction sees every line of theirs too,
            # tracebacks included (after format_exc_info has made them text).
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                *renderers,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A library's logger keeps WARNING whatever the level asked (max: a level above WARNING is
    # honoured, since the root's level does not filter records that reach it from a child logger).
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(max(logging.WARNING, root.level))
    # Our own events skip the standard library's machinery (a LogRecord, handler locks, a formatter
    # per line): rendered by the same processors and written straight to the same stream. On the hot
    # path (a line per request received and per batch made) that was 70 % of the cost of a line.
    # An event below the level costs one method call returning None (the filtering logger).
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact, *renderers],
        logger_factory=structlog.WriteLoggerFactory(file=output),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )


def get(component: str) -> Any:
    """The logger of a component (`log.info("component.event", key=value)`)."""
    return structlog.get_logger(component)
