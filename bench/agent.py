"""The device agent (``edge-runtime run``): cold start, idle cost, and a 5 MB transfer.

    python bench/agent.py [--json] [--quick]

1. cold start: one small model installed (through a signed desired state), the broker up;
   ``--restarts`` restarts, each timed from ``Popen`` to ``READY=1`` on the notify socket
   and to the first retained birth on the state topic. Baseline: ``python -c "import sys"``
   (the bare interpreter start), and ``python -c "import edge_runtime.agent.daemon"``.
2. idle: that agent with telemetry every 10 s, over 60 s (``--quick``: 15 s): CPU of the
   agent's process tree as a share of one core (psutil cpu_times delta / wall), RSS max and
   at the end. Baseline: the broker's CPU in the same window.
3. transfer: a ~5 MB valid TFLite model through amqtt and Mosquitto side by side. A fresh
   agent and data dir per broker, the agent's link to the broker through a counting
   ``TcpProxy``, the controller's real chunk service (``ArtifactService``) on the broker
   directly. Timed from publishing the desired state to the ``verifying`` event (the whole
   file is on disk); bytes on the wire = proxy bytes up + down in that span / artifact size.
   Baseline: the transfer library alone (``Transfer`` in this process, same chunk size and
   window, through its own proxy), no agent.

Everything runs on loopback; every process started is stopped. The last line of stdout is
one JSON object (DESIGN.md's report shape).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.artifact_service import ArtifactService, DirectoryLookup  # noqa: E402
from controller.artifacts import ArtifactServer  # noqa: E402
from edge_runtime.agent.transfer import PublishingChunkSource, Transfer  # noqa: E402
from edge_runtime.benchmark import report, target  # noqa: E402
from edge_runtime.modelgen import zoo  # noqa: E402
from edge_runtime.modelgen.writer import ModelBuilder  # noqa: E402
from edge_runtime.mqtt import MqttClient, MqttConfig  # noqa: E402
from edge_runtime.protocol import topics  # noqa: E402
from tests.agentkit import AgentProcess, Keys, NotifyListener, Observer, desired_doc, manifest_for, write_config  # noqa: E402
from tests.brokers import AmqttBroker, MosquittoBroker, mosquitto_binary  # noqa: E402
from tests.helpers import free_port, wait_until  # noqa: E402
from tests.netproxy import TcpProxy  # noqa: E402

MB = 1e6  # MB/s in decimal megabytes
KiB = 1024


def log(msg: str) -> None:
    print(f"[agent] {msg}", file=sys.stderr, flush=True)


# -- helpers ------------------------------------------------------------------------------


class TimedObserver(Observer):
    """``Observer`` that also records when each decoded state/event arrived
    (``time.monotonic()``) and what ``probe()`` read at that moment (proxy counters)."""

    def __init__(self, *args: Any, probe: Optional[Callable[[], Any]] = None, **kw: Any) -> None:
        self.probe = probe
        self.timed: dict[str, list[tuple[float, Any, Any]]] = {"state": [], "events": [], "telemetry": []}
        super().__init__(*args, **kw)

    def _on_message(self, msg: Any) -> None:
        now = time.monotonic()
        snap = self.probe() if self.probe else None
        kind = topics.parse(msg.topic).kind
        lst = self._lists.get(kind)
        before = len(lst) if lst is not None else 0
        super()._on_message(msg)
        if lst is not None and len(lst) > before and kind in self.timed:
            self.timed[kind].append((now, snap, lst[-1]))

    def first_birth(self, after: float) -> Optional[float]:
        for at, _, state in list(self.timed["state"]):
            if at > after and state.online:
                return at
        return None

    def first_event(self, step: str, model: str, after: float, pred: Callable[[Any], bool] = lambda e: True
                    ) -> Optional[tuple[float, Any, Any]]:
        for at, snap, ev in list(self.timed["events"]):
            if at > after and ev.step == step and ev.model == model and pred(ev):
                return at, snap, ev
        return None


def big_model(target_bytes: int = 5 * 2**20, seed: int = 0) -> zoo.BuiltModel:
    """A valid float32 TFLite model of about ``target_bytes``: x (1, 1024) -> FC -> y."""
    depth = 1024
    units = max(1, target_bytes // (4 * depth))
    rng = np.random.default_rng(seed)
    b = ModelBuilder(description=f"edgefleet bench big_fc {units}x{depth} seed={seed}")
    x = b.input("x", shape=(1, depth))
    w = (rng.standard_normal((units, depth)) * (2.0 / depth) ** 0.5).astype(np.float32)
    y = b.fully_connected(x, weights=w, bias=np.zeros(units, np.float32))
    b.output(y, name="y")
    return zoo.BuiltModel.from_builder(b)


def tree_cpu_s(pid: int) -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) of ``pid`` and its live descendants, plus what its reaped
    children used, keyed by (pid, create_time) so a reused pid is not mistaken."""
    out: dict[tuple[int, float], float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[(p.pid, p.create_time())] = t.user + t.system + (t.children_user + t.children_system if p is root else 0.0)
        except psutil.NoSuchProcess:
            pass
    return out


def tree_rss_mb(pid: int) -> tuple[float, float, int]:
    """(main process RSS, whole tree RSS) in MiB, and the number of processes."""
    root = psutil.Process(pid)
    main = root.memory_info().rss
    total, n = main, 1
    for c in root.children(recursive=True):
        try:
            total += c.memory_info().rss
            n += 1
        except psutil.NoSuchProcess:
            pass
    return main / 2**20, total / 2**20, n


def cpu_delta(start: dict[tuple[int, float], float], end: dict[tuple[int, float], float]) -> float:
    return sum(v - start.get(k, 0.0) for k, v in end.items())


def timed_run(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def summary(xs: list[float], digits: int = 3) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs), "all": [round(x, digits) for x in xs]}


