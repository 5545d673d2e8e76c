"""Engine creation: a PostgreSQL URL on an install without the driver is a configuration error."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import structlog

from orchestrator import cli
from orchestrator.settings import ConfigError
from orchestrator.store.engine import create_engine

NO_DRIVER = "ORCH_STORE__URL: PostgreSQL needs the asyncpg driver: pip install 'aep-orchestrator[postgres]'"


@pytest.fixture
def without_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import asyncpg` fail as on an install without the extra.
    monkeypatch.setitem(sys.modules, "asyncpg", None)


@pytest.mark.usefixtures("without_asyncpg")
def test_postgresql_without_asyncpg_names_the_extra() -> None:
    with pytest.raises(ConfigError) as caught:
        create_engine("postgresql://orch:secret@db:5432/orch")
    assert caught.value.problems == [NO_DRIVER]
    assert "secret" not in str(caught.value)


@pytest.mark.usefixtures("without_asyncpg")
def test_the_cli_says_so_in_one_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env file of the working tree
    monkeypatch.setenv("ORCH_STORE__URL", "postgresql://orch:secret@db:5432/orch")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        code = cli.main(["batches"])  # the store opens the engine on a worker thread
    finally:  # main configures logging for the process: put it back for the tests after this one
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()

    assert code == 2
    assert capsys.readouterr().err == f"orchestrator: {NO_DRIVER}\n"


def test_postgresql_with_asyncpg_gets_an_engine() -> None:
    # Made without connecting; the check only stands in for a driver that is not there.
    engine = create_engine("postgresql://orch:secret@db:5432/orch")
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "asyncpg")
