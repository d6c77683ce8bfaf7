"""The device CLI and the serving daemon as a user runs them: real subprocesses, real files.

Every command goes through ``sys.executable -m edge_runtime.cli`` (``runtime_cmd``), on real
``.tflite`` files from modelgen, run by the real interpreter, and answers are checked against
the models' numpy reference. The daemon is ``edge-runtime serve`` in a subprocess; tests wait
for its one "ready" JSON line on stdout, then poll with ``wait_until`` deadlines — no sleeps.
Network: loopback only (REST on 127.0.0.1, the fast path on a Unix socket under tmp_path).

    1. infer     positional / named / .npz inputs, --json, bad input, not a model, bad usage
    2. install   models --verify, refusals change nothing, --sha256, rollback, activate
    3. serve     REST + fast path vs the reference, hot swap under a live client, rollback,
                 SIGHUP, socket mode
    4. SIGTERM   exit 0, socket removed, requests already received are answered;
                 a burst of new fast-path clients all get through
    5. start-up  with a corrupted blob: the rest serves, the damaged model answers 503
                 (or its previous version serves, if one is intact)
    6. demo      --json steps

Deliberately not asserted: "SIGHUP makes the daemon re-read the store" as distinct from its
0.5 s store poll — the CLI cannot turn the poll off, so a black-box test can only show that
the daemon survives SIGHUP (the default action would kill it) and ends up serving the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.api import FastPathClient, framing
from edge_runtime.errors import ModelUnavailable
from tests.helpers import free_port, runtime_cmd, wait_until

RTOL, ATOL = 1e-4, 1e-5
CLI_TIMEOUT = 60.0
READY_TIMEOUT = 30.0

Spawn = Callable[..., "subprocess.Popen[str]"]


# -- helpers ------------------------------------------------------------------------------


def run_cli(*args: Any, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(runtime_cmd(*map(str, args)), capture_output=True, text=True, timeout=timeout)


def cli_json(*args: Any, rc: int = 0) -> Any:
    """Run a ``--json`` command, check its exit code, return its (one-document) stdout."""
    proc = run_cli(*args, "--json")
    assert proc.returncode == rc, f"exit {proc.returncode}, wanted {rc}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(proc.stdout)


def cli_error(*args: Any) -> tuple[dict[str, Any], str]:
    """Run a ``--json`` command that must fail with a typed error: (the error, stderr).

    Exit 1; stdout is exactly ``{"error": {...}}``; stderr has the same message for people
    ("edge-runtime: ...", after any interpreter INFO lines) and no traceback."""
    proc = run_cli(*args, "--json")
    assert proc.returncode == 1, f"exit {proc.returncode}, wanted 1\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    doc = json.loads(proc.stdout)
    assert list(doc) == ["error"], doc
    err = doc["error"]
    assert f"\nedge-runtime: {err['message']}" in "\n" + proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    return err, proc.stderr


def install(data: Path, path: Path, name: str, version: str, *extra: Any) -> dict[str, Any]:
    return cli_json("install", path, "--data-dir", data, "--name", name, "--version", version, *extra)


def models(data: Path) -> dict[str, Any]:
    return cli_json("models", "--data-dir", data, "--verify")


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.allclose(actual, expected, rtol=RTOL, atol=ATOL))


def http(url: str, body: Any = None, *, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, JSON payload) of one REST call; error statuses are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def served_version(rest: str, name: str) -> str:
    status, payload = http(f"{rest}/v1/models/{name}")
    assert status == 200, payload
    return str(payload["model_version_status"][0]["version"])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def blob_path(data: Path, sha256: str) -> Path:
    return data / "blobs" / "sha256" / sha256


def weight_byte(model: Any) -> int:
    """Offset of the sign/exponent byte of the first float of the model's largest weight
    tensor: flipping it keeps the file loadable but changes the answers a lot."""
    weights = max((t for t in model.graph.tensors if t.data is not None), key=lambda t: t.data.nbytes)
    assert weights.data.dtype == np.float32
    start = model.data.find(np.ascontiguousarray(weights.data, dtype="<f4").tobytes())
    assert start > 0, "weights not found in the file"
    return start + 3  # little endian: the last byte holds the sign and high exponent bits


def unread_bytes(sock: socket.socket) -> int:
    """Bytes this socket sent that the peer has not read yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    socket: Path
    stderr_path: Path

    @property
    def rest(self) -> str:
        return str(self.ready["rest"])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_daemon(spawn: Spawn, tmp_path: Path, data: Path, *extra: str) -> Daemon:
    """Start ``edge-runtime serve`` and wait for its ready line (stderr goes to a file)."""
    sock = tmp_path / "api.sock"
    err_path = tmp_path / "serve.stderr"
    port = free_port()
    with err_path.open("w") as err:  # the child keeps its own copy of the descriptor
        proc = spawn(
            runtime_cmd("serve", "--data-dir", str(data), "--rest", f"127.0.0.1:{port}", "--socket", str(sock), *extra),
            stderr=err,
        )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=READY_TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"no ready line after {READY_TIMEOUT}s; stderr:\n{err_path.read_text()}") from None
    assert line, f"serve exited ({proc.poll()}) before it was ready; stderr:\n{err_path.read_text()}"
    ready = json.loads(line)
    assert ready["event"] == "ready"
    assert ready["rest"] == f"http://127.0.0.1:{port}"
    assert ready["socket"] == str(sock)
    return Daemon(proc, ready, sock, err_path)


