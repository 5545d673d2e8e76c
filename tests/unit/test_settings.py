from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from orchestrator.settings import (
    DEFAULT_RATE,
    DEFAULT_SCOPES,
    MAX_SECONDS,
    ConfigError,
    RetrySettings,
    Settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ORCH_ variable from the outside, and a working directory without a `.env`."""
    for name in list(os.environ):
        if name.upper().startswith("ORCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems(config_path: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(config_path)
    err = info.value
    assert err.problems
    assert str(err) == "\n".join(err.problems)
    # No traceback material: nothing chained for a formatter to print.
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    return err.problems


def attr(settings: Settings, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


# --- defaults and every documented variable ------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert str(s.aep.base_url) == "https://platform.adobe.io/"
    assert str(s.aep.ims_url) == "https://ims-na1.adobelogin.com/"
    assert (s.aep.client_id, s.aep.client_secret, s.aep.org_id, s.aep.access_token) == (None,) * 4
    assert s.aep.scopes == DEFAULT_SCOPES
    assert s.aep.sandbox == "prod"
    assert s.aep.timeout == 30
    assert s.aep.input_format == "json"
    assert s.queue.url == "sqlite:///var/queue.db"
    assert s.queue.name == "aep.batch-requests"
    assert s.store.url == "sqlite:///var/orchestrator.db"
    assert (s.limits.rate, s.limits.period, s.limits.concurrency) == (DEFAULT_RATE, 1, 16)
    assert s.limits.max_backlog == 10_000
    assert s.limits.redis_url is None
    assert (s.retry.max_attempts, s.retry.base_delay, s.retry.max_delay) == (8, 0.5, 60)
    assert (s.http.host, s.http.port) == ("0.0.0.0", 8080)
    assert s.shutdown.grace == 25
    assert (s.events.url, s.events.name) == (None, "aep.batch-events")
    assert (s.log.format, s.log.level) == ("json", "info")


# Every variable of CONTRACT.md's table (and README's ORCH_LIMITS__MAX_BACKLOG), a non-default value,
# and what it becomes.
CONTRACT = [
    ("ORCH_AEP__BASE_URL", "https://aep.example.test", "aep.base_url", "https://aep.example.test/"),
    ("ORCH_AEP__IMS_URL", "http://127.0.0.1:8081", "aep.ims_url", "http://127.0.0.1:8081/"),
    ("ORCH_AEP__CLIENT_ID", "my-client", "aep.client_id", "my-client"),
    ("ORCH_AEP__CLIENT_SECRET", "p@ss word", "aep.client_secret", "p@ss word"),
    ("ORCH_AEP__SCOPES", "openid, AdobeID,,session ", "aep.scopes", ("openid", "AdobeID", "session")),
    ("ORCH_AEP__ORG_ID", "ABC123@AdobeOrg", "aep.org_id", "ABC123@AdobeOrg"),
    ("ORCH_AEP__SANDBOX", "dev-2", "aep.sandbox", "dev-2"),
    ("ORCH_AEP__ACCESS_TOKEN", "eyJ.token", "aep.access_token", "eyJ.token"),
    ("ORCH_AEP__TIMEOUT", "2.5", "aep.timeout", 2.5),
    ("ORCH_AEP__INPUT_FORMAT", "Parquet", "aep.input_format", "parquet"),
    ("ORCH_QUEUE__URL", "amqp://guest:guest@localhost/", "queue.url", "amqp://guest:guest@localhost/"),
    ("ORCH_QUEUE__URL", "redis://localhost:6379/0", "queue.url", "redis://localhost:6379/0"),
    ("ORCH_QUEUE__URL", "nats://localhost:4222", "queue.url", "nats://localhost:4222"),
    ("ORCH_QUEUE__URL", "sqlite:////abs/q.db", "queue.url", "sqlite:////abs/q.db"),
    ("ORCH_QUEUE__NAME", "my.queue-1", "queue.name", "my.queue-1"),
    ("ORCH_STORE__URL", "postgresql://u@localhost/db", "store.url", "postgresql://u@localhost/db"),
    ("ORCH_STORE__URL", "postgresql+asyncpg://u@h/db", "store.url", "postgresql+asyncpg://u@h/db"),
    ("ORCH_LIMITS__RATE", "2000", "limits.rate", 2000),
    ("ORCH_LIMITS__PERIOD", "60", "limits.period", 60.0),
    ("ORCH_LIMITS__CONCURRENCY", "4", "limits.concurrency", 4),
    ("ORCH_LIMITS__MAX_BACKLOG", "50", "limits.max_backlog", 50),
    ("ORCH_LIMITS__REDIS_URL", "redis://localhost:6379/1", "limits.redis_url", "redis://localhost:6379/1"),
    ("ORCH_RETRY__MAX_ATTEMPTS", "3", "retry.max_attempts", 3),
    ("ORCH_RETRY__BASE_DELAY", "0.1", "retry.base_delay", 0.1),
    ("ORCH_RETRY__MAX_DELAY", "5", "retry.max_delay", 5.0),
    ("ORCH_HTTP__HOST", "127.0.0.1", "http.host", "127.0.0.1"),
    ("ORCH_HTTP__PORT", "0", "http.port", 0),
    ("ORCH_SHUTDOWN__GRACE", "0", "shutdown.grace", 0.0),
    ("ORCH_EVENTS__URL", "nats://localhost:4222", "events.url", "nats://localhost:4222"),
    ("ORCH_EVENTS__NAME", "my.events", "events.name", "my.events"),
    ("ORCH_LOG__FORMAT", "Console", "log.format", "console"),
    ("ORCH_LOG__LEVEL", "DEBUG", "log.level", "debug"),
]


@pytest.mark.parametrize(("variable", "raw", "path", "expected"), CONTRACT)
def test_every_contract_variable_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, path: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, raw)
    value = attr(load_settings(), path)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    elif path.endswith("_url") and path.startswith("aep."):
        value = str(value)
    assert value == expected


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("orch_limits__rate", "7")
    assert load_settings().limits.rate == 7


def test_the_same_variables_in_a_dotenv_file(clean: Path) -> None:
    lines = [f"{variable}={raw}" for variable, raw, _, _ in CONTRACT if variable != "ORCH_QUEUE__URL"]
    (clean / ".env").write_text("\n".join(lines) + "\n")
    s = load_settings()
    assert s.limits.max_backlog == 50
    assert s.aep.scopes == ("openid", "AdobeID", "session")
    assert s.aep.client_secret is not None
    assert s.aep.client_secret.get_secret_value() == "p@ss word"
    assert s.events.name == "my.events"


def test_the_same_settings_in_a_toml_file(clean: Path) -> None:
    (clean / "c.toml").write_text(
        """
[aep]
base_url = "https://aep.example.test"
scopes = ["a", "b"]
timeout = 3
input_format = "CSV"
[queue]
name = "q1"
[limits]
rate = 10
max_backlog = 5
[retry]
max_attempts = 2
[http]
port = 0
[shutdown]
grace = 1.5
[events]
url = "redis://localhost"
[log]
level = "warning"
"""
    )
    s = load_settings(str(clean / "c.toml"))
    assert str(s.aep.base_url) == "https://aep.example.test/"
    assert s.aep.scopes == ("a", "b")
    assert (s.aep.timeout, s.aep.input_format) == (3, "csv")
    assert (s.queue.name, s.limits.rate, s.limits.max_backlog, s.retry.max_attempts) == ("q1", 10, 5, 2)
    assert (s.http.port, s.shutdown.grace, s.events.url, s.log.level) == (
        0,
        1.5,
        "redis://localhost",
        "warning",
    )


def test_the_example_toml_loads() -> None:
    example = Path(__file__).parents[2] / "config" / "orchestrator.example.toml"
    s = load_settings(str(example))
    assert s.limits.max_backlog == 10_000
    assert s.aep.scopes == DEFAULT_SCOPES


# --- precedence: environment > .env > TOML > defaults -------------------------------------------------


def test_precedence(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    (clean / "c.toml").write_text(
        "[limits]\nrate = 1\nconcurrency = 2\nmax_backlog = 3\n[aep]\nsandbox = 'toml'\n"
    )
    (clean / ".env").write_text(
        "ORCH_LIMITS__RATE=10\nORCH_LIMITS__CONCURRENCY=20\nORCH_AEP__SANDBOX=dotenv\n"
    )
    monkeypatch.setenv("ORCH_LIMITS__RATE", "100")
    s = load_settings(str(clean / "c.toml"))
    assert s.limits.rate == 100  # environment over .env and TOML
    assert s.limits.concurrency == 20  # .env over TOML
    assert s.aep.sandbox == "dotenv"
    assert s.limits.max_backlog == 3  # TOML over the default
    assert s.limits.period == 1.0  # the default


def test_the_environment_overrides_one_field_of_a_toml_section(
    monkeypatch: pytest.MonkeyPatch, clean: Path
) -> None:
    (clean / "c.toml").write_text("[retry]\nmax_attempts = 3\nbase_delay = 2\nmax_delay = 4\n")
    monkeypatch.setenv("ORCH_RETRY__MAX_DELAY", "9")
    assert load_settings(str(clean / "c.toml")).retry == RetrySettings(
        max_attempts=3, base_delay=2, max_delay=9
    )


def test_orch_config_names_the_toml_file(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    (clean / "a.toml").write_text("[limits]\nrate = 4\n")
    (clean / "b.toml").write_text("[limits]\nrate = 5\n")
    monkeypatch.setenv("ORCH_CONFIG", str(clean / "a.toml"))
    assert load_settings().limits.rate == 4
    assert load_settings(str(clean / "b.toml")).limits.rate == 5  # --config wins over ORCH_CONFIG


def test_the_toml_file_is_only_read_when_named(clean: Path) -> None:
    (clean / "orchestrator.toml").write_text("[limits]\nrate = 4\n")
    assert load_settings().limits.rate == DEFAULT_RATE


def test_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_LIMITS__RATE", "100")
    assert load_settings(limits={"rate": 3}).limits.rate == 3


def test_empty_dotenv_values_are_unset(clean: Path) -> None:
    # config/.env.example, copied as its first line says, leaves the credentials empty: that must read as
    # "not set" (credentials_problems names them), not as an empty client id and org id.
    (clean / ".env").write_text(
        "ORCH_AEP__CLIENT_ID=\nORCH_AEP__CLIENT_SECRET=\nORCH_AEP__ORG_ID=\nORCH_AEP__SANDBOX=prod\n"
    )
    s = load_settings()
    assert (s.aep.client_id, s.aep.client_secret, s.aep.org_id) == (None, None, None)
    names = [line.split(":")[0] for line in s.aep.credentials_problems()]
    assert names == ["ORCH_AEP__ORG_ID", "ORCH_AEP__CLIENT_ID", "ORCH_AEP__CLIENT_SECRET"]


def test_empty_environment_values_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AEP__ORG_ID", "")
    monkeypatch.setenv("ORCH_LIMITS__RATE", "")
    s = load_settings()
    assert s.aep.org_id is None
    assert s.limits.rate == DEFAULT_RATE


@pytest.mark.parametrize(
    "variable", ["ORCH_TEST_REQUIRE_SERVICES", "ORCH_TEST_POSTGRES_URL", "orch_test_x", "ORCH_SHARED_DIR"]
)
def test_orch_variables_that_are_not_settings_are_allowed(
    monkeypatch: pytest.MonkeyPatch, clean: Path, variable: str
) -> None:
    # Read by the tests and the CI script, not by the service.
    monkeypatch.setenv(variable, "1")
    (clean / ".env").write_text(f"{variable}=1\n")
    assert load_settings().limits.rate == DEFAULT_RATE


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("ORCH_LIMIT__RATE", "ORCH_LIMITS__RATE"),  # a misspelt section
        ("orch_limit__rate", "ORCH_LIMITS__RATE"),
        ("ORCH_LIMITS_RATE", "ORCH_LIMITS__RATE"),  # one underscore
        ("ORCH_AEP_TIMEOUT", "ORCH_AEP__TIMEOUT"),
        ("ORCH_SOMETHING", None),
        ("ORCH_CONFIGG", None),
    ],
)
def test_an_unknown_orch_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, suggestion: str | None
) -> None:
    monkeypatch.setenv(variable, "zq1value")
    [line] = problems()
    assert line.startswith(f"{variable.upper()}: not a setting")
    assert "zq1value" not in line
    if suggestion is not None:
        assert f"did you mean {suggestion}?" in line


def test_an_unknown_variable_in_dotenv_is_named(clean: Path) -> None:
    (clean / ".env").write_text("ORCH_LIMITS__RATE=5\nORCH_LIMIT__RATE=zq1value\nOTHER_TOOL=1\n")
    [line] = problems()
    assert line.startswith("ORCH_LIMIT__RATE: not a setting")
    assert ".env" in line
    assert "zq1value" not in line


def test_an_unknown_field_of_a_known_section_suggests_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RETRY__MAX_ATTEMPT", "3")
    assert problems() == ["ORCH_RETRY__MAX_ATTEMPT: not a setting (did you mean ORCH_RETRY__MAX_ATTEMPTS?)"]


def test_an_unknown_toml_section_is_named(clean: Path) -> None:
    (clean / "c.toml").write_text("[limitz]\nrate = 5\n[retry]\nmax_attempts = 2\n")
    [line] = problems(str(clean / "c.toml"))
    assert line.startswith(f"ORCH_CONFIG: {clean / 'c.toml'}: [limitz] is not a section")
    assert "did you mean [limits]?" in line


def test_an_unknown_field_in_a_toml_section_is_named(clean: Path) -> None:
    (clean / "c.toml").write_text("[limits]\nratee = 5\n")
    [line] = problems(str(clean / "c.toml"))
    assert line.startswith("ORCH_LIMITS__RATEE: not a setting")


# --- errors: one line per problem, naming the variable, never echoing a value ---------------------------

INVALID = [
    ("ORCH_AEP__BASE_URL", "not-a-url-zq1"),
    ("ORCH_AEP__BASE_URL", "ftp://zq1.example"),
    ("ORCH_AEP__IMS_URL", "//zq1"),
    ("ORCH_AEP__SANDBOX", "Prod_ZQ1"),
    ("ORCH_AEP__TIMEOUT", "-3"),
    ("ORCH_AEP__TIMEOUT", "zq1"),
    ("ORCH_AEP__INPUT_FORMAT", "xmlzq1"),
    ("ORCH_QUEUE__URL", "http://zq1"),
    ("ORCH_QUEUE__NAME", "bad name zq1"),
    ("ORCH_STORE__URL", "mysql://zq1"),
    ("ORCH_LIMITS__RATE", "-7"),
    ("ORCH_LIMITS__RATE", "1.5"),
    ("ORCH_LIMITS__PERIOD", "-9"),
    ("ORCH_LIMITS__CONCURRENCY", "2048"),
    ("ORCH_LIMITS__MAX_BACKLOG", "-4"),
    ("ORCH_RETRY__MAX_ATTEMPTS", "-6"),
    ("ORCH_RETRY__MAX_ATTEMPTS", "101"),
    ("ORCH_RETRY__BASE_DELAY", "zq1"),
    ("ORCH_RETRY__MAX_DELAY", "-9"),
    ("ORCH_HTTP__PORT", "65536"),
    ("ORCH_HTTP__PORT", "zq1"),
    ("ORCH_SHUTDOWN__GRACE", "-9"),
    ("ORCH_LOG__FORMAT", "xmlzq1"),
    ("ORCH_LOG__LEVEL", "loudzq1"),
    ("ORCH_LIMITS__RATEE", "5"),  # a typo in a known section
]


@pytest.mark.parametrize(("variable", "raw"), INVALID)
def test_invalid_value(monkeypatch: pytest.MonkeyPatch, variable: str, raw: str) -> None:
    monkeypatch.setenv(variable, raw)
    lines = problems()
    assert len(lines) == 1
    assert lines[0].startswith(f"{variable}: ")
    assert raw not in lines[0]
    assert len(lines[0]) > len(variable) + 2  # says what is wrong


@pytest.mark.parametrize(("variable", "raw"), INVALID[:6])
def test_invalid_value_in_dotenv(clean: Path, variable: str, raw: str) -> None:
    (clean / ".env").write_text(f"{variable}={raw}\n")
    [line] = problems()
    assert line.startswith(f"{variable}: ")
    assert raw not in line


def test_one_line_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {
        "ORCH_LIMITS__RATE": "zq1",
        "ORCH_AEP__TIMEOUT": "zq2",
        "ORCH_LOG__LEVEL": "zq3",
        "ORCH_HTTP__PORT": "-1",
    }
    for variable, raw in bad.items():
        monkeypatch.setenv(variable, raw)
    lines = problems()
    assert sorted(line.split(":")[0] for line in lines) == sorted(bad)
    assert not any(raw in line for line in lines for raw in bad.values())


def test_max_delay_below_base_delay_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RETRY__BASE_DELAY", "10")
    monkeypatch.setenv("ORCH_RETRY__MAX_DELAY", "5")
    [line] = problems()
    assert line.startswith("ORCH_RETRY__MAX_DELAY: ")
    assert "ORCH_RETRY__BASE_DELAY" in line
    with pytest.raises(ValidationError):
        RetrySettings(base_delay=2, max_delay=1)
    assert RetrySettings(base_delay=2, max_delay=2).max_delay == 2


def test_invalid_base_delay_is_one_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RETRY__BASE_DELAY", "zq1")
    monkeypatch.setenv("ORCH_RETRY__MAX_DELAY", "5")
    assert [line.split(":")[0] for line in problems()] == ["ORCH_RETRY__BASE_DELAY"]


def test_errors_in_toml_name_the_variable(clean: Path) -> None:
    (clean / "c.toml").write_text(
        "[limits]\nrate = 'zq1secret'\n[aep]\nscopes = ['ok', 42]\nclient_secret = 123456789\n"
    )
    lines = problems(str(clean / "c.toml"))
    assert sorted(line.split(":")[0] for line in lines) == [
        "ORCH_AEP__CLIENT_SECRET",
        "ORCH_AEP__SCOPES",
        "ORCH_LIMITS__RATE",
    ]
    text = "\n".join(lines)
    assert "zq1secret" not in text
    assert "123456789" not in text
    assert "42" not in text


def test_a_section_that_is_not_a_table(clean: Path) -> None:
    (clean / "c.toml").write_text("limits = 5\n")
    [line] = problems(str(clean / "c.toml"))
    assert line.startswith("ORCH_LIMITS: ")


def test_a_section_as_malformed_json_names_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AEP", '{"client_secret": "zq1secret"')
    [line] = problems()
    assert line.startswith("ORCH_AEP: ")
    assert "zq1secret" not in line


def test_a_section_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_LIMITS", '{"rate": 3, "concurrency": 2}')
    assert (load_settings().limits.rate, load_settings().limits.concurrency) == (3, 2)


def test_toml_syntax_error_names_the_file_and_the_line(clean: Path) -> None:
    (clean / "c.toml").write_text('[limits]\nrate = 5\n[aep]\nclient_secret = "zq1secret\n')
    [line] = problems(str(clean / "c.toml"))
    assert line.startswith(f"ORCH_CONFIG: {clean / 'c.toml'}: ")
    assert "line 4" in line
    assert "zq1secret" not in line


def test_a_toml_file_that_is_not_utf8_is_named(clean: Path) -> None:
    (clean / "c.toml").write_bytes(b"[limits]\nrate = 5 # \xff\n")
    [line] = problems(str(clean / "c.toml"))
    assert line == f"ORCH_CONFIG: {clean / 'c.toml'}: not UTF-8 text"


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    [line] = problems(str(clean / "nope.toml"))
    assert line.startswith("ORCH_CONFIG: no such file")
    monkeypatch.setenv("ORCH_CONFIG", str(clean / "missing.toml"))
    [line] = problems()
    assert line.startswith("ORCH_CONFIG: ")


# --- numbers: finite and within a day -------------------------------------------------------------------


def _float_settings() -> list[str]:
    """Every float setting's variable, found from the models so that a new one is covered too."""
    names = []
    for section, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type)
        for name, info in field.annotation.model_fields.items():
            if info.annotation is float:
                names.append(f"ORCH_{section}__{name}".upper())
    return names


