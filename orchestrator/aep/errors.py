"""Typed failures of AEP and IMS calls. What to *do* about each lives in `pipeline/retry.py`."""

from __future__ import annotations


class CallNotSent(Exception):
    """The call gate closed before this call's turn came: the service is stopping, and the call was
    never sent. Its caller gives its work back for the next run, with no attempt counted."""


class AepError(Exception):
    """A call to AEP did not succeed.

    `status` is the HTTP status (None when no answer came), `error_code` and `detail` Adobe's error
    code and message when the body had them, `retry_after` the raw `Retry-After` header.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        error_code: str | None = None,
        detail: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.retry_after = retry_after

    def summary(self) -> str:
        """One line for `lastError` and logs: status, Adobe's code and message, never a token."""
        parts = [self.endpoint]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.error_code:
            parts.append(self.error_code)
        parts.append(self.detail or str(self))
        return " ".join(parts)[:500]


class AepHttpError(AepError):
    """AEP answered with a status other than the expected one."""


class AepTransportError(AepError):
    """No complete answer: connection refused or dropped, or the call timed out.

    `maybe_sent` is False only when the request certainly never reached AEP (the connection was
    never made); otherwise the outcome is unknown and a create may have happened.
    """

    def __init__(self, message: str, *, endpoint: str, maybe_sent: bool) -> None:
        super().__init__(message, endpoint=endpoint)
        self.maybe_sent = maybe_sent


class AepTimeout(AepTransportError):
    """The call took longer than `ORCH_AEP__TIMEOUT`."""


class AuthError(AepError):
    """IMS gave no token: bad credentials (`permanent`) or IMS unreachable or failing."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        permanent: bool = False,
        error_code: str | None = None,
        detail: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(
            message,
            endpoint="ims.token",
            status=status,
            error_code=error_code,
            detail=detail,
            retry_after=retry_after,
        )
        self.permanent = permanent
