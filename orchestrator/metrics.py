"""Prometheus metrics: the `Observer` that counts what the pipeline reports, and the gauges read from
the store (backlog by state, the oldest unfinished request, reconciliations and events waiting).

Each service has its own registry, so tests and several services in one process do not share
counters. Label values are few and fixed (endpoints, HTTP statuses, outcomes, retry reasons from the
classification table), so the series stay bounded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator.store.base import BatchStore, State

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# `*_created` series (when each counter was made) double the exposition and tell an operator nothing
# a restart does not already say.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

# Platform calls take tens of milliseconds to the whole timeout (30 s by default).
CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A call waits nothing when the rate has room, up to a minute behind a shared pause.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)

# Every metric the service exports, by name: the deploy files (alerts, dashboard) are checked against
# this list by the tests.
NAMES = (
    "orchestrator_requests_total",
    "orchestrator_messages_total",
    "orchestrator_aep_calls_total",
    "orchestrator_aep_call_duration_seconds",
    "orchestrator_limiter_wait_seconds",
    "orchestrator_limiter_pauses_total",
    "orchestrator_limiter_paused_seconds_total",
    "orchestrator_limiter_rate",
    "orchestrator_retries_total",
    "orchestrator_token_requests_total",
    "orchestrator_credentials_refused",
    "orchestrator_leases_lost_total",
    "orchestrator_duplicates_aborted_total",
    "orchestrator_backlog",
    "orchestrator_oldest_unfinished_seconds",
    "orchestrator_reconciliations_pending",
    "orchestrator_events_waiting",
)


class Metrics:
    """The Prometheus `Observer`, plus `refresh` for what only the store knows."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "orchestrator_requests",
            # succeeded and batch_failed: AEP's final word on the batch of a request with files.
            "Requests that reached a final state, by outcome",
            ["outcome"],
            registry=r,
        )
        self._messages = Counter(
            "orchestrator_messages", "Messages intake handled, by result", ["result"], registry=r
        )
        self._calls = Counter(
            "orchestrator_aep_calls",
            "Platform API calls by endpoint and HTTP status (none: no answer)",
            ["endpoint", "status"],
            registry=r,
        )
        self._call_seconds = Histogram(
            "orchestrator_aep_call_duration_seconds",
            "Platform API call duration",
            ["endpoint"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self._wait = Histogram(
            "orchestrator_limiter_wait_seconds",
            "Time a call waited in the limiter (pause, rate, concurrency) before it was sent",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._pauses = Counter(
            "orchestrator_limiter_pauses", "Throttle signals that paused every call", registry=r
        )
        self._paused = Counter(
            "orchestrator_limiter_paused_seconds", "Seconds added to the shared pause", registry=r
        )
        self._rate = Gauge(
            "orchestrator_limiter_rate", "The limiter's effective rate, in calls per period", registry=r
        )
        self._retries = Counter(
            "orchestrator_retries",
            "Attempts that failed and were scheduled again, by reason",
            ["reason"],
            registry=r,
        )
        self._tokens = Counter(
            "orchestrator_token_requests", "IMS token requests, by result", ["result"], registry=r
        )
        self._refused = Gauge(
            "orchestrator_credentials_refused", "1 while the service waits for usable credentials", registry=r
        )
        self._leases_lost = Counter(
            "orchestrator_leases_lost", "Calls abandoned because their lease was lost", registry=r
        )
        self._aborted = Counter(
            "orchestrator_duplicates_aborted", "Extra batches aborted by reconciliation", registry=r
        )
        self._backlog = Gauge(
            "orchestrator_backlog", "Requests in the store, by state", ["state"], registry=r
        )
        self._oldest = Gauge(
            "orchestrator_oldest_unfinished_seconds",
            "Age of the oldest request still pending or retrying (0 when none)",
            registry=r,
        )
        self._reconciliations = Gauge(
            "orchestrator_reconciliations_pending", "Created requests waiting for reconciliation", registry=r
        )
        self._events = Gauge(
            "orchestrator_events_waiting", "Batch events in the outbox, not yet published", registry=r
        )
        self._call_series: dict[tuple[str, int | None], Any] = {}
        self._call_timers: dict[str, Any] = {}
        # Series that exist from the start, so a rate() over them is defined before the first event;
        # the two counted once or twice per request are kept, to be counted without `labels()`.
        self._request_series = {
            outcome: self._requests.labels(outcome)
            for outcome in ("created", "adopted", "failed", "succeeded", "batch_failed")
        }
        self._message_series = {
            result: self._messages.labels(result)
            for result in ("accepted", "duplicate", "conflict", "rejected")
        }
        for result in ("ok", "failed"):
            self._tokens.labels(result)
        for state in State:
            self._backlog.labels(state.value)

    # --- Observer ---------------------------------------------------------------------------------

    def aep_call(self, endpoint: str, status: int | None, seconds: float) -> None:
        # The series of each (endpoint, status) looked up once: `labels()` takes a lock and builds a
        # key on every call, and this runs for every call the service makes.
        key = (endpoint, status)
        series = self._call_series.get(key)
        if series is None:
            series = self._calls.labels(endpoint, "none" if status is None else str(status))
            self._call_series[key] = series
        series.inc()
        timer = self._call_timers.get(endpoint)
        if timer is None:
            timer = self._call_timers[endpoint] = self._call_seconds.labels(endpoint)
        timer.observe(seconds)

    def limiter_waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def limiter_paused(self, seconds: float) -> None:
        self._pauses.inc()
        self._paused.inc(seconds)

    def rate_changed(self, rate: float) -> None:
        self._rate.set(rate)

    def token_fetched(self, ok: bool) -> None:
        self._tokens.labels("ok" if ok else "failed").inc()

    def credentials(self, refused: bool) -> None:
        self._refused.set(1 if refused else 0)

    def message(self, result: str) -> None:
        series = self._message_series.get(result)
        (self._messages.labels(result) if series is None else series).inc()

    def request_finished(self, outcome: str) -> None:
        series = self._request_series.get(outcome)
        (self._requests.labels(outcome) if series is None else series).inc()

    def retry_scheduled(self, reason: str) -> None:
        self._retries.labels(reason).inc()

    def lease_lost(self) -> None:
        self._leases_lost.inc()

    def duplicate_aborted(self) -> None:
        self._aborted.inc()

    # --- from the store ---------------------------------------------------------------------------

    async def refresh(self, store: BatchStore, now: datetime, events_waiting: int | None = None) -> None:
        """Read the gauges that only the store knows (a few indexed queries: call it every few
        seconds, not on every scrape)."""
        for state, count in (await store.counts()).items():
            self._backlog.labels(state.value).set(count)
        oldest = await store.oldest_unfinished()
        self._oldest.set(0 if oldest is None else max(0.0, (now - oldest).total_seconds()))
        self._reconciliations.set(await store.pending_reconciliations())
        if events_waiting is not None:
            self._events.set(events_waiting)

    def exposition(self) -> bytes:
        """The text format `/metrics` answers with."""
        return generate_latest(self.registry)