def test_the_float_settings_are_found() -> None:
    assert {"ORCH_AEP__TIMEOUT", "ORCH_LIMITS__PERIOD", "ORCH_SHUTDOWN__GRACE"} <= set(_float_settings())


@pytest.mark.parametrize("variable", _float_settings())
@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "Infinity", "1e309"])
def test_non_finite_numbers_are_rejected(monkeypatch: pytest.MonkeyPatch, variable: str, raw: str) -> None:
    # `inf` parses as a float: ORCH_AEP__TIMEOUT=inf crashed the first call, ORCH_LIMITS__PERIOD=inf
    # stalled the service without a word.
    monkeypatch.setenv(variable, raw)
    [line] = problems()
    assert line.startswith(f"{variable}: ")


@pytest.mark.parametrize("variable", _float_settings())
def test_durations_are_at_most_a_day(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # 1e12 seconds overflowed a lease's expiry in the middle of a run.
    monkeypatch.setenv(variable, "1e12")
    [line] = problems()
    prefix = f"{variable}: Input should be less than or equal to "
    assert line.startswith(prefix)
    assert 0 < float(line.removeprefix(prefix)) <= MAX_SECONDS


def test_a_non_finite_number_in_toml(clean: Path) -> None:
    (clean / "c.toml").write_text("[limits]\nperiod = inf\n[aep]\ntimeout = nan\n")
    assert sorted(line.split(":")[0] for line in problems(str(clean / "c.toml"))) == [
        "ORCH_AEP__TIMEOUT",
        "ORCH_LIMITS__PERIOD",
    ]


# --- the queue and the store are files ------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["ORCH_QUEUE__URL", "ORCH_STORE__URL"])
@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///:memory:", "sqlite:///file:zq1?mode=memory&uri=true", "sqlite:///", "sqlite:"],
)
def test_an_in_memory_queue_or_store_is_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str
) -> None:
    # An in-memory queue took `enqueue`'s messages and lost them when the command exited.
    monkeypatch.setenv(variable, url)
    [line] = problems()
    assert line.startswith(f"{variable}: must be sqlite:///PATH")


