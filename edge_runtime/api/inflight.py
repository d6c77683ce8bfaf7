"""Requests in flight, so that a shutdown answers everything it has already accepted.

The servers use daemon threads (a keep-alive client must not hold the process open), so
nothing would otherwise wait for a request that was read but not yet answered. Each request
is admitted once its bytes are complete and counted until its answer is sent; ``drain``
waits for the count to reach zero, with a deadline (systemd's stop timeout is the outer
bound). ``ByteBudget`` bounds the memory that requests still arriving may claim.
"""

from __future__ import annotations

import socket
import threading
import time


class InFlight:
    """Admission and counting of requests, decided under one lock with the closing flag:
    a request is either admitted before ``close`` (and then ``drain`` waits for it) or
    refused after it (and the caller answers "shutting down") — never lost in between."""

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def try_enter(self) -> bool:
        """Admit one request; False once closing (answer it with a shutting-down error)."""
        with self._cond:
            if self._closed:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    def close(self) -> None:
        """Admit nothing more; requests already admitted still run."""
        with self._cond:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def count(self) -> int:
        return self._count

    def drain(self, timeout: float) -> bool:
        """Wait until no admitted request is running; False if ``timeout`` passed first."""
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

    def try_add(self, sock: socket.socket, limit: int) -> bool:
        """Track ``sock`` unless ``limit`` connections are already open."""
        with self._lock:
            if len(self._socks) >= limit:
                return False
            self._socks.add(sock)
            return True

    def __len__(self) -> int:
        return len(self._socks)

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


class ByteBudget:
    """Bytes that requests may claim at once (receive buffers, mapped shared memory), so
    that many slow or lying clients cannot make the daemon allocate more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    @property
    def used(self) -> int:
        return self._used


class Draining:
    """The second half of a two-phase stop, shared by the REST and fast-path servers.

    A server first ``begin_stop``s (its own: close the door, refuse new admissions); once
    every server has done so, ``finish_stop`` answers what was admitted and closes the rest.
    """

    inflight: InFlight
    connections: Connections

    def begin_stop(self) -> None:
        raise NotImplementedError

    def finish_stop(self, timeout: float = 10.0) -> bool:
        """Wait for admitted requests to be answered, then close every connection (idle
        keep-alive ones, and ones still sending a request that will never be admitted).

        Returns False if requests were still running after ``timeout`` seconds.
        """
        drained = self.inflight.drain(timeout)
        self.connections.close_all()
        return drained

    def stop(self, timeout: float = 10.0) -> bool:
        """``begin_stop`` then ``finish_stop``."""
        self.begin_stop()
        return self.finish_stop(timeout)
