"""REST on loopback, shaped like TF Serving's so its existing clients work unchanged.

    GET  /v1/models                         every served model (our addition)
    GET  /v1/models/{name}[/versions/{v}]   version status
    GET  /v1/models/{name}/metadata         signature: names, dtypes, shapes, quantization
    POST /v1/models/{name}[/versions/{v}]:predict
         {"instances": [...]}  row format  → {"predictions": [...]}
         {"inputs": ...}       column format → {"outputs": ...}
    GET  /healthz                           liveness + what is served

Errors are ``{"error": message, "type": code}`` with 400 (bad request or input), 404 (no
such model or route), 411/413 (body missing or too large), 501 (Transfer-Encoding), 503
(cannot serve now: model unavailable, ``busy`` past the connection cap, ``shutting_down``).

Location-transparent: when the agent set ``server.forward`` (``agent.remote.RemoteCaller``)
and a model's route is another node, ``forward.resolve(name)`` gives a remote model (name,
version, signature from the signed desired state; ``predict(feeds, deadline_ms=)``) and the
call goes there, falling back to the local copy when the executor does not answer. Its
deadline is the agent's default, or the request's ``X-Deadline-Ms`` header (1..600000).
A routed call that fails with no local copy is a 503 typed ``busy``, ``deadline_exceeded``,
``executor_unreachable`` or ``model_unavailable``.

HTTP/1.1 keep-alive. Every request's body is read (or the connection closed) before it is
routed, so the next request on a connection always starts where the server thinks it does;
framing the server cannot follow (chunked bodies, a Content-Length that is not plain digits,
two Content-Lengths) is refused and the connection closed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_runtime.api.inflight import Connections, Draining, InFlight
from edge_runtime.engine import Engine, LoadedModel
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelNotFound

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 * 1024 * 1024
_DRAIN_LIMIT = 16 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 64
# Plain digits only: int() would also take "-1", "+5", "1_0" and non-ASCII digits. 18 digits
# keep int() cheap and are far past any body limit.
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")
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


def predict_body(engine: Engine, name: str, version: str | None, body: Any, *, forward: Any = None,
                 deadline_ms: Any = None) -> dict[str, Any]:
    """Answer one TF Serving predict body, entirely from one model version (the one looked up
    here), even if a swap lands between its chunks. ``forward``: the agent's remote hook
    (see the module docstring); ``deadline_ms``: a routed call's deadline override.

    Raises:
        InputError, ModelNotFound: as ``Engine.predict``; also for bodies of the wrong shape.
        ModelUnavailable (Busy, DeadlineExceeded, ExecutorUnreachable): a routed call failed
            and there is no local copy.
    """
    remote = forward.resolve(name) if forward is not None else None
    if remote is not None:
        model: Any = remote
        run: Callable[[Any], dict[str, np.ndarray]] = (
            lambda feeds: remote.predict(remote.signature.feeds(feeds, coerce=True), deadline_ms=deadline_ms)[1])
    else:
        model = engine.get(name)
        run = lambda feeds: engine.predict_on(model, feeds, coerce=True)  # noqa: E731
    if version is not None and version != model.version:
        raise ModelNotFound(f"model {name!r} version {version!r} is not served; the active version is {model.version!r}")
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object with 'instances' or 'inputs'")
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise InputError("the body needs exactly one of 'instances' (row format) or 'inputs' (column format)")
    if has_cols:
        cols = body["inputs"]
        feeds = cols if isinstance(cols, dict) else [cols] if len(model.signature.inputs) == 1 else cols
        out = run(feeds)
        return {"outputs": _jsonable(out)}
    return {"predictions": _predict_rows(run, model, body["instances"])}


def _predict_rows(run: Callable[[Any], dict[str, np.ndarray]], model: Any, instances: Any) -> list[Any]:
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
        out = run(feeds)
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
    # Socket timeout for every read and write (StreamRequestHandler applies it in setup;
    # http.server then closes the connection): an idle keep-alive client or a stalled
    # request does not hold a thread forever. Set per server from ``idle_timeout``.
    timeout: float | None = DEFAULT_IDLE_TIMEOUT
    server: RestServer
    server_version = "edge-runtime"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
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
        if self.close_connection or self.server.closing.is_set():
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": message, "type": code})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._serve(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._serve(self._post)

    def _serve(self, route: Callable[[bytes | None], tuple[int, Any]]) -> None:
        """Read the body, then admit, answer and leave. Admission waits for the whole body
        so that a shutdown waits only for requests it can answer, never for a client that
        stopped sending halfway."""
        try:
            body = self._read_body()
        except HTTPError as exc:
            self._fail(exc.status, exc.code, str(exc))
            return
        if not self.server.inflight.try_enter():
            self.close_connection = True
            self._fail(503, "shutting_down", "the server is shutting down; retry shortly")
            return
        try:
            self._answer(lambda: route(body))
        finally:
            self.server.inflight.leave()  # after the answer is written: drain waits for it

    def _answer(self, fn: Callable[[], tuple[int, Any]]) -> None:
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

    def _get(self, _body: bytes | None) -> tuple[int, Any]:
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        if path == "/healthz":
            return 200, {"status": "ok", "models": engine.names()}
        if path == "/v1/models":
            return 200, {"models": [m.describe() for m in engine.models()]}
        m = _MODEL_RE.match(path)
        if not m or m["rest"] == ":predict":
            raise HTTPError(404, "not_found", f"no route GET {path}")
        forward = self.server.forward
        model: Any = (forward.resolve(m["name"]) if forward is not None else None) or engine.get(m["name"])
        if m["version"] is not None and m["version"] != model.version:
            raise ModelNotFound(f"model {model.name!r} version {m['version']!r} is not served; active is {model.version!r}")
        return 200, model_metadata(model) if m["rest"] == "/metadata" else model_status(model)

    def _post(self, body: bytes | None) -> tuple[int, Any]:
        path = self.path.split("?", 1)[0]
        m = _MODEL_RE.match(path)
        if not m or m["rest"] != ":predict":
            raise HTTPError(404, "not_found", f"no route POST {path}")
        if body is None:
            self.close_connection = True  # a client that frames no body may also send one unframed
            raise HTTPError(411, "length_required", "send a Content-Length header")
        return 200, predict_body(self.server.engine, m["name"], m["version"], _parse_json(body),
                                 forward=self.server.forward, deadline_ms=self._deadline())

    def _deadline(self) -> int | None:
        """The ``X-Deadline-Ms`` header of a routed call, if given.

        Raises:
            HTTPError: 400 when it is not an integer from 1 to 600000.
        """
        raw = self.headers.get("X-Deadline-Ms")
        if raw is None:
            return None
        raw = raw.strip()
        if not _CONTENT_LENGTH_RE.fullmatch(raw) or not 1 <= int(raw) <= 600_000:
            raise HTTPError(400, "bad_request", f"X-Deadline-Ms must be an integer from 1 to 600000, got {raw[:40]!r}")
        return int(raw)

    def _body_length(self) -> int | None:
        """The announced body length; None if the request has no body.

        Raises:
            HTTPError: framing this server does not follow (the caller closes the connection).
        """
        if self.headers.get_all("Transfer-Encoding"):
            raise HTTPError(501, "not_implemented", "Transfer-Encoding is not supported; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        if len(values) > 1 or not _CONTENT_LENGTH_RE.fullmatch(values[0].strip(" \t")):
            raise HTTPError(400, "bad_request", f"bad Content-Length {', '.join(values)!r}: expected one decimal number")
        return int(values[0].strip(" \t"))

    def _read_body(self) -> bytes | None:
        """Consume this request's body, whatever the method and route, so the next request
        on the connection starts right after it; on any error the connection is closed,
        since where the next request starts is then unknown.

        Raises:
            HTTPError: bad framing, a body over ``max_body``, or a body cut short.
        """
        try:
            length = self._body_length()
            if length is None:
                return None
            if length > self.server.max_body:
                # Read (and drop) a bounded amount so the client, still sending, sees the 413
                # instead of a broken pipe; past that, close: the rest is not worth reading.
                self._discard(min(length, _DRAIN_LIMIT))
                raise HTTPError(413, "too_large", f"body of {length} bytes exceeds the limit of {self.server.max_body}")
            body = self.rfile.read(length)
            if len(body) < length:
                raise HTTPError(400, "bad_request", f"the body ended after {len(body)} of {length} bytes")
            return body
        except HTTPError:
            self.close_connection = True
            raise

    def handle_expect_100(self) -> bool:
        """Refuse an announced oversized (or unframeable) body before the client sends it."""
        try:
            length = self._body_length()
            if length is not None and length > self.server.max_body:
                raise HTTPError(413, "too_large", f"body of {length} bytes exceeds the limit of {self.server.max_body}")
        except HTTPError as exc:
            self.close_connection = True
            self._fail(exc.status, exc.code, str(exc))
            return False
        return super().handle_expect_100()

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                return
            n -= len(chunk)


def _parse_json(raw: bytes) -> Any:
    """
    Raises:
        HTTPError: 400 ``bad_json``.
    """
    try:
        return json.loads(raw)
    # ValueError covers bad UTF-8 and syntax, but also integers past Python's digit limit;
    # RecursionError is deep nesting. Both are the client's malformed body, not our fault.
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, "bad_json", f"body is not valid JSON: {exc}") from None


def _raw_json_response(status: int, reason: str, payload: Any) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + data


class RestServer(Draining, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        host: str,
        port: int,
        engine: Engine,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        """Bind ``host:port`` and serve ``engine``; not yet accepting (``start``).

        ``idle_timeout``: seconds any one read or write on a connection may wait (an idle
        keep-alive client, a stalled request) before the connection is closed.
        ``max_connections``: connections served at once (one thread each); beyond it a new
        connection is answered 503 ``busy`` and closed.
        """
        self.engine = engine
        self.forward: Any = None  # the agent's remote-inference hook (agent.remote.RemoteCaller), set after start
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = _raw_json_response(503, "Service Unavailable", {
            "error": f"{max_connections} connections already open; retry later", "type": "busy"})
        self.closing = threading.Event()
        self.inflight = InFlight()
        self.connections = Connections()
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        # Past the cap, answer from the accept thread without starting one: a flood of slow
        # clients then costs no threads. Non-blocking, so no client can stall accepting.
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(self._busy)
                request.recv(65536)  # take what the client already sent: closing on unread data resets
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away, or finish_stop shut its socket
            log.debug("REST connection from %s ended: %r", client_address, exc)
        else:
            log.exception("REST connection from %s failed", client_address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="rest", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Admit no new request and accept no new connection; admitted requests go on.

        Requests whose body completes from now on get 503 ``shutting_down``. The runtime
        calls this on every server before ``finish_stop`` on any, so none takes new work
        while another drains.
        """
        self.closing.set()
        self.inflight.close()
        if self._thread is not None:  # shutdown() waits for serve_forever, which must be running
            self.shutdown()
        self.server_close()


__all__ = ["RestServer", "predict_body"]
