"""``fleetctl demo``: the whole stack on one machine, as real processes, in well under a minute.

    fleetctl demo [--dir DIR] [--keep] [--json]

What it starts (each in its own session, output in ``DIR/logs/NAME.log``):

    fleetctl broker          the embedded amqtt broker with a users file and its ACLs:
                             "ctl" (controller), "console" (this script), and one device user
                             per node whose username is the node id (cloud-1's too)
    fleetctl serve           the controller: keys in DIR/keys, SQLite in DIR/controller
    edge-runtime run  x3     dev-1, dev-2, dev-3: own data dir, REST port and password file,
                             trusting DIR/keys/root.json (the root made by ``keys init``)
    edge-runtime run         cloud-1, after the rollouts: the same runtime with ``tier = "cloud"``

What it then does, as an operator would with ``fleetctl`` (through the same ``ApiClient``):

    1. push tiny@1 and deploy it with a 33% canary (one device)    -> succeeded
    2. push tiny@2, canary 33% then 100%                           -> succeeded;
       REST predict on every device equals v2's numpy reference
    3. push tiny@3 (outputs NaN), canary 33%                       -> aborted at the canary
       with health_check_failed; the canary reverted to 2, the others never touched;
       REST predict on every device still equals v2's reference
    4. a live migration under load: cloud-1 starts (tier cloud) while a load generator calls
       dev-2's local API back to back (one REST thread, one fast-path thread, every answer
       checked against v2's reference);
       migrate tiny --source dev-2 --to cloud-1 (make-before-break)  -> done; the fast path
       now answers served_by cloud-1;
       migrate tiny --source dev-2 --to dev-2                        -> done; calls local
       again, cloud-1 unloaded; 0 failed calls before, during and after both moves;
       REST predict on every device still equals v2's reference
    5. tables: devices, rollouts, migrations, dev-2's calls by phase (p50/p95 before, during
       each move, on cloud-1, after) and ``fleetctl plan``'s view (``--json``: one JSON
       summary on stdout, the scene's figures under "migration")

Progress lines go to stderr, each saying what the step proves; tables go to stdout.

Exit codes: 0 every expectation held; 1 one did not (what was expected, what happened, and
the tail of the logs are printed); 130 interrupted (Ctrl-C or SIGTERM). On every way out,
the load generator is stopped, then every process started here gets SIGTERM (cloud-1 and
the devices together, then the controller, then the broker), SIGKILL after 10 s, and its
whole process group a SIGKILL after that; the directory is removed unless ``--keep`` (a
``--dir`` that existed, empty, is emptied rather than removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from edge_runtime.agent.config import to_toml

__all__ = ["DemoFailed", "add_cli", "run_demo"]

T = TypeVar("T")

DEVICES = ("dev-1", "dev-2", "dev-3")
CLOUD = "cloud-1"  # the cloud node of the migration scene (tier = "cloud")
SOURCE = "dev-2"  # the device whose calls are migrated (not the v3 canary, whose store saw a rollback)
MODEL = "tiny"
CANARY_PCT = 33.0  # one device of three (34% would round up to two: assign_waves takes the ceiling)
SOAK_S = 1.0  # short soaks: the demo is about the flow, not the wait
STOP_TIMEOUT_S = 10.0
CONTROLLER_USER, CONSOLE_USER = "ctl", "console"
LOAD_CALLS = 20  # fast-path calls seen on a route (local, cloud-1, local again) before moving on
MIGRATION_TIMEOUT_S = 60.0
_SOCKET_MAX = 60  # AF_UNIX paths stop at 108 bytes, and the API binds "NAME.PID.THREAD" first


class DemoFailed(Exception):
    """An expectation that did not hold: ``what`` was checked, ``expected`` vs ``got``."""

    def __init__(self, what: str, expected: Any, got: Any) -> None:
        super().__init__(f"{what}: expected {expected}, got {got}")
        self.what, self.expected, self.got = what, expected, got


class _Interrupted(BaseException):
    """SIGTERM to the demo: unwinds like Ctrl-C so that the ``finally`` blocks run."""


_started = time.monotonic()


def _say(msg: str) -> None:
    print(f"==> [{time.monotonic() - _started:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(fn: Callable[[], Optional[T]], timeout: float, what: str, *, expected: Any = "it within the time",
          interval: float = 0.2, last: Optional[Callable[[], Any]] = None) -> T:
    """Poll ``fn`` until it returns something truthy; ``DemoFailed`` after ``timeout``
    (``last()`` says what was seen instead)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoFailed(what, expected, f"not within {timeout:g}s; last seen: {last() if last else value!r}")
        time.sleep(interval)