@pytest.mark.parametrize("url", ["sqlite:///x.db", "sqlite:////abs/dir/x.db", "sqlite:///var/q.db"])
def test_sqlite_files_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("ORCH_QUEUE__URL", url)
    monkeypatch.setenv("ORCH_STORE__URL", url)
    settings = load_settings()
    assert (settings.queue.url, settings.store.url) == (url, url)


# --- AEP base URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["ORCH_AEP__BASE_URL", "ORCH_AEP__IMS_URL"])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://zq1user:zq1pass@aep.example.test", "user name or password"),
        ("https://zq1user@aep.example.test", "user name or password"),
        ("https://:zq1pass@aep.example.test", "user name or password"),
        ("https://aep.example.test/?zq1=1", "query string"),
        ("https://aep.example.test/#zq1", "fragment"),
    ],
)
def test_a_base_url_with_credentials_a_query_or_a_fragment_is_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str, says: str
) -> None:
    # Every call would have failed: credentials go in headers, and paths are appended to the base.
    monkeypatch.setenv(variable, url)
    [line] = problems()
    assert line.startswith(f"{variable}: must not contain")
    assert says in line
    assert "zq1" not in line


def test_a_base_url_with_a_path_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AEP__BASE_URL", "https://proxy.example.test/aep")
    assert str(load_settings().aep.base_url) == "https://proxy.example.test/aep"


