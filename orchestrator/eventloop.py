"""The event loop the service runs on.

uvloop where it is installed (a dependency on Linux and macOS): its loop, transports and callbacks
are C, where asyncio's are Python, and the service's per-request cost is mostly the event loop and
aiohttp moving small requests (`make bench`, the cpu section). Without it (Windows, or a build that
lacks it) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop's loop when uvloop is there."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def name() -> str:
    """The running loop's kind, for the service's start-up log line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