Serve = Callable[..., Daemon]


@pytest.fixture
def serve(spawn: Spawn, tmp_path: Path) -> Iterator[Serve]:
    """``serve(data_dir, *extra_args)`` → a ready daemon; at teardown it is killed (if still
    running), reaped and its stdout pipe closed (``spawn`` also kills what it started)."""
    started: list[Daemon] = []

    def start(data: Path, *extra: str) -> Daemon:
        d = start_daemon(spawn, tmp_path, data, *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait(10)
        if d.proc.stdout is not None:
            d.proc.stdout.close()


# -- 1. infer -----------------------------------------------------------------------------


def test_infer_positional_input_writes_reference_outputs(tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    model = zoo["tiny_v1"]
    x = model.sample_inputs(seed=1)["x"]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    proc = run_cli("infer", model_files["tiny_v1"], "--input", tmp_path / "x.npy", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "y" in proc.stdout and "float32" in proc.stdout  # the human table
    with np.load(out) as got:
        assert got.files == ["y"]
        assert close(got["y"], model.reference({"x": x})["y"])


@pytest.mark.parametrize("form", ["named", "npz"])
def test_infer_multi_io_named_and_npz_inputs(form: str, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    model = zoo["multi_io"]
    feeds = model.sample_inputs(seed=2)
    if form == "named":
        args: list[Any] = []
        for name, value in feeds.items():
            np.save(tmp_path / f"{name}.npy", value)
            args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    else:
        np.savez(tmp_path / "in.npz", **feeds)
        args = ["--input", tmp_path / "in.npz"]
    out = tmp_path / "out.npz"
    proc = run_cli("infer", model_files["multi_io"], *args, "--output", out)
    assert proc.returncode == 0, proc.stderr
    expected = model.reference(feeds)
    with np.load(out) as got:
        assert sorted(got.files) == sorted(expected) == ["probs", "sum"]
        for name, value in expected.items():
            assert close(got[name], value), name


def test_infer_json_is_one_parseable_document(tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    model = zoo["multi_io"]
    feeds = model.sample_inputs(seed=3)
    np.savez(tmp_path / "in.npz", **feeds)
    doc = cli_json("infer", model_files["multi_io"], "--input", tmp_path / "in.npz")
    assert doc["model"] == str(model_files["multi_io"])
    assert doc["output_file"] is None and doc["backend"]
    for name, value in model.reference(feeds).items():
        got = doc["outputs"][name]
        assert got["dtype"] == "float32" and got["shape"] == list(value.shape)
        assert close(np.array(got["values"], dtype=np.float32), value.ravel()[:16])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_shape", ["input 'x'", "expected shape [1, 16]", "got [1, 8]"]),
        ("wrong_dtype", ["input 'x'", "expected dtype float32", "got float64"]),
        ("missing_name", ["missing input 'b'", "a float32[1, 8]", "b float32[1, 8]"]),
        ("unknown_name", ["unknown input 'c'"]),
    ],
)
def test_infer_bad_input_exits_1_saying_expected_vs_got(
    case: str, expected: list[str], tmp_path: Path, model_files: dict[str, Path]
) -> None:
    f32 = np.zeros((1, 8), np.float32)
    if case == "wrong_shape":
        model, specs = "tiny_v1", {"": f32}
    elif case == "wrong_dtype":
        model, specs = "tiny_v1", {"": np.zeros((1, 16), np.float64)}
    elif case == "missing_name":
        model, specs = "multi_io", {"a": f32}
    else:
        model, specs = "multi_io", {"a": f32, "b": f32, "c": f32}
    args: list[Any] = []
    for name, value in specs.items():
        path = tmp_path / f"{name or 'x'}.npy"
        np.save(path, value)
        args += ["--input", f"{name}={path}" if name else path]
    out = tmp_path / "out.npz"
    err, _ = cli_error("infer", model_files[model], *args, "--output", out)
    assert err["type"] == "invalid_input"
    for text in expected:
        assert text in err["message"], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "reason", "says"),
    [
        ("npy_file", "not_tflite", "not a TFLite model"),
        ("text_file", "truncated", "too short to be a TFLite model"),
        ("truncated", "truncated", "damaged or truncated"),
        ("custom_op", "unresolved_op", "EdgefleetUnresolvedOp"),
        ("missing", "not_found", "not found"),
    ],
)
def test_infer_refuses_what_is_not_a_usable_model(
    case: str, reason: str, says: str, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 16), np.float32))
    path = {
        "npy_file": x,
        "text_file": tmp_path / "notes.tflite",
        "truncated": tmp_path / "truncated.tflite",
        "custom_op": model_files["custom"],
        "missing": tmp_path / "missing.tflite",
    }[case]
    if case == "text_file":
        path.write_text("hello\n")
    elif case == "truncated":
        path.write_bytes(zoo["tiny_v1"].data[:3000])
    err, _ = cli_error("infer", path, "--input", x)
    assert (err["type"], err["reason"]) == ("invalid_model", reason)
    assert str(path) in err["message"] and says in err["message"], err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["infer"],
        ["infer", "{model}", "--input", "{x}", "--bogus"],
        ["infer", "{model}", "--input", "{x}", "--num-threads", "many"],
        ["install", "{model}", "--data-dir", "{data}", "--name", "tiny"],
        ["rollback", "--data-dir", "{data}"],
        ["serve"],
    ],
    ids=["no-command", "unknown-command", "infer-no-model", "unknown-option", "bad-int", "install-no-version",
         "rollback-no-name", "serve-no-data-dir"],
)
def test_bad_usage_exits_2(argv: list[str], tmp_path: Path, model_files: dict[str, Path]) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 16), np.float32))
    data = tmp_path / "data"
    args = [a.format(model=model_files["tiny_v1"], x=x, data=data) for a in argv]
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "usage: edge-runtime" in proc.stderr
    assert not data.exists()  # usage errors touch nothing