class Setup:
    """Keys, root, models and their manifests shared by the sections."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = Keys()
        self.root = self.keys.write_root(tmp / "root.json")
        self.tiny_path = zoo.tiny_mlp(seed=0).save(tmp / "models" / "tiny.tflite")
        self.tiny_manifest = manifest_for(self.tiny_path, "kws", "1")
        self.big_path = big_model().save(tmp / "models" / "big.tflite")
        self.big_manifest = manifest_for(self.big_path, "big", "1")
        self.big_sha = self.big_manifest["sha256"]
        self.big_size = self.big_manifest["size"]
        self.blob_dir = tmp / "blobs"
        self.blob_dir.mkdir()
        shutil.copyfile(self.big_path, self.blob_dir / self.big_sha)
        shutil.copyfile(self.tiny_path, self.blob_dir / self.tiny_manifest["sha256"])

    def config(self, name: str, broker_url: str, *, chunk_size: int = 64 * KiB, window: int = 8,
               telemetry_interval_s: float = 10) -> Path:
        d = self.tmp / name
        return write_config(d / "agent.toml", device_id=name, data_dir=d / "data", broker_url=broker_url,
                            trust_root=self.root, rest_port=free_port(), telemetry_interval_s=telemetry_interval_s,
                            extra={"limits": {"chunk_size": chunk_size, "transfer_window": window}})


@contextlib.contextmanager
def chunk_service(broker_url: str, blob_dir: Path, client_id: str) -> Iterator[ArtifactService]:
    """The controller's real chunk server on the broker (directly, not through any proxy)."""
    ctl = MqttClient(MqttConfig(url=broker_url, client_id=client_id, keepalive=5,
                                reconnect_min_delay=0.1, reconnect_max_delay=1.0))
    ctl.connect(timeout=10)
    service = ArtifactService(ctl, ArtifactServer(DirectoryLookup(blob_dir)))
    try:
        service.start()
        yield service
    finally:
        service.stop()
        ctl.disconnect(timeout=5)


def model_active(name: str, version: str) -> Callable[[Observer], bool]:
    def check(o: Observer) -> bool:
        s = o.last_state
        return bool(s and s.online and name in s.models and s.models[name].active == version)
    return check


