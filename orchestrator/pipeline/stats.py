"""What the dispatcher counts: outcomes this process recorded (the exit code and `service.stopped`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DispatchStats:
    created: int = 0
    adopted: int = 0
    failed: int = 0
    retries: int = 0
    released: int = 0
    duplicates_aborted: int = 0
