"""REST on loopback, shaped like TF Serving's so its existing clients work unchanged.

    GET  /v1/models                         every served model (our addition)
    GET  /v1/models/{name}[/versions/{v}]   version status
    GET  /v1/models/{name}/metadata         signature: names, dtypes, shapes, quantization
    POST /v1/models/{name}[/versions/{v}]:predict
         {"instances": [...]}  row format  → {"predictions": [...]}
         {"inputs": ...}       column format → {"outputs": ...}
    GET  /healthz                           liveness + what is served

Errors are ``{"error": message, "type": code}`` with 400 (bad request or input), 404 (no
such model or route), 413 (body too large), 503 (cannot serve now). HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_runtime.api.inflight import Connections, InFlight
from edge_runtime.engine import Engine, LoadedModel
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelNotFound

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 * 1024 * 1024
_DRAIN_LIMIT = 16 * 1024 * 1024
_MODEL_RE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<rest>/metadata|:predict)?$")


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def model_status(model: LoadedModel) -> dict[str, Any]:
    return {
        "model_version_status": [
            {"version": model.version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    sig = model.signature
    def tensor_map(specs: Any) -> dict[str, Any]:
        return {s.name: {"dtype": s.dtype.name, "tensor_shape": list(s.shape), **(
            {"quantization": {"scale": s.scale, "zero_point": s.zero_point}} if s.scale else {})} for s in specs}
    return {
        "model_spec": {"name": model.name, "version": model.version, "signature_name": "serving_default"},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": tensor_map(sig.inputs), "outputs": tensor_map(sig.outputs), "method_name": "tensorflow/serving/predict",
        }}}},
    }


def predict_body(engine: Engine, name: str, version: str | None, body: Any) -> dict[str, Any]:
    """Answer one TF Serving predict body.

    Raises:
        InputError, ModelNotFound: as ``Engine.predict``; also for bodies of the wrong shape.
    """
    model = engine.get(name)
    if version is not None and version != model.version:
        raise ModelNotFound(f"model {name!r} version {version!r} is not served; the active version is {model.version!r}")
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object with 'instances' or 'inputs'")
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise InputError("the body needs exactly one of 'instances' (row format) or 'inputs' (column format)")
    if has_cols:
        cols = body["inputs"]
        out = engine.predict(name, cols if isinstance(cols, dict) else [cols] if len(model.signature.inputs) == 1 else cols, coerce=True)
        return {"outputs": _jsonable(out)}
    return {"predictions": _predict_rows(engine, model, body["instances"])}


def _predict_rows(engine: Engine, model: LoadedModel, instances: Any) -> list[Any]:
    """Row format: each instance is one batch element; run them in model-batch-sized chunks."""
    if not isinstance(instances, list) or not instances:
        raise InputError("'instances' must be a non-empty list, one entry per example")
    specs = model.signature.inputs
    batch = specs[0].shape[0] if specs[0].shape else 1
    if len(instances) % max(batch, 1):
        raise InputError(f"{len(instances)} instances do not fill whole batches of {batch}")
    rows: list[Any] = []
    for start in range(0, len(instances), max(batch, 1)):
        chunk = instances[start : start + max(batch, 1)]
        if len(specs) == 1 and not isinstance(chunk[0], dict):
            feeds: Any = {specs[0].name: chunk}
        else:
            if not all(isinstance(c, dict) for c in chunk):
                raise InputError(f"this model has {len(specs)} inputs: each instance must be an object keyed by input name")
            keys = set(chunk[0])
            if any(set(c) != keys for c in chunk):
                raise InputError("every instance must name the same inputs")
            feeds = {k: [c[k] for c in chunk] for k in keys}
        out = engine.predict(model.name, feeds, coerce=True)
        for i in range(len(chunk)):
            if len(out) == 1:
                rows.append(next(iter(out.values()))[i].tolist())
            else:
                rows.append({k: v[i].tolist() for k, v in out.items()})
    return rows


def _jsonable(out: dict[str, np.ndarray]) -> Any:
    if len(out) == 1:
        return next(iter(out.values())).tolist()
    return {k: v.tolist() for k, v in out.items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; without TCP_NODELAY the second waits for the
    # client's delayed ACK (~40 ms per keep-alive request).
    disable_nagle_algorithm = True
    server: RestServer
    server_version = "edge-runtime"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.closing.is_set():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": message, "type": code})

    def _guard(self, fn: Any) -> None:
        with self.server.inflight:  # a shutdown waits for this answer
            self._answer(fn)

    def _answer(self, fn: Any) -> None:
        try:
            status, payload = fn()
            self._send(status, payload)
        except HTTPError as exc:
            self._fail(exc.status, exc.code, str(exc))
        except EdgeRuntimeError as exc:
            self._fail(exc.http_status, exc.code, str(exc))
        except Exception as exc:
            log.exception("REST request failed")
            self._fail(500, "internal", f"{type(exc).__name__}: {exc}")

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._guard(self._post)

    def _get(self) -> tuple[int, Any]:
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        if path == "/healthz":
            return 200, {"status": "ok", "models": engine.names()}
        if path == "/v1/models":
            return 200, {"models": [m.describe() for m in engine.models()]}
        m = _MODEL_RE.match(path)
        if not m or m["rest"] == ":predict":
            raise HTTPError(404, "not_found", f"no route GET {path}")
        model = engine.get(m["name"])
        if m["version"] is not None and m["version"] != model.version:
            raise ModelNotFound(f"model {model.name!r} version {m['version']!r} is not served; active is {model.version!r}")
        return 200, model_metadata(model) if m["rest"] == "/metadata" else model_status(model)

    def _post(self) -> tuple[int, Any]:
        path = self.path.split("?", 1)[0]
        m = _MODEL_RE.match(path)
        if not m or m["rest"] != ":predict":
            self._drain()
            raise HTTPError(404, "not_found", f"no route POST {path}")
        body = self._read_json()
        return 200, predict_body(self.server.engine, m["name"], m["version"], body)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= self.server.max_body:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        """Refuse an announced oversized body before the client sends it."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > self.server.max_body:
            self.close_connection = True
            self._fail(413, "too_large", f"body of {length} bytes exceeds the limit of {self.server.max_body}")
            return False
        return super().handle_expect_100()

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                return
            n -= len(chunk)

    def _read_json(self) -> Any:
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            self.close_connection = True
            raise HTTPError(411, "length_required", "send a Content-Length header")
        try:
            length = int(raw_len)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "bad_request", f"bad Content-Length {raw_len!r}") from None
        if length > self.server.max_body:
            # Read (and drop) a bounded amount so the client, still sending, sees the 413
            # instead of a broken pipe; past that, close: the rest is not worth reading.
            self._discard(min(length, _DRAIN_LIMIT))
            self.close_connection = True
            raise HTTPError(413, "too_large", f"body of {length} bytes exceeds the limit of {self.server.max_body}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, "bad_json", f"body is not valid JSON: {exc}") from exc


class RestServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, engine: Engine, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.engine = engine
        self.max_body = max_body
        self.closing = threading.Event()
        self.inflight = InFlight()
        self.connections = Connections()
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="rest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, answer requests already received, then close keep-alive connections."""
        self.closing.set()
        self.shutdown()
        self.server_close()
        drained = self.inflight.drain(timeout)
        self.connections.close_all()
        return drained


__all__ = ["RestServer", "predict_body"]
