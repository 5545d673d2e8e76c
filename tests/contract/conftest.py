"""Every adapter, one after the other, for the contract tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.contract.brokers import FACTORIES, Broker


@pytest.fixture(params=sorted(FACTORIES))
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    async with FACTORIES[request.param](tmp_path) as made:
        yield made
