"""systemd's notify protocol (``sd_notify(3)``) in a few lines, without libsystemd.

A service with ``Type=notify`` tells systemd how it is doing by sending newline-separated
``KEY=VALUE`` assignments in one datagram to the Unix socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace)::

    notify(ready=True, status="serving 2 models")   # READY=1\\nSTATUS=serving 2 models
    notify(watchdog=True)                           # WATCHDOG=1, every watchdog_interval()
    notify(reloading=True)                          # RELOADING=1 + MONOTONIC_USEC=... (SIGHUP)
    notify(stopping=True, status="draining")        # STOPPING=1 (SIGTERM)
    notify(mainpid=1234)                            # MAINPID=1234

Keyword names are upper-cased; ``True`` becomes ``1``; a newline inside a value is replaced
by a space so a status line cannot inject another assignment. Outside systemd (no
``$NOTIFY_SOCKET``) ``notify`` does nothing and returns False. It never raises: a failure
to send is logged once at WARNING (later ones at DEBUG) and returns False — a daemon must
not die because its supervisor went away.

``BusyWatchdog`` keeps the pings going while the main loop is inside one long step (an
install that verifies, loads and health-checks a large model on a slow board may outlast
``WatchdogSec``), but only for ``max_busy_s``: a step stuck longer than that is a hang, and
systemd's watchdog then restarts the service as it should.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Optional, Union

log = logging.getLogger(__name__)

__all__ = ["notify", "watchdog_interval", "notify_address", "BusyWatchdog"]

_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_warned = False


def notify_address(env: Optional[Mapping[str, str]] = None) -> Optional[Union[str, bytes]]:
    """The socket address from ``$NOTIFY_SOCKET`` as ``socket.connect`` takes it (an
    abstract ``@name`` becomes ``b"\\0name"``), or None when unset or unusable."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        _warn_once("NOTIFY_SOCKET=%r is neither an absolute path nor an @abstract name; not notifying", value)
    return None


def notify(**fields: Union[str, int, float, bool]) -> bool:
    """Send ``fields`` to systemd as one datagram; True if it was sent.

    ``reloading=True`` also sends ``MONOTONIC_USEC`` (required by ``Type=notify-reload``)
    unless given. Never raises.
    """
    try:
        address = notify_address()
        if address is None:
            return False
        if fields.get("reloading") and "monotonic_usec" not in fields:
            fields["monotonic_usec"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = []
        for key, value in fields.items():
            name = key.upper()
            if not _KEY_RE.match(name):
                raise ValueError(f"not a notify field name: {key!r}")
            if value is True:
                value = 1
            elif value is False:
                continue  # READY=0 means nothing to systemd: leave it out
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{name}={text}")
        if not lines:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode("utf-8"))
        return True
    except Exception as exc:  # noqa: BLE001 - the caller's service must not die of this
        _warn_once("sd_notify %s failed: %s", sorted(fields), exc)
        return False


def watchdog_interval(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as systemd
    recommends. None when no watchdog is set, the value is unusable, or
    ``$WATCHDOG_PID`` names another process (the watchdog is not ours)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        _warn_once("WATCHDOG_USEC=%r / WATCHDOG_PID=%r are not integers; no watchdog pings", usec, pid)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def _warn_once(message: str, *args: object) -> None:
    global _warned
    log.log(logging.DEBUG if _warned else logging.WARNING, message, *args)
    _warned = True


class BusyWatchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds from a thread while the caller is
    inside ``busy()``, for at most ``max_busy_s`` of one busy stretch. Outside ``busy()`` it
    sends nothing: the main loop pings for itself. ``interval`` None (no watchdog): a no-op."""

    def __init__(self, interval: Optional[float], *, max_busy_s: float = 600.0) -> None:
        self.interval = interval
        self.max_busy_s = max_busy_s
        self.pings = 0
        self._since: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if interval is not None:
            self._thread = threading.Thread(target=self._run, name="watchdog-busy", daemon=True)
            self._thread.start()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            since = self._since
            if since is not None and time.monotonic() - since < self.max_busy_s:
                notify(watchdog=True)
                self.pings += 1
