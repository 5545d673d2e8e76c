"""What the operator commands read and decide: `orchestrator status` and `orchestrator requeue`.

Both work on the store alone, so they answer the same whether the service runs or not, and on
every broker. The CLI (`cli.py`) opens the store and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from orchestrator import logs
from orchestrator.store.base import BatchRecord, BatchStore, State

if TYPE_CHECKING:
    from rich.console import RenderableType

# The effective rate is averaged over this window: long enough to smooth the bursts of a limiter
# pause, short enough to show a stall within a minute.
RATE_WINDOW = timedelta(minutes=1)
LAST_ERRORS = 5
ERROR_CHARS = 300  # of each error on the screen; `--json` has all of it
SINCE_EXAMPLE = "2026-11-28T15:00:00Z"
# The upload stage's steps in the order a request goes through them.
STEPS = ("upload", "complete", "track", "done")


@dataclass(frozen=True)
class Status:
    """The store at a glance, at `at`."""

    at: datetime
    counts: dict[State, int]
    oldest: BatchRecord | None  # the oldest request still pending or retrying
    created: int  # requests that reached `created` (made or adopted) within RATE_WINDOW
    retries: int  # retries scheduled within RATE_WINDOW
    failed: int  # requests that reached `failed` within RATE_WINDOW
    errors: list[BatchRecord]  # the latest failed or retrying requests with an error
    # Requests in each step of the upload stage (upload, complete, track, done); empty without any.
    steps: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        """Batches recorded per second over the last RATE_WINDOW."""
        return self.created / RATE_WINDOW.total_seconds()

    def oldest_age(self) -> float | None:
        """Seconds since the oldest unfinished request was recorded."""
        return None if self.oldest is None else (self.at - self.oldest.created_at).total_seconds()

    def to_json(self) -> dict[str, object]:
        """`status --json`: one object, records in the contract's shape."""
        oldest: dict[str, object] | None = None
        if self.oldest is not None:
            oldest = {**self.oldest.to_json(), "ageSeconds": round(self.oldest_age() or 0.0, 3)}
        return {
            "at": iso(self.at),
            "counts": {state.value: count for state, count in self.counts.items()},
            "total": self.total,
            "oldestUnfinished": oldest,
            "lastMinute": {"created": self.created, "retries": self.retries, "failed": self.failed},
            "ratePerSecond": round(self.rate, 3),
            "lastErrors": [record.to_json() for record in self.errors],
            "steps": self.steps,
        }


async def read_status(store: BatchStore, now: datetime, *, errors: int = LAST_ERRORS) -> Status:
    created = retries = failed = 0
    for change in await store.recent_changes(now - RATE_WINDOW):
        if change.to_state is State.CREATED and change.from_state is not State.CREATED:
            created += 1  # created -> created is a reconciliation, not a new batch
        elif change.to_state is State.RETRYING:
            retries += 1
        elif change.to_state is State.FAILED:
            failed += 1
    return Status(
        at=now,
        counts=await store.counts(),
        oldest=await store.oldest_unfinished_record(),
        created=created,
        retries=retries,
        failed=failed,
        errors=await store.last_errors(errors),
        steps=await store.step_counts(),
    )


def status_summary(status: Status) -> RenderableType:
    """The lines above the last errors: counts, the oldest unfinished request, the rate. Request ids
    are other people's text: escaped, and never read as markup."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    # The upload stage's states only when some request is in one: most deployments have none.
    shown = [
        (state, count)
        for state, count in status.counts.items()
        if count or state not in (State.UPLOADING, State.PROCESSING, State.SUCCEEDED)
    ]
    counts = " · ".join(f"{count:,} {state.value}" for state, count in shown)
    grid.add_row("requests", Text(f"{status.total:,}: {counts}"))
    if status.steps:
        steps = " · ".join(f"{status.steps.get(step, 0):,} {step}" for step in STEPS)
        grid.add_row("upload stage", Text(steps))
    oldest = status.oldest
    if oldest is None:
        grid.add_row("oldest", Text("nothing pending or retrying"))
    else:
        tries = f", {_tries(oldest.attempts)}" if oldest.attempts else ""
        line = Text(f"{oldest.state.value} for {duration(status.oldest_age() or 0.0)}: ")
        line.append(logs.escape_controls(oldest.request_id), style="bold")
        line.append(f" (dataset {logs.escape_controls(oldest.dataset_id)}{tries})")
        grid.add_row("oldest", line)
    grid.add_row(
        "rate",
        Text(
            f"{status.rate:.2f} batches/s over the last minute "
            f"({status.created:,} created, {status.retries:,} retries, {status.failed:,} failed)"
        ),
    )
    grid.add_row("last errors", Text("none" if not status.errors else ""))
    return grid


def errors_table(status: Status) -> RenderableType:
    """The last errors, newest first: how long ago, the state and tries, the request, the error
    (wrapped; ids fold). Escaped, and never read as markup, as in `batches`."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("when", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("request", overflow="fold", max_width=36)
    table.add_column("last error", overflow="fold", ratio=1)
    for record in status.errors:
        error = record.last_error or ""
        if len(error) > ERROR_CHARS:
            error = error[: ERROR_CHARS - 1] + "…"
        table.add_row(
            Text(f"{duration((status.at - record.updated_at).total_seconds())} ago"),
            Text(f"{record.state.value}, {_tries(record.attempts)}"),
            Text(logs.escape_controls(record.request_id)),
            Text(logs.escape_controls(error)),
        )
    return table


def duration(seconds: float) -> str:
    """`3m 12s`, `2h 5m`, `1d 3h`: the two largest units, which is all a glance needs."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for name, size in units:
        if whole >= size or parts:
            parts.append(f"{whole // size}{name}")
            whole %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _tries(attempts: int) -> str:
    return f"{attempts} {'try' if attempts == 1 else 'tries'}"


def parse_since(text: str) -> datetime:
    """`--since`: an ISO 8601 time (`2026-11-28T15:00:00Z`, `2026-11-28T16:00+01:00`, a date alone
    for its midnight); without a zone it is UTC, as every time the store keeps and shows."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: not an ISO 8601 time: {text!r} (e.g. {SINCE_EXAMPLE})") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def requeue_line(record: BatchRecord) -> str:
    """One failed request as `requeue --dry-run` lists it (escaped: ids and errors are others' text)."""
    error = (record.last_error or "").replace("\n", " ")
    return logs.escape_controls(
        f"{record.request_id}  {record.dataset_id}  failed {iso(record.updated_at)}  {error[:200]}"
    )


def iso(value: datetime) -> str:
    """A time as the records show it (UTC, milliseconds, `Z`)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
