"""In-memory stand-ins for the queue and AEP ports, for the intake and dispatcher unit tests."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from orchestrator.aep.api import Batch
from orchestrator.aep.errors import AuthError
from orchestrator.messages import BatchRequest
from orchestrator.queues.base import Delivery
from orchestrator.settings import AepSettings
from orchestrator.store.sql import SqlBatchStore


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (real time, in 1 ms steps) until `condition` holds; fail the test after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.001)


async def open_store(directory: Path) -> SqlBatchStore:
    """A real `SqlBatchStore` on a fresh SQLite file in `directory` (the caller closes it).

    The file is a copy of one migrated once per test session (next to the tests' temporary
    directories): running the migrations for every test is most of what opening a store costs."""
    template = directory.parent / "store-template.db"
    if not template.exists():
        building = directory / "template.db"
        store = SqlBatchStore(f"sqlite:///{building}")
        await store.open()
        await store.close()
        shutil.copyfile(building, template)
    target = directory / "store.db"
    shutil.copyfile(template, target)
    store = SqlBatchStore(f"sqlite:///{target}")
    await store.open()
    return store


# --- queue ------------------------------------------------------------------------------------------


class FakeQueue:
    """The `Queue` port in memory. Records every ack, dead letter and release."""

    def __init__(self, *, name: str = "test.requests") -> None:
        self.name = name
        self.ready: deque[Delivery] = deque()
        self.leased: dict[str, Delivery] = {}
        self.acked: list[Delivery] = []
        self.dead: list[tuple[Delivery, str]] = []
        self.released: list[Delivery] = []
        self.receive_calls: list[int] = []  # max_messages of each call
        self.on_ack: Callable[[Delivery], None] | None = None
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for delivery in list(self.leased.values()):
            await self.release(delivery)

    async def publish(self, bodies: Sequence[bytes], message_ids: Sequence[str] | None = None) -> int:
        for body in bodies:
            self.ready.append(Delivery(body=bytes(body), message_id=f"m{next(self._ids)}", attempt=1))
        self._arrived.set()
        return len(bodies)

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        self.receive_calls.append(max_messages)
        if not self.ready:
            self._arrived.clear()
            # Real time, but never long: the tests use tiny poll timeouts or a manual clock.
            try:
                await asyncio.wait_for(self._arrived.wait(), min(timeout, 0.01))
            except TimeoutError:
                return []
        out: list[Delivery] = []
        while self.ready and len(out) < max_messages:
            delivery = self.ready.popleft()
            self.leased[delivery.message_id] = delivery
            out.append(delivery)
        return out

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)
        self.acked.append(delivery)
        if self.on_ack is not None:
            self.on_ack(delivery)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self.ack(delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._settle(delivery)
        self.dead.append((delivery, reason))

    async def release(self, delivery: Delivery) -> None:
        self._settle(delivery)
        self.released.append(delivery)
        again = Delivery(delivery.body, delivery.message_id, delivery.attempt + 1, delivery.handle)
        self.ready.append(again)

    async def is_empty(self) -> bool:
        return not self.ready and not self.leased

    def _settle(self, delivery: Delivery) -> None:
        if self.leased.pop(delivery.message_id, None) is None:
            raise AssertionError(f"{delivery.message_id} settled twice or never delivered")


# --- AEP --------------------------------------------------------------------------------------------


@dataclass
class Hang:
    """A scripted outcome: the call never answers (until cancelled)."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0

    async def wait(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


# What a scripted call does: return a batch (or, for lookups, a list), raise, hang, or run a coroutine.
Outcome = Batch | list[Batch] | BaseException | Hang | Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Call:
    method: str  # "create", "lookup" or "abort"
    external_id: str  # the batch id, for an abort
    dataset_id: str | None = None
    input_format: str | None = None


class FakeApi:
    """The `BatchApi` port with scripted outcomes per call, in order. When a script runs out, a
    create makes a new batch and a lookup finds nothing. Counts calls in flight."""

    def __init__(
        self,
        creates: Sequence[Outcome] = (),
        lookups: Sequence[Outcome] = (),
        *,
        call_seconds: float = 0.0,
    ) -> None:
        self.creates: deque[Outcome] = deque(creates)
        self.lookups: deque[Outcome] = deque(lookups)
        self.call_seconds = call_seconds
        self.token_error: AuthError | None = None
        self.token_checks = 0
        self.calls: list[Call] = []
        self.aborted: list[str] = []
        self.abort_errors: deque[BaseException] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._batch_ids = itertools.count(1)

    @property
    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    async def ensure_token(self) -> None:
        self.token_checks += 1
        if self.token_error is not None:
            raise self.token_error

    async def create_batch(self, request: BatchRequest, input_format: str) -> Batch:
        self.calls.append(Call("create", request.external_id, request.dataset_id, input_format))
        result = await self._run(self.creates)
        if result is None:
            return Batch(f"batch-{next(self._batch_ids)}", "loading", request.external_id, request.dataset_id)
        assert isinstance(result, Batch), f"scripted create outcome {result!r} is not a Batch"
        return result

    async def find_batches(self, external_id: str) -> list[Batch]:
        self.calls.append(Call("lookup", external_id))
        result = await self._run(self.lookups)
        if result is None:
            return []
        assert isinstance(result, list), f"scripted lookup outcome {result!r} is not a list"
        return result

    async def get_batch(self, batch_id: str) -> Batch:
        raise AssertionError("the dispatcher never reads a batch by id")

    async def abort_batch(self, batch_id: str) -> None:
        self.calls.append(Call("abort", batch_id))
        if self.abort_errors:
            raise self.abort_errors.popleft()
        self.aborted.append(batch_id)

    async def _run(self, script: deque[Outcome]) -> object:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.call_seconds:
                await asyncio.sleep(self.call_seconds)
            if not script:
                return None
            outcome = script.popleft()
            if isinstance(outcome, BaseException):
                raise outcome
            if isinstance(outcome, Hang):
                await outcome.wait()
                raise AssertionError("unreachable")
            if isinstance(outcome, Batch | list):
                return outcome
            return await outcome()
        finally:
            self.in_flight -= 1


IMS_URL = "https://ims.test/ims/token/v3"
SECRET = "s3cr3t-client-VALUE-42"


def aep_settings(**overrides: Any) -> AepSettings:
    """Settings for a fake org at made-up hosts (aioresponses answers them); `overrides` win."""
    values: dict[str, Any] = {
        "base_url": "https://platform.test",
        "ims_url": "https://ims.test",
        "client_id": "cid-123",
        "client_secret": SecretStr(SECRET),
        "org_id": "ORG@AdobeOrg",
    }
    values.update(overrides)
    return AepSettings(**values)
