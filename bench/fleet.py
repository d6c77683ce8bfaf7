"""The controller at fleet scale: telemetry ingest, a rollout, database growth.

    python bench/fleet.py [--json] [--quick]

Simulated devices (``tests/simfleet.py``: one real MQTT connection each, the real
protocol, no interpreter) against ``fleetctl serve`` (a subprocess, SQLite database).

1. ingest on the embedded broker (``fleetctl broker --allow-anonymous``: amqtt with the
   fleet's FleetBroker) and on Mosquitto side by side: 1,000 devices at 1 Hz for 60 s
   (``--quick``: 100 devices, 15 s); then 10,000 devices at 0.1 Hz on Mosquitto
   (``--quick``: 1,000, 30 s). Sent = telemetry PUBACKed by the broker; stored = rows in
   the ``telemetry`` table (read-only sqlite3) once the controller has caught up; loss =
   1 - stored/acked. CPU as cores (psutil cpu_times delta / wall) of the controller, the
   broker and the baseline over the publishing window; controller RSS at the end.
   Baseline in the same run: a plain subscriber process (``python -m tests.simfleet
   subscribe``: one connection on ``fleet/v1/dev/+/telemetry``, decoding and counting) on
   the same broker under the same load; ``rate_vs_raw_subscriber`` = controller rate /
   subscriber rate (rates = samples / (last - first arrival)).
2. rollout: 200 simulated devices (``--quick``: 50) that verify desired states against the
   key directory's root.json (deploy-key signature, target, generation floor); a ~1 MB
   TFLite model pushed through the console API and deployed to all in waves (10 % canary,
   then 100 %, 2 s soak). Timed from the deploy call to the last device publishing its
   ``active`` event (``rollout_s``), and to the rollout's final state; a rollout that
   aborts before every device is active does not meet the target. CPU as cores of the
   controller, the broker and this process (the simulated devices) from the deploy on.
   ``--rollout-broker mosquitto`` runs it on Mosquitto instead of the embedded broker,
   which isolates the broker's share.
3. database bytes per device-day: growth of the SQLite database (pages in use) during ingest per
   stored sample, times the samples one device sends in a day at that rate.

Every process started is stopped. The last line of stdout is one JSON object (DESIGN.md's
report shape).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.benchmark import report, target  # noqa: E402
from tests.brokers import MosquittoBroker, _Broker, mosquitto_binary  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.simfleet import SimFleet  # noqa: E402

DAY = 86_400


def log(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


def needs_controller() -> None:
    """Raise a clear error when ``fleetctl serve`` or the console API is not there."""
    try:
        from controller.apiclient import ApiClient  # noqa: F401
        from tests.fleetkit import ControllerProcess  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"bench/fleet.py needs fleetctl serve and controller.apiclient: {exc}") from exc
    probe = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"bench/fleet.py needs fleetctl serve: `fleetctl serve --help` failed:\n{probe.stderr[-2000:]}")


class EmbeddedBroker(_Broker):
    """``fleetctl broker --allow-anonymous`` (amqtt + the fleet's FleetBroker, retained
    messages persisted in its work dir) as a subprocess on a free port."""

    name = "embedded"
    stop_signal = signal.SIGTERM

    def write_config(self) -> None:
        pass

    def command(self) -> list[str]:
        return [sys.executable, "-m", "controller.cli", "broker", "--bind", f"{self.host}:{self.port}",
                "--allow-anonymous", "--data", str(self.workdir)]


def cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def rss_mb(pid: int) -> Optional[float]:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.NoSuchProcess:
        return None


def db_bytes(path: Path) -> int:
    """The database's logical size: pages in use (the WAL's committed frames included,
    free pages not), so a WAL that has not been checkpointed yet is not counted twice."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)
    finally:
        con.close()


def db_query(path: Path, sql: str) -> Any:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchone()
    finally:
        con.close()


