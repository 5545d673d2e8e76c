"""The log set-up: the shape of every line, whose keys go where, quiet libraries, and redaction of
tokens and secrets in our events and in the libraries' records alike."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
import structlog
from aioresponses import aioresponses
from multidict import CIMultiDict

from orchestrator import logs
from orchestrator.aep.auth import ImsTokenProvider
from orchestrator.clock import ManualClock
from orchestrator.pipeline.limiter import Limiter
from orchestrator.settings import LimitSettings
from tests.unit.fakes import IMS_URL, SECRET, aep_settings

TOKEN = (
    "eyJhbGciOiJSUzI1NiIsIng1dSI6Imltc19uYTEta2V5LWF0LTEuY2VyIn0.eyJpZCI6IjE3MzI4MDAwMDAwMDBfIn0.c2lnbmF0dXJl"
)
OPAQUE = "opaque-token-Zx9_SENSITIVE"  # not a JWT: only where it stands tells it is a token


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered secrets are process-wide: each test starts with none and leaves none behind."""
    monkeypatch.setattr(logs, "_secret_values", set())
    monkeypatch.setattr(logs, "_secret_value_pattern", None)


@contextmanager
def configured(fmt: str, level: str) -> Iterator[io.StringIO]:
    """`logs.configure` writing to a buffer, and the logging set-up it changes put back after."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LIBRARIES}
    try:
        logs.configure(fmt, level, stream=buffer)
        yield buffer
    finally:
        root.handlers[:], was = saved
        root.setLevel(was)
        for name, level_was in quiet.items():
            logging.getLogger(name).setLevel(level_was)
        structlog.reset_defaults()


@pytest.fixture
def output(secrets: None) -> Iterator[io.StringIO]:
    with configured("json", "debug") as buffer:
        yield buffer


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every line, each of which must be one JSON object with the three keys every line has."""
    parsed = [json.loads(line) for line in buffer.getvalue().splitlines()]
    for line in parsed:
        assert {"timestamp", "level", "event"} <= line.keys(), line
    return parsed


