"""Access tokens for the Platform API: a fixed one for development, or OAuth Server-to-Server tokens
from Adobe IMS, shared by every call, fetched one at a time and refreshed before they expire.

Tokens and the client secret are never logged and never put in an exception's text.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Protocol

import aiohttp
from pydantic import SecretStr
from yarl import URL

from orchestrator import logs
from orchestrator.aep.errors import AepHttpError, AuthError
from orchestrator.clock import Clock
from orchestrator.observe import NULL, Observer
from orchestrator.settings import AepSettings

log = logs.get("auth")

# Backoff between failed IMS attempts (seconds): full jitter up to a cap, so a fleet of replicas
# that lost IMS together does not come back in lockstep.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# Most of an IMS error body we keep: enough for `error_description`, too little for an echo of a page.
MAX_DETAIL = 300


class TokenProvider(Protocol):
    async def token(self) -> str:
        """A token that is valid now, fetched first when there is none or it is about to expire."""

    async def refresh(self, stale: str) -> str:
        """A new token after AEP refused `stale` with a 401.

        Fetches only while `stale` is still the current token, so a wave of concurrent 401s costs
        one IMS call; a caller whose token was already replaced gets the replacement. A `fixed`
        provider has no other token: it notes the refusal and returns `stale`, which the caller
        must not replay.
        """

    @property
    def ready(self) -> bool:
        """True while a usable token is at hand."""

    @property
    def problem(self) -> str | None:
        """Why there is no usable token (never containing a secret); None when ready."""

    @property
    def fixed(self) -> bool:
        """True when the token cannot be refreshed, so replaying a call after a 401 is pointless."""


class TokenRefused(AuthError, AepHttpError):
    """AEP answered 401 to a token that cannot be replaced (`ORCH_AEP__ACCESS_TOKEN`).

    An HTTP answer of the endpoint that was called (so an `AepHttpError`, with AEP's error code and
    message), and a credentials problem (so an `AuthError`): the request waits for credentials
    instead of spending its attempts on a token that will be refused every time."""

    def __init__(
        self, message: str, *, endpoint: str, error_code: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message, status=401, permanent=True, error_code=error_code, detail=detail)
        self.endpoint = endpoint


def _refused_fixed_token() -> TokenRefused:
    return TokenRefused(
        "refused by AEP; a fixed token cannot be refreshed: set a valid one and restart",
        endpoint="ORCH_AEP__ACCESS_TOKEN",
    )


class StaticToken:
    """`ORCH_AEP__ACCESS_TOKEN`: a token someone fetched by hand. It cannot be refreshed, so when AEP
    refuses it the credentials are at fault, not the request: the refusal is remembered and every
    call is held back (`token()` raises it) for a backoff, after which calls may probe again."""

    def __init__(self, secret: SecretStr, clock: Clock, rng: random.Random | None = None) -> None:
        self._secret = secret
        self._clock = clock
        self._rng = rng or random.Random()
        self._refusals = 0  # refusals in a row, each after its backoff had passed
        self._retry_at = 0.0  # monotonic: no call before this after a refusal

    async def token(self) -> str:
        value = self._secret.get_secret_value()
        if not value:
            raise AuthError("ORCH_AEP__ACCESS_TOKEN is empty", permanent=True)
        if self._backing_off():
            raise _refused_fixed_token()
        return value

    async def refresh(self, stale: str) -> str:
        """AEP refused the token. The 401s of the calls that were in flight together count once;
        a refusal after the backoff (a probe) starts the next one."""
        if not self._backing_off():
            self._refusals += 1
            # A refused fixed token stays refused until an operator replaces it (and restarts):
            # probed at the cap, like credentials IMS refused.
            delay = backoff_delay(self._refusals, self._rng, permanent=True)
            self._retry_at = self._clock.monotonic() + delay
            log.error(
                "auth.token_failed",
                status=401,
                error=_refused_fixed_token().summary(),
                permanent=True,
                retry_in=round(delay, 3),
            )
        return stale

    @property
    def ready(self) -> bool:
        return self.problem is None

    @property
    def problem(self) -> str | None:
        if not self._secret.get_secret_value():
            return "ORCH_AEP__ACCESS_TOKEN is empty"
        if self._backing_off():
            return _refused_fixed_token().summary()
        return None

    @property
    def fixed(self) -> bool:
        return True

    def _backing_off(self) -> bool:
        return self._refusals > 0 and self._clock.monotonic() < self._retry_at


def refresh_margin(lifetime: float) -> float:
    """How long before a token expires its successor is fetched.

    A fifth of the lifetime, at most an hour: IMS tokens live 24 h and Adobe advises a new one every
    23 h, while a short-lived token (a test's 5 s, a simulator's minute) is still renewed well before
    it lapses, however slow IMS is at that moment. Never the whole lifetime, so a token is used.
    """
    return min(0.2 * lifetime, 3600.0)


def backoff_delay(failures: int, rng: random.Random, *, permanent: bool) -> float:
    """Seconds before IMS is asked again after `failures` failed attempts in a row.

    Transient failures back off exponentially with full jitter. Bad credentials stay bad until an
    operator fixes them, so those are retried only at the cap: often enough to notice the fix,
    rarely enough not to look like an attack on IMS.
    """
    if permanent:
        return BACKOFF_CAP
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures - 1, 30)))


class ImsTokenProvider:
    """OAuth Server-to-Server (`client_credentials`) tokens from `POST {ims_url}/ims/token/v3`."""

    def __init__(
        self,
        settings: AepSettings,
        session: aiohttp.ClientSession,
        clock: Clock,
        rng: random.Random | None = None,
        observer: Observer = NULL,
    ) -> None:
        self._settings = settings
        self._session = session
        self._clock = clock
        self._rng = rng or random.Random()
        self._observer = observer
        self._url = URL(str(settings.ims_url)).joinpath("ims", "token", "v3")
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout,
            connect=min(10.0, settings.timeout),
            sock_connect=min(10.0, settings.timeout),
        )
        # One fetch at a time: whoever finds the token missing or due fetches, everyone else waits
        # for that fetch instead of starting their own.
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic: fetch the next token from here on
        self._expires_at = 0.0  # monotonic: the token is no good from here on
        self._failure: AuthError | None = None
        self._failures = 0  # consecutive failed attempts
        self._retry_at = 0.0  # monotonic: no IMS call before this after a failure

    async def token(self) -> str:
        current = self._usable(self._clock.monotonic())
        if current is not None:
            return current
        async with self._lock:
            # Re-check: the fetch we waited for may have produced a token, or failed.
            current = self._usable(self._clock.monotonic())
            if current is not None:
                return current
            return await self._fetch()

    async def refresh(self, stale: str) -> str:
        async with self._lock:
            if self._token is not None and self._token != stale:
                return self._token  # someone else's 401 already replaced it
            # AEP refused it: even if a refresh fails, it is no use to anyone.
            self._token = None
            self._refresh_at = self._expires_at = 0.0
            self._raise_if_backing_off(self._clock.monotonic())
            log.info("auth.token_refresh_forced")
            return await self._fetch()

    @property
    def ready(self) -> bool:
        return self._token is not None and self._clock.monotonic() < self._expires_at

    @property
    def problem(self) -> str | None:
        if self.ready:
            return None
        if self._failure is not None:
            return self._failure.summary()
        missing = self._missing_settings()
        if missing:
            return missing
        if self._token is not None:
            return "the IMS token expired and no new one was fetched yet"
        return "no IMS token fetched yet"

    @property
    def fixed(self) -> bool:
        return False

    def _usable(self, now: float) -> str | None:
        """The token to use without calling IMS, or None when IMS must be asked. Raises the last
        failure while backing off and no valid token remains."""
        if self._token is not None and now < self._refresh_at:
            return self._token
        if self._failure is not None and now < self._retry_at:
            if self._token is not None and now < self._expires_at:
                return self._token  # the refresh failed, but this one still works for a while
            raise _again(self._failure)
        return None

    def _raise_if_backing_off(self, now: float) -> None:
        if self._failure is not None and now < self._retry_at:
            raise _again(self._failure)

    def _missing_settings(self) -> str | None:
        if self._settings.client_id is None or self._settings.client_secret is None:
            return "ORCH_AEP__CLIENT_ID and ORCH_AEP__CLIENT_SECRET are required to get an IMS token"
        return None

    async def _fetch(self) -> str:
        """One IMS call; the caller holds the lock. On failure, record it and start backing off,
        but hand out the current token while it is still valid (a forced refresh has dropped it)."""
        started = self._clock.monotonic()
        try:
            token, lifetime = await self._request()
        except AuthError as exc:
            self._failures += 1
            self._observer.token_fetched(ok=False)
            delay = max(
                backoff_delay(self._failures, self._rng, permanent=exc.permanent),
                _retry_after_seconds(exc.retry_after),
            )
            self._failure = exc
            self._retry_at = self._clock.monotonic() + delay
            log_event = log.error if exc.permanent else log.warning
            log_event(
                "auth.token_failed",
                status=exc.status,
                error_code=exc.error_code,
                error=exc.detail or str(exc),
                permanent=exc.permanent,
                retry_in=round(delay, 3),
            )
            if self._token is not None and self._clock.monotonic() < self._expires_at:
                return self._token
            raise
        # Lifetimes count from before the call, so time spent waiting for IMS shortens them.
        margin = refresh_margin(lifetime)
        self._token = token
        self._expires_at = started + lifetime
        self._refresh_at = started + lifetime - margin
        self._failure = None
        self._failures = 0
        self._observer.token_fetched(ok=True)
        log.info("auth.token_fetched", expires_in=lifetime, refresh_in=round(lifetime - margin, 3))
        return token

    async def _request(self) -> tuple[str, float]:
        missing = self._missing_settings()
        client_id, secret = self._settings.client_id, self._settings.client_secret
        if missing or client_id is None or secret is None:
            raise AuthError(missing or "no client credentials", permanent=True)
        # In the form body, never the query string: query strings end up in proxy and server logs.
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret.get_secret_value(),
            "scope": ",".join(self._settings.scopes),
        }
        try:
            async with self._session.post(
                self._url, data=form, headers={"Accept": "application/json"}, timeout=self._timeout
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            raise AuthError(f"IMS did not answer within {self._settings.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            # `from None`: the message says all that is known; aiohttp's chained internals would
            # only lengthen every log line that reports this.
            raise AuthError(f"IMS unreachable: {type(exc).__name__}: {exc}"[:MAX_DETAIL]) from None
        text = raw.decode("utf-8", errors="replace")
        body = _json(text)
        if status != 200:
            raise self._refused(status, body, text, retry_after)
        token = body.get("access_token") if isinstance(body, dict) else None
        lifetime = body.get("expires_in") if isinstance(body, dict) else None
        # `expires_in` is in seconds (the JWT exchange used milliseconds; this endpoint does not).
        if (
            not isinstance(token, str)
            or not token
            or isinstance(lifetime, bool)
            or not isinstance(lifetime, int | float)
            or lifetime <= 0
        ):
            raise AuthError("IMS answered 200 without access_token and a positive expires_in", status=200)
        return token, float(lifetime)

    def _refused(self, status: int, body: Any, text: str, retry_after: str | None) -> AuthError:
        code: str | None = None
        detail: str | None = None
        if isinstance(body, dict):
            code = _text(body.get("error")) or _text(body.get("error_code"))
            detail = _text(body.get("error_description")) or _text(body.get("message"))
        elif text.strip():
            detail = text.strip()[:MAX_DETAIL]
        if detail is not None:
            detail = self._scrub(detail)
        # A 4xx is IMS judging the credentials (invalid_client, invalid_scope, ...): asking again
        # changes nothing until someone fixes them. 408 and 429 are IMS being busy, not a verdict.
        permanent = 400 <= status < 500 and status not in (408, 429)
        return AuthError(
            f"IMS refused the token request: HTTP {status}",
            status=status,
            permanent=permanent,
            error_code=code,
            detail=detail,
            retry_after=retry_after,
        )

    def _scrub(self, text: str) -> str:
        """Last line of defence: an IMS message that echoes the secret does not carry it further."""
        secret = self._settings.client_secret
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "***")
        return text


def _retry_after_seconds(header: str | None) -> float:
    """IMS's own `Retry-After` when it sent one in seconds (0 otherwise): we wait at least that
    long, but no more than ten minutes, so a wild value cannot park the service for a day."""
    try:
        return min(600.0, max(0.0, float(header))) if header else 0.0
    except ValueError:
        return 0.0


def token_provider(
    settings: AepSettings, session: aiohttp.ClientSession, clock: Clock, observer: Observer = NULL
) -> TokenProvider:
    """The fixed token when `ORCH_AEP__ACCESS_TOKEN` is set, IMS client credentials otherwise."""
    if settings.access_token is not None:
        return StaticToken(settings.access_token, clock)
    return ImsTokenProvider(settings, session, clock, observer=observer)


def _again(failure: AuthError) -> AuthError:
    """A fresh copy of the cached failure: raising one instance over and over would grow its
    traceback with every raise, for as long as IMS stays down."""
    return AuthError(
        str(failure),
        status=failure.status,
        permanent=failure.permanent,
        error_code=failure.error_code,
        detail=failure.detail,
        retry_after=failure.retry_after,
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return (value if isinstance(value, str) else json.dumps(value))[:MAX_DETAIL]