# -- 1. cold start ------------------------------------------------------------------------


def cold_start(setup: Setup, broker: AmqttBroker, notify: NotifyListener, restarts: int) -> dict[str, Any]:
    device = "bench-cold"
    cfg = setup.config(device, broker.url)
    with TimedObserver(broker.url, device) as obs, chunk_service(broker.url, setup.blob_dir, "bench-ctl-cold"):
        log("cold start: installing the small model through a desired state")
        with AgentProcess(cfg, notify=notify) as agent:
            agent.wait_ready(60)
            obs.publish_desired(desired_doc(device, 1, {"kws": ("1", setup.tiny_manifest)}))
            obs.wait_for(model_active("kws", "1"), 120, what="kws 1 active")
            first_exit = agent.terminate()
        ready, birth, stop, exits = [], [], [], []
        for i in range(restarts):
            with AgentProcess(cfg, notify=notify) as agent:
                n = agent.wait_ready(60)
                ready.append(n.at - agent.started_at)
                at = wait_until(lambda: obs.first_birth(agent.started_at), timeout=60, what="birth")
                birth.append(at - agent.started_at)
                obs.wait_for(model_active("kws", "1"), 30, what="kws 1 active after restart")
                t0 = time.monotonic()
                exits.append(agent.terminate())
                stop.append(time.monotonic() - t0)
            log(f"  restart {i + 1}/{restarts}: READY {ready[-1]:.3f}s, birth {birth[-1]:.3f}s")
    log("cold start: baselines (bare interpreter, importing the daemon module)")
    py = [timed_run([sys.executable, "-c", "import sys"]) for _ in range(max(restarts, 5))]
    imp = [timed_run([sys.executable, "-c", "import edge_runtime.agent.daemon"]) for _ in range(max(restarts, 5))]
    return {
        "models_installed": 1,
        "ready_s": summary(ready),
        "birth_s": summary(birth),
        "sigterm_to_exit_s": summary(stop),
        "exit_codes": [first_exit] + exits,
        "baseline_python_start_s": summary(py),
        "baseline_import_daemon_s": summary(imp),
        "ready_over_python_start_s": round(statistics.median(ready) - statistics.median(py), 3),
    }, cfg


# -- 2. idle ------------------------------------------------------------------------------


def idle(cfg: Path, broker: AmqttBroker, notify: NotifyListener, window_s: float) -> dict[str, Any]:
    device = "bench-cold"
    assert broker.proc is not None
    with TimedObserver(broker.url, device) as obs, AgentProcess(cfg, notify=notify) as agent:
        agent.wait_ready(60)
        obs.wait_for(model_active("kws", "1"), 60, what="kws 1 active")
        time.sleep(3.0)  # settle: start-up work (imports, first loads, outbox drain) is over
        log(f"idle: measuring {window_s:.0f}s (telemetry every 10 s)")
        n_tel0 = len(obs.telemetry)
        a0, b0, t0 = tree_cpu_s(agent.pid), tree_cpu_s(broker.proc.pid), time.monotonic()
        rss_main, rss_tree, nprocs = [], [], 0
        deadline = t0 + window_s
        while time.monotonic() < deadline:  # a measurement window, sampled once a second
            m, t, nprocs = tree_rss_mb(agent.pid)
            rss_main.append(m)
            rss_tree.append(t)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        a1, b1, t1 = tree_cpu_s(agent.pid), tree_cpu_s(broker.proc.pid), time.monotonic()
        m, t, nprocs = tree_rss_mb(agent.pid)
        rss_main.append(m)
        rss_tree.append(t)
        wall = t1 - t0
        telemetry = len(obs.telemetry) - n_tel0
        alive = agent.alive
    return {
        "window_s": round(wall, 1),
        "telemetry_interval_s": 10,
        "telemetry_messages_in_window": telemetry,
        "agent_alive": alive,
        "processes": nprocs,
        "cpu_pct_of_core": round(cpu_delta(a0, a1) / wall * 100, 3),
        "rss_mb_max": round(max(rss_tree), 1),
        "rss_mb_end": round(rss_tree[-1], 1),
        "rss_main_process_mb_max": round(max(rss_main), 1),
        "baseline_broker": "amqtt",
        "baseline_broker_cpu_pct_of_core": round(cpu_delta(b0, b1) / wall * 100, 3),
    }


