"""Test helpers: free ports, polling with a deadline, the runtime command line."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


# Ports come from a slice of their own per pytest-xdist worker, below the kernel's
# ephemeral range. A port the kernel hands out for bind(0) can be handed out again to
# another worker the moment a test stops its broker, and that broker's restart "on the
# same port" then finds the other worker's broker there (its CONNECT probe is answered by
# the wrong broker). Ports below the ephemeral range are never handed out by the kernel,
# not for bind(0) and not as the local end of an outgoing connection.
_SLICE = 1000
_FIRST = 10000
_next: dict[int, int] = {}


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback TCP port that no other test worker will be given.

    Each xdist worker (``gwN``; the controller process is slice 0) takes ports from its own
    slice of 1,000, starting at a random point (a subprocess of the same worker, such as a
    bench script, starts elsewhere in the slice) and skipping ports something holds. Falls
    back to the kernel's choice when the slices would reach the ephemeral range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    base = _FIRST + index * _SLICE
    if base + _SLICE <= _ephemeral_floor():
        pid = os.getpid()
        offset = _next.setdefault(pid, random.randrange(_SLICE))
        for step in range(_SLICE):
            port = base + (offset + step) % _SLICE
            if _bindable(port):
                _next[pid] = offset + step + 1
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def runtime_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime.cli", *args]
