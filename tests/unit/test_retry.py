from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.aep.errors import AepError, AepHttpError, AepTimeout, AepTransportError, AuthError
from orchestrator.pipeline.retry import (
    STATUS_RULES,
    Action,
    RetryBudget,
    RetryPolicy,
    classify,
    full_jitter,
    parse_retry_after,
)
from orchestrator.settings import RetrySettings

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
R, F = Action.RETRY, Action.FINAL


def http(status: int, retry_after: str | None = None) -> AepHttpError:
    return AepHttpError("boom", endpoint="batches.create", status=status, retry_after=retry_after)


def policy(
    settings: RetrySettings | None = None, *, seed: int = 0, budget: RetryBudget | None = None, **kw: float
) -> RetryPolicy:
    return RetryPolicy(settings or RetrySettings(), random.Random(seed), budget or RetryBudget(), **kw)


# --- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "action", "ambiguous", "throttled"),
    [
        (400, F, False, False),
        (401, R, False, False),
        (403, F, False, False),
        (404, F, False, False),
        (408, R, False, False),
        (409, R, True, False),
        (412, F, False, False),
        (413, F, False, False),
        (414, F, False, False),
        (415, F, False, False),
        (418, F, False, False),  # any other 4xx
        (422, F, False, False),
        (429, R, False, True),
        (500, R, True, False),
        (501, R, True, False),  # any other 5xx
        (502, R, True, False),
        (503, R, False, False),
        (504, R, True, False),
        (200, R, True, False),  # an unexpected success status on a create: the batch may exist
        (302, R, True, False),
    ],
)
def test_status_table_on_create(status: int, action: Action, ambiguous: bool, throttled: bool) -> None:
    verdict = classify(http(status), creating=True)
    assert (verdict.action, verdict.ambiguous, verdict.throttled) == (action, ambiguous, throttled)
    assert f"HTTP {status}" in verdict.reason


def test_503_throttles_only_with_retry_after() -> None:
    assert classify(http(503, "7"), creating=True).throttled
    assert not classify(http(503, "  "), creating=True).throttled
    assert classify(http(429), creating=True).throttled  # with or without the header


@pytest.mark.parametrize(
    ("error", "action", "ambiguous"),
    [
        (AepTimeout("slow", endpoint="e", maybe_sent=True), R, True),
        (AepTimeout("slow", endpoint="e", maybe_sent=False), R, False),
        (AepTransportError("reset", endpoint="e", maybe_sent=True), R, True),
        (AepTransportError("refused", endpoint="e", maybe_sent=False), R, False),
        (TimeoutError(), R, True),
        (ConnectionResetError(), R, True),
        (AepError("no status", endpoint="e"), R, True),
        (ValueError("201 body did not parse"), R, True),
        (AuthError("ims down"), Action.WAIT_FOR_CREDENTIALS, False),
        (AuthError("bad secret", status=401, permanent=True), Action.WAIT_FOR_CREDENTIALS, False),
    ],
)
def test_exception_rules_on_create(error: Exception, action: Action, ambiguous: bool) -> None:
    verdict = classify(error, creating=True)
    assert (verdict.action, verdict.ambiguous, verdict.throttled) == (action, ambiguous, False)


ERRORS = st.one_of(
    st.builds(http, st.integers(100, 599), st.sampled_from([None, "3", "soon"])),
    st.builds(AepTimeout, st.just("t"), endpoint=st.just("e"), maybe_sent=st.booleans()),
    st.builds(AepTransportError, st.just("t"), endpoint=st.just("e"), maybe_sent=st.booleans()),
    st.builds(AuthError, st.just("a"), permanent=st.booleans()),
    st.sampled_from([TimeoutError(), OSError(), RuntimeError("bug")]),
)


@given(ERRORS)
def test_non_create_calls_are_never_ambiguous(error: Exception) -> None:
    assert not classify(error, creating=False).ambiguous