# -- 3. transfer --------------------------------------------------------------------------


def raw_transfer(setup: Setup, broker_url: str, broker_port: int, chunk: int, window: int) -> dict[str, Any]:
    """The transfer library alone through the same broker (no agent): the baseline."""
    device = "bench-raw"
    with TcpProxy("127.0.0.1", broker_port) as proxy:
        dev = MqttClient(MqttConfig(url=proxy.url, client_id=device, keepalive=5))
        dev.connect(timeout=10)
        try:
            source = PublishingChunkSource(device, lambda t, p: dev.publish(t, p, qos=1, timeout=10))
            part = setup.tmp / "raw" / "big.part"
            part.parent.mkdir(parents=True, exist_ok=True)
            transfer = Transfer(part, setup.big_sha, setup.big_size, source=source, chunk_size=chunk, window=window,
                                chunk_timeout=2.0, retries=5)
            dev.add_handler(topics.chunk_inbox(device, setup.big_sha), lambda m: transfer.on_payload(m.payload))
            dev.subscribe([(topics.chunk_inbox(device, setup.big_sha), 1)], timeout=10)
            up0, down0 = proxy.bytes_up, proxy.bytes_down
            t0 = time.monotonic()
            transfer.start()

            def finished() -> bool:
                transfer.pump()
                return transfer.finished.is_set()

            wait_until(finished, timeout=300, interval=0.005, what="raw transfer")
            secs = time.monotonic() - t0
            wire = proxy.bytes_up - up0 + proxy.bytes_down - down0
        finally:
            dev.disconnect(timeout=5)
    if transfer.error is not None:
        raise RuntimeError(f"raw transfer failed: {transfer.error}")
    c = transfer.counters
    return {"seconds": round(secs, 3), "mb_per_s": round(setup.big_size / MB / secs, 2),
            "wire_ratio": round(wire / setup.big_size, 4), "requested": c.requested, "retried": c.retried}


