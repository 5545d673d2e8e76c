"""What the local AEP + IMS simulator pretends to be, and the `orchestrator simulate` flags that set it.

Split from `simulator.py` so the CLI can build a configuration without importing aiohttp's server.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Literal

RetryAfterFormat = Literal["seconds", "date"]

_FRACTIONS = (
    "throttle_rate",
    "error_rate",
    "unavailable_rate",
    "drop_before_rate",
    "drop_after_rate",
    "slow_rate",
    "ims_error_rate",
    "upload_error_rate",
)
_NON_NEGATIVE = (
    "latency",
    "latency_jitter",
    "slow_delay",
    "catalog_lag",
    "unavailable_retry_after",
    "throttle_retry_after",
    "processing_time",
)


@dataclass(frozen=True)
class SimulatorConfig:
    """Credentials the simulator accepts and the faults it injects (all off by default).

    Rates are fractions of calls in [0, 1], drawn from one random source seeded by `seed`; times are
    seconds. Faults touch only the Platform endpoints; IMS fails only through `ims_error_rate`.
    Uploaded files go to a temporary directory made inside `files_dir` (the system's temporary
    directory when None), read once when the simulator is built; it is removed at stop and reset.
    """

    client_id: str = "sim-client"
    client_secret: str = "sim-secret"  # noqa: S105 (a public demo credential)
    org_id: str = "SIM0RG0000000000000000@AdobeOrg"
    sandbox: str = "prod"
    token_lifetime: int = 86399
    latency: float = 0.0
    latency_jitter: float = 0.0
    rate_limit: int | None = None
    rate_period: float = 1.0
    retry_after_format: RetryAfterFormat = "seconds"
    throttle_rate: float = 0.0
    throttle_retry_after: int = 1
    error_rate: float = 0.0
    unavailable_rate: float = 0.0
    unavailable_retry_after: int = 1
    drop_before_rate: float = 0.0
    drop_after_rate: float = 0.0
    slow_rate: float = 0.0
    slow_delay: float = 5.0
    unknown_datasets: frozenset[str] = frozenset()
    catalog_lag: float = 0.0
    ims_error_rate: float = 0.0
    upload_error_rate: float = 0.0
    processing_time: float = 0.5
    fail_datasets: frozenset[str] = frozenset()
    files_dir: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = [name for name in _FRACTIONS if not 0.0 <= getattr(self, name) <= 1.0]
        problems += [name for name in _NON_NEGATIVE if getattr(self, name) < 0]
        if self.token_lifetime <= 0:
            problems.append("token_lifetime")
        if self.rate_limit is not None and self.rate_limit <= 0:
            problems.append("rate_limit")
        if self.rate_period <= 0:
            problems.append("rate_period")
        if self.retry_after_format not in ("seconds", "date"):
            problems.append("retry_after_format")
        if problems:
            raise ValueError("invalid simulator settings: " + ", ".join(problems))


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `orchestrator simulate`; every default is `SimulatorConfig`'s."""
    d = SimulatorConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=_port, default=8081, help="port to listen on, 0 for any (default: %(default)s)")
    add("--client-id", default=d.client_id, help="accepted client id, also the x-api-key")
    add("--client-secret", default=d.client_secret, help="accepted client secret")
    add("--org-id", default=d.org_id, help="accepted x-gw-ims-org-id")
    add("--token-lifetime", type=_positive_int, default=d.token_lifetime, help="token expires_in, seconds")
    add("--latency", type=_non_negative, default=d.latency, help="seconds added to every Platform answer")
    add("--latency-jitter", type=_non_negative, default=d.latency_jitter, help="up to this many more")
    add("--rate-limit", type=_positive_int, default=d.rate_limit, help="Platform calls per period, then 429")
    add("--rate-period", type=_positive, default=d.rate_period, help="seconds of the sliding rate window")
    add("--retry-after-format", choices=["seconds", "date"], default=d.retry_after_format)
    add("--throttle-rate", type=_fraction, default=d.throttle_rate, help="fraction answered 429 at random")
    add("--throttle-retry-after", type=_positive_int, default=d.throttle_retry_after)
    add("--error-rate", type=_fraction, default=d.error_rate, help="fraction answered 500 or 502")
    add("--unavailable-rate", type=_fraction, default=d.unavailable_rate, help="fraction answered 503")
    add("--unavailable-retry-after", type=_positive_int, default=d.unavailable_retry_after)
    add("--drop-before-rate", type=_fraction, default=d.drop_before_rate, help="creates dropped, none made")
    add("--drop-after-rate", type=_fraction, default=d.drop_after_rate, help="creates made, then dropped")
    add("--slow-rate", type=_fraction, default=d.slow_rate, help="fraction answered after --slow-delay")
    add("--slow-delay", type=_non_negative, default=d.slow_delay, help="seconds (default: %(default)s)")
    add("--unknown-dataset", action="append", default=[], metavar="ID", help="answered 400 (repeatable)")
    add("--catalog-lag", type=_non_negative, default=d.catalog_lag, help="seconds before lists see a batch")
    add("--ims-error-rate", type=_fraction, default=d.ims_error_rate, help="fraction of IMS calls 503")
    add(
        "--upload-error-rate",
        type=_fraction,
        default=d.upload_error_rate,
        help="fraction of file PUT/PATCH/INITIALIZE/COMPLETE answered 500, nothing stored",
    )
    add(
        "--processing-time",
        type=_non_negative,
        default=d.processing_time,
        help="seconds a completed batch stays processing (default: %(default)s)",
    )
    add("--fail-dataset", action="append", default=[], metavar="ID", help="its batches fail (repeatable)")
    add("--files-dir", default=d.files_dir, metavar="DIR", help="where uploads go (default: system temp)")
    add("--seed", type=int, default=None, help="seed of the fault and id random source")


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Build the configuration from `add_arguments`' flags; `--host`/`--port` stay with the caller."""
    values = {f.name: getattr(args, f.name) for f in fields(SimulatorConfig) if hasattr(args, f.name)}
    values["unknown_datasets"] = frozenset(getattr(args, "unknown_dataset", None) or ())
    values["fail_datasets"] = frozenset(getattr(args, "fail_dataset", None) or ())
    return SimulatorConfig(**values)