def _write_secret(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


# -- the agent's config (the same keys tests/agentkit.py writes) -------------------------


def write_agent_config(path: Path, *, device_id: str, data_dir: Path, broker_url: str, username: str,
                       password_file: Path, trust_root: Path, rest_port: int, socket_path: Path,
                       telemetry_interval_s: float = 1.0, tier: str = "edge") -> Path:
    """An ``edge-runtime run`` TOML (``edge_runtime.agent.config``) with short reconnect
    delays, for a device (``tier = "edge"``) or a cloud node (``"cloud"``) on this machine.
    Returns ``path``."""
    data: dict[str, Any] = {
        "device_id": device_id,
        "tier": tier,
        "data_dir": data_dir.absolute(),
        "trust_root": trust_root.absolute(),
        "telemetry_interval_s": telemetry_interval_s,
        "broker": {"url": broker_url, "username": username, "password_file": password_file.absolute(),
                   "keepalive_s": 5, "reconnect_initial_s": 0.2, "reconnect_max_s": 2.0},
        "api": {"rest_port": rest_port, "socket_path": socket_path.absolute()},
        "limits": {"chunk_timeout_s": 2.0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(data), encoding="utf-8")
    return path


# -- processes ---------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child if the demo itself is SIGKILLed (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    port: Optional[int] = None
    popen: Optional[subprocess.Popen[bytes]] = None
    exit_code: Optional[int] = None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in lines[-n:]) or "    (empty)"


@dataclass
class Processes:
    """Everything the demo started, stopped in reverse order of starting."""

    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, port: Optional[int] = None) -> Proc:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EDGE_RUNTIME_", "FLEETCTL_")) and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                                                "WATCHDOG_PID")}
        env["PYTHONUNBUFFERED"] = "1"
        proc = Proc(name, argv, self.logs / f"{name}.log", port)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                          start_new_session=True,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.procs.append(proc)
        return proc

    def get(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def check_alive(self) -> None:
        """Raises: DemoFailed: a process exited on its own."""
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise DemoFailed(f"{p.name} keeps running", "running", f"exited with {p.popen.returncode}")

    @staticmethod
    def _tier(name: str) -> str:
        return "nodes" if name.startswith(("dev-", "cloud-")) else name

    def stop_all(self) -> None:
        """SIGTERM in reverse order of starting, by tier (all devices and the cloud node at
        once), SIGKILL after ``STOP_TIMEOUT_S``; then SIGKILL to each process group (any
        grandchild left)."""
        tiers: list[list[Proc]] = []
        for p in reversed(self.procs):
            tier = self._tier(p.name)
            if tiers and self._tier(tiers[-1][0].name) == tier:
                tiers[-1].append(p)
            else:
                tiers.append([p])
        for tier_procs in tiers:
            for p in tier_procs:
                self._signal(p, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for p in tier_procs:
                if p.popen is None:
                    continue
                try:
                    p.exit_code = p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._signal(p, signal.SIGKILL)
                    p.exit_code = p.popen.wait()
        for p in self.procs:
            self._signal(p, signal.SIGKILL, group_only=True)

    @staticmethod
    def _signal(p: Proc, sig: int, *, group_only: bool = False) -> None:
        if p.popen is None or (not group_only and p.popen.poll() is not None):
            return
        try:
            os.killpg(p.popen.pid, sig)  # its own session: the pgid is its pid
        except (ProcessLookupError, PermissionError):
            pass


# -- REST on a device ----------------------------------------------------------------------


def _rest(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _rest_ok(url: str) -> bool:
    try:
        _rest(url, timeout=2)
        return True
    except (OSError, ValueError):
        return False


def _serving(rest: str) -> Optional[str]:
    """The version the device's REST API serves for MODEL (None: none or unreachable)."""
    try:
        status = _rest(f"{rest}/v1/models/{MODEL}", timeout=5)
    except urllib.error.HTTPError:
        return None
    return next((v["version"] for v in status.get("model_version_status", []) if v.get("state") == "AVAILABLE"), None)


# -- the load generator of the migration scene ------------------------------------------------


@dataclass
class Call:
    kind: str  # "rest" | "fast"
    t0: float  # time.monotonic() at the start
    ms: float
    ok: bool
    served_by: Optional[str] = None  # fast path only: "local" or the executor node
    error: Optional[str] = None


@dataclass
class Load:
    """Threads calling one device's local API back to back (REST and the fast path), every
    answer checked against the numpy reference ``ref`` and every call recorded. A routed
    call gets 10 s (``X-Deadline-Ms`` / ``deadline_ms``) rather than the agent's default."""

    rest_url: str
    socket: str
    x: Any
    ref: Any
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, kind: str) -> None:
        t = threading.Thread(target=self._run, args=(kind,), name=f"demo-load-{kind}", daemon=True)
        self.threads.append(t)
        t.start()

    def _run(self, kind: str) -> None:
        import numpy as np

        from edge_runtime.api.client import FastPathClient

        body = json.dumps({"instances": self.x.tolist()}).encode()
        fast = FastPathClient(self.socket, timeout=10)
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                served = error = None
                try:
                    if kind == "fast":
                        reply, out = fast.call({"op": "predict", "model": MODEL, "inputs": ["x"], "deadline_ms": 10000},
                                               [self.x])
                        served, got = reply.get("served_by", "local"), out[0]  # absent: not routed
                    else:
                        req = urllib.request.Request(f"{self.rest_url}/v1/models/{MODEL}:predict", data=body,
                                                     headers={"Content-Type": "application/json",
                                                              "X-Deadline-Ms": "10000"}, method="POST")
                        with urllib.request.urlopen(req, timeout=30) as resp:
                            got = json.load(resp)["predictions"]
                    got = np.asarray(got, np.float32)
                    ok = got.shape == self.ref.shape and bool(np.allclose(got, self.ref, atol=1e-4, rtol=1e-4))
                    error = None if ok else "outputs differ from the reference"
                except urllib.error.HTTPError as exc:
                    ok, error = False, f"HTTP {exc.code}: {exc.read()[:200]!r}"
                except Exception as exc:  # noqa: BLE001 - a failed call is what the scene counts
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                call = Call(kind, t0, (time.monotonic() - t0) * 1e3, ok, served, error)
                with self.lock:
                    self.calls.append(call)
        finally:
            fast.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)  # calls take milliseconds; the threads are daemons should one hang

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def count(self, *, since: float = 0.0, served_by: Optional[str] = None) -> int:
        return sum(1 for c in self.snapshot() if c.t0 >= since and (served_by is None or c.served_by == served_by))


def _pct(calls: list[Call], q: int) -> Optional[float]:
    """The ``q``-th percentile of the calls' latencies in ms (nearest rank); None: no calls."""
    if not calls:
        return None
    ms = sorted(c.ms for c in calls)
    return round(ms[min(len(ms) - 1, max(0, -(-q * len(ms) // 100) - 1))], 2)


def _p95(calls: list[Call]) -> Optional[float]:
    return _pct(calls, 95)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f} ms"


# -- the demo ------------------------------------------------------------------------------


@dataclass
class Demo:
    root: Path
    procs: Processes
    checks: list[dict[str, Any]] = field(default_factory=list)
    rest: dict[str, str] = field(default_factory=dict)
    rollouts: list[int] = field(default_factory=list)
    predict_ok: dict[str, Optional[bool]] = field(default_factory=dict)
    broker_url: str = ""
    socket_dir: Optional[Path] = None  # short paths for the API sockets when ``root``'s are too long
    sockets: dict[str, Path] = field(default_factory=dict)  # node -> its fast-path socket
    passwords: dict[str, Path] = field(default_factory=dict)  # broker user -> its password file
    migrations: list[dict[str, Any]] = field(default_factory=list)  # the scene's migrations, with their figures
    scene: Optional[dict[str, Any]] = None  # the migration scene's figures (``--json``: "migration")
    plan: Optional[dict[str, Any]] = None  # ``fleetctl plan``'s view after the scene

    def expect(self, what: str, ok: bool, expected: Any, got: Any) -> None:
        """Record a check; raises DemoFailed when it did not hold."""
        self.checks.append({"check": what, "ok": bool(ok), "expected": expected, "got": got})
        if not ok:
            raise DemoFailed(what, expected, got)

    # -- bring-up ----------------------------------------------------------------------

    def setup(self) -> Any:
        """Keys, users, broker, controller, devices; returns a connected console ApiClient."""
        from controller.apiclient import ApiClient
        from controller.credentials import UserDB, generate_password
        from controller.keys import KeyDir

        keys = self.root / "keys"
        KeyDir(keys).init(root_keys=3, root_threshold=2, deploy_keys=1, deploy_threshold=1, command_keys=1,
                          command_threshold=1, passphrase=None, expires_days=365)
        _say(f"keys in {keys}: root 2-of-3, deploy, command; root.json is the devices' trust root")

        users = UserDB(self.root / "broker" / "users.json")
        secrets = self.root / "secrets"
        passwords = self.passwords
        for name, role in [(CONTROLLER_USER, "controller"), (CONSOLE_USER, "console"),
                           *((d, "device") for d in (*DEVICES, CLOUD))]:
            password = generate_password()
            users.add(name, role, password)
            passwords[name] = _write_secret(secrets / f"{name}.pass", password)
        users.save()
        _say(f"broker users: {CONTROLLER_USER} (controller), {CONSOLE_USER} (console), "
             f"{', '.join((*DEVICES, CLOUD))} (device role: username = node id, own topics only; "
             f"{CLOUD} starts later)")

        py = sys.executable
        port = _free_port()
        self.broker_url = f"mqtt://127.0.0.1:{port}"
        broker = self.procs.start("broker", [py, "-m", "controller.cli", "broker", "--bind", f"127.0.0.1:{port}",
                                             "--users", str(users.path), "--data", str(self.root / "broker")], port=port)
        _wait(lambda: (self.procs.check_alive(), _port_open(port))[1], 20, "the broker listens",
              expected=f"127.0.0.1:{port} accepting connections", last=broker.log_tail)
        _say(f"broker on {self.broker_url} (fleetctl broker: amqtt with the fleet's authentication and ACLs)")

        ctl_dir = self.root / "controller"
        self.procs.start("controller", [
            py, "-m", "controller.cli", "serve", "--broker", self.broker_url,
            "--db", f"sqlite:///{(ctl_dir / 'controller.db').absolute()}", "--keys", str(keys), "--data", str(ctl_dir),
            "--instance", "demo", "--tick", "0.2", "--username", CONTROLLER_USER,
            "--password-file", str(passwords[CONTROLLER_USER])])
        for d in DEVICES:
            self.start_node(d)

        api = ApiClient(self.broker_url, username=CONSOLE_USER,
                        password=passwords[CONSOLE_USER].read_text(encoding="utf-8").strip(), timeout=10)
        api.connect()
        try:
            self._wait_controller(api)
            _say("controller online (fleetctl serve: retained ctl/state online, answering the console API)")
            for d in DEVICES:
                _wait(lambda d=d: (self.procs.check_alive(), _rest_ok(f"{self.rest[d]}/healthz"))[1], 60,
                      f"{d} serves its REST API", expected=f"{self.rest[d]}/healthz answering",
                      last=self.procs.get(d).log_tail)
            def all_online() -> Optional[set[str]]:
                self.procs.check_alive()
                online = self._online(api)
                return online if online >= set(DEVICES) else None

            online = _wait(all_online, 60, "every device online at the controller", expected=sorted(DEVICES),
                           last=lambda: sorted(self._online(api)))
            self.expect("devices online at the controller", online >= set(DEVICES), sorted(DEVICES), sorted(online))
            _say(f"{len(DEVICES)} devices online: {', '.join(DEVICES)} (agents connected with their own "
                 "credentials, births seen by the controller, REST answering)")
        except BaseException:
            api.close()
            raise
        return api

    def start_node(self, node: str, tier: str = "edge") -> Proc:
        """``edge-runtime run`` for ``node`` (own data dir, REST port, socket, password file)."""
        rest_port = _free_port()
        node_dir = self.root / "devices" / node
        sock = node_dir / "api.sock"
        if len(str(sock.absolute())) > _SOCKET_MAX:  # too long once the API adds its temp suffix
            if self.socket_dir is None:
                self.socket_dir = Path(tempfile.mkdtemp(prefix="ef-demo-", dir="/tmp"))
            sock = self.socket_dir / f"{node}.sock"
        cfg = write_agent_config(node_dir / "agent.toml", device_id=node, data_dir=node_dir / "data",
                                 broker_url=self.broker_url, username=node, password_file=self.passwords[node],
                                 trust_root=self.root / "keys" / "root.json", rest_port=rest_port, socket_path=sock,
                                 tier=tier)
        proc = self.procs.start(node, [sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(cfg)],
                                port=rest_port)
        self.rest[node] = f"http://127.0.0.1:{rest_port}"
        self.sockets[node] = sock
        return proc

    def _wait_controller(self, api: Any) -> None:
        from controller.apiclient import ControllerUnavailable

        def ping() -> bool:
            self.procs.check_alive()
            try:
                api.request("ping", {}, timeout=2)
            except ControllerUnavailable:
                return False
            return bool(api.controller and api.controller.online)

        _wait(ping, 45, "the controller answers", expected="ping answered and ctl/state online",
              last=self.procs.get("controller").log_tail)

    @staticmethod
    def _online(api: Any) -> set[str]:
        return {r["id"] for r in api.call("devices.list") if r.get("online")}

    # -- the story ---------------------------------------------------------------------

    def push(self, api: Any, path: Path, version: str, health: Optional[dict[str, Any]]) -> None:
        from controller.cli import inspect_file

        release = api.upload(path, MODEL, version, inspect_file(path)["signature"], health)
        self.expect(f"release {MODEL}@{version} pushed", release.get("version") == version, version, release.get("version"))

    def deploy(self, api: Any, version: str, waves: list[float]) -> dict[str, Any]:
        row = api.call("deploy", model=MODEL, version=version, to="all", canary_pct=CANARY_PCT, waves=waves,
                       soak_s=SOAK_S, step_timeout_s=60)
        self.rollouts.append(row["id"])
        return _wait(lambda: (lambda r: r if r["state"] in ("succeeded", "aborted") else None)(
            api.call("rollouts.show", id=row["id"])), 120, f"rollout {row['id']} ({MODEL}@{version}) finishes",
            expected="succeeded or aborted", interval=0.3,
            last=lambda: (lambda r: f"{r['state']}, steps {r['counts']}")(api.call("rollouts.show", id=row["id"])))

    def check_served(self, version: str, model: Any, when: str) -> None:
        import numpy as np

        x = model.sample_inputs(seed=1)["x"]
        want = model.reference({"x": x})["y"]
        for d in DEVICES:
            serving = _serving(self.rest[d])
            self.expect(f"{d} serves {MODEL}@{version} {when}", serving == version, version, serving)
            got = np.asarray(_rest(f"{self.rest[d]}/v1/models/{MODEL}:predict", {"instances": x.tolist()})["predictions"],
                             np.float32)
            ok = got.shape == want.shape and bool(np.allclose(got, want, atol=1e-4, rtol=1e-4))
            self.predict_ok[d] = ok
            self.expect(f"{d} REST predict equals {MODEL}@{version}'s reference {when}", ok,
                        np.round(want[0], 4).tolist(), np.round(got[0], 4).tolist() if got.ndim > 1 else got.tolist())

    def story(self, api: Any) -> None:
        from edge_runtime.modelgen import zoo
        from edge_runtime.protocol.messages import HealthSpec

        models_dir = self.root / "models"
        v1, v2, v3 = zoo.tiny_mlp(seed=0), zoo.tiny_mlp(seed=0, version_bias=0.5), zoo.broken_mlp()
        paths = {"1": v1.save(models_dir / "tiny_v1.tflite"), "2": v2.save(models_dir / "tiny_v2.tflite"),
                 "3": v3.save(models_dir / "tiny_v3_broken.tflite")}

        def health(m: Any) -> dict[str, Any]:
            inputs = m.sample_inputs(seed=0)
            return HealthSpec.of(inputs, m.reference(inputs), atol=1e-4, rtol=1e-4).model_dump(mode="json", exclude_none=True)

        # 1. v1 everywhere
        self.push(api, paths["1"], "1", health(v1))
        _say(f"pushed {MODEL}@1 ({paths['1'].stat().st_size} B; a sample and its expected outputs as the health gate)")
        r1 = self.deploy(api, "1", [100.0])
        self.expect("rollout of v1", r1["state"] == "succeeded", "succeeded", f"{r1['state']} ({r1['reason']})")
        _say(f"rollout #{r1['id']} {MODEL}@1: canary {self._canary(r1)}, then the rest -> succeeded "
             f"(signed desired state, chunked download over MQTT, install + health gate on each device)")

        # 2. v2 with a canary, then everyone
        self.push(api, paths["2"], "2", health(v2))
        r2 = self.deploy(api, "2", [100.0])
        self.expect("rollout of v2", r2["state"] == "succeeded", "succeeded", f"{r2['state']} ({r2['reason']})")
        self.expect("v2 steps", r2["counts"] == {"done": len(DEVICES)}, {"done": len(DEVICES)}, r2["counts"])
        canary = [s for s in r2["steps"] if s["wave"] == 0]
        rest = [s for s in r2["steps"] if s["wave"] > 0]
        self.expect("v2 canary finished before the next wave started",
                    len(canary) == 1 and all(s["started_at"] >= canary[0]["finished_at"] for s in rest),
                    "1 canary, done before wave 1", [(s["device_id"], s["wave"], s["started_at"]) for s in r2["steps"]])
        _say(f"rollout #{r2['id']} {MODEL}@2: canary {self._canary(r2)} soaked {SOAK_S:g}s, then wave 100% "
             "-> succeeded (waves, soak, gates on device reports)")
        self.check_served("2", v2, "after the v2 rollout")
        _say(f"REST predict on {', '.join(DEVICES)} equals v2's numpy reference (hot-swapped, serving locally)")

        # 3. a broken v3: the canary's health gate refuses it, the rollout aborts and reverts
        self.push(api, paths["3"], "3", None)
        _say(f"pushed {MODEL}@3: loads fine, but every output is NaN (the device's default gate wants finite outputs)")
        r3 = self.deploy(api, "3", [100.0])
        self.expect("rollout of broken v3", r3["state"] == "aborted", "aborted", f"{r3['state']} ({r3['reason']})")
        self.expect("v3 abort reason", "health_check_failed" in (r3["reason"] or ""), "health_check_failed",
                    r3["reason"])
        canary3 = [s["device_id"] for s in r3["steps"] if s["wave"] == 0]
        untouched = {s["device_id"]: s["state"] for s in r3["steps"] if s["wave"] > 0}
        self.expect("v3 stopped at the canary: later waves never started",
                    all(st == "pending" for st in untouched.values()), "pending", untouched)
        r3 = _wait(lambda: (lambda r: r if all(s["state"] in ("pending", "reverted") for s in r["steps"]) else None)(
            api.call("rollouts.show", id=r3["id"])), 60, "the v3 canary reverted", expected="canary step reverted",
            last=lambda: [(s["device_id"], s["state"]) for s in api.call("rollouts.show", id=r3["id"])["steps"]])
        _say(f"rollout #{r3['id']} {MODEL}@3: canary {', '.join(canary3)} failed its health gate on the device "
             f"(rolled back there, never served), rollout aborted ({r3['reason']}), canary's desired state reverted "
             f"to 2; {', '.join(untouched) or 'no one else'} never touched")
        self.check_served("2", v2, "after the v3 abort")
        _say(f"REST predict on {', '.join(DEVICES)} still equals v2's reference: the fleet kept serving")

    # -- the migration scene -----------------------------------------------------------

    def migration_scene(self, api: Any) -> None:
        """A cloud node, load on SOURCE's local API, ``migrate`` there and back; see the
        module docstring (step 4). The figures land in ``self.scene`` on every way out."""
        from edge_runtime.modelgen import zoo

        v2 = zoo.tiny_mlp(seed=0, version_bias=0.5)
        x = v2.sample_inputs(seed=2)["x"]
        self.start_node(CLOUD, tier="cloud")
        load = Load(self.rest[SOURCE], str(self.sockets[SOURCE]), x, v2.reference({"x": x})["y"])
        marks: dict[str, float] = {}
        try:
            load.start("rest")  # the load runs while cloud-1 boots: these are the "before" calls
            load.start("fast")
            self._wait_cloud(api)
            _wait(lambda: (self.procs.check_alive(), load.count(served_by="local") >= LOAD_CALLS)[1], 30,
                  f"fast-path calls on {SOURCE} served locally", expected=f">= {LOAD_CALLS}",
                  last=lambda: f"{load.count(served_by='local')} local, {len(load.snapshot())} calls in all")
            self._no_failures(load, "before the migration")
            before = load.snapshot()
            _say(f"load on {SOURCE}: {len(before)} calls back to back (REST + fast path), every answer equals v2's "
                 f"reference, p95 {_ms(_p95(before))}, served locally (the baseline the moves must not break)")

            there = self._migrate(api, CLOUD, marks, "there")
            _wait(lambda: (self.procs.check_alive(), load.count(since=marks["there_done"], served_by=CLOUD)
                           >= LOAD_CALLS)[1], 30, f"fast-path calls on {SOURCE} served by {CLOUD}",
                  expected=f">= {LOAD_CALLS} answers with served_by {CLOUD}",
                  last=lambda: {k: load.count(since=marks["there_done"], served_by=k) for k in ("local", CLOUD)})
            marks["back"] = time.monotonic()
            on_cloud = [c for c in load.snapshot() if marks["there_done"] <= c.t0]
            n_cloud = sum(1 for c in on_cloud if c.served_by == CLOUD)
            self.expect(f"fast-path calls on {SOURCE} served by {CLOUD} after migration #{there['id']}",
                        n_cloud >= LOAD_CALLS, f">= {LOAD_CALLS}", n_cloud)
            self._no_failures(load, f"while {CLOUD} served")
            self._during(there, load, marks)
            _say(f"migration #{there['id']} {MODEL}@{there['version']} for {SOURCE}: {SOURCE} -> {CLOUD} done in "
                 f"{there['duration_s']:.2f}s, {there['calls_during']} calls during it, 0 failed (make-before-break: "
                 f"deployed to {CLOUD} and active there before {SOURCE}'s route switched; the local copy stays "
                 "for fallback)")
            _say(f"{n_cloud} fast-path calls on {SOURCE} answered served_by {CLOUD}, p95 "
                 f"{_ms(_p95(on_cloud))}: the app calls the same local API, the runtime forwards to the cloud node")

            back = self._migrate(api, SOURCE, marks, "back")
            _wait(lambda: (self.procs.check_alive(), load.count(since=marks["back_done"], served_by="local")
                           >= LOAD_CALLS)[1], 30, f"fast-path calls on {SOURCE} local again",
                  expected=f">= {LOAD_CALLS} local answers",
                  last=lambda: {k: load.count(since=marks["back_done"], served_by=k) for k in ("local", CLOUD)})
            n_local = load.count(since=marks["back_done"], served_by="local")
            self.expect(f"fast-path calls on {SOURCE} local again after migration #{back['id']}",
                        n_local >= LOAD_CALLS and load.count(since=marks["back_done"], served_by=CLOUD) == 0,
                        f">= {LOAD_CALLS} local, 0 by {CLOUD}",
                        {k: load.count(since=marks["back_done"], served_by=k) for k in ("local", CLOUD)})
            _wait(lambda: not self._assignments(api, CLOUD), 15, f"{CLOUD} unloads {MODEL}",
                  expected=f"no assignment on {CLOUD}", last=lambda: self._assignments(api, CLOUD))
            left = self._assignments(api, CLOUD)
            self.expect(f"{CLOUD} holds no assignment after the move back", not left, [], left)
            self._no_failures(load, "after the move back")
            self._during(back, load, marks)
            _say(f"migration #{back['id']} {MODEL}@{back['version']} for {SOURCE}: {CLOUD} -> {SOURCE} done in "
                 f"{back['duration_s']:.2f}s, {back['calls_during']} calls during it, 0 failed; calls local again, "
                 f"{CLOUD} unloaded {MODEL} (nothing else routes to it)")
        finally:
            load.close()
            for m in self.migrations:
                self._during(m, load, marks)
            self.scene = self._scene_figures(load, marks)
        fig = self.scene
        self.expect("calls during each migration", all(m["calls_during"] > 0 for m in self.migrations),
                    "> 0 during each", [m["calls_during"] for m in self.migrations])
        self.expect(f"no failed call on {SOURCE} before, during or after both migrations", fig["failed_calls"] == 0,
                    0, f"{fig['failed_calls']}: {fig['failures_sample']}")
        p = fig["p95_ms"]
        _say(f"{fig['calls']} calls on {SOURCE} ({fig['by_kind']['rest']} REST, {fig['by_kind']['fast']} fast path), "
             f"0 failed; p95 before {_ms(p['before'])}, during the moves {_ms(p['during'])}, on {CLOUD} "
             f"{_ms(p['on_cloud'])}, after {_ms(p['after'])}: live migration there and back lost no call")
        self.check_served("2", v2, "after the migrations")
        _say(f"REST predict on {', '.join(DEVICES)} equals v2's reference after the migrations: {SOURCE} local again, "
             "the others never touched")
        try:
            self.plan = api.call("plan")
        except Exception as exc:  # noqa: BLE001 - the planner's view is shown, not checked
            self.plan = {"error": f"{type(exc).__name__}: {exc}"}

    def _wait_cloud(self, api: Any) -> None:
        _wait(lambda: (self.procs.check_alive(), _rest_ok(f"{self.rest[CLOUD]}/healthz"))[1], 60,
              f"{CLOUD} serves its REST API", expected=f"{self.rest[CLOUD]}/healthz answering",
              last=self.procs.get(CLOUD).log_tail)

        def online() -> Optional[dict[str, Any]]:
            self.procs.check_alive()
            return next((r for r in api.call("devices.list") if r["id"] == CLOUD and r.get("online")), None)

        row = _wait(online, 30, f"{CLOUD} online at the controller", expected="online",
                    last=lambda: next((r for r in api.call("devices.list") if r["id"] == CLOUD), "not registered"))
        self.expect(f"{CLOUD}'s tier", row.get("tier") == "cloud", "cloud", row.get("tier"))
        _say(f"{CLOUD} online, tier cloud (the same edge-runtime with tier = \"cloud\" and its own broker user)")

    @staticmethod
    def _assignments(api: Any, node: str) -> list[Any]:
        return [(a.get("model"), a.get("route")) for a in api.call("devices.show", id=node).get("assignments") or []]

    def _migrate(self, api: Any, to: str, marks: dict[str, float], leg: str) -> dict[str, Any]:
        """``fleetctl migrate MODEL --source SOURCE --to TO`` and wait for a final state; the
        console's view of it, with ``duration_s`` (created -> finished at the controller)."""
        from controller.migration import FINAL_STATES

        marks[leg] = time.monotonic()
        row = api.call("migrate", model=MODEL, source=SOURCE, to=to, reason="fleetctl demo")
        mid = row["id"]
        entry: dict[str, Any] = {"id": mid, "model": MODEL, "version": row.get("version"), "source": SOURCE,
                                 "from_node": row.get("from_node"), "to_node": to, "state": row.get("state"),
                                 "leg": leg}
        self.migrations.append(entry)

        def final() -> Optional[dict[str, Any]]:
            self.procs.check_alive()
            r = api.call("migrations.show", id=mid)
            entry["state"] = r["state"]
            return r if r["state"] in FINAL_STATES else None

        row = _wait(final, MIGRATION_TIMEOUT_S, f"migration #{mid} ({MODEL} for {SOURCE} -> {to}) finishes",
                    expected="done", last=lambda: (lambda r: f"{r['state']} ({r.get('failure') or '-'})")(
                        api.call("migrations.show", id=mid)))
        marks[f"{leg}_done"] = time.monotonic()
        entry.update({k: row.get(k) for k in ("version", "from_node", "to_node", "state", "failure", "detail",
                                              "target_had", "created_at", "finished_at")})
        entry["duration_s"] = round(row["finished_at"] - row["created_at"], 3) if row.get("finished_at") else None
        self.expect(f"migration #{mid} of {MODEL} for {SOURCE} to {to}",
                    row["state"] == "done" and row.get("failure") is None, "done",
                    f"{row['state']} ({row.get('failure') or '-'}: {row.get('detail') or '-'})")
        return entry

    @staticmethod
    def _during(entry: dict[str, Any], load: Load, marks: Mapping[str, float]) -> None:
        """The calls started while the migration ran (from ``migrate`` until the console saw it final)."""
        a, b = marks.get(entry["leg"], float("inf")), marks.get(f"{entry['leg']}_done", float("inf"))
        during = [c for c in load.snapshot() if a <= c.t0 < b]
        entry.update({"calls_during": len(during), "failed_during": sum(1 for c in during if not c.ok),
                      "p95_during_ms": _p95(during)})

    def _no_failures(self, load: Load, when: str) -> None:
        failed = [c for c in load.snapshot() if not c.ok]
        self.expect(f"no failed call on {SOURCE} {when}", not failed, 0,
                    f"{len(failed)}: {sorted({c.error or '' for c in failed})[:3]}")

    @staticmethod
    def _scene_figures(load: Load, marks: Mapping[str, float]) -> dict[str, Any]:
        """Calls by phase (before / during there / on cloud-1 / during back / after)."""
        calls = load.snapshot()
        inf = float("inf")
        there, there_done = marks.get("there", inf), marks.get("there_done", inf)
        back, back_done = marks.get("back", inf), marks.get("back_done", inf)
        bounds = [("before", -inf, there), ("moving there", there, there_done), (f"on {CLOUD}", there_done, back),
                  ("moving back", back, back_done), ("after", back_done, inf)]
        phases = []
        for name, a, b in bounds:
            cs = [c for c in calls if a <= c.t0 < b]
            if not cs and a == inf:
                continue
            phases.append({"phase": name, "calls": len(cs), "failed": sum(1 for c in cs if not c.ok),
                           "fast_path": {k: sum(1 for c in cs if c.served_by == k) for k in ("local", CLOUD)},
                           "p50_ms": _pct(cs, 50), "p95_ms": _p95(cs)})
        during = [c for c in calls if there <= c.t0 < there_done or back <= c.t0 < back_done]
        failed = [c for c in calls if not c.ok]
        return {
            "source": SOURCE, "cloud": CLOUD, "model": MODEL,
            "calls": len(calls), "failed_calls": len(failed),
            "failures_sample": sorted({c.error or "" for c in failed})[:5],
            "by_kind": {k: sum(1 for c in calls if c.kind == k) for k in ("rest", "fast")},
            "served_by": {k: sum(1 for c in calls if c.served_by == k) for k in ("local", CLOUD)},
            "p95_ms": {"before": _p95([c for c in calls if c.t0 < there]), "during": _p95(during),
                       "on_cloud": _p95([c for c in calls if there_done <= c.t0 < back]),
                       "after": _p95([c for c in calls if c.t0 >= back_done])},
            "phases": phases,
        }

    @staticmethod
    def _canary(r: Mapping[str, Any]) -> str:
        return ", ".join(s["device_id"] for s in r.get("steps", []) if s["wave"] == 0) or "-"

    # -- the summary -------------------------------------------------------------------

    def summary(self, api: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(device rows, rollout rows) as the controller and the devices see them now."""
        shows = [api.call("rollouts.show", id=i) for i in self.rollouts]
        top: dict[str, Any] = {}
        deadline = time.monotonic() + 5  # p95 arrives with the next telemetry (1 s interval)
        while True:
            top = {r["id"]: r for r in api.call("top")}
            if all((top.get(d) or {}).get("p95_ms", {}).get(MODEL) is not None for d in DEVICES) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.3)
        listed = {r["id"]: r for r in api.call("devices.list")}
        devices = []
        for d in DEVICES:
            last = None
            for r in shows:
                for s in r.get("steps", []):
                    if s["device_id"] == d:
                        last = {"rollout": r["id"], "version": r["version"], "wave": s["wave"], "state": s["state"],
                                "reason": s.get("reason")}
            try:
                serving = _serving(self.rest[d])
            except OSError:
                serving = None
            devices.append({
                "id": d, "online": (listed.get(d) or {}).get("online"), "serving": serving,
                "models": (listed.get(d) or {}).get("models"), "last_step": last,
                "p95_ms": ((top.get(d) or {}).get("p95_ms") or {}).get(MODEL), "predict_matches_v2": self.predict_ok.get(d),
            })
        rollouts = [{k: r.get(k) for k in ("id", "model", "version", "target", "state", "wave", "waves", "counts", "reason",
                                           "created_at", "finished_at")} | {"canary": self._canary(r).split(", ")}
                    for r in shows]
        return devices, rollouts


def _device_table(rows: list[dict[str, Any]]) -> Any:
    from controller.console import _online, _state, _table, fmt, fmt_models

    def step(s: Optional[Mapping[str, Any]]) -> str:
        if not s:
            return "-"
        return f"#{s['rollout']} {MODEL}@{s['version']} wave {s['wave']}: {_state(s['state'])}" + \
            (f" ({s['reason']})" if s.get("reason") else "")

    return _table("devices", ["device", "state", "serving (REST)", "controller view", "last rollout step", "p95",
                              "predict = v2 reference"], [
        [r["id"], _online(r["online"]), fmt(r["serving"]), fmt_models(r["models"]), step(r["last_step"]),
         f"{r['p95_ms']:.1f} ms" if isinstance(r["p95_ms"], (int, float)) else "-", fmt(r["predict_matches_v2"])]
        for r in rows])


def _migrations_table(rows: list[dict[str, Any]]) -> Any:
    from controller.console import _state, _table, fmt

    return _table("migrations", ["id", "model", "workload (source: from -> to)", "state", "took", "calls during",
                                 "failed", "p95 during"], [
        [str(r["id"]), f"{r['model']}@{r.get('version') or '-'}",
         f"{r['source']}: {r.get('from_node')} -> {r['to_node']}",
         _state(r.get("state")) + (f" ({r['failure']})" if r.get("failure") else ""),
         f"{r['duration_s']:.2f} s" if isinstance(r.get("duration_s"), (int, float)) else "-",
         fmt(r.get("calls_during")), fmt(r.get("failed_during")), _ms(r.get("p95_during_ms"))]
        for r in rows])


def _calls_table(scene: Mapping[str, Any]) -> Any:
    from controller.console import _table

    return _table(f"calls on {scene['source']} (REST + fast path, each checked against v2's reference)",
                  ["phase", "calls", "failed", f"fast path: local / {scene['cloud']}", "p50", "p95"], [
        [p["phase"], str(p["calls"]), str(p["failed"]), f"{p['fast_path']['local']} / {p['fast_path'][scene['cloud']]}",
         _ms(p["p50_ms"]), _ms(p["p95_ms"])]
        for p in scene["phases"]])


def _prepare_dir(path: Optional[Path]) -> tuple[Path, bool]:
    """(root, created): a fresh temp dir, or ``path`` if it is missing or empty.

    Raises:
        DemoFailed: ``path`` exists and is not an empty directory.
    """
    if path is None:
        return Path(tempfile.mkdtemp(prefix="fleetctl-demo-")), True
    path = path.absolute()
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise DemoFailed("--dir", "a new or empty directory", f"{path} is not empty")
        return path, False
    path.mkdir(parents=True)
    return path, True


def _remove(root: Path, created: bool) -> None:
    if created:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink()


def run_demo(*, directory: Optional[Path] = None, keep: bool = False, as_json: bool = False) -> int:
    """The whole demo; returns the exit code (0 all held, 1 an expectation failed, 130 interrupted)."""
    global _started
    _started = time.monotonic()
    try:
        root, created = _prepare_dir(directory)
    except DemoFailed as exc:
        print(f"fleetctl demo: {exc}", file=sys.stderr)
        return 2

    def on_term(_sig: int, _frame: Any) -> None:
        raise _Interrupted()

    old_term = signal.signal(signal.SIGTERM, on_term)
    procs = Processes(root / "logs")
    demo = Demo(root, procs)
    failure: Optional[DemoFailed] = None
    error: Optional[str] = None
    code = 0
    devices: list[dict[str, Any]] = []
    rollouts: list[dict[str, Any]] = []
    _say(f"fleetctl demo in {root}: broker, controller, {len(DEVICES)} devices and (later) a cloud node as real "
         "processes")
    try:
        api = None
        try:
            api = demo.setup()
            demo.story(api)
            demo.migration_scene(api)
        except DemoFailed as exc:
            failure, code = exc, 1
        except (KeyboardInterrupt, _Interrupted):
            error, code = "interrupted", 130
        except Exception as exc:  # an unexpected error is a failed expectation too: report it, clean up
            from edge_runtime.errors import EdgeRuntimeError

            error, code = (str(exc) if isinstance(exc, EdgeRuntimeError) else f"{type(exc).__name__}: {exc}"), 1
        if api is not None:
            try:
                if code != 130 and demo.rollouts:
                    devices, rollouts = demo.summary(api)
            except Exception as exc:  # the summary is best effort after a failure
                if code == 0:
                    error, code = f"summary: {type(exc).__name__}: {exc}", 1
            finally:
                api.close()
        if code == 1:
            _report_failure(failure, error, procs, root, keep)
    except (KeyboardInterrupt, _Interrupted):
        error, code = "interrupted", 130
    finally:
        try:
            cloud = "the cloud node and " if any(p.name == CLOUD for p in procs.procs) else ""
            _say(f"stopping {cloud}devices, controller, broker (SIGTERM; SIGKILL after {STOP_TIMEOUT_S:g}s)"
                 if procs.procs else "nothing to stop")
            procs.stop_all()
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if demo.socket_dir is not None:
                shutil.rmtree(demo.socket_dir, ignore_errors=True)
            if not keep:
                _remove(root, created)
    if code == 130:
        _say("interrupted: everything stopped" + ("" if keep else f", {root} removed"))
    else:
        stopped = ", ".join(f"{p.name} {p.exit_code}" for p in procs.procs)
        _say(f"stopped ({stopped}); " + (f"kept {root} (logs in {root / 'logs'})" if keep else f"removed {root}"))
    summary = {
        "ok": code == 0, "elapsed_s": round(time.monotonic() - _started, 1), "dir": str(root), "kept": keep,
        "socket_dir": None if demo.socket_dir is None else str(demo.socket_dir),
        "broker": demo.broker_url, "devices": devices, "rollouts": rollouts,
        "migration": None if demo.scene is None else {**demo.scene, "migrations": demo.migrations},
        "plan": demo.plan, "checks": demo.checks,
        "processes": [{"name": p.name, "pid": p.popen.pid if p.popen else None, "port": p.port, "exit_code": p.exit_code}
                      for p in procs.procs],
        "failure": None if failure is None and error is None else (
            {"check": failure.what, "expected": failure.expected, "got": failure.got} if failure else {"error": error}),
    }
    if as_json:
        from edge_runtime.console import emit_json

        emit_json(summary)
    elif devices or rollouts:
        from controller.console import _print, plan_detail, rollouts_table

        tables = [_device_table(devices), rollouts_table(rollouts)]
        if demo.migrations:
            tables.append(_migrations_table(demo.migrations))
        if demo.scene is not None:
            tables.append(_calls_table(demo.scene))
        if demo.plan is not None:
            head = "[italic]fleetctl plan[/] (the placement planner's view of the fleet now; not applied)"
            tables += [head, *plan_detail(demo.plan)] if "error" not in demo.plan else \
                [f"{head}: unavailable ({demo.plan['error']})"]
        _print(tables)
    if code == 0:
        _say(f"all {len(demo.checks)} expectations held in {summary['elapsed_s']}s")
    return code


def _report_failure(failure: Optional[DemoFailed], error: Optional[str], procs: Processes, root: Path,
                    keep: bool) -> None:
    out = sys.stderr
    if failure is not None:
        print(f"\nfleetctl demo: FAILED: {failure.what}\n  expected: {failure.expected}\n  happened: {failure.got}",
              file=out)
    else:
        print(f"\nfleetctl demo: FAILED: {error}", file=out)
    for p in procs.procs:
        if p.name in ("controller",) or p.name.startswith(("dev-", "cloud-")) or not p.alive:
            print(f"  last lines of {p.name} ({p.log.name}):\n{p.log_tail()}", file=out)
    if not keep:
        print(f"  (run with --keep to keep {root} and every log)", file=out)
    out.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(directory=args.dir, keep=args.keep, as_json=args.json)


def add_cli(sub: Any, models: Any) -> None:
    """Register this part's ``fleetctl`` subcommands."""
    p = sub.add_parser("demo", help="the whole stack on one machine: broker, controller, 3 devices, 3 rollouts, "
                                    "a live migration to a cloud node and back",
                       description="Broker, controller and three device runtimes as real processes; pushes and "
                                   "rolls out two versions with a canary, then a broken one that is aborted and "
                                   "reverted; REST inference on every device; then a cloud node, and a device's "
                                   "calls migrated there and back under load without a failed call; a summary. "
                                   "Exit 0 when every expectation held.")
    p.add_argument("--dir", type=Path, metavar="DIR", help="work here (a new or empty directory) instead of a temp dir")
    p.add_argument("--keep", action="store_true", help="keep the directory (keys, databases, logs) afterwards")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout (progress stays on stderr)")
    p.set_defaults(fn=cmd_demo)
