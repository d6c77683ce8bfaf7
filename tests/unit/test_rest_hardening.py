"""REST server against hostile or unlucky clients: HTTP framing, version pinning, malformed
JSON, slow and numerous connections, and a two-phase stop. Malformed HTTP goes over raw
loopback sockets, read with one buffered reader so that pipelined responses are not lost."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.api import RestServer
from edge_runtime.api.rest import predict_body
from edge_runtime.engine import Engine
from tests.helpers import wait_until

MAX_BODY = 1024
PREDICT = json.dumps({"inputs": [[0.0] * 16]}).encode()


@pytest.fixture
def engine(model_files: dict[str, Path]) -> Engine:
    e = Engine(pool_size=1)
    e.swap("tiny", "1", model_files["tiny_v1"])
    return e


@pytest.fixture
def rest(engine: Engine) -> Iterator[RestServer]:
    server = RestServer("127.0.0.1", 0, engine, max_body=MAX_BODY)
    server.start()
    yield server
    server.stop(timeout=5)


class Raw:
    """One loopback connection spoken to in raw bytes."""

    def __init__(self, server: RestServer, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(server.server_address[:2], timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def response(self) -> tuple[int, dict[str, str], Any]:
        """Read one response: status, headers (lower-case names), JSON body."""
        status_line = self.reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, json.loads(body)

    def closed_by_server(self) -> bool:
        """True once the server has closed; a still-open connection times out (test fails)."""
        try:
            return self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _post(path: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body


def _get(path: str, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode()


# -- 1. Content-Length is parsed strictly ---------------------------------------------------

BAD_CONTENT_LENGTHS = {
    "negative": "-1",  # int() takes it; read(-1) then reads to EOF, past any limit
    "plus sign": f"+{len(PREDICT)}",
    "underscore": f"{len(PREDICT) // 10}_{len(PREDICT) % 10}",
    "hex": hex(len(PREDICT)),
    "trailing junk": f"{len(PREDICT)}x",
    "non-ASCII digit": "\u00b2",  # str.isdigit() says yes
    "list": f"{len(PREDICT)}, {len(PREDICT)}",
}


@pytest.mark.parametrize("value", list(BAD_CONTENT_LENGTHS.values()), ids=list(BAD_CONTENT_LENGTHS))
def test_content_length_must_be_plain_digits(rest: RestServer, value: str) -> None:
    conn = Raw(rest).send(_post("/v1/models/tiny:predict", PREDICT, f"Content-Length: {value}"))
    status, headers, payload = conn.response()
    assert (status, payload["type"]) == (400, "bad_request"), payload
    assert headers.get("connection") == "close" and conn.closed_by_server()
    conn.close()


# -- 2. every request's body is consumed (or the connection closed) before routing ---------

SMUGGLED = _post("/v1/models/tiny:predict", PREDICT, f"Content-Length: {len(PREDICT)}")

# name → (first request, its status and type, whether the server must close afterwards)
FRAMING = {
    "GET with a body": (_get("/healthz", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED, 200, None, False),
    "unknown POST route with a body": (_post("/nope", SMUGGLED, f"Content-Length: {len(SMUGGLED)}"), 404, "not_found", False),
    "unknown POST route, bad length": (_post("/nope", SMUGGLED, "Content-Length: 1x"), 400, "bad_request", True),
    "GET with a body over the limit": (_get("/healthz", f"Content-Length: {MAX_BODY + 1}") + b" " * (MAX_BODY + 1),
                                       413, "too_large", True),
    "GET chunked": (_get("/healthz", "Transfer-Encoding: chunked") + b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
                    501, "not_implemented", True),
    "POST chunked and Content-Length": (_post("/v1/models/tiny:predict", PREDICT, "Transfer-Encoding: chunked",
                                              f"Content-Length: {len(PREDICT)}"), 501, "not_implemented", True),
    "two Content-Lengths": (_post("/v1/models/tiny:predict", PREDICT, f"Content-Length: {len(PREDICT)}", "Content-Length: 0"),
                            400, "bad_request", True),
}


@pytest.mark.parametrize("case", list(FRAMING.values()), ids=list(FRAMING))
def test_keep_alive_stays_in_step_or_closes(rest: RestServer, case: tuple[bytes, int, str | None, bool]) -> None:
    request, want_status, want_type, closes = case
    conn = Raw(rest).send(request + _get("/v1/models/tiny"))  # pipelined: must not meet a smuggled request
    status, headers, payload = conn.response()
    assert status == want_status, payload
    if want_type is not None:
        assert payload["type"] == want_type
    if closes:
        assert headers.get("connection") == "close" and conn.closed_by_server()
    else:
        status, _, payload = conn.response()
        assert status == 200 and "model_version_status" in payload, payload  # the status, not a prediction
    conn.close()


# -- 3. a predict is answered by one version ------------------------------------------------

def test_predict_is_answered_by_the_version_it_looked_up(engine: Engine, model_files: dict[str, Path],
                                                         zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = engine.get("tiny"), engine.load("tiny", "2", model_files["tiny_v2"])
    real_get = engine.get

    def get_then_swap(name: str) -> Any:  # a hot swap lands right after the request's lookup
        model = real_get(name)
        engine.activate(v2)
        return model

    x = [zoo["tiny_v1"].sample_inputs(seed=s)["x"] for s in range(2)]
    want = [zoo["tiny_v1"].reference({"x": xi})["y"] for xi in x]
    monkeypatch.setattr(engine, "get", get_then_swap)
    out = predict_body(engine, "tiny", "1", {"inputs": x[0].tolist()})["outputs"]
    np.testing.assert_allclose(out, want[0], rtol=1e-4, atol=1e-5)  # /versions/1 answered by version 1

    engine.activate(v1)
    rows = predict_body(engine, "tiny", None, {"instances": [xi[0].tolist() for xi in x]})["predictions"]  # two chunks
    for row, w in zip(rows, want):
        np.testing.assert_allclose(row, w[0], rtol=1e-4, atol=1e-5)


# -- 4. malformed JSON is the client's error -------------------------------------------------

BAD_JSON = {
    "integer past the digit limit": b'{"inputs": [[' + b"1" * 4301 + b"]]}",
    "nesting past the recursion limit": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("raw", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_malformed_json_is_400_bad_json(engine: Engine, raw: bytes) -> None:
    server = RestServer("127.0.0.1", 0, engine, max_body=1 << 20)
    server.start()
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("POST", "/v1/models/tiny:predict", body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert (resp.status, payload["type"]) == (400, "bad_json"), payload
        conn.close()
    finally:
        server.stop(timeout=5)


# -- 5. slow and numerous clients are bounded ------------------------------------------------

def test_idle_and_stalled_connections_time_out(engine: Engine) -> None:
    server = RestServer("127.0.0.1", 0, engine, idle_timeout=0.3)
    server.start()
    try:
        idle = Raw(server)
        stalled = Raw(server).send(_post("/v1/models/tiny:predict", b"{", "Content-Length: 100"))
        assert idle.closed_by_server() and stalled.closed_by_server()  # each Raw waits 10 s at most
        for conn in (idle, stalled):
            conn.close()
        assert Raw(server).send(_get("/healthz")).response()[0] == 200
    finally:
        server.stop(timeout=5)


def test_connections_past_the_cap_get_503_busy(engine: Engine) -> None:
    server = RestServer("127.0.0.1", 0, engine, max_connections=2)
    server.start()
    try:
        held = [Raw(server).send(_get("/healthz")) for _ in range(2)]
        assert all(conn.response()[0] == 200 for conn in held)  # both served: both slots taken
        extra = Raw(server)
        status, headers, payload = extra.response()
        assert (status, payload["type"], headers.get("connection")) == (503, "busy", "close")
        assert extra.closed_by_server()
        extra.close()
        held.pop().close()  # frees a slot once the server sees the close

        def served() -> bool:
            conn = Raw(server).send(_get("/healthz"))
            try:
                return conn.response()[0] == 200
            finally:
                conn.close()

        wait_until(served, timeout=10, what="a freed slot to serve a new connection")
        held[0].close()
    finally:
        server.stop(timeout=5)


# -- 6. two-phase stop: admitted requests are answered, others refused, none waited for ----

def test_half_sent_body_does_not_hold_up_stop(rest: RestServer) -> None:
    conn = Raw(rest).send(_post("/v1/models/tiny:predict", b"", "Content-Length: 100", "Expect: 100-continue"))
    assert conn.reader.readline().startswith(b"HTTP/1.1 100")  # headers parsed: the handler is reading the body
    conn.reader.readline()
    conn.send(b"{")
    start = time.monotonic()
    assert rest.stop(timeout=10) is True
    assert time.monotonic() - start < 5
    assert conn.closed_by_server()
    conn.close()


def test_request_completed_after_begin_stop_is_refused(rest: RestServer) -> None:
    conn = Raw(rest).send(_get("/healthz"))
    assert conn.response()[0] == 200  # an open keep-alive connection
    rest.begin_stop()
    status, headers, payload = conn.send(_post("/v1/models/tiny:predict", PREDICT, f"Content-Length: {len(PREDICT)}")).response()
    assert (status, payload["type"], headers.get("connection")) == (503, "shutting_down", "close")
    assert conn.closed_by_server()
    assert rest.finish_stop(timeout=5) is True
    conn.close()


def test_admitted_request_is_answered_before_stop_finishes(rest: RestServer, engine: Engine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    real_predict_on = engine.predict_on

    def slow_predict_on(*args: Any, **kw: Any) -> Any:
        started.set()
        assert release.wait(10)
        return real_predict_on(*args, **kw)

    monkeypatch.setattr(engine, "predict_on", slow_predict_on)
    conn = Raw(rest).send(_post("/v1/models/tiny:predict", PREDICT, f"Content-Length: {len(PREDICT)}"))
    assert started.wait(10)
    rest.begin_stop()  # returns at once: it does not wait for the running request
    assert rest.inflight.count == 1
    release.set()
    assert rest.finish_stop(timeout=10) is True
    status, headers, payload = conn.response()
    assert status == 200 and "outputs" in payload and headers.get("connection") == "close"
    conn.close()
