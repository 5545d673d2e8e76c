"""Who holds a lease: a name per running instance that says which host and process it lives in, so a
restart on the same host can tell the leases of a process that died (kill -9, OOM) from those of a
live one and take them back at once instead of waiting for them to expire."""

from __future__ import annotations

import os
import socket
from uuid import uuid4


def process_owner() -> str:
    """A new owner name for an instance of this process: `host/pid/random`."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid4().hex[:12]}"


def died_here(owner: str) -> bool:
    """Whether `owner` (host/pid/id) was a process on this host that no longer exists. Only this
    host's processes are judged; a pid that is alive (even if reused by another program) keeps its
    leases until they expire. POSIX only: elsewhere nothing is judged dead."""
    if os.name != "posix":  # os.kill(pid, 0) is a probe only on POSIX
        return False
    host, _, rest = owner.partition("/")
    pid_text = rest.partition("/")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False