# --- secrets ----------------------------------------------------------------------------------------------


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AEP__CLIENT_SECRET", "zq1-client-secret")
    monkeypatch.setenv("ORCH_AEP__ACCESS_TOKEN", "zq2-access-token")
    s = load_settings()
    assert isinstance(s.aep.client_secret, SecretStr)
    assert isinstance(s.aep.access_token, SecretStr)
    for text in (repr(s), str(s), repr(s.aep), s.model_dump_json(), str(s.model_dump())):
        assert "zq1-client-secret" not in text
        assert "zq2-access-token" not in text
    assert "**********" in repr(s.aep)
    assert s.aep.client_secret.get_secret_value() == "zq1-client-secret"
    assert s.aep.access_token.get_secret_value() == "zq2-access-token"


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.limits.rate = 5


# --- credentials_problems ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ["ORCH_AEP__ORG_ID", "ORCH_AEP__CLIENT_ID", "ORCH_AEP__CLIENT_SECRET"]),
        ({"ORCH_AEP__ORG_ID": "zqorg", "ORCH_AEP__CLIENT_ID": "zqcid"}, ["ORCH_AEP__CLIENT_SECRET"]),
        (
            {"ORCH_AEP__ORG_ID": "zqorg", "ORCH_AEP__CLIENT_ID": "zqcid", "ORCH_AEP__CLIENT_SECRET": "zqsec"},
            [],
        ),
        ({"ORCH_AEP__ORG_ID": "zqorg", "ORCH_AEP__ACCESS_TOKEN": "zqtok"}, ["ORCH_AEP__CLIENT_ID"]),
        (
            {"ORCH_AEP__ORG_ID": "zqorg", "ORCH_AEP__ACCESS_TOKEN": "zqtok", "ORCH_AEP__CLIENT_ID": "zqcid"},
            [],
        ),
    ],
)
def test_credentials_problems(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lines = load_settings().aep.credentials_problems()
    assert [line.split(":")[0] for line in lines] == expected
    assert not any(value in line.split(":", 1)[1] for line in lines for value in env.values())
