from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest

from orchestrator import eventloop


async def _answer() -> tuple[str, int]:
    await asyncio.sleep(0)
    return eventloop.name(), 42


def test_runs_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.run(_answer()) == ("uvloop", 42)


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert eventloop.run(_answer()) == ("asyncio", 42)
