"""Requests in flight, so that a shutdown answers everything it has already accepted.

The servers use daemon threads (a keep-alive client must not hold the process open), so
nothing would otherwise wait for a request that was read but not yet answered. Each request
is counted from the moment its bytes are complete until its answer is sent; ``drain`` waits
for the count to reach zero, with a deadline (systemd's stop timeout is the outer bound).
"""

from __future__ import annotations

import socket
import threading
import time


class InFlight:
    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> InFlight:
        with self._cond:
            self._count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class Connections:
    """Open client sockets of a server, so a shutdown can end idle keep-alive connections
    (their threads sit in recv and would otherwise outlive the server)."""

    def __init__(self) -> None:
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def close_all(self) -> None:
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
