"""Sending one request's files into its batch: small files in one PUT, large ones in parts.

Each step AEP confirms is written to the store before the next (`StageStore.file_progress`, fenced
by the stage's lease), so a restart resumes where AEP stands: a file done is never sent again; a
large file is resumed from the bytes AEP says it has (`HEAD`), or started over when AEP has no such
file. A store write that finds the lease gone raises `LeaseLost`: another worker owns the request now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import structlog

from orchestrator import logs
from orchestrator.aep.api import UploadApi
from orchestrator.aep.errors import AepHttpError
from orchestrator.clock import Clock
from orchestrator.files import FileSources, Source
from orchestrator.messages import FileRef
from orchestrator.store.base import Stage, StageStore, UploadFile

log = logs.get("upload")


class LeaseLost(Exception):
    """The stage's lease is gone: stop, whoever holds it now carries on."""


class FileRestart(Exception):
    """AEP refused to complete a large file (its parts do not add up): it is started over at the
    next attempt."""


@dataclass
class Progress:
    """Whether a step got anywhere (a file or a part AEP confirmed): the step's failures in a row
    then count from its next failure, not from before."""

    made: bool = False


@dataclass
class TransferStats:
    files: int = 0
    bytes: int = 0


class Transfer:
    def __init__(
        self,
        store: StageStore,
        api: UploadApi,
        sources: FileSources,
        clock: Clock,
        *,
        large_file_threshold: int,
        part_size: int,
    ) -> None:
        self._store = store
        self._api = api
        self._sources = sources
        self._clock = clock
        self._threshold = large_file_threshold
        self._part_size = part_size
        self.stats = TransferStats()

    async def send_all(self, stage: Stage, progress: Progress) -> None:
        """Every file of `stage` not yet done, in order."""
        for file in stage.files:
            if not file.done:
                with structlog.contextvars.bound_contextvars(file=file.name):
                    await self._send(stage, file, progress)

    async def _send(self, stage: Stage, file: UploadFile, progress: Progress) -> None:
        source = await self._sources.open(FileRef(file.source, file.name))
        started = self._clock.monotonic()
        large = source.size > self._threshold
        if large:
            await self._send_large(stage, file, source, progress)
        else:
            await self._api.put_file(
                batch_of(stage), stage.record.dataset_id, file.name, source.chunks, source.size
            )
        await written(
            self._store.file_progress(stage, file.position, self._clock.now(), size=source.size, done=True)
        )
        progress.made = True
        self.stats.files += 1
        self.stats.bytes += source.size
        log.info(
            "upload.file_uploaded",
            size=source.size,
            large=large,
            seconds=round(self._clock.monotonic() - started, 3),
            files_done=sum(1 for other in stage.files if other.done or other.position <= file.position),
            files_total=len(stage.files),
        )

    async def _send_large(self, stage: Stage, file: UploadFile, source: Source, progress: Progress) -> None:
        batch, dataset, name, size = batch_of(stage), stage.record.dataset_id, file.name, source.size
        received = await self._api.file_received(batch, dataset, name) if file.initialized else None
        if received is None or received > size:
            await self._api.initialize_file(batch, dataset, name)
            await written(
                self._store.file_progress(
                    stage, file.position, self._clock.now(), size=size, initialized=True, bytes_sent=0
                )
            )
            received = 0
        elif received:
            log.info("upload.file_resumed", received=received, size=size)
        while received < size:
            start, length = received, min(self._part_size, size - received)

            def part(start: int = start, length: int = length) -> AsyncIterator[bytes]:
                return source.chunks(start, length)

            await self._api.put_part(batch, dataset, name, start, part, length, size)
            received += length
            await written(
                self._store.file_progress(stage, file.position, self._clock.now(), bytes_sent=received)
            )
            progress.made = True
            log.info("upload.part_uploaded", bytes_sent=received, size=size)
        try:
            await self._api.complete_file(batch, dataset, name)
        except AepHttpError as exc:
            if exc.status != 400:
                raise
            # The parts do not add up (a gap or an overlap, found only now): start the file over.
            await written(
                self._store.file_progress(
                    stage, file.position, self._clock.now(), initialized=False, bytes_sent=0
                )
            )
            raise FileRestart(f"{exc.summary()} (the file is sent again from its start)") from exc


async def written(write: Awaitable[bool]) -> None:
    """Await a fenced store write; `LeaseLost` when it found the lease gone (nothing written)."""
    if not await write:
        raise LeaseLost


def batch_of(stage: Stage) -> str:
    batch_id = stage.record.batch_id
    if batch_id is None:  # a lifecycle row exists only once the batch does
        raise RuntimeError(f"request {stage.record.request_id} has no batch")
    return batch_id
