"""``edge-runtime demo``: the device side end to end, with real parts, in about ten seconds.

Builds real .tflite files, installs them into a store, starts ``edge-runtime serve`` as a
subprocess, calls it over REST and the fast path, hot-swaps a version under a live client,
shows a bad file refused and a failing version rolled back, then prints a summary table.
The controller side joins in later issues (``fleetctl demo``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.console import emit_json, table


_progress = sys.stdout


def _say(msg: str) -> None:
    print(f"==> {msg}", file=_progress, flush=True)


def _rest(url: str, body: Any | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def run_demo(*, data_dir: Path | None = None, as_json: bool = False) -> int:
    from edge_runtime.api import FastPathClient
    from edge_runtime.engine import Engine
    from edge_runtime.errors import HealthCheckFailed, InstallError
    from edge_runtime.health import HealthCheck
    from edge_runtime.installer import Installer
    from edge_runtime.modelgen import zoo
    from edge_runtime.store import ModelStore

    global _progress
    _progress = sys.stderr if as_json else sys.stdout  # with --json, stdout is only JSON
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="edge-runtime-demo-")
        root = Path(tmp)
    else:
        root = Path(data_dir)
        root.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    proc: subprocess.Popen[str] | None = None
    try:
        _say(f"building models with the pure-Python TFLite writer into {root / 'models'}")
        models = root / "models"
        models.mkdir(exist_ok=True)
        tiny1, tiny2, vision = zoo.tiny_mlp(seed=0), zoo.tiny_mlp(seed=0, version_bias=0.5), zoo.vision_net(seed=0)
        paths = {"tiny1": tiny1.save(models / "tiny_v1.tflite"), "tiny2": tiny2.save(models / "tiny_v2.tflite"),
                 "vision": vision.save(models / "vision.tflite")}
        rows.append(["build", "tiny_mlp, vision_net", f"{paths['tiny1'].stat().st_size} B, {paths['vision'].stat().st_size / 1e6:.2f} MB"])

        store = ModelStore(root / "data")
        installer = Installer(store, Engine(pool_size=1))
        for name, version, key in (("tiny", "1", "tiny1"), ("vision", "1", "vision")):
            r = installer.install_file(name, version, paths[key])
            rows.append(["install", f"{name} {version}", f"{r.outcome}, sha256 {r.sha256[:12]}"])
        _say("installed tiny 1 and vision 1; starting `edge-runtime serve`")

        sock = root / "api.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "serve", "--data-dir", str(root / "data"), "--rest", "127.0.0.1:0", "--socket", str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if ready.get("event") != "ready":
            raise RuntimeError(f"edge-runtime serve did not start (exit {proc.poll()})")
        rest = ready["rest"]
        rows.append(["serve", "REST + fast path", f"{rest}, {sock.name}, models {ready['models']}"])

        x = tiny1.sample_inputs(seed=1)["x"]
        t0 = time.perf_counter()
        pred = _rest(f"{rest}/v1/models/tiny:predict", {"instances": x.tolist()})["predictions"][0]
        rest_ms = (time.perf_counter() - t0) * 1e3
        ok = np.allclose(pred, tiny1.reference({"x": x})["y"][0], rtol=1e-4, atol=1e-5)
        rows.append(["REST predict", "tiny 1", f"matches numpy reference: {ok}; {rest_ms:.1f} ms"])
        _say(f"REST  POST /v1/models/tiny:predict -> {np.round(pred, 4).tolist()}")

        image = vision.sample_inputs(seed=0)["image"]
        with FastPathClient(str(sock)) as client:
            client.predict("vision", {"image": image})
            t0 = time.perf_counter()
            probs = client.predict("vision", {"image": image})["probs"]
            fast_ms = (time.perf_counter() - t0) * 1e3
        ok = np.allclose(probs, vision.reference({"image": image})["probs"], rtol=1e-3, atol=1e-5)
        rows.append(["fast path predict", "vision 1 (224x224x3)", f"matches numpy reference: {ok}; {fast_ms:.1f} ms"])
        _say(f"fast path vision -> top class {int(np.argmax(probs))} in {fast_ms:.1f} ms")

        _say("hot swap tiny 1 -> 2 while a client calls it in a loop")
        stop, counts, failures = threading.Event(), {"1": 0, "2": 0}, []

        def hammer() -> None:
            with FastPathClient(str(sock)) as c:
                while not stop.is_set():
                    try:
                        counts[c.predict_versioned("tiny", {"x": x})[0]] += 1
                    except Exception as exc:  # any failure is what the demo is here to show does not happen
                        failures.append(exc)

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        installer.install_file("tiny", "2", paths["tiny2"])
        deadline = time.monotonic() + 20
        while counts["2"] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t.join(10)
        rows.append(["hot swap under load", "tiny 1 -> 2", f"{counts['1']} calls on 1, {counts['2']} on 2, {len(failures)} failed"])

        bad = models / "truncated.tflite"
        bad.write_bytes(paths["tiny2"].read_bytes()[:3000])
        try:
            installer.install_file("tiny", "3", bad)
            rows.append(["refuse bad file", "tiny 3", "NOT refused"])
        except InstallError as exc:
            rows.append(["refuse bad file", "tiny 3 (truncated)", f"refused: {exc.reason}; active still {store.read().models['tiny'].active}"])
        _say("a truncated file was refused; nothing changed")

        wrong = HealthCheck(inputs={"x": x}, expected=tiny2.reference({"x": x}), atol=1e-4)
        try:
            installer.install_file("tiny", "4", paths["tiny1"], health=wrong)  # v1 weights cannot give v2's outputs
            rows.append(["health gate", "tiny 4", "NOT rolled back"])
        except HealthCheckFailed as exc:
            rows.append(["health gate", "tiny 4 (wrong outputs)", f"rolled back ({exc.figures.get('max_abs_error', '?'):.3g} max error); active still {store.read().models['tiny'].active}"])
        _say("a version failing its health check was rolled back; tiny 2 kept serving")

        active = installer.rollback("tiny")
        deadline = time.monotonic() + 20
        while _rest(f"{rest}/v1/models/tiny")["model_version_status"][0]["version"] != active and time.monotonic() < deadline:
            time.sleep(0.05)
        rows.append(["rollback", "tiny 2 -> 1", f"daemon serving {_rest(f'{rest}/v1/models/tiny')['model_version_status'][0]['version']}"])
        problems = store.fsck()
        rows.append(["fsck", "store", "ok" if not problems else "; ".join(problems)])
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    if as_json:
        emit_json({"steps": [{"step": a, "subject": b, "result": c} for a, b, c in rows]})
    else:
        print()
        table(["step", "subject", "result"], rows)
    return 0
