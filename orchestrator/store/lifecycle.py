"""The upload stage's queries: claims, progress and outcomes of the batch lifecycle after `created`.

A request with files gets a `batch_lifecycle` row (and an `upload_file` row per file) in the
transaction that records its batch. The stage claims those rows as the dispatcher claims requests:
leased for `lease_seconds` on the lease clock, every write fenced by the lease's token, a lease left
behind (its holder died) seen as a take-over. The request's own row carries the state a user sees
(`uploading`, `processing`, `succeeded`, `failed`) and its trail; its create-path columns are never
touched here, so the two paths cannot fence each other out.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    RowMapping,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.messages import FileRef
from orchestrator.store.base import BatchRecord, Stage, State, Step, UploadFile
from orchestrator.store.schema import NO_LEASE, OUTCOME, batch_lifecycle, batch_request, upload_file

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncEngine

    from orchestrator.store.sql import _Tx


def files_json(files: Sequence[FileRef]) -> str | None:
    return json.dumps([[ref.source, ref.name] for ref in files]) if files else None


def files_from_json(text: str | None) -> tuple[FileRef, ...]:
    if not text:
        return ()
    return tuple(FileRef(source=source, name=name) for source, name in json.loads(text))


class LifecycleQueries:
    """Mixed into `SqlBatchStore`, whose writer, reader and lease clock it uses."""

    _events: bool
    _track_without_files: bool
    _first_look: float  # seconds after `created` a batch without files is first looked at

    if TYPE_CHECKING:

        @property
        def _read(self) -> AsyncEngine: ...

        def _lease_clock(self, now: datetime) -> Any: ...

        async def _run_write(self, run: Callable[[_Tx], Awaitable[Any]]) -> Any: ...

        async def _lease_due(
            self,
            tx: _Tx,
            table: Table,
            key: ColumnElement[Any],
            due: Any,
            claimable: tuple[ColumnElement[bool], ...],
            owner: str,
            lease_seconds: float,
            now: datetime,
            **values: Any,
        ) -> tuple[list[RowMapping], set[int]]: ...

        def _lock_for_claim(self, statement: Any) -> Any: ...

        def _record(self, row: RowMapping) -> BatchRecord: ...

    # --- written with the state change to `created` (see SqlBatchStore._finish) -----------------

    async def _start_lifecycle(self, tx: _Tx, pk: int, files_text: str | None, now: datetime) -> None:
        """A request just got its batch: with files, its upload stage starts; without, its batch is
        followed only when ORCH_TRACK__WITHOUT_FILES or ABORT_LOADING_AFTER asks for it (first
        looked at after ORCH_TRACK__POLL_MIN). A request created again (requeued after its batch
        failed) starts over: its earlier lifecycle is replaced."""
        files = files_from_json(files_text)
        if not files and not self._track_without_files:
            return
        connection = tx.connection
        await connection.execute(delete(upload_file).where(upload_file.c.batch_request_id == pk))
        await connection.execute(delete(batch_lifecycle).where(batch_lifecycle.c.batch_request_id == pk))
        await connection.execute(
            insert(batch_lifecycle).values(
                batch_request_id=pk,
                step=(Step.UPLOAD if files else Step.TRACK).value,
                attempts=0,
                next_at=now if files else now + timedelta(seconds=self._first_look),
                started_at=now,
                files_total=len(files),
                files_done=0,
                polls=0,
            )
        )
        if files:
            await connection.execute(
                insert(upload_file),
                [
                    {
                        "batch_request_id": pk,
                        "position": position,
                        "source": ref.source,
                        "name": ref.name,
                        "bytes_sent": 0,
                        "initialized": False,
                        "done": False,
                    }
                    for position, ref in enumerate(files)
                ],
            )

    # --- claims ---------------------------------------------------------------------------------

    async def claim_stages(self, owner: str, limit: int, lease_seconds: float, now: datetime) -> list[Stage]:
        if limit <= 0:
            return []
        life = batch_lifecycle.c
        claimable = (life.next_at <= now, self._stage_lease_free(now))
        due = self._lock_for_claim(
            select(life.batch_request_id, life.lease_expires_at.is_not(None))
            .where(*claimable)
            .order_by(life.next_at, life.batch_request_id)
            .limit(limit)
        )

        async def run(tx: _Tx) -> list[Stage]:
            leased, taken_over = await self._lease_due(
                tx, batch_lifecycle, life.batch_request_id, due, claimable, owner, lease_seconds, now
            )
            if not leased:
                return []
            rows = {row["batch_request_id"]: row for row in leased}
            requested = select(batch_request).where(batch_request.c.id.in_(list(rows)))
            requests = {
                row["id"]: self._record(row) for row in (await tx.connection.execute(requested)).mappings()
            }
            files: dict[int, list[UploadFile]] = {pk: [] for pk in rows}
            listed = (
                select(upload_file)
                .where(upload_file.c.batch_request_id.in_(list(rows)))
                .order_by(upload_file.c.batch_request_id, upload_file.c.position)
            )
            for row in (await tx.connection.execute(listed)).mappings():
                files[row["batch_request_id"]].append(_upload_file(row))
            # A request with files enters the upload stage: `created` becomes `uploading`.
            starting = [
                pk
                for pk, row in rows.items()
                if row["step"] == Step.UPLOAD.value and requests[pk].state is State.CREATED
            ]
            if starting:
                await tx.connection.execute(
                    update(batch_request)
                    .where(batch_request.c.id.in_(starting), batch_request.c.state == State.CREATED.value)
                    .values(state=State.UPLOADING.value, updated_at=now)
                )
                for pk in starting:
                    tx.trail(pk, now, State.CREATED, State.UPLOADING, 0, "upload stage started")
            stages = []
            for pk, row in rows.items():  # in the order they were due
                record = requests[pk]
                if pk in starting:
                    record = replace(record, state=State.UPLOADING)
                stages.append(
                    Stage(
                        pk=pk,
                        record=record,
                        step=Step(row["step"]),
                        lease=row["lease_token"],
                        attempts=row["attempts"],
                        files=tuple(files[pk]),
                        polls=row["polls"],
                        started_at=row["started_at"],
                        completed_at=row["completed_at"],
                        taken_over=pk in taken_over,
                    )
                )
            return stages

        stages: list[Stage] = await self._run_write(run)
        return stages

    async def next_stage_due(self) -> datetime | None:
        life = batch_lifecycle.c
        unleased = (
            select(life.next_at)
            .where(life.next_at.is_not(None), life.lease_expires_at.is_(None))
            .order_by(life.next_at)
            .limit(1)
        )
        leased = select(func.min(life.lease_expires_at)).where(life.lease_expires_at.is_not(None))
        async with self._read.connect() as connection:
            first = (await connection.execute(unleased)).scalar_one_or_none()
            expiry = (await connection.execute(leased)).scalar_one_or_none()
        times = [value for value in (first, expiry) if value is not None]
        return min(times) if times else None

    async def stages_waiting(self) -> int:
        """Requests whose lifecycle is not done (`--until-idle` waits for them)."""
        statement = (
            select(func.count()).select_from(batch_lifecycle).where(batch_lifecycle.c.next_at.is_not(None))
        )
        async with self._read.connect() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def step_counts(self) -> dict[str, int]:
        """Requests in each lifecycle step (`orchestrator status`), `complete` apart from `upload`."""
        life = batch_lifecycle.c
        statement = select(life.step, life.files_done == life.files_total, func.count()).group_by(
            life.step, life.files_done == life.files_total
        )
        async with self._read.connect() as connection:
            rows = (await connection.execute(statement)).all()
        counts: dict[str, int] = {}
        for step, all_in, count in rows:
            name = "complete" if step == Step.UPLOAD.value and all_in else step
            counts[name] = counts.get(name, 0) + count
        return counts

    async def renew_stages(self, stages: Sequence[Stage], lease_seconds: float, now: datetime) -> set[str]:
        if not stages:
            return set()
        life = batch_lifecycle.c
        pairs = [(stage.pk, stage.lease) for stage in stages]
        names = {stage.pk: stage.record.request_id for stage in stages}
        statement = (
            update(batch_lifecycle)
            .where(tuple_(life.batch_request_id, life.lease_token).in_(pairs))
            .values(lease_expires_at=self._lease_clock(now) + timedelta(seconds=lease_seconds))
            .returning(life.batch_request_id)
        )

        async def run(tx: _Tx) -> set[str]:
            return {names[pk] for pk in (await tx.connection.execute(statement)).scalars()}

        renewed: set[str] = await self._run_write(run)
        return renewed

    # --- progress and outcomes, each fenced by the stage's lease ------------------------------------

    async def file_progress(
        self,
        stage: Stage,
        position: int,
        now: datetime,
        *,
        size: int | None = None,
        bytes_sent: int | None = None,
        initialized: bool | None = None,
        done: bool = False,
    ) -> bool:
        """Record how far one file got; `done`: AEP has it whole (the stage's failures start over)."""
        values: dict[str, Any] = {}
        if size is not None:
            values["size"] = size
        if bytes_sent is not None:
            values["bytes_sent"] = bytes_sent
        if initialized is not None:
            values["initialized"] = initialized
        if done:
            values["done"] = True
        if done:
            return await self._file_done(stage, position, values)
        # Bytes AEP confirmed are progress: the stage's failures in a row start over.
        changes: dict[str, Any] = {"attempts": 0} if bytes_sent else {}

        async def run(tx: _Tx) -> bool:
            if not await self._fenced(tx, stage, changes, keep_lease=True):
                return False
            await tx.connection.execute(
                update(upload_file)
                .where(upload_file.c.batch_request_id == stage.pk, upload_file.c.position == position)
                .values(**values)
            )
            return True

        written: bool = await self._run_write(run)
        return written

    async def _file_done(self, stage: Stage, position: int, values: dict[str, Any]) -> bool:
        async def run(tx: _Tx) -> bool:
            if not await self._fenced(tx, stage, {"attempts": 0}, keep_lease=True):
                return False
            marked = await tx.connection.execute(
                update(upload_file)
                .where(
                    upload_file.c.batch_request_id == stage.pk,
                    upload_file.c.position == position,
                    upload_file.c.done.is_(False),  # counted once
                )
                .values(**values)
                .returning(upload_file.c.position)
            )
            if marked.first() is not None:
                await tx.connection.execute(
                    update(batch_lifecycle)
                    .where(batch_lifecycle.c.batch_request_id == stage.pk)
                    .values(files_done=batch_lifecycle.c.files_done + 1)
                )
            return True

        written: bool = await self._run_write(run)
        return written

    async def batch_completed(self, stage: Stage, now: datetime, next_at: datetime) -> bool:
        """AEP accepted COMPLETE: the request is `processing`, its status polled from `next_at`."""
        changes = {"step": Step.TRACK.value, "attempts": 0, "next_at": next_at, "completed_at": now}
        return await self._move(stage, now, changes, State.PROCESSING, "batch completed: every file is in")

    async def stage_polled(
        self, stage: Stage, batch_status: str, now: datetime, next_at: datetime, *, processing: bool
    ) -> bool:
        """A poll found the batch not final yet: due again at `next_at`. `processing`: someone else
        completed a batch this service only follows, so its request is now `processing`."""
        changes = {"attempts": 0, "next_at": next_at, "polls": batch_lifecycle.c.polls + 1}
        to_state = State.PROCESSING if processing and stage.record.state is State.CREATED else None
        return await self._move(
            stage, now, changes, to_state, f"batch {batch_status}", batch_status=batch_status
        )

    async def stage_finished(
        self,
        stage: Stage,
        now: datetime,
        *,
        to_state: State | None,
        batch_status: str | None,
        error: str | None,
        errors: list[dict[str, Any]] | None = None,
        record_count: int | None = None,
        failed_record_count: int | None = None,
    ) -> bool:
        """The lifecycle is over: AEP's final word, a failure of the stage, or (`to_state` None) a
        batch this service only watched went on without it. `batch_status` None keeps the last one."""
        changes: dict[str, Any] = {
            "step": Step.DONE.value,
            "next_at": None,
            "last_error": error,
            "errors": None if errors is None else json.dumps(errors),
            "record_count": record_count,
            "failed_record_count": failed_record_count,
        }
        request: dict[str, Any] = {}
        if batch_status is not None:
            request["batch_status"] = batch_status
        if to_state is not None:
            request["last_error"] = error
        detail = error or f"batch {batch_status or stage.record.batch_status}"
        return await self._move(stage, now, changes, to_state, detail, **request)

    async def stage_retry(
        self, stage: Stage, error: str | None, next_at: datetime, now: datetime, *, attempts: int | None
    ) -> bool:
        """The step failed, its `attempts`-th failure in a row, or was put back (`attempts` None, not
        counted): due again at `next_at`."""
        changes: dict[str, Any] = {"next_at": next_at}
        if attempts is not None:
            changes["attempts"] = attempts
            changes["last_error"] = error

        async def run(tx: _Tx) -> bool:
            return await self._fenced(tx, stage, changes)

        written: bool = await self._run_write(run)
        return written

    async def _move(
        self,
        stage: Stage,
        now: datetime,
        changes: dict[str, Any],
        to_state: State | None,
        detail: str,
        **request: Any,
    ) -> bool:
        """Write the stage's `changes` (dropping its lease) and, with `to_state`, move the request
        there with a trail row and (for an arrival that has one) its event, in one transaction."""

        async def run(tx: _Tx) -> bool:
            if not await self._fenced(tx, stage, changes):
                return False
            if to_state is None and not request:
                return True
            values = {**request, "updated_at": now}
            if to_state is not None:
                values["state"] = to_state.value
            row = (
                await tx.connection.execute(
                    update(batch_request)
                    .where(batch_request.c.id == stage.pk)
                    .values(**values)
                    .returning(*OUTCOME)
                )
            ).one()
            if to_state is not None and to_state is not stage.record.state:
                tx.trail(stage.pk, now, stage.record.state, to_state, 0, detail[:500])
                if self._events and to_state in (State.SUCCEEDED, State.FAILED):
                    tx.event(to_state, row, now)
            return True

        written: bool = await self._run_write(run)
        return written

    async def _fenced(
        self, tx: _Tx, stage: Stage, changes: dict[str, Any], *, keep_lease: bool = False
    ) -> bool:
        """Apply `changes` to the stage's row while its lease is still the stage's; without
        `keep_lease` the lease is dropped (the step's outcome is written)."""
        life = batch_lifecycle.c
        values = changes if keep_lease else {**changes, **NO_LEASE}
        statement = update(batch_lifecycle).where(
            life.batch_request_id == stage.pk, life.lease_token == stage.lease
        )
        if not values:
            values = {"lease_token": stage.lease}  # a no-op write that still checks the fence
        result = await tx.connection.execute(statement.values(**values).returning(life.batch_request_id))
        return result.first() is not None

    def _stage_lease_free(self, now: datetime) -> ColumnElement[bool]:
        expires = batch_lifecycle.c.lease_expires_at
        return or_(expires.is_(None), expires <= self._lease_clock(now))

    # --- leases of dead processes (see SqlBatchStore.lease_owners / expire_leases) ------------------

    async def _stage_lease_owners(self, connection: Any) -> set[str]:
        life = batch_lifecycle.c
        statement = select(life.lease_owner).where(life.lease_expires_at.is_not(None)).distinct()
        return {owner for (owner,) in await connection.execute(statement) if owner is not None}

    async def _expire_stage_leases(self, tx: _Tx, owners: Sequence[str], now: datetime) -> int:
        life = batch_lifecycle.c
        statement = (
            update(batch_lifecycle)
            .where(life.lease_owner.in_(list(owners)), life.lease_expires_at > self._lease_clock(now))
            .values(lease_expires_at=self._lease_clock(now))
            .returning(life.batch_request_id)
        )
        return len((await tx.connection.execute(statement)).all())


def _upload_file(values: RowMapping) -> UploadFile:
    return UploadFile(
        position=values["position"],
        source=values["source"],
        name=values["name"],
        size=values["size"],
        bytes_sent=values["bytes_sent"],
        initialized=bool(values["initialized"]),
        done=bool(values["done"]),
    )
