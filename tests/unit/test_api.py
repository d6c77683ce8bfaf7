"""REST and fast path, served in-process over the real engine and interpreter."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.api import FastPathClient, FastPathServer, RestServer
from edge_runtime.engine import Engine
from edge_runtime.errors import InputError, ModelNotFound, ModelUnavailable
from tests.helpers import wait_until


@pytest.fixture
def engine(model_files: dict[str, Path]) -> Engine:
    e = Engine(pool_size=2)
    e.swap("tiny", "1", model_files["tiny_v1"])
    e.swap("mio", "3", model_files["multi_io"])
    return e


@pytest.fixture
def rest(engine: Engine) -> Iterator[RestServer]:
    server = RestServer("127.0.0.1", 0, engine, max_body=1 << 20)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fast(engine: Engine, tmp_path: Path) -> Iterator[FastPathServer]:
    server = FastPathServer(tmp_path / "run" / "api.sock", engine)
    server.start()
    yield server
    server.stop()


def _request(server: RestServer, method: str, path: str, body: Any = None, raw: bytes | None = None,
             conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    c = conn or http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    c.request(method, path, body=data, headers=headers)
    resp = c.getresponse()
    payload = json.loads(resp.read())
    if conn is None:
        c.close()
    return resp.status, payload


def test_rest_status_and_metadata(rest: RestServer) -> None:
    status, body = _request(rest, "GET", "/v1/models/tiny")
    assert status == 200
    assert body["model_version_status"][0] == {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    status, body = _request(rest, "GET", "/v1/models/mio/metadata")
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and body["model_spec"] == {"name": "mio", "version": "3", "signature_name": "serving_default"}
    assert set(sig["inputs"]) == {"a", "b"} and sig["inputs"]["a"] == {"dtype": "float32", "tensor_shape": [1, 8]}
    status, body = _request(rest, "GET", "/v1/models")
    assert [m["name"] for m in body["models"]] == ["mio", "tiny"]
    assert _request(rest, "GET", "/healthz") == (200, {"status": "ok", "models": ["mio", "tiny"]})


def test_rest_row_and_column_formats_match_reference(rest: RestServer, zoo: dict[str, Any]) -> None:
    built = zoo["tiny_v1"]
    rows = [built.sample_inputs(seed=s)["x"] for s in range(3)]
    status, body = _request(rest, "POST", "/v1/models/tiny:predict", {"instances": [r[0].tolist() for r in rows]})
    assert status == 200 and len(body["predictions"]) == 3
    for r, pred in zip(rows, body["predictions"]):
        np.testing.assert_allclose(pred, built.reference({"x": r})["y"][0], rtol=1e-4, atol=1e-5)
    status, body = _request(rest, "POST", "/v1/models/tiny/versions/1:predict", {"inputs": rows[0].tolist()})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], built.reference({"x": rows[0]})["y"], rtol=1e-4, atol=1e-5)


def test_rest_multi_input_output(rest: RestServer, zoo: dict[str, Any]) -> None:
    built = zoo["multi_io"]
    feeds = built.sample_inputs(seed=1)
    want = built.reference(feeds)
    status, body = _request(rest, "POST", "/v1/models/mio:predict", {"inputs": {k: v.tolist() for k, v in feeds.items()}})
    assert status == 200 and set(body["outputs"]) == set(want)
    for k in want:
        np.testing.assert_allclose(body["outputs"][k], want[k], rtol=1e-4, atol=1e-5)
    status, body = _request(rest, "POST", "/v1/models/mio:predict", {"instances": [{k: v[0].tolist() for k, v in feeds.items()}]})
    assert status == 200 and isinstance(body["predictions"][0], dict)
    for k in want:
        np.testing.assert_allclose(body["predictions"][0][k], want[k][0], rtol=1e-4, atol=1e-5)


REST_ERRORS = {
    "unknown model": ("POST", "/v1/models/nope:predict", {"instances": [[0] * 16]}, None, 404, "model_not_found"),
    "unknown version": ("POST", "/v1/models/tiny/versions/9:predict", {"instances": [[0] * 16]}, None, 404, "model_not_found"),
    "bad json": ("POST", "/v1/models/tiny:predict", None, b"{instances: oops", 400, "bad_json"),
    "both formats": ("POST", "/v1/models/tiny:predict", {"instances": [], "inputs": []}, None, 400, "invalid_input"),
    "neither format": ("POST", "/v1/models/tiny:predict", {"signature_name": "x"}, None, 400, "invalid_input"),
    "body not object": ("POST", "/v1/models/tiny:predict", [1, 2], None, 400, "invalid_input"),
    "wrong row shape": ("POST", "/v1/models/tiny:predict", {"instances": [[0.0] * 15]}, None, 400, "invalid_input"),
    "ragged rows": ("POST", "/v1/models/tiny:predict", {"instances": [[0.0] * 16, [0.0] * 3]}, None, 400, "invalid_input"),
    "strings": ("POST", "/v1/models/tiny:predict", {"inputs": [["a"] * 16]}, None, 400, "invalid_input"),
    "missing multi input": ("POST", "/v1/models/mio:predict", {"inputs": {"a": [[0.0] * 8]}}, None, 400, "invalid_input"),
    "empty instances": ("POST", "/v1/models/tiny:predict", {"instances": []}, None, 400, "invalid_input"),
    "too large": ("POST", "/v1/models/tiny:predict", None, b"[" + b"0," * (1 << 20) + b"0]", 413, "too_large"),
    "unknown route": ("GET", "/v2/whatever", None, None, 404, "not_found"),
    "predict via GET": ("GET", "/v1/models/tiny:predict", None, None, 404, "not_found"),
}


@pytest.mark.parametrize("case", list(REST_ERRORS.values()), ids=list(REST_ERRORS))
def test_rest_errors_are_json_with_status(rest: RestServer, case: tuple[Any, ...]) -> None:
    method, path, body, raw, want_status, want_type = case
    status, payload = _request(rest, method, path, body, raw)
    assert (status, payload["type"]) == (want_status, want_type), payload
    assert payload["error"]
    assert _request(rest, "GET", "/v1/models/tiny")[0] == 200  # the server is unharmed


def test_rest_wrong_shape_message_states_expected_and_got(rest: RestServer) -> None:
    _, payload = _request(rest, "POST", "/v1/models/tiny:predict", {"inputs": [[0.0] * 15]})
    assert "expected shape [1, 16], got [1, 15]" in payload["error"]


def test_rest_503_while_a_model_is_unavailable(rest: RestServer, engine: Engine) -> None:
    engine.mark_unavailable("loading", "loading version 2")
    status, payload = _request(rest, "POST", "/v1/models/loading:predict", {"instances": [[0]]})
    assert status == 503 and payload["type"] == "model_unavailable" and "loading version 2" in payload["error"]


def test_rest_keep_alive_serves_many_requests_on_one_connection(rest: RestServer) -> None:
    conn = http.client.HTTPConnection(*rest.server_address[:2], timeout=30)
    for _ in range(20):
        assert _request(rest, "POST", "/v1/models/tiny:predict", {"instances": [[0.1] * 16]}, conn=conn)[0] == 200
    assert _request(rest, "POST", "/v1/models/nope:predict", {"instances": [[0.1] * 16]}, conn=conn)[0] == 404
    assert _request(rest, "GET", "/v1/models/tiny", conn=conn)[0] == 200
    conn.close()


def test_fast_path_predicts_and_describes(fast: FastPathServer, zoo: dict[str, Any]) -> None:
    assert stat.S_IMODE(os.stat(fast.path).st_mode) == 0o660
    with FastPathClient(str(fast.path)) as client:
        client.ping()
        feeds = zoo["multi_io"].sample_inputs(seed=2)
        out = client.predict("mio", feeds)
        for k, v in zoo["multi_io"].reference(feeds).items():
            np.testing.assert_allclose(out[k], v, rtol=1e-4, atol=1e-5)
        x = zoo["tiny_v1"].sample_inputs()["x"]
        np.testing.assert_allclose(client.predict("tiny", x)["y"], zoo["tiny_v1"].reference({"x": x})["y"], rtol=1e-4, atol=1e-5)
        assert client.predict_versioned("tiny", {"x": x})[0] == "1"
        assert client.metadata("tiny")["signature"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [1, 16]}
        assert [m["name"] for m in client.models()] == ["mio", "tiny"]


def test_fast_path_typed_errors(fast: FastPathServer, engine: Engine) -> None:
    with FastPathClient(str(fast.path)) as client:
        with pytest.raises(InputError, match="expected dtype float32, got float64"):
            client.predict("tiny", {"x": np.zeros((1, 16))})
        with pytest.raises(ModelNotFound):
            client.predict("nope", {"x": np.zeros((1, 16), np.float32)})
        engine.mark_unavailable("later", "load failed: truncated")
        with pytest.raises(ModelUnavailable, match="truncated"):
            client.predict("later", {"x": np.zeros((1, 16), np.float32)})
        with pytest.raises(InputError, match="one name per tensor"):
            client.call({"op": "predict", "model": "tiny", "inputs": ["x", "y"]}, [np.zeros((1, 16), np.float32)])
        client.ping()  # the connection survives typed errors


def test_fast_path_malformed_frame_closes_only_that_connection(fast: FastPathServer) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(fast.path))
    s.sendall(struct.pack("<4sII", b"JUNK", 2, 0) + b"{}")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):  # until the server closes
        data += chunk
    assert b"bad_frame" in data and b"bad frame magic" in data
    s.close()
    with FastPathClient(str(fast.path)) as client:
        client.ping()


def test_fast_path_client_reconnects_after_server_restart(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = FastPathServer(path, engine)
    server.start()
    client = FastPathClient(str(path))
    client.ping()
    server.stop()
    server = FastPathServer(path, engine)
    server.start()
    try:
        client.ping()  # the old connection is dead; the client retries once on a new one
    finally:
        client.close()
        server.stop()
    with pytest.raises(ModelUnavailable, match="cannot reach"):
        FastPathClient(str(path)).ping()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fast_path_large_inputs_travel_through_shared_memory(fast: FastPathServer, vision: tuple[Any, Path], engine: Engine) -> None:
    built, path = vision
    engine.swap("vision", "1", path)
    image = built.sample_inputs(seed=3)["image"]
    want = built.reference({"image": image})["probs"]
    before = _open_fds()
    with FastPathClient(str(fast.path)) as client:
        assert client.use_shm
        for _ in range(3):
            np.testing.assert_allclose(client.predict("vision", {"image": image})["probs"], want, rtol=1e-3, atol=1e-5)
        assert client._attached and client.last_reply["compute_ms"] > 0
        with FastPathClient(str(fast.path), shm=False) as plain:
            np.testing.assert_allclose(plain.predict("vision", {"image": image})["probs"], want, rtol=1e-3, atol=1e-5)
            assert not plain._attached
    wait_until(lambda: _open_fds() <= before, what="server to close the shared-memory descriptors")


def test_fast_path_refuses_unsafe_shared_memory(fast: FastPathServer) -> None:
    import fcntl

    from edge_runtime.api import framing

    before = _open_fds()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(fast.path))

        def ask(header: dict[str, Any], fds: list[int] = ()) -> dict[str, Any]:  # type: ignore[assignment]
            framing.send_frame(s, header, fds=fds)
            return framing.recv_frame(s)[0]

        unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.ftruncate(unsealed, 4096)
        reply = ask({"op": "attach_shm", "size": 4096}, [unsealed])
        assert not reply["ok"] and "F_SEAL_SHRINK" in reply["error"]["message"]
        reply = ask({"op": "predict", "model": "tiny", "inputs": ["x"], "shm": [{"offset": 0, "descr": "<f4", "shape": [1, 16]}]})
        assert not reply["ok"] and "before attach_shm" in reply["error"]["message"]
        sealed = os.memfd_create("y", os.MFD_ALLOW_SEALING)
        os.ftruncate(sealed, 4096)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        assert not ask({"op": "attach_shm", "size": 1 << 20}, [sealed])["ok"]  # bigger than the file
        assert not ask({"op": "attach_shm", "size": 4096})["ok"]  # no descriptor at all
        assert ask({"op": "attach_shm", "size": 4096}, [sealed])["ok"]
        for bad in ({"offset": 4090, "descr": "<f4", "shape": [1, 16]}, {"offset": -64, "descr": "<f4", "shape": [1, 16]},
                    {"offset": 0, "descr": "|O", "shape": [1]}, {"offset": 0, "shape": [1, 16]}, "junk"):
            reply = ask({"op": "predict", "model": "tiny", "inputs": ["x"], "shm": [bad]})
            assert not reply["ok"] and reply["error"]["type"] == "invalid_input", bad
        reply = ask({"op": "predict", "model": "tiny", "inputs": ["x"], "shm": [{"offset": 0, "descr": "<f4", "shape": [1, 16]}]})
        assert reply["ok"] and reply["version"] == "1"
        for fd in (unsealed, sealed):
            os.close(fd)
    wait_until(lambda: _open_fds() <= before, what="every received descriptor to be closed")