# -- 2. install, models, rollback, activate -----------------------------------------------


def test_install_then_models_shows_it_active_and_verified(tmp_path: Path, model_files: dict[str, Path]) -> None:
    data = tmp_path / "data"
    path = model_files["tiny_v1"]
    result = install(data, path, "tiny", "1")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result["outcome"] == "active" and result["replaced"] is None
    assert (result["name"], result["version"], result["sha256"], result["size"]) == ("tiny", "1", digest, path.stat().st_size)
    assert blob_path(data, digest).read_bytes() == path.read_bytes()

    listing = models(data)
    assert listing["problems"] == []
    (tiny,) = listing["models"]
    assert (tiny["name"], tiny["active"], tiny["previous"], tiny["installing"]) == ("tiny", "1", [], None)
    assert tiny["versions"]["1"]["sha256"] == digest
    assert tiny["last_result"]["outcome"] == "active"

    # The same bytes under the same version with --sha256: nothing to do.
    again = install(data, path, "tiny", "1", "--sha256", digest.upper())
    assert again["outcome"] == "already_active"
    # The human table names the model and its version.
    table = run_cli("models", "--data-dir", data, "--verify")
    assert table.returncode == 0 and "tiny" in table.stdout and "store ok" in table.stdout


def _without_last_results(doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for model in doc["models"] if isinstance(doc["models"], list) else doc["models"].values():
        model.pop("last_result")
    doc.pop("revision", None)
    return doc


REFUSALS = [  # (case, reason in the --json error, text its message has)
    ("truncated", "invalid_model", "damaged or truncated"),
    ("custom_op", "invalid_model", "EdgefleetUnresolvedOp"),
    ("wrong_sha256", "hash_mismatch", "sha256 mismatch"),
    ("not_tflite", "invalid_model", "not a TFLite model"),
]


def test_refused_installs_change_nothing(tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    """What the store holds — versions, active, previous — is unchanged, and the blobs are
    byte-for-byte the same with nothing left in tmp/. state.json itself is *not* byte-identical:
    ``last_result`` records the refusal and its reason, and ``revision`` goes up, as
    installer.py documents ("nothing changed but the recorded last result")."""
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    before = models(data)
    state_before = json.loads((data / "state.json").read_bytes())
    blobs_before = {p.name: p.read_bytes() for p in (data / "blobs" / "sha256").iterdir()}
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(zoo["tiny_v2"].data[:3000])
    np.save(tmp_path / "x.npy", np.zeros(4096, np.float32))
    not_tflite = tmp_path / "x.tflite"
    not_tflite.write_bytes((tmp_path / "x.npy").read_bytes())
    files = {"truncated": truncated, "custom_op": model_files["custom"], "wrong_sha256": model_files["tiny_v2"],
             "not_tflite": not_tflite}

    for case, reason, says in REFUSALS:
        extra = ["--sha256", "ab" * 32] if case == "wrong_sha256" else []
        args = ["install", files[case], "--data-dir", data, "--name", "tiny", "--version", "2", *extra]
        err, _ = cli_error(*args)
        assert (err["type"], err["reason"]) == ("install_failed", reason), case
        assert says in err["message"], (case, err)

        state = json.loads((data / "state.json").read_bytes())
        assert _without_last_results(state) == _without_last_results(state_before), case
        last = state["models"]["tiny"]["last_result"]
        assert (last["version"], last["outcome"], last["reason"]) == ("2", "refused", reason), case
        assert {p.name: p.read_bytes() for p in (data / "blobs" / "sha256").iterdir()} == blobs_before, case
        assert list((data / "tmp").iterdir()) == [], case

    after = models(data)
    assert after["problems"] == []
    assert _without_last_results(after) == _without_last_results(before)
    assert after["models"][0]["last_result"]["reason"] == REFUSALS[-1][1]


def test_rollback_and_activate_switch_versions(tmp_path: Path, model_files: dict[str, Path]) -> None:
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    assert install(data, model_files["tiny_v2"], "tiny", "2")["replaced"] == "1"

    def active() -> tuple[str, list[str]]:
        tiny = json.loads((data / "state.json").read_bytes())["models"]["tiny"]
        return tiny["active"], tiny["previous"]

    assert active() == ("2", ["1"])
    assert cli_json("rollback", "tiny", "--data-dir", data) == {"name": "tiny", "active": "1"}
    assert active() == ("1", ["2"])
    assert cli_json("rollback", "tiny", "--data-dir", data) == {"name": "tiny", "active": "2"}  # undoes the first
    assert cli_json("activate", "tiny", "1", "--data-dir", data) == {"name": "tiny", "active": "1", "replaced": "2"}
    human = run_cli("activate", "tiny", "2", "--data-dir", data)
    assert human.returncode == 0 and "tiny: active version 2 (was 1)" in human.stdout

    # Refusals: typed, and nothing moves.
    err, _ = cli_error("activate", "tiny", "7", "--data-dir", data)
    assert err["type"] == "version_not_found" and "installed: 1, 2" in err["message"]
    err, _ = cli_error("rollback", "nope", "--data-dir", data)
    assert err["type"] == "version_not_found" and "nope" in err["message"]
    assert active() == ("2", ["1"])
    (tiny,) = models(data)["models"]  # what the CLI lists agrees with the file
    assert (tiny["active"], tiny["previous"]) == ("2", ["1"])


# -- 3. serve -----------------------------------------------------------------------------


def test_serve_rest_and_fast_path_match_reference(serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    install(data, model_files["multi_io"], "multi", "3")
    d = serve(data)
    assert d.ready["models"] == ["multi", "tiny"]
    assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660

    tiny, multi = zoo["tiny_v1"], zoo["multi_io"]
    x = tiny.sample_inputs(seed=5)["x"]
    feeds = multi.sample_inputs(seed=6)
    tiny_ref, multi_ref = tiny.reference({"x": x}), multi.reference(feeds)

    # REST, TF Serving shaped.
    status, body = http(f"{d.rest}/v1/models/tiny")
    assert status == 200
    assert body["model_version_status"] == [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    status, body = http(f"{d.rest}/v1/models/tiny:predict", {"instances": x.tolist()})
    assert status == 200 and close(np.array(body["predictions"], np.float32), tiny_ref["y"])
    status, body = http(f"{d.rest}/v1/models/multi:predict", {"inputs": {k: v.tolist() for k, v in feeds.items()}})
    assert status == 200
    for name, value in multi_ref.items():
        assert close(np.array(body["outputs"][name], np.float32), value), name
    status, body = http(f"{d.rest}/v1/models/tiny:predict", {"instances": [[0.0] * 3]})
    assert status == 400 and body["type"] == "invalid_input" and "expected shape [1, 16]" in body["error"]
    status, body = http(f"{d.rest}/v1/models/nope:predict", {"instances": x.tolist()})
    assert status == 404 and body["type"] == "model_not_found"

    # The fast path.
    with FastPathClient(str(d.socket)) as client:
        assert close(client.predict("tiny", {"x": x})["y"], tiny_ref["y"])
        version, out = client.predict_versioned("multi", feeds)
        assert version == "3"
        for name, value in multi_ref.items():
            assert close(out[name], value), name
        assert {m["name"]: m["version"] for m in client.models()} == {"multi": "3", "tiny": "1"}
    assert d.proc.poll() is None


def test_hot_swap_rollback_and_sighup_while_a_client_calls(
    serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    """A client calls in a loop throughout: install 2 (another process), rollback to 1,
    rollback to 2 plus SIGHUP. Every call succeeds with the answering version's outputs, and
    the versions it sees go 1 → 2 → 1 → 2 with no flapping."""
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    d = serve(data)
    x = zoo["tiny_v1"].sample_inputs(seed=7)["x"]
    refs = {"1": zoo["tiny_v1"].reference({"x": x})["y"], "2": zoo["tiny_v2"].reference({"x": x})["y"]}
    assert not close(refs["1"], refs["2"])  # the two versions are distinguishable

    stop = threading.Event()
    seen: list[str] = []  # versions in the order they answered, repeats collapsed
    calls = {"1": 0, "2": 0}
    failures: list[BaseException] = []
    wrong: list[tuple[str, np.ndarray]] = []

    def hammer() -> None:
        with FastPathClient(str(d.socket)) as client:
            while not stop.is_set():
                try:
                    version, out = client.predict_versioned("tiny", {"x": x})
                except BaseException as exc:  # any failure is the finding
                    failures.append(exc)
                    if len(failures) >= 100:
                        return
                    continue
                calls[version] = calls.get(version, 0) + 1
                if not seen or seen[-1] != version:
                    seen.append(version)
                if version not in refs or not close(out["y"], refs[version]):
                    wrong.append((version, out["y"]))

    def serving(version: str, after: int) -> Callable[[], bool]:
        """The client's latest answers come from ``version`` (its ``after``-th switch)."""
        return lambda: len(seen) >= after and seen[-1] == version and served_version(d.rest, "tiny") == version

    thread = threading.Thread(target=hammer, name="hammer", daemon=True)
    thread.start()
    try:
        wait_until(lambda: calls["1"] >= 20, timeout=15, what="the client to get answers from version 1")

        result = install(data, model_files["tiny_v2"], "tiny", "2")  # a separate process, while serving
        assert (result["outcome"], result["replaced"]) == ("active", "1")
        wait_until(serving("2", 2), timeout=20, what="the daemon to serve version 2")

        assert cli_json("rollback", "tiny", "--data-dir", data)["active"] == "1"
        wait_until(serving("1", 3), timeout=20, what="the daemon to go back to version 1")

        assert cli_json("rollback", "tiny", "--data-dir", data)["active"] == "2"
        d.proc.send_signal(signal.SIGHUP)
        wait_until(serving("2", 4), timeout=20, what="the daemon to serve version 2 after SIGHUP")
        done = calls["2"]
        wait_until(lambda: calls["2"] >= done + 20, timeout=15, what="more calls after the last switch")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert failures == [], f"{len(failures)} failed calls, first: {failures[:1]!r}"
    assert wrong == [], f"{len(wrong)} answers did not match their version's reference"
    assert seen == ["1", "2", "1", "2"], seen
    assert d.proc.poll() is None, "SIGHUP must not stop the daemon"
    with FastPathClient(str(d.socket)) as client:
        assert client.predict_versioned("tiny", {"x": x})[0] == "2"


# -- 4. SIGTERM ---------------------------------------------------------------------------


def _vision_daemon(serve: Serve, tmp_path: Path, vision: tuple[Any, Path], *extra: str) -> tuple[Daemon, np.ndarray, np.ndarray]:
    model, path = vision
    data = tmp_path / "data"
    install(data, path, "vision", "1")
    d = serve(data, *extra)
    image = model.sample_inputs(seed=0)["image"]
    return d, image, model.reference({"image": image})["probs"]


def test_sigterm_exits_zero_and_removes_the_socket(serve: Serve, tmp_path: Path, vision: tuple[Any, Path]) -> None:
    d, image, expected = _vision_daemon(serve, tmp_path, vision)
    idle = FastPathClient(str(d.socket))  # a persistent connection left open must not hold up the exit
    try:
        assert close(idle.predict("vision", {"image": image})["probs"], expected)  # default: via shared memory
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0, d.stderr()
    finally:
        idle.close()
    assert not d.socket.exists()
    assert "Traceback" not in d.stderr()
    with pytest.raises(ModelUnavailable, match="cannot reach the runtime"):
        FastPathClient(str(d.socket)).ping()


IN_FLIGHT = 120  # ~1 s of vision invokes queued on one interpreter: several times the shutdown itself


def test_sigterm_answers_every_request_received_before_it(
    serve: Serve, tmp_path: Path, vision: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic in-flight calls. The clients connect one at a time (each proven accepted
    by a ping), then all send their predict at once; SIGTERM goes only when every request has
    been *read by the daemon* (SIOCOUTQ of its client socket is 0 once the whole frame was
    sent — or its call already returned). With ``--pool-size 1`` they queue on one
    interpreter, so the work (~120 × 8 ms) outlasts the shutdown (~0.25 s here) several times
    over: a daemon that drains answers them all, one that does not drops most of them.
    A single ~8 ms call would not do: the shutdown itself takes longer than that, so such a
    test passes or fails by timing, not by what the daemon does."""
    d, image, expected = _vision_daemon(serve, tmp_path, vision, "--pool-size", "1")
    clients = [FastPathClient(str(d.socket), shm=False) for _ in range(IN_FLIGHT)]  # shm=False: one frame per call
    sent: list[socket.socket] = []
    send_buffers = framing.send_buffers
    together = threading.Barrier(IN_FLIGHT, timeout=30)
    armed = threading.Event()  # from now on every frame sent is a predict

    def gated_send(sock: socket.socket, parts: list[Any], fds: Sequence[int] = ()) -> None:
        if armed.is_set():
            together.wait()  # all send at once
        send_buffers(sock, parts, fds)
        if armed.is_set():
            sent.append(sock)  # the whole frame is in the kernel

    def read_by_daemon(sock: socket.socket) -> bool:
        return sock.fileno() == -1 or unread_bytes(sock) == 0  # closed: its call already returned

    monkeypatch.setattr(framing, "send_buffers", gated_send)
    results: list[np.ndarray] = []
    failures: list[BaseException] = []

    def call(client: FastPathClient) -> None:
        try:
            results.append(client.predict("vision", {"image": image})["probs"])
        except BaseException as exc:
            failures.append(exc)
        finally:
            client.close()

    try:
        for client in clients:  # one connection at a time: see the backlog test below
            client.ping()
        armed.set()
        threads = [threading.Thread(target=call, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        wait_until(lambda: len(sent) == IN_FLIGHT and all(read_by_daemon(s) for s in sent), timeout=30,
                   what="every request to be read by the daemon")
        in_flight = IN_FLIGHT - len(results)
        d.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
    finally:
        for client in clients:
            client.close()
    assert d.proc.wait(10) == 0
    assert not d.socket.exists()
    assert failures == [], f"{len(failures)} of the {in_flight} calls in flight at SIGTERM failed, first: {failures[0]!r}"
    assert len(results) == IN_FLIGHT and all(close(r, expected) for r in results)


BURST = 16


def test_a_burst_of_new_fast_path_clients_all_get_through(
    serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP stands in for a daemon busy or descheduled for a moment; 16 applications
    connect at once meanwhile, and after SIGCONT every one of them is answered. (It failed
    before: a listen backlog of 5 and a non-blocking connect gave the 7th client EAGAIN.)

    SIGCONT goes once every client has sent its request or failed. A client that is instead
    still waiting to connect is also correct; then the 5 s deadline only ends the waiting, and
    the assertions below do not depend on it."""
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    d = serve(data)
    x = zoo["tiny_v1"].sample_inputs(seed=10)["x"]
    expected = zoo["tiny_v1"].reference({"x": x})["y"]
    sent: list[socket.socket] = []
    send_buffers = framing.send_buffers

    def recording_send(sock: socket.socket, parts: list[Any], fds: Sequence[int] = ()) -> None:
        send_buffers(sock, parts, fds)
        sent.append(sock)

    monkeypatch.setattr(framing, "send_buffers", recording_send)
    results: list[np.ndarray] = []
    failures: list[BaseException] = []

    def call() -> None:
        try:
            with FastPathClient(str(d.socket), timeout=30) as client:
                results.append(client.predict("tiny", {"x": x})["y"])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(BURST)]
    d.proc.send_signal(signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(sent) + len(failures) == BURST, timeout=5, what="every client to send or fail")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(30)
    assert failures == [], f"{len(failures)} of {BURST} clients failed, first: {failures[0]!r}"
    assert len(results) == BURST and all(close(r, expected) for r in results)


# -- 5. start-up with a corrupted blob ---------------------------------------------------


def _corrupted_store(tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path], where: str) -> tuple[Path, Path]:
    """tiny 1 (its blob then damaged on disk) and multi 1 (intact)."""
    data = tmp_path / "data"
    digest = install(data, model_files["tiny_v1"], "tiny", "1")["sha256"]
    install(data, model_files["multi_io"], "multi", "1")
    blob = blob_path(data, digest)
    flip_byte(blob, 4 if where == "identifier" else weight_byte(zoo["tiny_v1"]))
    return data, blob


def _serves_the_others(d: Daemon, zoo: dict[str, Any]) -> None:
    multi = zoo["multi_io"]
    feeds = multi.sample_inputs(seed=8)
    with FastPathClient(str(d.socket)) as client:
        out = client.predict("multi", feeds)
    for name, value in multi.reference(feeds).items():
        assert close(out[name], value), name
    status, body = http(f"{d.rest}/v1/models/multi:predict", {"inputs": {k: v.tolist() for k, v in feeds.items()}})
    assert status == 200 and close(np.array(body["outputs"]["sum"], np.float32), feeds["a"] + feeds["b"])
    assert served_version(d.rest, "multi") == "1"


def _answers_503(d: Daemon, zoo: dict[str, Any]) -> None:
    x = zoo["tiny_v1"].sample_inputs(seed=9)["x"]
    status, body = http(f"{d.rest}/v1/models/tiny:predict", {"instances": x.tolist()})
    assert status == 503, f"got {status}: {body} (reference: {zoo['tiny_v1'].reference({'x': x})['y'].tolist()})"
    assert body["type"] == "model_unavailable" and "tiny" in body["error"]
    status, body = http(f"{d.rest}/v1/models/tiny")
    assert status == 503 and body["type"] == "model_unavailable"
    with FastPathClient(str(d.socket)) as client, pytest.raises(ModelUnavailable, match="tiny"):
        client.predict("tiny", {"x": x})


def test_blob_corrupted_so_it_no_longer_loads_answers_503_and_the_rest_serves(
    serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    data, blob = _corrupted_store(tmp_path, zoo, model_files, "identifier")
    d = serve(data)
    assert d.ready["models"] == ["multi"]
    _serves_the_others(d, zoo)
    _answers_503(d, zoo)
    assert d.proc.poll() is None


def test_blob_corrupted_in_its_weights_answers_503_not_a_wrong_answer(
    serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    """The dangerous case: the damaged file still loads, and would compute garbage."""
    data, blob = _corrupted_store(tmp_path, zoo, model_files, "weights")
    verify = run_cli("models", "--data-dir", data, "--verify", "--json")
    assert verify.returncode == 1  # the store's own check sees it
    problems = json.loads(verify.stdout)["problems"]
    assert any(blob.name in p and "damaged" in p for p in problems), problems
    d = serve(data)
    assert d.ready["models"] == ["multi"]
    _serves_the_others(d, zoo)
    _answers_503(d, zoo)
    assert "damaged" in d.stderr()
    assert d.proc.poll() is None


def test_damaged_active_version_falls_back_to_the_previous_one(
    serve: Serve, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    """tiny 2 active with its blob damaged, tiny 1 intact: an offline device keeps serving 1
    (with 1's answers) and says so; the store itself is not changed."""
    data = tmp_path / "data"
    install(data, model_files["tiny_v1"], "tiny", "1")
    digest = install(data, model_files["tiny_v2"], "tiny", "2")["sha256"]
    flip_byte(blob_path(data, digest), weight_byte(zoo["tiny_v2"]))
    state = (data / "state.json").read_bytes()
    d = serve(data)
    x = zoo["tiny_v1"].sample_inputs(seed=11)["x"]
    assert served_version(d.rest, "tiny") == "1"
    with FastPathClient(str(d.socket)) as client:
        version, out = client.predict_versioned("tiny", {"x": x})
    assert version == "1" and close(out["y"], zoo["tiny_v1"].reference({"x": x})["y"])
    assert "serving previous version 1" in d.stderr()
    assert (data / "state.json").read_bytes() == state


# -- 6. demo ------------------------------------------------------------------------------


def test_demo_json_reports_no_failed_calls_and_the_refusals(tmp_path: Path) -> None:
    proc = run_cli("demo", "--json", "--data-dir", tmp_path / "demo", timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # --json: stdout is one JSON document, progress goes elsewhere
    steps = {s["step"]: s for s in doc["steps"]}
    swap = steps["hot swap under load"]["result"]
    m = re.fullmatch(r"(\d+) calls on 1, (\d+) on 2, (\d+) failed", swap)
    assert m and int(m[2]) > 0 and int(m[3]) == 0, swap
    assert steps["refuse bad file"]["result"].startswith("refused: invalid_model; active still 2")
    assert steps["health gate"]["result"].startswith("rolled back") and "active still 2" in steps["health gate"]["result"]
    assert steps["rollback"]["result"] == "daemon serving 1"
    assert "matches numpy reference: True" in steps["REST predict"]["result"]
    assert "matches numpy reference: True" in steps["fast path predict"]["result"]
    assert steps["fsck"]["result"] == "ok"
