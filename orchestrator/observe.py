"""The one seam the pipeline reports through: the AEP client, the limiter, the token provider, intake,
the dispatcher and the reconciler tell an `Observer` what happened, and metrics (and later traces)
hang off it without touching the pipeline. Logs stay where the event happens, with its context.

Every method is a plain, synchronous call that must not fail or block: an observer counts, it does
not decide anything. `NULL` observes nothing (the default, and what unit tests get).
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def aep_call(self, endpoint: str, status: int | None, seconds: float) -> None:
        """One Platform call ended: its HTTP status (None when no answer came) and duration."""

    def limiter_waited(self, seconds: float) -> None:
        """A call waited this long in the limiter (pause, rate and concurrency) before it was sent."""

    def limiter_paused(self, seconds: float) -> None:
        """A throttle signal extended the shared pause by this long."""

    def rate_changed(self, rate: float) -> None:
        """The limiter's effective rate (calls per period) is now `rate`."""

    def token_fetched(self, ok: bool) -> None:
        """An IMS token request ended, with a token or without."""

    def credentials(self, refused: bool) -> None:
        """Whether the service is waiting for usable credentials."""

    def message(self, result: str) -> None:
        """Intake handled a message: `accepted`, `duplicate`, `conflict` or `rejected`."""

    def request_finished(self, outcome: str) -> None:
        """A request reached a final state: `created`, `adopted` or `failed`."""

    def retry_scheduled(self, reason: str) -> None:
        """An attempt failed and will be tried again; `reason` is the classification (a few values)."""

    def lease_lost(self) -> None:
        """A call lost its lease (another dispatcher may hold the request) and was abandoned."""

    def duplicate_aborted(self) -> None:
        """Reconciliation aborted an extra batch."""


class NullObserver:
    """Observes nothing."""

    def aep_call(self, endpoint: str, status: int | None, seconds: float) -> None:
        pass

    def limiter_waited(self, seconds: float) -> None:
        pass

    def limiter_paused(self, seconds: float) -> None:
        pass

    def rate_changed(self, rate: float) -> None:
        pass

    def token_fetched(self, ok: bool) -> None:
        pass

    def credentials(self, refused: bool) -> None:
        pass

    def message(self, result: str) -> None:
        pass

    def request_finished(self, outcome: str) -> None:
        pass

    def retry_scheduled(self, reason: str) -> None:
        pass

    def lease_lost(self) -> None:
        pass

    def duplicate_aborted(self) -> None:
        pass


NULL: Observer = NullObserver()
