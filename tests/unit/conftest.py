"""Fixtures for the unit tests: aioresponses in place of sockets."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
import structlog
from aioresponses import aioresponses
from yarl import URL

from orchestrator import logs
from orchestrator.clock import ManualClock
from orchestrator.store.sql import SqlBatchStore
from tests.unit.fakes import open_store


class _MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the `stream_writer` aiohttp 3.14 requires
    (pnuckowski/aioresponses#289, fix pending in #288); aiohttp only reads its `output_size`."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", Mock(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    monkeypatch.setattr("aioresponses.core.ClientResponse", _MockResponse)
    with aioresponses() as m:
        yield m


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlBatchStore]:
    """A migrated SQLite store in the test's directory."""
    store = await open_store(tmp_path)
    yield store
    await store.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything the service would log, rendered as in production, at debug level."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("json", "debug", stream=buffer)
    yield buffer
    root.handlers[:], level = saved
    root.setLevel(level)
    structlog.reset_defaults()
