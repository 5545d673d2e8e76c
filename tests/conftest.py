"""Shared fixtures. Integration tests use the machine's real services; without them they skip with
the reason, unless ORCH_TEST_REQUIRE_SERVICES=1 (CI), where a missing service fails the test."""

from __future__ import annotations

import os
import socket

import pytest

REQUIRE_SERVICES = os.environ.get("ORCH_TEST_REQUIRE_SERVICES") == "1"


def require_service(name: str, host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc.strerror or exc})"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ORCH_TEST_REQUIRE_SERVICES=1")
        pytest.skip(message + "; start it (../shared/scripts/services-up) to run this test")
