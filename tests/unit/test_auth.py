"""The IMS token provider: what it sends, when it fetches, how it fails, and what it never reveals."""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from pydantic import SecretStr
from yarl import URL

from orchestrator.aep.auth import (
    BACKOFF_CAP,
    ImsTokenProvider,
    StaticToken,
    TokenProvider,
    TokenRefused,
    backoff_delay,
    refresh_margin,
    token_provider,
)
from orchestrator.aep.client import AepClient
from orchestrator.aep.errors import AuthError
from orchestrator.clock import ManualClock
from orchestrator.messages import BatchRequest
from orchestrator.pipeline.retry import RetryBudget, RetryPolicy
from orchestrator.settings import AepSettings, RetrySettings
from tests.unit.fakes import IMS_URL, SECRET, aep_settings

TOKEN = "eyJ-token-one-SENSITIVE"


def settings(**overrides: Any) -> AepSettings:
    return aep_settings(
        **{"scopes": ("openid", "AdobeID", "read_organizations"), "timeout": 7.0, **overrides}
    )


class TopRng(random.Random):
    """Full jitter at its upper bound, so backoff times are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def provider(session: aiohttp.ClientSession, clock: ManualClock) -> ImsTokenProvider:
    return ImsTokenProvider(settings(), session, clock, TopRng())


def ims_calls(mock: aioresponses) -> int:
    return sum(len(calls) for (method, url), calls in mock.requests.items() if url.host == "ims.test")


def grant(token: str = TOKEN, expires_in: float = 86399) -> dict[str, Any]:
    return {"access_token": token, "token_type": "bearer", "expires_in": expires_in}


async def test_sends_client_credentials_in_the_form_body(
    mock: aioresponses, provider: ImsTokenProvider
) -> None:
    mock.post(IMS_URL, payload=grant())

    assert await provider.token() == TOKEN

    [(key, calls)] = mock.requests.items()
    assert key == ("POST", URL(IMS_URL))  # no query string at all
    assert calls[0].kwargs["data"] == {
        "grant_type": "client_credentials",
        "client_id": "cid-123",
        "client_secret": SECRET,
        "scope": "openid,AdobeID,read_organizations",
    }
    assert calls[0].kwargs.get("params") is None
    timeout = calls[0].kwargs["timeout"]
    assert timeout.total == 7.0
    assert timeout.connect == 7.0


def test_refresh_margin_scales_with_the_lifetime() -> None:
    assert refresh_margin(86399) == 3600  # a day-long token is renewed after 23 h
    assert refresh_margin(5) == pytest.approx(1.0)
    assert refresh_margin(600) == pytest.approx(120.0)


async def test_day_long_token_is_reused_until_23_hours(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, payload=grant("first", 86399))
    mock.post(IMS_URL, payload=grant("second", 86399))

    assert await provider.token() == "first"
    clock.advance(86399 - 3600 - 1)  # expires_in counts seconds, not milliseconds
    assert await provider.token() == "first"
    assert ims_calls(mock) == 1
    clock.advance(1.5)
    assert await provider.token() == "second"
    assert ims_calls(mock) == 2


async def test_five_second_token_is_renewed_after_four(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, payload=grant("first", 5))
    mock.post(IMS_URL, payload=grant("second", 5))

    assert await provider.token() == "first"
    clock.advance(3.9)
    assert await provider.token() == "first"
    clock.advance(0.2)
    assert await provider.token() == "second"
    assert ims_calls(mock) == 2


async def test_concurrent_callers_share_one_fetch(mock: aioresponses, provider: ImsTokenProvider) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_ims(url: URL, **kwargs: Any) -> CallbackResult:
        entered.set()
        await release.wait()
        return CallbackResult(payload=grant())

    mock.post(IMS_URL, callback=slow_ims, repeat=True)
    callers = [asyncio.create_task(provider.token()) for _ in range(10)]
    await entered.wait()
    for _ in range(5):  # let every caller reach the lock while the fetch is in flight
        await asyncio.sleep(0)
    release.set()

    assert await asyncio.gather(*callers) == [TOKEN] * 10
    assert ims_calls(mock) == 1


async def test_refresh_fetches_only_while_the_stale_token_is_current(
    mock: aioresponses, provider: ImsTokenProvider
) -> None:
    mock.post(IMS_URL, payload=grant("first"))
    mock.post(IMS_URL, payload=grant("second"))
    assert await provider.token() == "first"

    assert await provider.refresh("first") == "second"
    # A caller whose 401 came back late, after the replacement: no new fetch.
    assert await provider.refresh("first") == "second"
    assert await provider.token() == "second"
    assert ims_calls(mock) == 2


async def test_bad_credentials_are_permanent_and_not_retried_before_the_cap(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, status=400, payload={"error": "invalid_client", "error_description": "invalid client"})
    mock.post(IMS_URL, payload=grant())

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert caught.value.permanent
    assert caught.value.status == 400
    assert caught.value.error_code == "invalid_client"
    assert caught.value.detail == "invalid client"
    assert not provider.ready
    assert provider.problem is not None
    assert "invalid_client" in provider.problem

    clock.advance(59)
    with pytest.raises(AuthError) as again:
        await provider.token()
    assert again.value.permanent
    assert ims_calls(mock) == 1  # the cached failure, no new request

    clock.advance(1)  # an operator may have fixed the credentials: try again at the cap
    assert await provider.token() == TOKEN
    assert provider.ready
    assert provider.problem is None


async def test_ims_outage_is_retryable_with_growing_backoff(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, status=503, body="upstream down", content_type="text/plain", repeat=2)
    mock.post(IMS_URL, payload=grant())

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert not caught.value.permanent
    assert caught.value.status == 503
    assert caught.value.detail == "upstream down"

    clock.advance(0.5)  # first backoff is at most 1 s
    with pytest.raises(AuthError):
        await provider.token()
    assert ims_calls(mock) == 1

    clock.advance(0.5)
    with pytest.raises(AuthError):
        await provider.token()
    assert ims_calls(mock) == 2

    clock.advance(1.9)  # second backoff is at most 2 s
    with pytest.raises(AuthError):
        await provider.token()
    assert ims_calls(mock) == 2
    clock.advance(0.1)
    assert await provider.token() == TOKEN
    assert ims_calls(mock) == 3


async def test_waiters_on_a_failing_fetch_share_its_failure(
    mock: aioresponses, provider: ImsTokenProvider
) -> None:
    mock.post(IMS_URL, status=502, repeat=True)

    results = await asyncio.gather(*(provider.token() for _ in range(5)), return_exceptions=True)

    assert all(isinstance(result, AuthError) for result in results)
    assert ims_calls(mock) == 1


def test_backoff_is_full_jitter_capped() -> None:
    rng = TopRng()
    assert [backoff_delay(n, rng, permanent=False) for n in (1, 2, 3, 7, 8, 50)] == [1, 2, 4, 60, 60, 60]
    assert backoff_delay(1, rng, permanent=True) == 60
    low = random.Random(7)
    assert all(0 <= backoff_delay(3, low, permanent=False) <= 4 for _ in range(100))


@pytest.mark.parametrize(
    "failure",
    [TimeoutError(), aiohttp.ClientConnectionError("refused"), aiohttp.ServerDisconnectedError()],
)
async def test_unreachable_ims_is_retryable(
    mock: aioresponses, provider: ImsTokenProvider, failure: Exception
) -> None:
    mock.post(IMS_URL, exception=failure)

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert not caught.value.permanent
    assert caught.value.status is None


async def test_busy_ims_is_not_a_verdict_and_its_retry_after_is_honoured(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, status=429, headers={"Retry-After": "30"})
    mock.post(IMS_URL, payload=grant())

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert not caught.value.permanent
    clock.advance(29)
    with pytest.raises(AuthError):
        await provider.token()
    clock.advance(1)
    assert await provider.token() == TOKEN


@pytest.mark.parametrize(
    "payload",
    [{"token_type": "bearer", "expires_in": 86399}, grant(expires_in=0), {"access_token": TOKEN}],
)
async def test_malformed_grant_is_a_retryable_failure(
    mock: aioresponses, provider: ImsTokenProvider, payload: dict[str, Any]
) -> None:
    mock.post(IMS_URL, payload=payload)

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert not caught.value.permanent


async def test_failed_refresh_keeps_serving_a_still_valid_token(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock
) -> None:
    mock.post(IMS_URL, payload=grant("first", 5))
    mock.post(IMS_URL, status=503)

    assert await provider.token() == "first"
    clock.advance(4.1)  # due for renewal, IMS fails, but "first" is good until 5 s
    assert await provider.token() == "first"
    assert provider.ready
    clock.advance(0.9)  # expired, still backing off (until 5.1 s)
    with pytest.raises(AuthError):
        await provider.token()
    assert not provider.ready
    assert ims_calls(mock) == 2


async def test_forced_refresh_that_fails_drops_the_refused_token(
    mock: aioresponses, provider: ImsTokenProvider
) -> None:
    mock.post(IMS_URL, payload=grant("first"))
    mock.post(IMS_URL, status=500)
    await provider.token()

    with pytest.raises(AuthError):
        await provider.refresh("first")
    with pytest.raises(AuthError):  # AEP refused "first": it is not handed out again
        await provider.token()
    with pytest.raises(AuthError):  # the rest of the 401 wave waits out the backoff too
        await provider.refresh("first")
    assert ims_calls(mock) == 2


async def test_missing_credentials_fail_without_calling_ims(
    mock: aioresponses, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    provider = ImsTokenProvider(settings(client_secret=None), session, clock)

    with pytest.raises(AuthError) as caught:
        await provider.token()
    assert caught.value.permanent
    assert "ORCH_AEP__CLIENT_SECRET" in (provider.problem or "")
    assert ims_calls(mock) == 0


async def test_secrets_never_reach_logs_or_errors(
    mock: aioresponses, provider: ImsTokenProvider, clock: ManualClock, log_output: io.StringIO
) -> None:
    mock.post(IMS_URL, payload=grant(TOKEN, 5))
    # An IMS that echoes what it was sent must not make us repeat it.
    mock.post(IMS_URL, status=401, payload={"error": "invalid_client", "error_description": f"bad {SECRET}"})
    mock.post(IMS_URL, exception=aiohttp.ClientConnectionError("refused"))

    await provider.token()
    clock.advance(4.5)
    assert await provider.token() == TOKEN  # still valid, the failure is logged
    clock.advance(60)
    errors: list[AuthError] = []
    for _ in range(2):
        try:
            await provider.refresh(TOKEN)
        except AuthError as exc:
            errors.append(exc)
        clock.advance(60)

    output = log_output.getvalue()
    assert "auth.token_fetched" in output
    assert "auth.token_failed" in output
    assert "auth.token_refresh_forced" in output
    texts = [output, *(f"{e} {e!r} {e.summary()} {e.detail} {e.error_code}" for e in errors)]
    texts.append(provider.problem or "")
    for text in texts:
        assert SECRET not in text
        assert TOKEN not in text


async def test_static_token_is_handed_out_as_it_is(clock: ManualClock) -> None:
    static = StaticToken(SecretStr("fixed-token"), clock)

    assert await static.token() == "fixed-token"
    assert static.fixed
    assert static.ready
    assert static.problem is None
    with pytest.raises(AuthError):
        await StaticToken(SecretStr(""), clock).token()


async def test_a_refused_static_token_holds_calls_back_then_lets_one_probe(
    clock: ManualClock, log_output: io.StringIO
) -> None:
    static = StaticToken(SecretStr("fixed-token"), clock)

    assert await static.refresh("fixed-token") == "fixed-token"  # no other token to give
    with pytest.raises(TokenRefused) as caught:
        await static.token()
    assert isinstance(caught.value, AuthError)
    assert caught.value.permanent
    assert not static.ready
    assert "ORCH_AEP__ACCESS_TOKEN" in (static.problem or "")
    # The other calls that were in flight with it are refused too: one refusal, one backoff.
    assert BACKOFF_CAP == 60
    clock.advance(30)
    await static.refresh("fixed-token")
    clock.advance(29.5)
    with pytest.raises(AuthError):
        await static.token()

    clock.advance(0.5)  # the backoff has passed: a call may probe whether AEP takes it now
    assert await static.token() == "fixed-token"
    assert static.ready
    await static.refresh("fixed-token")  # refused again: another backoff
    clock.advance(59.5)
    with pytest.raises(AuthError):
        await static.token()
    clock.advance(0.5)
    assert await static.token() == "fixed-token"

    output = log_output.getvalue()
    assert output.count("auth.token_failed") == 2
    assert "fixed-token" not in output


async def test_the_client_turns_a_refused_static_token_into_a_wait_for_credentials(
    mock: aioresponses, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    client = AepClient(settings(), session, StaticToken(SecretStr(TOKEN), clock))
    create = "https://platform.test/data/foundation/import/batches"
    mock.post(create, status=401, payload={"error_code": "401013", "message": "Oauth token is not valid"})
    mock.post(create, status=201, payload={"id": "batch-1", "status": "loading"})
    request = BatchRequest(request_id="crm-1", dataset_id="5c8c3c555033b814b69f947f")

    with pytest.raises(TokenRefused) as caught:
        await client.create_batch(request, "json")

    refused = caught.value
    assert (refused.endpoint, refused.status, refused.error_code) == ("batches.create", 401, "401013")
    # Not the request's fault: released (no attempt spent, not failed), not retried or failed.
    policy = RetryPolicy(RetrySettings(), random.Random(), RetryBudget())
    assert policy.decide(refused, 1, clock.now(), creating=True).kind == "release"
    # Held back: no call reaches AEP until the backoff has passed, and it is not replayed.
    with pytest.raises(AuthError):
        await client.ensure_token()
    with pytest.raises(AuthError):
        await client.create_batch(request, "json")
    sent = mock.requests[("POST", URL(create))]
    assert len(sent) == 1
    clock.advance(BACKOFF_CAP)
    assert (await client.create_batch(request, "json")).id == "batch-1"  # the probe: accepted now
    assert len(sent) == 2
    assert TOKEN not in refused.summary()


async def test_token_provider_prefers_the_fixed_token(
    session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    fixed: TokenProvider = token_provider(settings(access_token=SecretStr("t")), session, clock)
    ims: TokenProvider = token_provider(settings(), session, clock)

    assert isinstance(fixed, StaticToken)
    assert isinstance(ims, ImsTokenProvider)
    assert not ims.fixed
    assert not ims.ready
    assert ims.problem == "no IMS token fetched yet"
