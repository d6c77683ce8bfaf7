"""The fast path: predictions over a Unix socket with `.npy` tensors (see ``framing``).

One thread per connection, many requests per connection. The socket file is created 0660
so that only the runtime's user and group (the applications allowed to call models) can
connect. Requests:

    {"op": "predict", "model": NAME, "inputs": [NAMES]} + tensors
        → {"ok": true, "model": NAME, "version": V, "outputs": [NAMES], "compute_ms": T} + tensors
          (T: time inside the engine, so a client can tell transport from compute)
    {"op": "metadata", "model": NAME}  → {"ok": true, "metadata": {...}}
    {"op": "models"}                    → {"ok": true, "models": [...]}
    {"op": "ping"}                      → {"ok": true}
    {"op": "attach_shm", "size": N} + one memfd (SCM_RIGHTS) → {"ok": true}
        then predict may carry {"shm": [{"offset", "descr", "shape"}, ...]} instead of
        inline tensors (see ``shm``: zero socket copies for large inputs)

An error answers ``{"ok": false, "error": {"type", "message", ...}}``; a malformed frame is
answered once, then the connection is closed, since the stream position is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.api import framing, shm
from edge_runtime.api.inflight import Connections, InFlight
from edge_runtime.engine import Engine
from edge_runtime.errors import EdgeRuntimeError, InputError

log = logging.getLogger(__name__)
SOCKET_MODE = 0o660
_DRAIN_LIMIT = 1024 * 1024


class Connection:
    """What one client connection holds besides its socket: its shared-memory region."""

    def __init__(self) -> None:
        self.region: shm.ServerRegion | None = None

    def attach(self, header: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            raise InputError(f"attach_shm needs exactly one file descriptor, got {len(fds)}")
        size = header.get("size")
        if not isinstance(size, int):
            raise InputError("attach_shm needs an integer 'size'")
        region = shm.ServerRegion(fds.pop(), size)
        self.close()
        self.region = region

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


class _Handler(socketserver.BaseRequestHandler):
    server: FastPathServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        conn = Connection()
        self.server.connections.add(sock)
        try:
            while not self.server.closing.is_set():
                fds: list[int] = []
                try:
                    header, tensors = framing.recv_frame(sock, max_frame=self.server.max_frame, fds=fds)
                except framing.PeerClosed:
                    return
                except (framing.FrameError, OSError) as exc:
                    for fd in fds:  # descriptors nobody will claim must not leak
                        os.close(fd)
                    with contextlib.suppress(OSError):
                        framing.send_frame(sock, _error("bad_frame", str(exc)))
                        _linger_close(sock)
                    return
                # From here the request is accepted: a shutdown waits until it is answered.
                with self.server.inflight:
                    try:
                        reply, out = self.server.dispatch(header, tensors, conn, fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    try:
                        framing.send_frame(sock, reply, out)
                    except OSError:
                        return
        finally:
            self.server.connections.discard(sock)
            conn.close()


def _linger_close(sock: socket.socket) -> None:
    """Half-close, then drop what the peer still sends (bounded), so that it reads our
    error instead of a connection reset caused by unread bytes."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(1.0)
    left = _DRAIN_LIMIT
    while left > 0:
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": code, "message": message}}


class FastPathServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 128  # socketserver's default of 5 refuses a burst of new clients

    def __init__(self, path: str | os.PathLike[str], engine: Engine, *, max_frame: int = framing.DEFAULT_MAX_FRAME) -> None:
        self.path = Path(path)
        self.engine = engine
        self.max_frame = max_frame
        self.closing = threading.Event()
        self.inflight = InFlight()
        self.connections = Connections()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run
        old_umask = os.umask(0o117)  # no window in which the socket is wider than 0660
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        self._thread: threading.Thread | None = None

    def dispatch(
        self, header: dict[str, Any], tensors: list[np.ndarray], conn: Connection | None = None, fds: list[int] | None = None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        op = header.get("op")
        try:
            if op == "predict":
                if "shm" in header:
                    if conn is None or conn.region is None:
                        raise InputError("'shm' tensors sent before attach_shm on this connection")
                    tensors = conn.region.tensors(header["shm"])
                return self._predict(header, tensors)
            if op == "attach_shm":
                if conn is None:
                    raise InputError("attach_shm needs a connection")
                conn.attach(header, fds if fds is not None else [])
                return {"ok": True}, []
            if op == "metadata":
                model = self.engine.get(str(header.get("model")))
                return {"ok": True, "metadata": model.describe()}, []
            if op == "models":
                return {"ok": True, "models": [m.describe() for m in self.engine.models()]}, []
            if op == "ping":
                return {"ok": True}, []
            return _error("bad_request", f"unknown op {op!r}; expected predict, metadata, models, ping or attach_shm"), []
        except EdgeRuntimeError as exc:
            return {"ok": False, "error": exc.to_dict()}, []
        except Exception as exc:  # a bug must not take the connection thread down silently
            log.exception("fast path request failed")
            return _error("internal", f"{type(exc).__name__}: {exc}"), []

    def _predict(self, header: dict[str, Any], tensors: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        name = str(header.get("model"))
        names = header.get("inputs")
        if names is None:
            feeds: Any = tensors
        elif isinstance(names, list) and len(names) == len(tensors) and all(isinstance(n, str) for n in names):
            feeds = dict(zip(names, tensors))
        else:
            raise InputError(f"'inputs' must list one name per tensor ({len(tensors)} tensors sent)")
        start = time.perf_counter()
        version, outputs = self.engine.predict_versioned(name, feeds)
        compute_ms = (time.perf_counter() - start) * 1e3
        return (
            {"ok": True, "model": name, "version": version, "outputs": list(outputs), "compute_ms": round(compute_ms, 4)},
            list(outputs.values()),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="fastpath", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, answer every request already received, then close connections.

        Returns False if requests were still running after ``timeout`` seconds.
        """
        self.closing.set()
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # new clients fail at once rather than queue on a dead socket
        drained = self.inflight.drain(timeout)
        self.connections.close_all()
        return drained
