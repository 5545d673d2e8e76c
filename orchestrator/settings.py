"""Every setting of the service, read from the environment, a `.env` file or a TOML file.

Precedence (highest first): environment variables, `.env`, the TOML file given by `--config` or
`ORCH_CONFIG`, then the defaults below. Secrets are `SecretStr`: pydantic masks them in reprs and the
error formatter never echoes an input value.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Adobe's own AEP connector asks IMS for exactly these scopes (reference §6.1).
DEFAULT_SCOPES = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)

# The current guardrail is 2000 batches per minute per user (reference §5.1): 33 a second stays under it.
DEFAULT_RATE = 33

# The TOML file's tables, read by `load_settings`; pydantic-settings takes them while building the sources.
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("toml_data", default=None)

PREFIX = "ORCH_"
# ORCH_ variables that are not settings and have readers of their own: the TOML file's path (read by
# `load_settings`), the CI script's shared directory and the tests' switches. Every other ORCH_ name
# must be a setting, so that a misspelt one is an error instead of a silently ignored value.
NOT_SETTINGS = frozenset({"ORCH_CONFIG", "ORCH_SHARED_DIR"})
NOT_SETTINGS_PREFIXES = ("ORCH_TEST_",)

# A day bounds every duration: longer is a mistake, and a larger number (or inf) overflows the datetime
# and timer arithmetic that uses it (a lease's expiry, aiohttp's deadline) in the middle of a run.
MAX_SECONDS = 86_400.0
PositiveFloat = Annotated[float, Field(gt=0, le=MAX_SECONDS)]


class Section(BaseModel):
    # allow_inf_nan=False: "inf" and "nan" parse as floats, and no setting means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _plain_http_base(value: AnyHttpUrl) -> AnyHttpUrl:
    """A Platform or IMS base URL: credentials go in headers, and a query or fragment would be cut off
    or mangled by the paths appended to it, so every call would fail."""
    if value.username is not None or value.password is not None:
        # PydanticCustomError's message is ours alone: the URL (with its password) is never echoed.
        raise PydanticCustomError("url_userinfo", "must not contain a user name or password")
    if value.query is not None or value.fragment is not None:
        raise PydanticCustomError("url_query", "must not contain a query string (?…) or a fragment (#…)")
    return value


def _sqlite_file(value: str) -> str:
    """An SQLite URL must name a file: an in-memory database vanishes with the command that opened it
    (an `enqueue` would publish into nothing, a `run` would forget every record)."""
    if value.split(":", 1)[0].split("+", 1)[0].lower() != "sqlite":
        return value
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError("must be sqlite:///PATH (a file)") from None
    database = url.database or ""
    if not database or ":memory:" in database or url.query.get("mode") == "memory":
        raise ValueError("must be sqlite:///PATH: an in-memory database is lost when the command exits")
    if database.endswith("/"):
        raise ValueError("must be sqlite:///PATH naming a file, not a directory")
    return value


class AepSettings(Section):
    base_url: AnyHttpUrl = AnyHttpUrl("https://platform.adobe.io")
    ims_url: AnyHttpUrl = AnyHttpUrl("https://ims-na1.adobelogin.com")
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scopes: Annotated[tuple[str, ...], NoDecode] = DEFAULT_SCOPES
    org_id: str | None = None
    sandbox: str = Field(default="prod", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    access_token: SecretStr | None = None
    timeout: PositiveFloat = 30.0
    input_format: Literal["json", "parquet", "csv"] = "json"
    # Seconds AEP's catalog may take to list a batch just made. After an ambiguous create no new
    # create is made before this window has passed (look-ups only); see the README for the trade.
    catalog_settle: float = Field(default=30.0, ge=0, le=3600)
    # `run --until-idle` gives up (exit 1) after this many seconds of refused credentials.
    credentials_wait: PositiveFloat = 300.0

    _urls = field_validator("base_url", "ims_url")(_plain_http_base)

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("input_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def credentials_problems(self) -> list[str]:
        """What stops the service from authenticating, one line per missing setting."""
        problems = []
        if self.org_id is None:
            problems.append("ORCH_AEP__ORG_ID: required (the x-gw-ims-org-id of your organization)")
        if self.access_token is None:
            if self.client_id is None:
                problems.append("ORCH_AEP__CLIENT_ID: required unless ORCH_AEP__ACCESS_TOKEN is set")
            if self.client_secret is None:
                problems.append("ORCH_AEP__CLIENT_SECRET: required unless ORCH_AEP__ACCESS_TOKEN is set")
        elif self.client_id is None:
            problems.append("ORCH_AEP__CLIENT_ID: required (it is also the x-api-key)")
        return problems


class QueueSettings(Section):
    url: str = "sqlite:///var/queue.db"
    name: str = Field(default="aep.batch-requests", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].lower()
        if scheme not in {"sqlite", "amqp", "amqps", "redis", "rediss", "nats", "tls"}:
            raise ValueError("must start with sqlite:///, amqp://, redis:// or nats://")
        return _sqlite_file(value)


class StoreSettings(Section):
    url: str = "sqlite:///var/orchestrator.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must start with sqlite:/// or postgresql://")
        return _sqlite_file(value)


class LimitSettings(Section):
    rate: int = Field(default=DEFAULT_RATE, gt=0)
    period: PositiveFloat = 1.0
    concurrency: int = Field(default=16, gt=0, le=1024)
    # Intake stops reading the queue while this many requests are unfinished (backpressure).
    max_backlog: int = Field(default=10_000, gt=0)
    # RATE per PERIOD shared by every replica using this Redis (pipeline/shared_limit.py).
    redis_url: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0].lower() not in {"redis", "rediss", "unix"}:
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class RetrySettings(Section):
    max_attempts: int = Field(default=8, gt=0, le=100)
    base_delay: PositiveFloat = 0.5
    max_delay: PositiveFloat = 60.0

    @field_validator("max_delay")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        # A field validator (not a model one), so the error names ORCH_RETRY__MAX_DELAY.
        base = info.data.get("base_delay")  # absent when base_delay itself was invalid
        if base is not None and value < base:
            raise ValueError("must not be below ORCH_RETRY__BASE_DELAY")
        return value


class HttpSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class ShutdownSettings(Section):
    grace: float = Field(default=25.0, ge=0, le=MAX_SECONDS)


class EventSettings(Section):
    url: str | None = None
    name: str = "aep.batch-events"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        # The brokers of the queue, and a SQLite file (an in-memory one would lose every event).
        return None if value is None else QueueSettings._known_scheme(value)


# fsspec protocols a message's `files` may name; `memory` (tests) and others are opt-in.
DEFAULT_PROTOCOLS = ("file", "s3", "gs", "abfs", "az")
# AEP takes a single PUT up to 256 MB; larger files go through the large-file flow (reference §2.1).
LARGE_FILE_THRESHOLD = 256 * 1024 * 1024
# A PATCH part: AEP accepts up to 512,000,000 bytes per part (reference §2.2).
MAX_PART_SIZE = 512_000_000


class UploadSettings(Section):
    # Where relative `files` entries resolve (never escaped); none: only URLs are accepted.
    root: Path | None = None
    protocols: Annotated[tuple[str, ...], NoDecode] = DEFAULT_PROTOCOLS
    large_file_threshold: int = Field(default=LARGE_FILE_THRESHOLD, gt=0, le=MAX_PART_SIZE)
    part_size: int = Field(default=64 * 1024 * 1024, gt=0, le=MAX_PART_SIZE)
    # Requests whose files are uploaded (or whose batch is polled) at once; AEP calls stay within
    # ORCH_LIMITS__RATE and ORCH_LIMITS__CONCURRENCY, shared with the creates.
    concurrency: int = Field(default=8, gt=0, le=1024)

    @field_validator("root")
    @classmethod
    def _directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError("must be an existing directory")
        return value

    @field_validator("protocols", mode="before")
    @classmethod
    def _split_protocols(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value


class TrackSettings(Section):
    # Polling a completed batch's status: from POLL_MIN seconds, doubling up to POLL_MAX.
    poll_min: PositiveFloat = 2.0
    poll_max: PositiveFloat = 300.0
    # Also follow the batches of requests without files, once someone else completes them.
    without_files: bool = False
    # Abort batches of requests without files still `loading` this many seconds after creation.
    abort_loading_after: float | None = Field(default=None, gt=0, le=30 * MAX_SECONDS)

    @field_validator("poll_max")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("poll_min")
        if low is not None and value < low:
            raise ValueError("must not be below ORCH_TRACK__POLL_MIN")
        return value


class LogSettings(Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCH_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        # `NAME=` (as in config/.env.example) means not set, not an empty client id or org id.
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    aep: AepSettings = AepSettings()
    queue: QueueSettings = QueueSettings()
    store: StoreSettings = StoreSettings()
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    http: HttpSettings = HttpSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    events: EventSettings = EventSettings()
    upload: UploadSettings = UploadSettings()
    track: TrackSettings = TrackSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_data = _toml_data.get()
        if toml_data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=toml_data))
        return tuple(sources)


class ConfigError(Exception):
    """Configuration that cannot run: one line per problem, no values echoed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _variable(loc: tuple[int | str, ...]) -> str:
    # A list item's index (ORCH_AEP__SCOPES given as a TOML list) is not part of the variable's name.
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        names.append(part.upper())
    return PREFIX + "__".join(names)