@given(ERRORS)
def test_definite_refusals_are_never_ambiguous(error: Exception) -> None:
    verdict = classify(error, creating=True)
    if isinstance(error, AepHttpError) and error.status in {429, 503, 401, 408}:
        assert not verdict.ambiguous
    if verdict.action is not Action.RETRY:
        assert not verdict.ambiguous


def test_every_row_documents_itself() -> None:
    assert all(rule.why for rule in STATUS_RULES.values())


# --- Retry-After --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("1e3", None),
        ("nan", None),
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-4", 0.0),
        ("Sat, 28 Nov 2026 12:00:30 GMT", 30.0),
        ("Sat, 28 Nov 2026 12:00:30 -0000", 30.0),  # parses naive: taken as UTC
        ("Sat, 28 Nov 2026 11:00:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after_examples(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


@given(st.integers(0, 10**7))
def test_parse_retry_after_http_date_round_trips(seconds: int) -> None:
    header = format_datetime(NOW + timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(header, NOW) == seconds


@given(st.decimals(-1000, 10**6, places=3, allow_nan=False, allow_infinity=False))
def test_parse_retry_after_delta_seconds(value: object) -> None:
    parsed = parse_retry_after(str(value), NOW)
    assert parsed == max(0.0, float(str(value)))


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises_and_is_never_negative(value: str) -> None:
    parsed = parse_retry_after(value, NOW)
    assert parsed is None or parsed >= 0


# --- full jitter -------------------------------------------------------------------------------------


@given(
    attempt=st.integers(1, 10**6),
    base=st.floats(0.001, 10),
    cap=st.floats(0.001, 600),
    seed=st.integers(0, 2**32),
)
def test_full_jitter_stays_within_its_ceiling(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = full_jitter(attempt, base, cap, random.Random(seed))
    # Past 2**1000 any base here exceeds any cap (and 2.0**n would overflow).
    ceiling = cap if attempt > 1001 else min(cap, base * 2.0 ** (attempt - 1))
    assert 0 <= delay <= ceiling


def test_full_jitter_spreads_over_the_whole_interval() -> None:
    rng = random.Random(7)
    samples = [full_jitter(4, 0.5, 60, rng) for _ in range(2000)]  # ceiling 0.5 * 2**3 = 4
    assert max(samples) > 3.9
    assert min(samples) < 0.1


def test_full_jitter_counts_attempts_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        full_jitter(0, 0.5, 60, random.Random(0))


# --- budget ------------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_budget_stays_within_zero_and_capacity(ops: list[tuple[bool, int]]) -> None:
    budget = RetryBudget(capacity=100)
    for spend, amount in ops:
        before = budget.available
        if spend:
            ok = budget.try_spend(amount)
            assert ok == (amount <= before)
            assert budget.available == (before - amount if ok else before)
        else:
            budget.refund(amount)
            assert budget.available == min(100, before + amount)
        assert 0 <= budget.available <= 100


def test_an_outage_empties_the_budget_after_a_hundred_retries() -> None:
    budget = RetryBudget()
    assert sum(budget.try_spend(RetryBudget.RETRY_COST) for _ in range(150)) == 100
    assert budget.available == 0


# --- policy ------------------------------------------------------------------------------------------

RETRYABLE = st.sampled_from([408, 409, 429, 500, 502, 503, 504, 599])


@given(
    status=RETRYABLE,
    attempt=st.integers(1, 7),
    retry_after=st.one_of(st.none(), st.integers(0, 500)),
    creating=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_retry_delay_bounds(
    status: int, attempt: int, retry_after: int | None, creating: bool, seed: int
) -> None:
    settings = RetrySettings(max_attempts=8, base_delay=0.5, max_delay=20.0)
    decision = policy(settings, seed=seed, lookup_delay=1.0).decide(
        http(status, None if retry_after is None else str(retry_after)), attempt, NOW, creating=creating
    )
    cap = 60.0  # the default: max(max_delay, 60)
    assert decision.kind == "retry"
    assert decision.ambiguous == classify(http(status), creating=creating).ambiguous
    if retry_after is not None:
        assert decision.delay >= min(retry_after, cap)  # never sooner than the server asked
    if decision.ambiguous:
        assert decision.delay >= 1.0  # the catalog gets time to list a batch the lost call made
    assert 0 <= decision.delay <= max(cap, settings.max_delay, 1.0)
    assert decision.delay <= max(min(retry_after or 0, cap), 1.0, min(20.0, 0.5 * 2 ** (attempt - 1)))


def test_retry_after_beyond_the_cap_waits_the_cap() -> None:
    decision = policy(RetrySettings(max_delay=5.0), retry_after_cap=30.0).decide(
        http(429, "3600"), 1, NOW, creating=True
    )
    assert decision.delay == 30.0


def test_default_cap_follows_max_delay_above_a_minute() -> None:
    assert policy(RetrySettings(max_delay=10.0)).retry_after_cap == 60.0
    assert policy(RetrySettings(max_delay=300.0)).retry_after_cap == 300.0


@given(status=st.sampled_from([400, 403, 404, 412, 413, 414, 415, 422, 451]), attempt=st.integers(1, 100))
def test_final_statuses_fail_at_once_and_spend_nothing(status: int, attempt: int) -> None:
    budget = RetryBudget()
    decision = policy(budget=budget).decide(http(status), attempt, NOW, creating=True)
    assert decision.kind == "fail"
    assert not decision.reason.startswith("gave up")
    assert budget.available == RetryBudget.CAPACITY


@given(attempt=st.integers(8, 100))
def test_gives_up_at_max_attempts(attempt: int) -> None:
    decision = policy(RetrySettings(max_attempts=8)).decide(http(503), attempt, NOW, creating=True)
    assert decision.kind == "fail"
    assert decision.reason.startswith(f"gave up after {attempt} attempts: service unavailable")


def test_last_attempt_before_the_limit_still_retries() -> None:
    assert policy(RetrySettings(max_attempts=8)).decide(http(503), 7, NOW, creating=True).kind == "retry"


@given(attempt=st.integers(1, 1000), permanent=st.booleans())
def test_credentials_release_the_request(attempt: int, permanent: bool) -> None:
    budget = RetryBudget()
    decision = policy(RetrySettings(max_delay=60.0), budget=budget).decide(
        AuthError("ims", permanent=permanent), attempt, NOW, creating=True
    )
    assert decision.kind == "release"
    assert not decision.ambiguous
    assert decision.delay == (60.0 if permanent else 5.0)
    assert budget.available == RetryBudget.CAPACITY


def test_release_waits_for_the_retry_after_of_ims() -> None:
    error = AuthError("ims busy", status=429, retry_after="42")
    assert policy().decide(error, 1, NOW, creating=False).delay == 42.0


def test_empty_budget_defers_instead_of_dropping() -> None:
    budget = RetryBudget(capacity=4)  # less than one retry
    decision = policy(RetrySettings(max_delay=20.0), budget=budget).decide(http(500), 1, NOW, creating=False)
    assert decision.kind == "retry"
    assert decision.delay == 20.0
    assert "budget" in decision.reason
    assert budget.available == 4


def test_timeouts_cost_double_and_successes_refund() -> None:
    budget = RetryBudget()
    p = policy(budget=budget)
    p.decide(AepTimeout("t", endpoint="e", maybe_sent=True), 1, NOW, creating=True)
    assert budget.available == 490
    p.decide(http(502), 2, NOW, creating=True)
    assert budget.available == 485
    p.succeeded(3)  # a success after retries refunds a retry's cost
    assert budget.available == 490
    p.succeeded(1)  # a first-time success refunds 1
    assert budget.available == 491


def test_same_seed_same_delays() -> None:
    first = [policy(seed=3).decide(http(500), n, NOW, creating=False).delay for n in range(1, 8)]
    again = [policy(seed=3).decide(http(500), n, NOW, creating=False).delay for n in range(1, 8)]
    assert first == again