def transfer(setup: Setup, kind: str, notify: NotifyListener, chunk: int, window: int) -> dict[str, Any]:
    broker = AmqttBroker() if kind == "amqtt" else MosquittoBroker()
    device = f"bench-xfer-{kind}"
    broker.start()
    try:
        with chunk_service(broker.url, setup.blob_dir, f"bench-ctl-{kind}") as service:
            log(f"transfer/{kind}: baseline (the transfer library alone)")
            baseline = raw_transfer(setup, broker.url, broker.port, chunk, window)
            served0 = Counter(service.served_offsets)
            with TcpProxy("127.0.0.1", broker.port) as proxy:
                cfg = setup.config(device, proxy.url, chunk_size=chunk, window=window)
                probe = lambda: (proxy.bytes_up, proxy.bytes_down)  # noqa: E731
                with TimedObserver(broker.url, device, probe=probe) as obs, AgentProcess(cfg, notify=notify) as agent:
                    agent.wait_ready(60)
                    wait_until(lambda: obs.first_birth(agent.started_at), timeout=60, what=f"{kind}: birth")
                    time.sleep(0.5)  # the outbox's start-up drain is over
                    log(f"transfer/{kind}: {setup.big_size / MB:.2f} MB through the agent")
                    doc = desired_doc(device, 1, {"big": ("1", setup.big_manifest)})
                    up0, down0, out0 = proxy.bytes_up, proxy.bytes_down, service.bytes_out
                    t0 = time.monotonic()
                    obs.publish_desired(doc)
                    verifying = obs.wait_for(lambda o: o.first_event("verifying", "big", t0), 300,
                                             what=f"{kind}: verifying")
                    out1 = service.bytes_out
                    done = obs.first_event("downloading", "big", t0, lambda e: e.progress == 1.0 and "requested" in e.figures)
                    obs.wait_for(model_active("big", "1"), 120, what=f"{kind}: big 1 active")
                    t_active = time.monotonic() - t0
                    active = obs.first_event("active", "big", t0)
                    if active is not None:
                        t_active = active[0] - t0
                    served = dict(service.served_offsets - served0)
    finally:
        broker.close()
    at, (up1, down1), _ev = verifying
    secs = at - t0
    size = setup.big_size
    figures = done[2].figures if done else {}
    wire_up, wire_down = up1 - up0, down1 - down0
    return {
        "broker": kind,
        "seconds_to_verifying": round(secs, 3),
        "seconds_to_downloaded": round(done[0] - t0, 3) if done else None,
        "seconds_to_active": round(t_active, 3),
        "mb_per_s": round(size / MB / secs, 2),
        "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down,
        "wire_ratio": round((wire_up + wire_down) / size, 4),
        "server_bytes_out_ratio": round((out1 - out0) / size, 4),
        "chunks_served": sum(served.values()),
        "chunks_served_twice": sum(1 for n in served.values() if n > 1),
        "agent_figures": {k: figures.get(k) for k in ("requested", "retried", "timeouts", "duplicates", "chunks_total")},
        "baseline_transfer_library": baseline,
    }


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON report on stdout")
    ap.add_argument("--quick", action="store_true", help="a 15 s idle window, 3 restarts (a smoke run)")
    ap.add_argument("--restarts", type=int, help="cold starts to time (default 5; --quick 3)")
    ap.add_argument("--idle-seconds", type=float, help="idle window (default 60; --quick 15)")
    ap.add_argument("--chunk-size", type=int, default=64 * KiB, help="agent chunk size (default 64 KiB)")
    ap.add_argument("--window", type=int, default=8, help="chunk requests in flight (default 8)")
    args = ap.parse_args()
    restarts = args.restarts or (3 if args.quick else 5)
    idle_s = args.idle_seconds or (15.0 if args.quick else 60.0)

    metrics: dict[str, Any] = {}
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))  # short: the API socket path stops at 108 bytes
    try:
        log("building models")
        setup = Setup(tmp)
        with NotifyListener() as notify:
            with AmqttBroker() as broker:
                metrics["cold_start"], cfg = cold_start(setup, broker, notify, restarts)
                metrics["idle"] = idle(cfg, broker, notify, idle_s)
            kinds = ["amqtt"]
            if mosquitto_binary() is None:
                notes.append("mosquitto not installed: its transfer was skipped (apt-get install mosquitto)")
            else:
                kinds.append("mosquitto")
            metrics["transfer"] = {
                "artifact_bytes": setup.big_size,
                "chunk_size": args.chunk_size,
                "window": args.window,
                **{k: transfer(setup, k, notify, args.chunk_size, args.window) for k in kinds},
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if notes:
        metrics["notes"] = notes

    cs, idl, xf = metrics["cold_start"], metrics["idle"], metrics["transfer"]
    targets = {
        "ready_s_median": target(cs["ready_s"]["median"], 1.5, "<="),
        "idle_cpu_pct_of_core": target(idl["cpu_pct_of_core"], 1.0, "<="),
        "idle_rss_mb": target(idl["rss_mb_max"], 90.0, "<="),
    }
    for k in ("amqtt", "mosquitto"):
        if k in xf:
            targets[f"transfer_wire_ratio_{k}"] = target(xf[k]["wire_ratio"], 1.05, "<=")
    out = report("agent", metrics, targets)
    if not args.json:
        for key, t in targets.items():
            print(f"{key:32s} {t['value']:>10} {t['op']} {t['limit']:<8} {'met' if t['met'] else 'NOT MET'}")
        for k in ("amqtt", "mosquitto"):
            if k in xf:
                x = xf[k]
                print(f"transfer {k:10s} {x['mb_per_s']:>7} MB/s  wire {x['wire_ratio']}x  "
                      f"(library alone: {x['baseline_transfer_library']['mb_per_s']} MB/s, "
                      f"{x['baseline_transfer_library']['wire_ratio']}x)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