def _problem(err: Mapping[str, Any]) -> str:
    variable = _variable(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{variable}: not a setting{_did_you_mean(variable)}"
    # pydantic prefixes our validators' messages with "Value error, ", which tells a user nothing.
    return f"{variable}: {err['msg'].removeprefix('Value error, ')}"


def _known_variables() -> list[str]:
    names = []
    for section, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type)  # every field of Settings is a Section
        names += [f"{PREFIX}{section}__{name}".upper() for name in field.annotation.model_fields]
    return names


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.upper(), _known_variables(), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_variables(names: Iterable[str], where: str) -> list[str]:
    """ORCH_ names that are neither a setting nor one of NOT_SETTINGS: pydantic-settings reads only the
    names it knows, so without this check a misspelt section (ORCH_LIMIT__RATE) is silently ignored."""
    problems = []
    for name in names:
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in NOT_SETTINGS or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        section = upper[len(PREFIX) :].split("__", 1)[0].lower()
        if section not in Settings.model_fields:
            problems.append(f"{upper}: not a setting{_did_you_mean(upper)}{where}")
    return problems


def _dotenv_names() -> list[str]:
    env_file = Settings.model_config.get("env_file")
    if not isinstance(env_file, str) or not Path(env_file).is_file():
        return []
    return list(dotenv_values(env_file, encoding=Settings.model_config.get("env_file_encoding")))


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's tables; a file that cannot be read or parsed, or holds a table that is not a
    section, is a problem naming the file (and the line, for a syntax error)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"ORCH_CONFIG: cannot read {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"ORCH_CONFIG: {path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line L, column C)"; it quotes no value, so no secret can leak.
        raise ConfigError([f"ORCH_CONFIG: {path}: {exc}"]) from None
    problems = []
    for key in data:
        if key not in Settings.model_fields:
            close = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            sections = ", ".join(Settings.model_fields)
            problems.append(f"ORCH_CONFIG: {path}: [{key}] is not a section{hint}; sections: {sections}")
    if problems:
        raise ConfigError(problems)
    return data


_SOURCE_FIELD = re.compile(r'field "([^"]+)"')


def _undecodable(exc: SettingsError) -> str:
    """pydantic-settings could not decode a variable (a whole section given as malformed JSON)."""
    match = _SOURCE_FIELD.search(str(exc))
    if match is None:
        return f"ORCH_CONFIG: {exc}"
    return f"ORCH_{match.group(1).upper()}: not a JSON object (or set its values one by one)"


def load_settings(config_path: str | None = None, **overrides: Any) -> Settings:
    """Read settings; raise `ConfigError` naming each bad variable (never its value)."""
    unknown = _unknown_variables(os.environ, "") + _unknown_variables(_dotenv_names(), ", in .env")
    if unknown:
        raise ConfigError(unknown)
    path_text = config_path or os.environ.get("ORCH_CONFIG")
    path = Path(path_text) if path_text else None
    if path is not None and not path.is_file():
        raise ConfigError([f"ORCH_CONFIG: no such file: {path}"])
    token = _toml_data.set(_read_toml(path) if path is not None else None)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError([_problem(err) for err in exc.errors(include_input=False)]) from None
    except SettingsError as exc:
        raise ConfigError([_undecodable(exc)]) from None
    finally:
        _toml_data.reset(token)
