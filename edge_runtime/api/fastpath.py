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

A model routed to another node (the agent set ``server.forward``, see ``api.rest``) is
forwarded there, falling back to the local copy; ``"deadline_ms"`` in a predict header
overrides the agent's default deadline, and the answer names ``"served_by"`` (the node, or
``"local"`` for a fallback). A routed call that fails with no local copy answers a 503-class
error typed ``busy``, ``deadline_exceeded``, ``executor_unreachable`` or ``model_unavailable``.

An error answers ``{"ok": false, "error": {"type", "message", ...}}``; a malformed frame is
answered once, then the connection is closed, since the stream position is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.api import framing, shm
from edge_runtime.api.inflight import ByteBudget, Connections, Draining, InFlight
from edge_runtime.engine import Engine
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelUnavailable

log = logging.getLogger(__name__)
SOCKET_MODE = 0o660
_DRAIN_LIMIT = 1024 * 1024


class Connection:
    """What one client connection holds besides its socket: its shared-memory region."""

    def __init__(self, budget: ByteBudget, max_region: int) -> None:
        self.region: shm.ServerRegion | None = None
        self._budget = budget
        self._max_region = max_region

    def attach(self, header: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            raise InputError(f"attach_shm needs exactly one file descriptor, got {len(fds)}")
        size = header.get("size")
        if not isinstance(size, int) or not 0 < size <= self._max_region:
            raise InputError(f"attach_shm needs an integer 'size' between 1 and {self._max_region}")
        self.close()  # the old region's budget is returned before the new one is claimed
        if not self._budget.try_acquire(size):
            raise ModelUnavailable(f"shared memory budget exhausted ({self._budget.limit} bytes mapped); retry later")
        try:
            self.region = shm.ServerRegion(fds.pop(), size)
        except BaseException:
            self._budget.release(size)
            raise

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self._budget.release(self.region.size)
            self.region = None


class _Handler(socketserver.BaseRequestHandler):
    server: FastPathServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        conn = Connection(self.server.shm_budget, self.server.max_frame)
        try:
            while self._one_request(sock, conn):
                pass
        finally:
            self.server.connections.discard(sock)
            conn.close()

    def _one_request(self, sock: socket.socket, conn: Connection) -> bool:
        """Read, answer and account for one frame; False when the connection should end."""
        server = self.server
        fds: list[int] = []
        claimed: list[int] = []
        try:
            sock.settimeout(server.idle_timeout)
            try:
                header, tensors = framing.recv_frame(sock, max_frame=server.max_frame, fds=fds, budget=server.recv_budget,
                                                     claimed=claimed, frame_timeout=server.frame_timeout)
            except framing.PeerClosed:
                return False
            except TimeoutError:
                return False  # idle or too slow: the client reconnects when it next calls
            except (framing.FrameError, OSError) as exc:
                with contextlib.suppress(OSError):
                    framing.send_frame(sock, _error("bad_frame", str(exc)))
                    _linger_close(sock)
                return False
            # Admitted before close() -> drained and answered; after it -> told, not dropped.
            if not server.inflight.try_enter():
                with contextlib.suppress(OSError):
                    framing.send_frame(sock, _error("shutting_down", "the runtime is stopping; retry shortly"))
                return False
            try:
                reply, out = server.dispatch(header, tensors, conn, fds)
                del tensors  # views into receive buffers / shared memory: free before replying
                framing.send_frame(sock, reply, out)
            except OSError:
                return False
            finally:
                server.inflight.leave()
            # Keep reading even when closing: a request sent now gets an explicit
            # "shutting_down" rather than a reset; finish_stop closes idle connections.
            return True
        finally:
            for fd in fds:  # descriptors nobody claimed must not leak, whatever happened
                os.close(fd)
            for n in claimed:
                server.recv_budget.release(n)


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


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a runtime that died; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ModelUnavailable(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: stale
        return
    finally:
        probe.close()
    raise ModelUnavailable(f"another runtime is already serving on {path}")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": code, "message": message}}


class FastPathServer(Draining, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 128  # socketserver's default of 5 refuses a burst of new clients

    def __init__(
        self,
        path: str | os.PathLike[str],
        engine: Engine,
        *,
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        max_connections: int = 256,
        idle_timeout: float = 300.0,
        frame_timeout: float = 30.0,
        recv_budget_bytes: int | None = None,
        shm_budget_bytes: int | None = None,
    ) -> None:
        """Bind ``path`` (mode 0660) and serve ``engine``; not yet accepting (``start``).

        Raises:
            ModelUnavailable: another runtime is already serving on ``path``, or ``path``
                exists and is not a socket (it is never deleted then).
        """
        self.path = Path(path)
        self.engine = engine
        self.forward: Any = None  # the agent's remote-inference hook (agent.remote.RemoteCaller), set after start
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        # Memory many clients may claim at once: bytes still arriving, and mapped regions.
        self.recv_budget = ByteBudget(recv_budget_bytes or 2 * max_frame)
        self.shm_budget = ByteBudget(shm_budget_bytes or 2 * max_frame)
        self.closing = threading.Event()
        self.inflight = InFlight()
        self.connections = Connections()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        super().__init__(str(self.path), _Handler)
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        """Bind under a temporary name, set 0660, then rename into place: the socket is
        never reachable with wider permissions, and no process-wide umask is touched."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, SOCKET_MODE)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink()
            raise
        self.server_address = str(self.path)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.try_add(request, self.max_connections):
            with contextlib.suppress(OSError):
                framing.send_frame(request, _error("too_many_connections", f"{self.max_connections} connections already open; retry later"))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

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
        remote = self.forward.resolve(name) if self.forward is not None else None
        extra: dict[str, Any] = {}
        if remote is not None:
            version, outputs, extra["served_by"] = remote.predict(remote.signature.feeds(feeds),
                                                                  deadline_ms=header.get("deadline_ms"))
        else:
            version, outputs = self.engine.predict_versioned(name, feeds)
        compute_ms = (time.perf_counter() - start) * 1e3
        return (
            {"ok": True, "model": name, "version": version, "outputs": list(outputs), "compute_ms": round(compute_ms, 4),
             **extra},
            list(outputs.values()),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="fastpath", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Admit no new request and accept no new connection; running requests go on."""
        self.closing.set()
        self.inflight.close()
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # new clients fail at once rather than queue on a dead socket