def named(buffer: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [line for line in lines(buffer) if line["event"] == event]


REQUEST = {"request_id": "req-1", "dataset_id": "ds-1", "attempt": 2, "batch_id": "b-1", "message_id": "m-1"}


# --- request keys --------------------------------------------------------------------------------


async def test_a_token_fetched_for_a_request_carries_no_request_keys(
    output: io.StringIO, session: aiohttp.ClientSession, mock: aioresponses
) -> None:
    provider = ImsTokenProvider(aep_settings(), session, ManualClock(), random.Random(1))
    limiter = Limiter(LimitSettings(rate=10, period=1.0, concurrency=2), ManualClock())
    with structlog.contextvars.bound_contextvars(**REQUEST):
        mock.post(IMS_URL, payload={"access_token": TOKEN, "token_type": "bearer", "expires_in": 86399})
        await provider.token()  # the first call of a request fetches the process's token
        limiter.record(429, "2")  # a request's call was throttled: the pause is everyone's
        logs.get("dispatcher").info("batch.created")
        logs.get("auth").info("auth.token_refresh_forced", request_id="named-on-purpose")
        logging.getLogger("aiohttp.client").warning("a library's line")

    [fetched] = named(output, "auth.token_fetched")
    [paused] = named(output, "limiter.paused")
    [decreased] = named(output, "limiter.rate_decreased")
    [library] = named(output, "a library's line")
    for line in (fetched, paused, decreased, library):
        assert not set(logs.REQUEST_KEYS) & line.keys(), line
    # The request's own events keep every key of the request; a key given in the call stays.
    [created] = named(output, "batch.created")
    assert REQUEST.items() <= created.items()
    [forced] = named(output, "auth.token_refresh_forced")
    assert forced["request_id"] == "named-on-purpose"


def test_other_context_keys_reach_every_event(output: io.StringIO) -> None:
    with structlog.contextvars.bound_contextvars(run="r-7", request_id="req-1"):
        logs.get("service").info("service.started")
    [started] = named(output, "service.started")
    assert started["run"] == "r-7"
    assert "request_id" not in started


# --- libraries kept quiet ----------------------------------------------------------------------------


def test_libraries_stay_at_warning_even_at_debug(output: io.StringIO) -> None:
    for name in ("aiosqlite", "sqlalchemy.engine.Engine", "asyncio", "aio_pika.robust", "alembic.runtime"):
        logging.getLogger(name).debug("internals of %s", name)
        logging.getLogger(name).info("news from %s", name)
    logging.getLogger("aiosqlite").warning("a real problem")
    logging.getLogger("aiohttp.client").debug("aiohttp at debug")  # not among the quiet ones
    logs.get("aep").debug("aep.call", endpoint="batches.create", status=201)

    assert [line["event"] for line in lines(output)] == ["a real problem", "aiohttp at debug", "aep.call"]


def test_a_level_above_warning_holds_for_libraries_too(secrets: None) -> None:
    with configured("json", "error") as buffer:
        logging.getLogger("aiosqlite").warning("not an error")
        logging.getLogger("aiosqlite").error("an error")
    assert [line["event"] for line in lines(buffer)] == ["an error"]


# --- redaction ----------------------------------------------------------------------------------------


def test_an_aiohttp_debug_record_with_an_authorization_header(output: io.StringIO) -> None:
    headers = CIMultiDict(
        {"Authorization": f"Bearer {TOKEN}", "x-api-key": "client-id", "x-sandbox-name": "prod"}
    )
    client = logging.getLogger("aiohttp.client")
    client.debug("POST %s headers=%s", "https://platform.adobe.io/data/foundation/import/batches", headers)
    client.debug("sent %r", {"authorization": f"Bearer {OPAQUE}"})
    client.debug("raw request:\r\nAuthorization: Bearer %s\r\nAccept: application/json", OPAQUE)
    client.debug("form grant_type=client_credentials&client_id=abc&client_secret=%s&scope=openid", SECRET)

    text = output.getvalue()
    for secret in (TOKEN, OPAQUE, SECRET, "Bearer " + OPAQUE[:5]):
        assert secret not in text
    first, second, third, fourth = (line["event"] for line in lines(output))
    assert "'Authorization': '***'" in first
    assert "'x-api-key': 'client-id'" in first  # what is no secret stays readable
    assert "https://platform.adobe.io/data/foundation/import/batches" in first
    assert second == "sent {'authorization': '***'}"
    assert third == "raw request:\r\nAuthorization: ***\r\nAccept: application/json"
    assert fourth == "form grant_type=client_credentials&client_id=abc&client_secret=***&scope=openid"


class Headers:
    """An object logged as a value: rendered by its repr, which shows the token."""

    def __repr__(self) -> str:
        return f"<Headers Authorization=Bearer {OPAQUE}>"


def test_a_structlog_event_carrying_a_token(output: io.StringIO) -> None:
    log = logs.get("aep")
    log.info(
        "aep.debugging",
        reply=json.dumps({"access_token": OPAQUE, "token_type": "bearer", "expires_in": 86399}),
        headers={"Authorization": f"Bearer {OPAQUE}", "Accept": "application/json"},
        calls=[{"token": OPAQUE}, f"jwt {TOKEN} here"],
        sent=Headers(),
        client_secret=SECRET,
    )
    try:
        raise RuntimeError(f"refused Bearer {OPAQUE}")
    except RuntimeError:
        log.exception("aep.failed")

    text = output.getvalue()
    assert OPAQUE not in text
    assert TOKEN not in text
    assert SECRET not in text
    [event] = named(output, "aep.debugging")
    assert json.loads(event["reply"]) == {"access_token": "***", "token_type": "bearer", "expires_in": 86399}
    assert event["headers"] == {"Authorization": "***", "Accept": "application/json"}
    assert event["calls"] == [{"token": "***"}, "jwt *** here"]
    assert event["sent"] == "<Headers Authorization=***>"
    assert event["client_secret"] == "***"
    [failed] = named(output, "aep.failed")
    assert "RuntimeError: refused Bearer ***" in failed["exception"]


def test_configured_secrets_are_masked_wherever_they_appear(output: io.StringIO) -> None:
    logs.register_secrets(["p8e-Client-Secret-Value", None, "", "fixed-dev-token-123"])
    logs.get("auth").warning("auth.token_failed", error="IMS echoed p8e-Client-Secret-Value back")
    logging.getLogger("aiohttp.client").debug("url ?x=fixed-dev-token-123&y=1")

    text = output.getvalue()
    assert "p8e-Client-Secret-Value" not in text
    assert "fixed-dev-token-123" not in text
    [failed, library] = lines(output)
    assert failed["error"] == "IMS echoed *** back"
    assert library["event"] == "url ?x=***&y=1"


def test_a_configured_secret_with_nothing_else_suspect_about_it_is_masked(output: io.StringIO) -> None:
    """Found by itself, not by a word near it: nothing else in the line looks like a secret."""
    logs.register_secrets(["Zq81-plain-value"])
    logs.get("dispatcher").warning("retry.scheduled", error="echoed Zq81-plain-value", request_id="r-1")
    [line] = lines(output)
    assert line["error"] == "echoed ***"
    assert line["request_id"] == "r-1"


def test_ordinary_text_is_left_alone(output: io.StringIO) -> None:
    texts = {
        "error": "bad request: batches.create HTTP 400 BadRequestError Dataset 5c8c3c555033b814b69f947f",
        "logger_name": "orchestrator.pipeline.dispatcher",
        "version": "1.0.0",
        "url": "https://platform.adobe.io/data/foundation/catalog/batches?externalId=orch-abc",
        "hint": "the token expired; token_type bearer",
    }
    logs.get("dispatcher").warning("retry.scheduled", delay=1.5, ambiguous=False, attempt=2, **texts)
    [line] = lines(output)
    assert texts.items() <= line.items()
    assert (line["delay"], line["ambiguous"], line["attempt"]) == (1.5, False, 2)


def test_console_lines_are_redacted_too(secrets: None) -> None:
    with configured("console", "debug") as buffer:
        logs.get("aep").info("aep.debugging", detail=f"Authorization: Bearer {OPAQUE}")
        logging.getLogger("aiohttp.client").debug("access_token=%s", OPAQUE)
    text = buffer.getvalue()
    assert OPAQUE not in text
    assert "Authorization: ***" in text
    assert "access_token=***" in text