class Subscriber:
    """The baseline: ``python -m tests.simfleet subscribe`` counting telemetry."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.simfleet", "subscribe", "--broker", url],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.strip().startswith('{"ready"'):
            self.proc.kill()
            raise RuntimeError(f"the raw subscriber did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate("", timeout=60)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def ingest(kind: str, n: int, hz: float, window: float, tmp: Path, keys: Path) -> dict[str, Any]:
    from tests.fleetkit import ControllerProcess

    label = f"{kind} {n}x{hz:g}Hz"
    broker: _Broker = EmbeddedBroker() if kind == "embedded" else MosquittoBroker()
    broker.start()
    assert broker.proc is not None
    work = tmp / f"ingest-{kind}-{n}"
    ctl = ControllerProcess(broker.url, work, keys, instance=f"bench-{kind}", tick="1")
    sub: Optional[Subscriber] = None
    fleet: Optional[SimFleet] = None
    try:
        ctl.wait_online(60)
        db = ctl.data / "controller.db"
        sub = Subscriber(broker.url)
        log(f"ingest {label}: connecting {n} simulated devices")
        fleet = SimFleet(broker.url, n, prefix=f"{kind[:3]}{n}", telemetry_hz=hz, timeout=60)
        fleet.start(telemetry=False)
        wait_until(lambda: db_query(db, "SELECT count(*) FROM devices WHERE online")[0] >= n, timeout=120,
                   interval=0.5, what=f"{label}: every birth stored")
        time.sleep(2.0)  # settle: the births' work is done
        size0 = db_bytes(db)
        c0, b0, s0, t0 = cpu_s(ctl.proc.pid), cpu_s(broker.proc.pid), cpu_s(sub.pid), time.monotonic()
        log(f"ingest {label}: publishing for {window:.0f}s")
        fleet.start_telemetry()
        time.sleep(window)
        fleet.stop_telemetry()
        c1, b1, s1, t1 = cpu_s(ctl.proc.pid), cpu_s(broker.proc.pid), cpu_s(sub.pid), time.monotonic()
        wall = t1 - t0
        all_acked = fleet.wait_acked(60)
        acked = fleet.acked
        log(f"ingest {label}: {fleet.sent} sent, {acked} acked; waiting for the database")
        last = [-1, time.monotonic()]

        def caught_up() -> bool:
            rows = db_query(db, "SELECT count(*) FROM telemetry")[0]
            if rows != last[0]:
                last[:] = [rows, time.monotonic()]
            return rows >= acked or time.monotonic() - last[1] > 15  # or no progress for 15 s

        wait_until(caught_up, timeout=600, interval=0.5, what=f"{label}: the database to catch up")
        catch_up = time.monotonic() - t1
        stored, first, lastrx = db_query(db, "SELECT count(*), min(received_at), max(received_at) FROM telemetry")
        ctl_rss = rss_mb(ctl.proc.pid)
        size1 = db_bytes(db)
        raw = sub.finish()
        stats = fleet.stats()
    finally:
        if fleet is not None:
            fleet.close(graceful=False)
        if sub is not None:
            sub.kill()
        ctl.__exit__(None, None, None)
        broker.close()
    raw_rate = raw["unique"] / (raw["last_at"] - raw["first_at"]) if raw.get("first_at") and raw["last_at"] > raw["first_at"] else None
    ctl_rate = stored / (lastrx - first) if stored and lastrx > first else None
    loss = 1 - stored / acked if acked else None
    per_sample = (size1 - size0) / stored if stored else None
    out = {
        "broker": kind, "devices": n, "hz": hz, "window_s": round(wall, 1),
        "sent": stats["published"], "acked": acked, "all_acked": all_acked, "stored": stored,
        "loss": round(loss, 6) if loss is not None else None,
        "catch_up_s": round(catch_up, 1),
        "controller_rate_msg_s": round(ctl_rate, 1) if ctl_rate else None,
        "controller_cores": round((c1 - c0) / wall, 3),
        "controller_rss_mb": ctl_rss,
        "broker_cores": round((b1 - b0) / wall, 3),
        "connect_s": stats["connect_seconds"], "connect_failures": stats["connect_failures"],
        "disconnects": stats["disconnects"],
        "baseline_raw_subscriber": {"unique": raw["unique"], "duplicates": raw["duplicates"],
                                    "rate_msg_s": round(raw_rate, 1) if raw_rate else None,
                                    "cores": round((s1 - s0) / wall, 3)},
        "rate_vs_raw_subscriber": round(ctl_rate / raw_rate, 3) if ctl_rate and raw_rate else None,
        "db_bytes_per_sample": round(per_sample, 1) if per_sample else None,
        "db_bytes_per_device_day": int(per_sample * hz * DAY) if per_sample else None,
    }
    log(f"ingest {label}: stored {stored}/{acked} (loss {out['loss']}), controller {out['controller_rate_msg_s']} msg/s "
        f"on {out['controller_cores']} cores, raw subscriber {out['baseline_raw_subscriber']['rate_msg_s']} msg/s")
    return out


def one_mb_model(path: Path) -> Path:
    """A valid float32 TFLite model of about 1 MB: x (1, 256) -> FC(1024) -> y."""
    from edge_runtime.modelgen import zoo
    from edge_runtime.modelgen.writer import ModelBuilder

    depth, units = 256, 1024  # 1 MiB of weights
    rng = np.random.default_rng(0)
    b = ModelBuilder(description="edgefleet bench fleet 1MB fc")
    x = b.input("x", shape=(1, depth))
    w = (rng.standard_normal((units, depth)) * (2.0 / depth) ** 0.5).astype(np.float32)
    y = b.fully_connected(x, weights=w, bias=np.zeros(units, np.float32))
    b.output(y, name="y")
    return zoo.BuiltModel.from_builder(b).save(path)


def rollout(n: int, tmp: Path, keys: Path, kind: str = "embedded") -> dict[str, Any]:
    from controller.apiclient import ApiClient
    from tests.fleetkit import ControllerProcess, push_model

    model = one_mb_model(tmp / "models" / "big.tflite")
    size = model.stat().st_size
    broker: _Broker = EmbeddedBroker() if kind == "embedded" else MosquittoBroker()
    broker.start()
    assert broker.proc is not None
    ctl = ControllerProcess(broker.url, tmp / "rollout", keys, instance="bench-rollout", tick="0.5")
    fleet: Optional[SimFleet] = None
    try:
        ctl.wait_online(60)
        log(f"rollout: {n} simulated devices (verifying signatures), a {size / 1e6:.2f} MB model, {kind} broker")
        fleet = SimFleet(broker.url, n, prefix="roll", telemetry_hz=0.2, root_json=(keys / "root.json").read_bytes(),
                         timeout=60)
        fleet.start()
        with ApiClient(broker.url, timeout=60) as api:
            wait_until(lambda: sum(1 for d in api.call("devices.list") if d["online"]) >= n, timeout=120,
                       interval=0.5, what="every simulated device online at the controller")
            push_model(api, model, "big", "1")
            t0 = time.time()
            c0, b0, s0 = cpu_s(ctl.proc.pid), cpu_s(broker.proc.pid), cpu_s(os.getpid())
            row = api.call("deploy", model="big", version="1", to="all", canary_pct=10.0, waves=[100.0], soak_s=2.0,
                           max_error_rate_pct=None, max_latency_regression_pct=None)
            state: dict[str, Any] = {}

            def finished() -> bool:  # every device active, or the rollout gave up
                if fleet.active_count("big", "1") >= n:
                    return True
                state.update(api.call("rollouts.show", id=row["id"]))
                return state["state"] in ("succeeded", "aborted")

            wait_until(finished, timeout=600, interval=0.5, what=f"big 1 active on {n} devices or the rollout ended")
            times = [t for d in fleet.devices.values() for k, t in d.stats.active_at.items() if k == "big@1"]
            active = fleet.active_count("big", "1")
            active_s = (max(times) if active >= n else time.time()) - t0
            wall = time.time() - t0
            cores = {"controller": round((cpu_s(ctl.proc.pid) - c0) / wall, 3),
                     "broker": round((cpu_s(broker.proc.pid) - b0) / wall, 3),
                     "simulated_devices": round((cpu_s(os.getpid()) - s0) / wall, 3)}
            final = wait_until(lambda: (lambda r: r if r["state"] in ("succeeded", "aborted") else None)(
                api.call("rollouts.show", id=row["id"])), timeout=300, interval=0.5, what="the rollout to finish")
            done_s = time.time() - t0
        stats = fleet.stats()
    finally:
        if fleet is not None:
            fleet.close(graceful=False)
        ctl.__exit__(None, None, None)
        broker.close()
    out = {
        "broker": kind, "devices": n, "artifact_bytes": size, "waves": "10% canary, 100%, 2 s soak",
        "signatures_verified": True,
        "all_active": active >= n, "active_at_end": active,
        "rollout_s": round(active_s, 2), "rollout_state": final["state"], "to_final_state_s": round(done_s, 2),
        "bytes_fetched": stats["bytes_fetched"], "wire_ratio": round(stats["bytes_fetched"] / (size * n), 4),
        "chunk_retries": stats["chunk_retries"], "transfer_failures": stats["transfer_failures"],
        "aggregate_mb_s": round(stats["bytes_fetched"] / 1e6 / active_s, 2),
        "cores": cores,
    }
    log(f"rollout: {active}/{n} devices active after {out['rollout_s']} s, rollout {final['state']} "
        f"after {out['to_final_state_s']} s ({out['transfer_failures']} transfer failures)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON report on stdout")
    ap.add_argument("--quick", action="store_true", help="100 devices for 15 s, 1,000 at 0.1 Hz, a 50-device rollout")
    ap.add_argument("--skip", action="append", default=[], choices=["embedded", "mosquitto", "big", "rollout"],
                    help="leave a section out (repeatable)")
    ap.add_argument("--rollout-broker", choices=["embedded", "mosquitto"], default="embedded",
                    help="the broker of the rollout section (default: embedded; mosquitto isolates the broker's share)")
    args = ap.parse_args()
    q = args.quick
    n1, window = (100, 15.0) if q else (1000, 60.0)
    n_big, window_big = (1000, 30.0) if q else (10_000, 60.0)
    n_roll = 50 if q else 200
    needs_controller()
    from tests.fleetkit import make_keys

    metrics: dict[str, Any] = {"quick": q}
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        keys = make_keys(tmp / "keys")
        ing: dict[str, Any] = {}
        if "embedded" not in args.skip:
            ing[f"embedded_{n1}x1hz"] = ingest("embedded", n1, 1.0, window, tmp, keys)
        if mosquitto_binary() is None:
            notes.append("mosquitto not installed: its sections were skipped (apt-get install mosquitto)")
        else:
            if "mosquitto" not in args.skip:
                ing[f"mosquitto_{n1}x1hz"] = ingest("mosquitto", n1, 1.0, window, tmp, keys)
            if "big" not in args.skip:
                ing[f"mosquitto_{n_big}x0.1hz"] = ingest("mosquitto", n_big, 0.1, window_big, tmp, keys)
        metrics["ingest"] = ing
        if "rollout" not in args.skip:
            if args.rollout_broker == "mosquitto" and mosquitto_binary() is None:
                raise SystemExit("--rollout-broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
            metrics["rollout"] = rollout(n_roll, tmp, keys, args.rollout_broker)
        per_day = [v["db_bytes_per_device_day"] for v in ing.values() if v.get("db_bytes_per_device_day")]
        per_sample = [v["db_bytes_per_sample"] for v in ing.values() if v.get("db_bytes_per_sample")]
        if per_sample:
            metrics["db"] = {"bytes_per_sample_median": float(np.median(per_sample)),
                             "bytes_per_device_day_at_1hz": int(np.median(per_sample) * DAY),
                             "bytes_per_device_day_at_0.1hz": int(np.median(per_sample) * DAY / 10),
                             "per_section": per_day}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if notes:
        metrics["notes"] = notes

    targets: dict[str, Any] = {}
    ing = metrics.get("ingest", {})
    if (e := ing.get(f"embedded_{n1}x1hz")) is not None:
        targets[f"ingest_loss_amqtt_{n1}x1hz"] = target(e["loss"] if e["loss"] is not None else 1.0, 0, "<=")
        targets["controller_cores_amqtt"] = target(e["controller_cores"], 1.0, "<=")
    if (m := ing.get(f"mosquitto_{n_big}x0.1hz")) is not None:
        targets[f"ingest_loss_mosquitto_{n_big}x0.1hz"] = target(m["loss"] if m["loss"] is not None else 1.0, 0, "<=")
    if (r := metrics.get("rollout")) is not None:
        # a rollout that did not reach every device has not met the target, whatever the time
        targets[f"rollout_{n_roll}_s"] = target(r["rollout_s"], 60, "<=")
        if not r["all_active"]:
            targets[f"rollout_{n_roll}_s"]["met"] = False
    out = report("fleet", metrics, targets)
    if not args.json:
        for key, t in targets.items():
            print(f"{key:40s} {t['value']!s:>10} {t['op']} {t['limit']!s:<8} {'met' if t['met'] else 'NOT MET'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
