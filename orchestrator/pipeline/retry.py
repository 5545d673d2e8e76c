"""What to do about a failed AEP call: classify it, then decide when (or whether) to try again.

Pure: no logging, no I/O, no clock of its own. Time (`now`) and randomness (`rng`) are passed in, so
backoff is tested without waiting; the dispatcher logs `retry.scheduled` with the `Decision`.

The one rule that shapes everything here: `POST /batches` is not idempotent. A failure after the
request may have reached AEP is *ambiguous* (the batch may exist), and the next attempt must look the
batch up by its externalId before creating again. `classify` says which failures are ambiguous.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Literal

from orchestrator.aep.errors import AepError, AepTimeout, AepTransportError, AuthError
from orchestrator.settings import RetrySettings


class Action(enum.StrEnum):
    RETRY = "retry"
    FINAL = "final"
    # No usable token: the request is not at fault, so it is released (not failed, no attempt used).
    WAIT_FOR_CREDENTIALS = "wait_for_credentials"


class Throttle(enum.Enum):
    """Whether a failure is the server asking us to slow down (it then pauses everyone)."""

    NO = "no"
    YES = "yes"
    IF_RETRY_AFTER = "if_retry_after"


@dataclass(frozen=True)
class Rule:
    action: Action
    # On a create: the batch may have been made, so the next attempt looks it up before creating.
    ambiguous: bool = False
    throttled: Throttle = Throttle.NO
    why: str = ""


_R, _F = Action.RETRY, Action.FINAL

# THE classification table: one row per HTTP status we know something about. A status not listed
# falls to the range rules below it. "ambiguous" only matters on a create (see `classify`).
STATUS_RULES: Mapping[int, Rule] = MappingProxyType(
    {
        # The body is malformed or the dataset id is refused: the same request fails the same way.
        400: Rule(_F, why="bad request"),
        # The client already forced one token refresh and replayed; a 401 reaching this table means the
        # *fresh* token was refused too. That is not the request's fault and usually passes (IMS and the
        # gateway disagree for a moment, a token revoked mid-rotation), so back off and retry; a
        # credential that is really wrong fails at IMS (AuthError) and a bounded attempt count stops it.
        # The gateway refuses before the service runs, so the create did not happen.
        401: Rule(_R, why="token refused after a refresh"),
        # Permissions, product profile or org header: a configuration problem, retrying will not fix it.
        403: Rule(_F, why="forbidden"),
        # The dataset (or batch) does not exist: a poison request.
        404: Rule(_F, why="not found"),
        # RFC 9110: the server gave up waiting for the *complete* request, so it did not act on it.
        408: Rule(_R, why="request timeout"),
        # On create, the likeliest conflict is an externalId that already exists, i.e. an earlier
        # attempt of ours succeeded: retry as ambiguous so the next attempt finds and adopts that batch.
        409: Rule(_R, ambiguous=True, why="conflict (the batch may already exist)"),
        # If-Match mismatch: we never send If-Match, so this is a bug, not something time fixes.
        412: Rule(_F, why="precondition failed"),
        413: Rule(_F, why="payload too large"),
        # "The URL length exceeds the allowed 2000 characters" (BI-spec).
        414: Rule(_F, why="URL too long"),
        415: Rule(_F, why="unsupported media type"),
        422: Rule(_F, why="unprocessable request"),
        # Rate limited: the request was refused, not run, so never ambiguous. Pauses everyone.
        429: Rule(_R, throttled=Throttle.YES, why="rate limited"),
        # PLAT-trouble: "If you are making many simultaneous calls, you may be reaching the API limit";
        # the create may have run before the error.
        500: Rule(_R, ambiguous=True, why="internal server error"),
        # A gateway lost the upstream answer: the upstream may well have created the batch.
        502: Rule(_R, ambiguous=True, why="bad gateway"),
        # "The service is currently unavailable": refused, not run. With Retry-After it is the server
        # asking for a pause (STR-spec), so it throttles like a 429.
        503: Rule(_R, throttled=Throttle.IF_RETRY_AFTER, why="service unavailable"),
        # The gateway stopped waiting; the service behind it may still have finished the create.
        504: Rule(_R, ambiguous=True, why="gateway timeout"),
    }
)
# Any other 4xx: the request itself is wrong; repeating it repeats the answer.
CLIENT_ERROR_RULE = Rule(_F, why="client error")
# Any other 5xx: a server fault passes; the server's state after it is unknown, so ambiguous.
SERVER_ERROR_RULE = Rule(_R, ambiguous=True, why="server error")
# A 1xx/2xx/3xx the client did not expect (a 200 instead of 201, a redirect): on a create the batch
# may exist, so retry as ambiguous and let the lookup tell.
UNEXPECTED_STATUS_RULE = Rule(_R, ambiguous=True, why="unexpected status")

# Failures without a status, checked in order (first isinstance match wins; subclasses first).
EXCEPTION_RULES: tuple[tuple[type[BaseException], Rule], ...] = (
    # IMS is down or refuses the credentials (no AEP call was made), or AEP refused a fixed token
    # (ORCH_AEP__ACCESS_TOKEN, which cannot be refreshed): not a request failure.
    (AuthError, Rule(Action.WAIT_FOR_CREDENTIALS, why="no usable token")),
    # The call may have reached AEP (ambiguous unless `maybe_sent` is False).
    (AepTimeout, Rule(_R, ambiguous=True, why="timed out")),
    # Refused or dropped connection; `maybe_sent=False` (never connected) makes it unambiguous.
    (AepTransportError, Rule(_R, ambiguous=True, why="connection failed")),
    # The same two, should an unwrapped one slip through the client.
    (TimeoutError, Rule(_R, ambiguous=True, why="timed out")),
    (ConnectionError, Rule(_R, ambiguous=True, why="connection failed")),
)
# Anything else (a bug, a response that failed to parse): retry, and as ambiguous, because e.g. a 201
# whose body did not parse *did* create the batch. Failing it would orphan that batch; a lookup adopts
# it. A real bug still ends after max_attempts, with its message in lastError.
UNEXPECTED_RULE = Rule(_R, ambiguous=True, why="unexpected error")


@dataclass(frozen=True)
class Verdict:
    action: Action
    ambiguous: bool
    throttled: bool
    reason: str


def _rule(error: Exception) -> Rule:
    if isinstance(error, AepError) and not isinstance(error, AepTransportError | AuthError):
        status = error.status
        if status is not None:
            if status in STATUS_RULES:
                return STATUS_RULES[status]
            if 400 <= status < 500:
                return CLIENT_ERROR_RULE
            if 500 <= status < 600:
                return SERVER_ERROR_RULE
            return UNEXPECTED_STATUS_RULE
    for kind, rule in EXCEPTION_RULES:
        if isinstance(error, kind):
            return rule
    return UNEXPECTED_RULE


def _has_header(value: str | None) -> bool:
    return value is not None and value.strip() != ""


def classify(error: Exception, *, creating: bool) -> Verdict:
    """Look `error` up in the table. `creating`: the failed call was `POST /batches`; other calls
    (lookups) change nothing on the server, so their failures are never ambiguous."""
    rule = _rule(error)
    ambiguous = creating and rule.ambiguous
    if isinstance(error, AepTransportError) and not error.maybe_sent:
        ambiguous = False  # the connection was never made: AEP never saw the request
    retry_after = error.retry_after if isinstance(error, AepError) else None
    throttled = rule.throttled is Throttle.YES or (
        rule.throttled is Throttle.IF_RETRY_AFTER and _has_header(retry_after)
    )
    detail = error.summary() if isinstance(error, AepError) else f"{type(error).__name__}: {error}"
    return Verdict(rule.action, ambiguous, throttled, f"{rule.why}: {detail}"[:500])


_DELTA_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from `now` per a `Retry-After` header: delta-seconds (integer or decimal,
    a negative one counts as 0) or an HTTP-date (a past one counts as 0). None when absent or
    unparseable: the caller then falls back to its own backoff."""
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return max(0.0, float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is GMT; "-0000" and friends parse naive. Treat naive `now` as UTC too.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform(0, min(cap, base * 2**(attempt-1))), attempt counting from 1.
    Spreading retries over the whole interval is what keeps clients that failed together from
    retrying together."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    try:
        # ldexp is base * 2**n without building a huge int, and raises instead of returning inf.
        ceiling = min(cap, math.ldexp(base, attempt - 1))
    except OverflowError:
        ceiling = cap
    return rng.uniform(0.0, ceiling)


class RetryBudget:
    """A process-wide retry quota (AWS SDK standard mode numbers): a token bucket of `capacity`
    tokens; a retry costs `retry_cost` (`timeout_cost` after a timeout, which ties up a connection
    for the whole timeout); a first-time success refunds `success_refund`, a success after retries
    refunds what a retry cost. During an outage every call fails, nothing refunds, and the budget
    runs dry after ~100 retries: from then on retries slow down instead of becoming a storm.

    Unlike AWS, an empty budget does not drop the retry: the request is durable and must not be lost,
    so `RetryPolicy` defers it to the longest backoff instead. One event loop, so no locking.
    """

    CAPACITY = 500
    RETRY_COST = 5
    TIMEOUT_COST = 10
    SUCCESS_REFUND = 1

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._available = capacity

    @property
    def available(self) -> int:
        return self._available

    def try_spend(self, cost: int) -> bool:
        """Take `cost` tokens if there are that many; otherwise take nothing and say so."""
        if cost < 0:
            raise ValueError("cost must not be negative")
        if cost > self._available:
            return False
        self._available -= cost
        return True

    def refund(self, amount: int) -> None:
        if amount < 0:
            raise ValueError("amount must not be negative")
        self._available = min(self.capacity, self._available + amount)


DecisionKind = Literal["retry", "fail", "release"]


@dataclass(frozen=True)
class Decision:
    """`retry` after `delay` seconds (look the batch up first when `ambiguous`), `fail` for good, or
    `release` the request untouched (no attempt used) until credentials come back."""

    kind: DecisionKind
    delay: float
    ambiguous: bool
    reason: str


class RetryPolicy:
    """Turns a failure into a `Decision`.

    Retry delay = the largest of:
    - full jitter over [0, min(max_delay, base_delay * 2**(attempt-1))];
    - the server's `Retry-After`, capped at `retry_after_cap` (never retry sooner than the server
      asked, unless it asks for more than the cap: a bogus or far-off date must not park a request
      for hours). Default cap: max(max_delay, 60 s), because AEP's guardrail is per minute
      (2000 batches/min/user), so a Retry-After up to a minute is plausible even when max_delay is small;
    - `lookup_delay` when ambiguous: the catalog is eventually consistent, so a batch created by the
      lost call may not be listed at once. Looking it up too early would find nothing and create a
      duplicate; a second of slack lets the catalog catch up before the lookup;
    - `max_delay` when the retry budget is empty (deferred, never dropped).
    """

    def __init__(
        self,
        settings: RetrySettings,
        rng: random.Random,
        budget: RetryBudget,
        retry_after_cap: float | None = None,
        *,
        lookup_delay: float = 1.0,
        credentials_delay: float = 5.0,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.budget = budget
        self.retry_after_cap = (
            retry_after_cap if retry_after_cap is not None else max(settings.max_delay, 60.0)
        )
        self.lookup_delay = lookup_delay
        # How long a released request waits before it is due again; the dispatcher also stops
        # claiming while IMS gives no token, so this only spaces out the re-claims.
        self.credentials_delay = credentials_delay

    def decide(self, error: Exception, attempt: int, now: datetime, *, creating: bool) -> Decision:
        """`attempt`: the number of the attempt that just failed, counting from 1."""
        verdict = classify(error, creating=creating)
        if verdict.action is Action.FINAL:
            return Decision("fail", 0.0, False, verdict.reason)
        if verdict.action is Action.WAIT_FOR_CREDENTIALS:
            permanent = isinstance(error, AuthError) and error.permanent
            # Bad credentials need an operator; there is no point coming back soon.
            delay = (
                max(self.credentials_delay, self.settings.max_delay) if permanent else self.credentials_delay
            )
            # IMS may say when to come back (AuthError carries its Retry-After).
            ims_after = parse_retry_after(error.retry_after, now) if isinstance(error, AepError) else None
            if ims_after is not None:
                delay = max(delay, min(ims_after, self.retry_after_cap))
            return Decision("release", delay, False, verdict.reason)
        if attempt >= self.settings.max_attempts:
            return Decision(
                "fail", 0.0, verdict.ambiguous, f"gave up after {attempt} attempts: {verdict.reason}"
            )

        settings = self.settings
        delay = full_jitter(attempt, settings.base_delay, settings.max_delay, self.rng)
        reason = verdict.reason
        retry_after = parse_retry_after(error.retry_after, now) if isinstance(error, AepError) else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        if verdict.ambiguous:
            delay = max(delay, self.lookup_delay)
        timed_out = isinstance(error, AepTimeout | TimeoutError)
        if not self.budget.try_spend(RetryBudget.TIMEOUT_COST if timed_out else RetryBudget.RETRY_COST):
            delay = max(delay, settings.max_delay)
            reason = f"{reason} (retry budget empty: deferred)"
        return Decision("retry", delay, verdict.ambiguous, reason)

    def succeeded(self, attempt: int) -> None:
        """A call succeeded on `attempt`: refill the budget (1 for a first try, a retry's cost after
        retries, as AWS does; a timeout retry refunds 5 of its 10, which refills slower after a
        timeout storm, the cautious side)."""
        self.budget.refund(RetryBudget.SUCCESS_REFUND if attempt <= 1 else RetryBudget.RETRY_COST)
