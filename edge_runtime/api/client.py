"""``FastPathClient``: the Python client of the fast path, for applications on the device.

    with FastPathClient("/run/edge-runtime/api.sock") as client:
        outputs = client.predict("detector", {"image": frame})   # dict name -> ndarray

One persistent connection per client, reconnected once if the runtime restarted between
calls; a lock makes one client usable from several threads (open one per thread for
parallel calls). Errors come back as the runtime's typed exceptions.

On Linux, inputs of ``shm_threshold`` bytes or more travel through a shared-memory region
attached once per connection (see ``shm``), not through the socket; ``shm=False`` turns
that off.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.api import framing
from edge_runtime.api import shm as shm_mod
from edge_runtime.errors import EdgeRuntimeError, ModelUnavailable, TooManyConnections, error_from_dict


class FastPathClient:
    def __init__(self, path: str, *, timeout: float = 30.0, shm: bool = True, shm_threshold: int = 64 * 1024) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.use_shm = shm and shm_mod.supported()
        self.shm_threshold = shm_threshold
        self._sock: socket.socket | None = None
        self._region: shm_mod.ClientRegion | None = None
        self._attached = False  # the region is attached on the current connection
        self.last_reply: dict[str, Any] = {}  # header of the last answer (e.g. compute_ms)
        self._lock = threading.RLock()

    def __enter__(self) -> FastPathClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop_connection()
            if self._region is not None:
                self._region.close()
                self._region = None

    def _connect(self) -> socket.socket:
        # With a timeout set, an AF_UNIX connect is non-blocking and fails with EAGAIN the
        # moment the listen backlog is full; a burst of clients should wait their turn.
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                return sock
            except BlockingIOError as exc:
                sock.close()
                if time.monotonic() + delay > deadline:
                    raise ModelUnavailable(f"the runtime at {self.path} is not accepting connections: {exc}") from exc
                time.sleep(delay)  # backoff while the server works through its backlog
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                sock.close()
                raise ModelUnavailable(f"cannot reach the runtime at {self.path}: {exc}") from exc

    def call(self, header: dict[str, Any], tensors: Sequence[np.ndarray] = ()) -> tuple[dict[str, Any], list[np.ndarray]]:
        """One request/response; raises the runtime's typed error on ``ok: false``.

        A connection refused at the door (too many open) read nothing, so it is retried
        with backoff until ``timeout``: a burst of clients queues instead of failing.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                return self._call_once(header, tensors)
            except TooManyConnections:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # backoff: the runtime asked us to come back later
                delay = min(delay * 2, 0.2)

    def _call_once(self, header: dict[str, Any], tensors: Sequence[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                    self._attached = False
                sock = self._sock
                assert sock is not None
                try:
                    head, inline = self._prepare(sock, header, tensors)
                    try:
                        framing.send_buffers(sock, framing.encode(head, inline))
                    except (BrokenPipeError, ConnectionResetError):
                        # The server may have answered and closed before reading us (too
                        # many connections, shutting down): its answer is still readable.
                        pass
                    reply, out = framing.recv_frame(sock)
                    break
                except (OSError, framing.FrameError) as exc:
                    sock.close()
                    self._sock = None
                    # A reused connection may have been closed by a runtime restart: retry once.
                    if fresh or attempt == 1:
                        raise ModelUnavailable(f"fast path call failed: {exc}") from exc
        self.last_reply = reply
        if not reply.get("ok") and (reply.get("error") or {}).get("type") == "too_many_connections":
            self._drop_connection()  # the server closed it
        return self._check(reply), out

    def _drop_connection(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._attached = False

    def _prepare(self, sock: socket.socket, header: dict[str, Any], tensors: Sequence[np.ndarray]) -> tuple[dict[str, Any], Sequence[np.ndarray]]:
        """Move large inputs into shared memory (attaching a region first if needed)."""
        if not (self.use_shm and header.get("op") == "predict" and sum(t.nbytes for t in tensors) >= self.shm_threshold):
            return header, tensors
        arrays = [np.asarray(t) for t in tensors]
        if self._region is None or not self._region.fits(arrays):
            if self._region is not None:
                self._region.close()
            self._region = shm_mod.ClientRegion(2 * sum(a.nbytes + shm_mod.ALIGN for a in arrays))
            self._attached = False
        if not self._attached:
            framing.send_frame(sock, {"op": "attach_shm", "size": self._region.capacity}, fds=[self._region.fd])
            reply, _ = framing.recv_frame(sock)
            if not reply.get("ok"):
                # The runtime will not map it (e.g. an older runtime): use the socket from now on.
                self.use_shm = False
                return header, tensors
            self._attached = True
        return {**header, "shm": self._region.place(arrays)}, []

    @staticmethod
    def _check(reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise error_from_dict(err) if isinstance(err, dict) else EdgeRuntimeError(str(err))
        return reply

    def predict(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run ``model``; ``inputs`` by name, in input order, or one array for one input.

        Raises:
            InputError, ModelNotFound, ModelUnavailable: as the runtime reports them.
        """
        if isinstance(inputs, Mapping):
            header: dict[str, Any] = {"op": "predict", "model": model, "inputs": list(inputs)}
            tensors = [np.asarray(v) for v in inputs.values()]
        elif isinstance(inputs, np.ndarray):
            header, tensors = {"op": "predict", "model": model}, [inputs]
        else:
            header, tensors = {"op": "predict", "model": model}, [np.asarray(v) for v in inputs]
        reply, out = self.call(header, tensors)
        return dict(zip(reply["outputs"], out))

    def predict_versioned(self, model: str, inputs: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
        reply, out = self.call({"op": "predict", "model": model, "inputs": list(inputs)}, [np.asarray(v) for v in inputs.values()])
        return str(reply["version"]), dict(zip(reply["outputs"], out))

    def metadata(self, model: str) -> dict[str, Any]:
        return self.call({"op": "metadata", "model": model})[0]["metadata"]

    def models(self) -> list[dict[str, Any]]:
        return self.call({"op": "models"})[0]["models"]

    def ping(self) -> None:
        self.call({"op": "ping"})
