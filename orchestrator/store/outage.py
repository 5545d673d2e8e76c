"""Waiting out a store that does not answer.

The service's loops read and write the store all the time: the dispatcher's claims, intake's records.
When the database restarts or a connection drops, those calls fail for a while. A loop that let the
error escape would end the service, and one that retried at once would spin; instead each keeps a
`StoreOutage`: the first failure is logged once (`store.unavailable`), the loop waits (0.5 s,
doubling to 5 s, on the injected clock) and tries again, and its first success after that is logged
(`store.recovered`). Nothing is lost meanwhile: intake gives what it received back to the broker,
and the leases of calls whose outcome could not be written run out, after which the request is
looked up before any new create.
"""

from __future__ import annotations

import asyncio

from orchestrator import logs
from orchestrator.clock import Clock, sleep_until_set

log = logs.get("store")

# Seconds between tries while the store fails: the first wait, doubled after each failure up to the
# last. A database restart takes a few seconds; 5 s keeps a long outage from costing more than a
# connection attempt every 5 s per loop, and the service back within 5 s of the database.
FIRST_WAIT = 0.5
LONGEST_WAIT = 5.0


class StoreOutage:
    """One loop's view of whether the store answers. `loop` names the loop in the logs."""

    def __init__(self, clock: Clock, loop: str) -> None:
        self._clock = clock
        self._loop = loop
        self._since: float | None = None  # monotonic: when the outage began, None while none is on
        self._wait = FIRST_WAIT

    @property
    def down(self) -> bool:
        return self._since is not None

    async def wait(self, error: BaseException, stop: asyncio.Event) -> None:
        """The store failed with `error`: log it (once per outage), then wait before the next try,
        or until `stop` is set."""
        if self._since is None:
            self._since = self._clock.monotonic()
            log.warning("store.unavailable", loop=self._loop, error=describe(error))
        wait, self._wait = self._wait, min(self._wait * 2, LONGEST_WAIT)
        await sleep_until_set(self._clock, wait, stop)

    def answered(self) -> None:
        """The store answered: the outage, if one was on, is over."""
        if self._since is not None:
            down_for = self._clock.monotonic() - self._since
            log.info("store.recovered", loop=self._loop, down_for=round(down_for, 3))
            self._since = None
            self._wait = FIRST_WAIT


class NotRecorded(Exception):
    """The store failed a write, and whoever raised this has dealt with it: logged it, or given
    the message back to the broker. The store's error is the cause."""


def describe(error: BaseException) -> str:
    """The error's type and first line: SQLAlchemy's further lines repeat the statement and its
    parameters, which say nothing about why the database did not answer."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
