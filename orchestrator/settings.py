"""Every setting of the service, read from the environment, a `.env` file or a TOML file.

Precedence (highest first): environment variables, `.env`, the TOML file given by `--config` or
`ORCH_CONFIG`, then the defaults below. Secrets are `SecretStr`: pydantic masks them in reprs and the
error formatter never echoes an input value.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

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
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

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

# The TOML file of the load in progress; pydantic-settings reads it while building the sources.
_toml_path: ContextVar[Path | None] = ContextVar("toml_path", default=None)

PositiveFloat = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    # `run --until-idle` gives up (exit 1) after this many seconds of refused credentials.
    credentials_wait: PositiveFloat = 300.0

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
        return value


class StoreSettings(Section):
    url: str = "sqlite:///var/orchestrator.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value


class LimitSettings(Section):
    rate: int = Field(default=DEFAULT_RATE, gt=0)
    period: PositiveFloat = 1.0
    concurrency: int = Field(default=16, gt=0, le=1024)
    # Intake stops reading the queue while this many requests are unfinished (backpressure).
    max_backlog: int = Field(default=10_000, gt=0)
    redis_url: str | None = None


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
    grace: float = Field(default=25.0, ge=0)


class EventSettings(Section):
    url: str | None = None
    name: str = "aep.batch-events"


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
        if _toml_path.get() is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path.get()))
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
    return "ORCH_" + "__".join(names)


_SOURCE_FIELD = re.compile(r'field "([^"]+)"')


def _undecodable(exc: SettingsError) -> str:
    """pydantic-settings could not decode a variable (a whole section given as malformed JSON)."""
    match = _SOURCE_FIELD.search(str(exc))
    if match is None:
        return f"ORCH_CONFIG: {exc}"
    return f"ORCH_{match.group(1).upper()}: not a JSON object (or set its values one by one)"


def load_settings(config_path: str | None = None, **overrides: Any) -> Settings:
    """Read settings; raise `ConfigError` naming each bad variable (never its value)."""
    path_text = config_path or os.environ.get("ORCH_CONFIG")
    path = Path(path_text) if path_text else None
    if path is not None and not path.is_file():
        raise ConfigError([f"ORCH_CONFIG: no such file: {path}"])
    token = _toml_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_variable(err['loc'])}: {err['msg']}" for err in exc.errors(include_input=False)]
        ) from None
    except SettingsError as exc:
        raise ConfigError([_undecodable(exc)]) from None
    except ValueError as exc:  # a TOML syntax error surfaces here
        raise ConfigError([f"ORCH_CONFIG: {exc}"]) from None
    finally:
        _toml_path.reset(token)
