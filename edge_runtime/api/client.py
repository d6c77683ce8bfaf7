"""``FastPathClient``: the Python client of the fast path, for applications on the device.

    with FastPathClient("/run/edge-runtime/api.sock") as client:
        outputs = client.predict("detector", {"image": frame})   # dict name -> ndarray

One persistent connection per client, reconnected once if the runtime restarted between
calls; a lock makes one client usable from several threads (open one per thread for
parallel calls). Errors come back as the runtime's typed exceptions.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.api import framing
from edge_runtime.errors import EdgeRuntimeError, ModelUnavailable, error_from_dict


class FastPathClient:
    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> FastPathClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ModelUnavailable(f"cannot reach the runtime at {self.path}: {exc}") from exc
        return sock

    def call(self, header: dict[str, Any], tensors: Sequence[np.ndarray] = ()) -> tuple[dict[str, Any], list[np.ndarray]]:
        """One request/response; raises the runtime's typed error on ``ok: false``."""
        parts = framing.encode(header, tensors)
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                sock = self._sock
                assert sock is not None
                try:
                    framing.send_buffers(sock, parts)
                    reply, out = framing.recv_frame(sock)
                    break
                except (OSError, framing.FrameError) as exc:
                    sock.close()
                    self._sock = None
                    # A reused connection may have been closed by a runtime restart: retry once.
                    if fresh or attempt == 1:
                        raise ModelUnavailable(f"fast path call failed: {exc}") from exc
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise error_from_dict(err) if isinstance(err, dict) else EdgeRuntimeError(str(err))
        return reply, out

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
