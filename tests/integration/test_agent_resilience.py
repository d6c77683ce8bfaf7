"""The real device agent (``edge-runtime run``) against failures: the "Must show" items of
issue 4 on resumable transfers, a long broker outage and SIGKILL during a reconcile.

1. A ~5 MB transfer: the broker is SIGKILLed in the middle, the agent is stopped (it
   checkpoints), restarted while the broker is still down, then the broker comes back on
   the same port. The transfer resumes from its bitmap: no chunk it held is fetched again,
   no more chunks are served than were missing plus the transfer's own retries, and the
   installed model is byte-exact and answers correctly over REST. Both brokers.
2. The broker unreachable for 30 s (a ``TcpProxy`` cut) with telemetry every second: every
   telemetry ``seq`` arrives, in order, none twice. ``make test`` runs it on ONE broker
   (Mosquitto when installed, else amqtt); ``EDGEFLEET_SLOW=1`` runs it on both.
3. SIGKILL at reconcile points: a traced run of an update tiny v1 -> v2 enumerates the
   crash points reached; then for >= 20 of them (spread over the trace, every distinct
   name the default run can afford, the install/desired ones always) a fresh copy of a
   device with v1 active runs the update with ``EDGEFLEET_CRASH_AT`` set, dies by SIGKILL,
   restarts without it and must converge: REST answers v1 or v2 (never anything else, never
   back to v1 once v2 answered), eventually v2, ``edge-runtime models --verify`` finds no
   problem, ``tmp/`` is empty. ``make test``: amqtt only; ``EDGEFLEET_SLOW=1``: every point
   of the trace, on both brokers.

Two regression tests pin bugs found on the way: a killed write of ``agent/desired.dsse`` left
its temp file for ever, and an agent whose first connect completed before ``_open_mqtt``
returned never subscribed.

Every wait is a deadline poll; the only timed wait is the outage of test 2, whose length is
the test's subject.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from controller.artifact_service import ArtifactService, DirectoryLookup
from controller.artifacts import ArtifactServer
from edge_runtime.mqtt import MqttClient, MqttConfig
from tests.agentkit import AgentProcess, Keys, NotifyListener, Observer, desired_doc, manifest_for, write_config
from tests import brokers
from tests.brokers import make_broker, mosquitto_binary
from tests.helpers import free_port, wait_until
from tests.netproxy import TcpProxy

SLOW = os.environ.get("EDGEFLEET_SLOW") == "1"
slow = pytest.mark.slow
needs_slow = pytest.mark.skipif(not SLOW, reason="soak run: set EDGEFLEET_SLOW=1")

CHUNK = 65536
WINDOW = 4
RETRIES = 5
CHUNK_TIMEOUT_S = 2.0


# -- helpers --------------------------------------------------------------------------------


def _short_dir(prefix: str) -> Path:
    """A short temp dir (the API's Unix socket path must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def predict(port: int, name: str, x: np.ndarray, timeout: float = 5.0) -> Optional[np.ndarray]:
    """The model's REST answer for ``x`` (row format), or None if it does not answer 200."""
    body = json.dumps({"instances": x.tolist()}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{name}:predict", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return np.array(json.loads(resp.read())["predictions"], np.float32)
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def close(a: Optional[np.ndarray], b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))


class SlowLookup(DirectoryLookup):
    """A ``DirectoryLookup`` that takes ``delay`` seconds per chunk request, so a transfer on
    loopback lasts long enough to be interrupted in its middle."""

    def __init__(self, directory: Path, delay: float) -> None:
        super().__init__(directory)
        self.delay = delay

    def __call__(self, sha256: str) -> Optional[Path]:
        time.sleep(self.delay)
        return super().__call__(sha256)


@contextlib.contextmanager
def artifact_service(url: str, lookup: DirectoryLookup, client_id: str) -> Iterator[ArtifactService]:
    """The real chunk service on its own MQTT client (which reconnects by itself and
    re-subscribes in its connect hook)."""
    client = MqttClient(MqttConfig(url=url, client_id=client_id, keepalive=5, reconnect_min_delay=0.1,
                                   reconnect_max_delay=0.5))
    client.connect(timeout=10)
    service = ArtifactService(client, ArtifactServer(lookup))
    service.start()
    try:
        yield service
    finally:
        service.stop()
        client.disconnect(timeout=5)


def blob_dir_with(directory: Path, *files: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        (directory / hashlib.sha256(data).hexdigest()).write_bytes(data)
    return directory


def decode_bitmap(path: Path) -> tuple[dict[str, Any], set[int]]:
    """The bitmap document and the set of chunk *offsets* it claims."""
    doc = json.loads(path.read_bytes())
    have = base64.b64decode(doc["have"])
    n_chunks = -(-doc["size"] // doc["chunk_size"])
    held = {i * doc["chunk_size"] for i in range(n_chunks) if have[i >> 3] & (1 << (i & 7))}
    return doc, held


def store_state(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "state.json").read_text())


def verify_store(data_dir: Path) -> dict[str, Any]:
    """``edge-runtime models --data-dir D --verify --json`` as a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "models", "--data-dir", str(data_dir),
                           "--verify", "--json"], capture_output=True, text=True, timeout=60)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"models --verify printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out["_rc"] = proc.returncode
    return out


# What ``durable.atomic_write_bytes`` leaves when killed before its rename, for the agent's
# desired-state file; the agent removes it at start-up (test_a_killed_desired_state_write_...).
STALE_DESIRED_TEMP = re.compile(r"^agent/\.desired\.dsse\..+\.tmp$")


def leftovers(data_dir: Path, *, known: bool = True) -> list[str]:
    """Temp files a converged device should not hold: anything in ``tmp/`` and any
    ``*.tmp`` of an interrupted atomic write (``known=False``: except the stale desired
    temp, which has its own xfail test)."""
    found = [str(p.relative_to(data_dir)) for p in (data_dir / "tmp").glob("*")] if (data_dir / "tmp").exists() else []
    found += [str(p.relative_to(data_dir)) for p in data_dir.rglob("*.tmp")]
    return sorted(f for f in set(found) if known or not STALE_DESIRED_TEMP.match(f))


def wait_for(predicate: Callable[[], Any], timeout: float, message: Callable[[], str]) -> Any:
    """``wait_until`` whose failure message is computed when it fails (the state then)."""
    try:
        return wait_until(predicate, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {message()}") from None


def connected_or_dead(agent: AgentProcess, timeout: float = 30.0) -> bool:
    """Wait until the agent's first connect ran its hook (or the agent died): False when the
    hook failed on ``self.mqtt`` still being None -- the daemon's start-up race (see
    ``test_an_early_connect_still_subscribes``): that agent never subscribes until a reconnect,
    so a test starts it again rather than wait for nothing."""
    def seen() -> Optional[str]:
        text = agent.log_text()
        if "connected to mqtt" in text:
            return "connected"
        if "assert self.mqtt is not None" in text:
            return "race"
        return None if agent.alive else "dead"

    return wait_until(seen, timeout=timeout, what="the agent's first connect") != "race"


def start_agent(cfg: Path, notify: NotifyListener, **kw: Any) -> AgentProcess:
    """``AgentProcess`` READY and connected."""
    agent = AgentProcess(cfg, notify=notify, **kw)
    agent.wait_ready(30)
    assert connected_or_dead(agent), "the agent's first connect did not subscribe (the on_connect race is back)"
    return agent


# -- 1. resume after a broker kill and an agent restart ----------------------------------------


@dataclass
class BigModel:
    path: Path
    data: bytes
    sha256: str
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> BigModel:
    """A valid ~5 MB float32 MLP: "x" (1, 64) -> FC 1024, RELU, FC 1200, RELU, FC 4, SOFTMAX."""
    from edge_runtime.modelgen.writer import ModelBuilder
    from edge_runtime.modelgen.zoo import BuiltModel

    rng = np.random.default_rng(7)

    def dense(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        w = rng.normal(0.0, math.sqrt(2.0 / n_in), size=(n_out, n_in)).astype(np.float32)
        return w, rng.normal(0.0, 0.05, size=n_out).astype(np.float32)

    b = ModelBuilder(description="edgefleet resilience big_mlp")
    x = b.input("x", shape=(1, 64))
    for n_out, n_in in ((1024, 64), (1200, 1024)):
        w, bias = dense(n_out, n_in)
        x = b.relu(b.fully_connected(x, weights=w, bias=bias))
    w, bias = dense(4, 1200)
    b.output(b.softmax(b.fully_connected(x, weights=w, bias=bias)), name="y")
    model = BuiltModel.from_builder(b)
    path = model.save(tmp_path_factory.mktemp("big") / "big.tflite")
    data = path.read_bytes()
    assert 4_500_000 < len(data) < 6_000_000, len(data)
    xin = model.sample_inputs(seed=3)["x"]
    return BigModel(path, data, hashlib.sha256(data).hexdigest(), xin, model.reference({"x": xin})["y"])


@pytest.mark.timeout(240)
def test_transfer_resumes_from_its_bitmap_after_broker_kill_and_agent_restart(broker, big_model, tmp_path,
                                                                             record_property):
    dev = "dev-resume-1"
    n_chunks = -(-len(big_model.data) // CHUNK)
    blobs = blob_dir_with(tmp_path / "blobs", big_model.path)
    data_dir = tmp_path / "data"
    keys = Keys()
    root = keys.write_root(tmp_path / "root.json")
    rest = free_port()
    cfg = write_config(tmp_path / "agent.toml", device_id=dev, data_dir=data_dir, broker_url=broker.url,
                       trust_root=root, rest_port=rest, socket_path=_short_dir("ef-res-") / "api.sock",
                       extra={"limits": {"chunk_size": CHUNK, "transfer_window": WINDOW, "chunk_retries": RETRIES,
                                         "chunk_timeout_s": CHUNK_TIMEOUT_S}})
    manifest = manifest_for(big_model.path, "big", "1")
    sha = big_model.sha256

    def served(counter: Counter[tuple[str, int]]) -> int:
        return sum(n for (s, _), n in counter.items() if s == sha)

    # 30 ms per chunk: ~2.5 s for the whole artifact, long enough to cut it in the middle
    lookup = SlowLookup(blobs, 0.03)
    with NotifyListener() as notify, artifact_service(broker.url, lookup, f"ctl-res-{os.getpid()}") as service, \
            Observer(broker.url, dev) as obs:
        with start_agent(cfg, notify) as agent:
            obs.publish_desired(desired_doc(dev, 1, {"big": ("1", manifest)}))
            wait_until(lambda: served(service.served_offsets) >= 0.3 * n_chunks, timeout=60,
                       what="30% of the artifact served")
            broker.kill()
            wait_until(lambda: "lost the broker" in agent.log_text(), timeout=20, what="the agent noticing the broker died")
            assert agent.terminate() == 0, agent.log_text()[-3000:]

        bitmaps = list((data_dir / "tmp").glob("*.part.bitmap"))
        assert len(bitmaps) == 1, f"expected one transfer bitmap, found {bitmaps}"
        doc, held = decode_bitmap(bitmaps[0])
        assert doc["sha256"] == sha and doc["size"] == len(big_model.data) and doc["chunk_size"] == CHUNK
        assert held, "the stopped transfer checkpointed no chunk"
        assert len(held) < n_chunks, "the transfer finished before the broker was killed: nothing to resume"
        assert held <= {o for (s, o) in service.served_offsets if s == sha}, "the bitmap claims chunks never served"
        before = Counter(service.served_offsets)

        with AgentProcess(cfg, notify=notify) as agent2:
            agent2.wait_ready(30)  # serves with the broker still down
            broker.start()  # same port; the service's client reconnects and re-subscribes
            wait_until(lambda: service.client.is_connected, timeout=20, what="the chunk service reconnected")
            wait_until(lambda: close(predict(rest, "big", big_model.x), big_model.y), timeout=120,
                       what="the big model answering correctly over REST")
            after = service.served_offsets - before

            refetched = sorted(o for (s, o) in after if s == sha and o in held)
            assert not refetched, f"chunks held in the bitmap were fetched again: {refetched}"
            missing = n_chunks - len(held)
            needed = {i * CHUNK for i in range(n_chunks)} - held
            got_after = {o for (s, o) in after if s == sha}
            assert got_after <= needed, f"served after the restart but not needed: {sorted(got_after - needed)}"
            # An answer queued before the broker died is re-sent by the service's MQTT client
            # once it reconnects (QoS 1), so a needed chunk may arrive without a new request:
            # every needed chunk was served at some point, none held was served again.
            assert needed <= got_after | {o for (s, o) in before if s == sha}

            # The transfer's own account rides on its final "downloading" event. With amqtt the
            # observer may miss it: a restarted amqtt forgets sessions, so an event the agent
            # publishes before the observer re-subscribed is gone. Then bound the retries by
            # what the settings allow: every chunk in flight (the window) retried at most
            # ``RETRIES`` times would already be a failing transfer.
            def final_event() -> Any:
                return next((e for e in reversed(obs.events) if e.step == "downloading" and e.model == "big"
                             and e.progress == 1.0 and "resumed_chunks" in e.figures), None)

            try:
                ev = wait_until(final_event, timeout=10, what="the final downloading event")
            except AssertionError:
                ev = None
            if ev is not None:
                assert ev.figures["resumed_chunks"] == len(held), ev.figures
                assert ev.figures["chunks_total"] == n_chunks
                retried = int(ev.figures["retried"])
            else:
                retried = WINDOW * RETRIES
            assert served(after) <= missing + retried, (served(after), missing, retried, ev and ev.figures)
            record_property("resume", f"{broker.name}: {len(held)}/{n_chunks} chunks held at the restart, "
                                      f"{served(after)} served after it, retried {retried}"
                                      f"{'' if ev is not None else ' (bound: final event not seen)'}")

            blob = data_dir / "blobs" / "sha256" / sha
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
            # the model answers once loaded; the install record and tmp/ are settled just after
            wait_for(lambda: store_state(data_dir)["models"]["big"].get("install") is None and not leftovers(data_dir),
                     20, lambda: f"the finished install left {leftovers(data_dir)}")
            assert agent2.terminate() == 0


# -- 2. thirty seconds without a broker, telemetry every second -------------------------------


_DEFAULT_KIND = "mosquitto" if mosquitto_binary() else "amqtt"
_OTHER_KIND = "amqtt" if _DEFAULT_KIND == "mosquitto" else "mosquitto"
OUTAGE_S = 30.0


@pytest.fixture
def one_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    yield from brokers._started(request.param, tmp_path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("one_broker", [_DEFAULT_KIND, pytest.param(_OTHER_KIND, marks=[slow, needs_slow])],
                         indirect=True)
def test_every_telemetry_seq_arrives_in_order_without_loss_across_a_30s_outage(one_broker, tmp_path):
    """The agent reaches the broker through a proxy that is cut for 30 s; the observer is
    connected straight to the broker. Runs on one broker in ``make test`` (Mosquitto when
    installed, else amqtt) and on both under ``EDGEFLEET_SLOW=1``."""
    dev = "dev-outage-1"
    keys = Keys()
    root = keys.write_root(tmp_path / "root.json")
    with TcpProxy("127.0.0.1", one_broker.port) as proxy, NotifyListener() as notify, \
            Observer(one_broker.url, dev) as obs:
        cfg = write_config(tmp_path / "agent.toml", device_id=dev, data_dir=tmp_path / "data", broker_url=proxy.url,
                           trust_root=root, rest_port=free_port(), telemetry_interval_s=1,
                           socket_path=_short_dir("ef-out-") / "api.sock")
        with start_agent(cfg, notify) as agent:
            obs.wait_for(lambda o: len(o.telemetry) >= 3, 30, what="3 telemetry messages before the outage")
            proxy.cut()
            cut_seq = max(t.seq for t in obs.telemetry)
            end = time.monotonic() + OUTAGE_S
            wait_until(lambda: time.monotonic() >= end, timeout=OUTAGE_S + 5, interval=0.2, what="the outage")
            assert agent.alive
            assert len([t for t in obs.telemetry if t.seq > cut_seq + 2]) == 0, "telemetry passed the cut proxy"
            proxy.restore()
            obs.wait_for(lambda o: max(t.seq for t in o.telemetry) >= cut_seq + OUTAGE_S + 3, 60,
                         what=f"telemetry past seq {cut_seq} + {OUTAGE_S:g}")
            seqs = [t.seq for t in obs.telemetry]
            assert agent.terminate() == 0
    # QoS 1 is at least once: a report the broker took but whose PUBACK the cut lost is sent
    # again after the outage (the controller stores each (device, seq) once). So a seq may
    # come twice only if it was in flight at the cut, and its second copy is that re-send.
    counts = Counter(seqs)
    dupes = sorted(s for s, n in counts.items() if n > 1)
    assert all(cut_seq - 2 <= s <= cut_seq + 2 and counts[s] == 2 for s in dupes), \
        f"telemetry seqs delivered twice that were not in flight at the cut (seq {cut_seq}): {dupes}"
    first = list(dict.fromkeys(seqs))
    assert first == sorted(first), f"telemetry out of order: {seqs}"
    gaps = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert not gaps, f"telemetry seqs lost: {gaps}"
    assert seqs[-1] - seqs[0] >= OUTAGE_S + 3


# -- 3. SIGKILL at reconcile points -----------------------------------------------------------


CRASH_DEV = "dev-crash-1"
REQUIRED = ("agent.desired.saved", "agent.desired.floor", "install.downloading", "install.staged",
            "install.loading", "install.activated")
MIN_POINTS = 20
DEFAULT_POINTS = 22  # a couple of spares: a point only some runs reach does not count


@dataclass
class CrashRig:
    kind: str
    broker: Any
    keys: Keys
    root: Path
    template: Path
    gen1: bytes
    gen2: bytes
    x: np.ndarray
    refs: dict[str, np.ndarray]
    obs: Observer
    notify: NotifyListener
    service: ArtifactService
    work: Path
    runs: int = 0
    trace: list[str] = field(default_factory=list)
    mark: int = 0


@pytest.fixture(scope="module", params=["amqtt", pytest.param("mosquitto", marks=[slow, needs_slow])])
def crash_rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, zoo: dict[str, Any],
              model_files: dict[str, Path]) -> Iterator[CrashRig]:
    """One broker, one chunk service, one observer for every point; a template data dir
    where tiny v1 is active, installed through desired generation 1."""
    kind = request.param
    if kind == "mosquitto" and mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found")
    work = tmp_path_factory.mktemp(f"crash-{kind}")
    b = make_broker(kind, workdir=work / kind)
    b.workdir.mkdir(parents=True, exist_ok=True)
    b.start()
    keys = Keys()
    root = keys.write_root(work / "root.json")
    blobs = blob_dir_with(work / "blobs", model_files["tiny_v1"], model_files["tiny_v2"])
    m1 = manifest_for(model_files["tiny_v1"], "tiny", "1")
    m2 = manifest_for(model_files["tiny_v2"], "tiny", "2")
    x = zoo["tiny_v1"].sample_inputs(seed=5)["x"]
    refs = {"1": zoo["tiny_v1"].reference({"x": x})["y"], "2": zoo["tiny_v2"].reference({"x": x})["y"]}
    assert not close(refs["1"], refs["2"])
    try:
        with NotifyListener() as notify, artifact_service(b.url, DirectoryLookup(blobs), f"ctl-crash-{kind}") as svc, \
                Observer(b.url, CRASH_DEV) as obs:
            rig = CrashRig(kind, b, keys, root, work / "template", desired_doc(CRASH_DEV, 1, {"tiny": ("1", m1)}),
                           desired_doc(CRASH_DEV, 2, {"tiny": ("2", m2)}), x, refs, obs, notify, svc, work)
            cfg, rest = rig_config(rig, rig.template, "template")
            obs.publish_desired(rig.gen1)
            with start_agent(cfg, notify) as agent:
                wait_until(lambda: close(predict(rest, "tiny", x), refs["1"]), timeout=60, what="tiny v1 active")
                wait_until(lambda: store_state(rig.template)["models"]["tiny"].get("install") is None, timeout=30,
                           what="no install in progress")
                assert agent.terminate() == 0
            shutil.rmtree(rig.template / "run", ignore_errors=True)
            yield rig
    finally:
        b.close()


def rig_config(rig: CrashRig, data_dir: Path, label: str) -> tuple[Path, int]:
    rest = free_port()
    cfg = write_config(rig.work / f"{label}.toml", device_id=CRASH_DEV, data_dir=data_dir, broker_url=rig.broker.url,
                       trust_root=rig.root, rest_port=rest, telemetry_interval_s=3600,
                       socket_path=_short_dir("ef-crash-") / "api.sock",
                       extra={"limits": {"chunk_size": 4096}})  # a few chunks: transfer points in the trace
    return cfg, rest


def answered_version(rig: CrashRig, rest: int) -> Optional[str]:
    out = predict(rest, "tiny", rig.x, timeout=3)
    if out is None:
        return None
    for version, ref in rig.refs.items():
        if close(out, ref):
            return version
    return f"unknown output {out.tolist()}"


def start_update(rig: CrashRig, label: str, env: Optional[dict[str, str]] = None, *,
                 trace: Optional[Path] = None) -> tuple[AgentProcess, Path, Path, int]:
    """A fresh copy of the template (tiny v1 active), its agent started, generation 2
    published once the agent is up on generation 1 -- online, reconciled, its event sent --
    (or has died trying). With ``trace``, ``rig.mark`` is set to the number of crash points
    reached before the publication."""
    for attempt in range(3):
        rig.runs += 1
        data = rig.work / f"{label}-data{attempt}"
        shutil.copytree(rig.template, data)
        cfg, rest = rig_config(rig, data, label)
        rig.obs.publish_desired(rig.gen1)  # the previous run left generation 2 retained
        n_states, n_events = len(rig.obs.states), len(rig.obs.events)
        agent = AgentProcess(cfg, notify=rig.notify, env_extra=env, log_path=rig.work / f"{label}.log")
        if connected_or_dead(agent):
            break
        agent.kill()
        shutil.rmtree(data, ignore_errors=True)
    else:
        raise AssertionError(f"{label}: the agent hit its on_connect race three times in a row")

    def up() -> bool:
        return (any(s.online and s.generation == 1 for s in rig.obs.states[n_states:])
                and any(e.step == "reconciled" and e.generation == 1 for e in rig.obs.events[n_events:]))

    wait_until(lambda: not agent.alive or up(), timeout=30, what=f"{label}: the agent up on generation 1")
    if trace is not None:
        wait_until(lambda: "outbox.ack.after_commit" in trace.read_text(), timeout=10, what="the startup event acked")
        rig.mark = len(trace.read_text().splitlines())
    rig.obs.publish_desired(rig.gen2)
    return agent, data, cfg, rest


@pytest.fixture(scope="module")
def crash_trace(crash_rig: CrashRig) -> CrashRig:
    """Run the update once with ``EDGEFLEET_CRASH_TRACE``: the crash points reached, in order,
    and where the update began (``mark``)."""
    rig = crash_rig
    trace = rig.work / "trace.txt"
    trace.touch()
    agent, data, _, rest = start_update(rig, "trace", {"EDGEFLEET_CRASH_TRACE": str(trace)}, trace=trace)
    with agent:
        wait_until(lambda: answered_version(rig, rest) == "2", timeout=60, what="tiny v2 active in the traced run")
        wait_until(lambda: not leftovers(data), timeout=20, what="tmp/ empty in the traced run")
        assert agent.terminate() == 0
    rig.trace = trace.read_text().splitlines()
    return rig


def choose_points(trace: list[str], mark: int, n: Optional[int]) -> list[tuple[str, int]]:
    """``(name, k)``: the k-th time ``name`` is reached (1-based, counted from the start),
    for points after ``mark``. Every REQUIRED name; then the first occurrence of every other
    name; then occurrences spread evenly over the trace; at most ``n`` (all if None)."""
    occurrences: list[tuple[int, str, int]] = []
    counts: Counter[str] = Counter()
    for i, name in enumerate(trace):
        counts[name] += 1
        if i >= mark:
            occurrences.append((i, name, counts[name]))
    chosen: dict[int, tuple[str, int]] = {}
    for name in REQUIRED + tuple(dict.fromkeys(nm for _, nm, _ in occurrences)):
        first = next(((i, nm, k) for i, nm, k in occurrences if nm == name), None)
        if first is not None:
            chosen.setdefault(first[0], (first[1], first[2]))
    limit = len(occurrences) if n is None else n
    if len(chosen) < limit:
        rest = [o for o in occurrences if o[0] not in chosen]
        want = limit - len(chosen)
        step = max(1.0, len(rest) / want) if want else 1.0
        for j in range(min(want, len(rest))):
            i, nm, k = rest[int(j * step)]
            chosen[i] = (nm, k)
    elif len(chosen) > limit:
        required = {i for i, p in chosen.items() if p[0] in REQUIRED}
        others = sorted(set(chosen) - required)
        keep = limit - len(required)
        picked = {others[int(j * len(others) / keep)] for j in range(keep)} if keep > 0 else set()
        chosen = {i: p for i, p in chosen.items() if i in required | picked}
    return [chosen[i] for i in sorted(chosen)]


def crash_and_restart(rig: CrashRig, label: str, point: str) -> tuple[Optional[list[str]], Path]:
    """Run the update with ``EDGEFLEET_CRASH_AT=point``; once SIGKILLed, restart without it
    and check convergence: tiny v2 active and answering, no install in progress, nothing in
    ``tmp/``, ``models --verify`` clean. Returns the versions REST answered after the
    restart, in order (None: the run converged without reaching ``point``), and the data dir."""
    agent, data, cfg, rest = start_update(rig, label, {"EDGEFLEET_CRASH_AT": point})
    try:
        wait_until(lambda: not agent.alive or answered_version(rig, rest) == "2", timeout=30,
                   what=f"{point}: the agent dying or converging")
        if agent.alive:  # converged without reaching the point (a timing-dependent count)
            return None, data
        assert agent.returncode == -9, f"{point}: exit {agent.returncode}, not SIGKILL:\n{agent.log_text()[-3000:]}"
    finally:
        agent.kill()  # and whatever it left in its session

    seen: list[str] = []
    with start_agent(cfg, rig.notify, log_path=rig.work / f"{label}.log") as again:

        def converged() -> bool:
            v = answered_version(rig, rest)
            if v is not None and (not seen or seen[-1] != v):
                seen.append(v)
            return v == "2"

        wait_for(converged, 60, lambda: f"{point}: tiny v2 answering after the restart (answers: {seen})\n"
                                         f"{again.log_text()[-3000:]}")
        wait_for(lambda: store_state(data)["models"]["tiny"].get("install") is None and not leftovers(data),
                 20, lambda: f"{point}: install finished, no leftovers: {leftovers(data)}; "
                             f"install {store_state(data)['models']['tiny'].get('install')}")
        report = verify_store(data)
        assert report["_rc"] == 0 and report["problems"] == [], f"{point}: models --verify: {report}"
        assert {m["name"]: m.get("active") for m in report["models"]} == {"tiny": "2"}, f"{point}: {report['models']}"
        again.kill()  # converged; this data dir is thrown away
    return seen, data


@pytest.mark.timeout(1800 if SLOW else 240)
def test_sigkill_at_reconcile_points_leaves_old_or_new_version_and_a_valid_store(crash_trace, record_property):
    rig = crash_trace
    reconcile_names = set(rig.trace[rig.mark:])
    for name in ("agent.desired.saved", "agent.desired.floor", "install.downloading", "install.staged",
                 "install.loading"):
        assert name in reconcile_names, f"{name} not reached by the update; trace: {rig.trace[rig.mark:]}"
    points = choose_points(rig.trace, rig.mark, None if SLOW else DEFAULT_POINTS)
    killed: list[str] = []
    not_reached: list[str] = []
    for n, (name, k) in enumerate(points):
        point = f"{name}:{k}"
        label = f"p{n:02d}-{name.replace('.', '_')}-{k}"
        versions, data = crash_and_restart(rig, label, point)
        if versions is None:
            not_reached.append(point)
            continue
        killed.append(point)
        assert versions in (["2"], ["1", "2"]), f"{point}: versions answered after the restart: {versions}"
        shutil.rmtree(data, ignore_errors=True)

    summary = f"{rig.kind}: {len(killed)} crash points exercised: {', '.join(killed)}"
    if not_reached:
        summary += f"; not reached in their run: {', '.join(not_reached)}"
    record_property("crash_points", summary)
    print(summary)
    assert len(killed) >= MIN_POINTS, summary


def test_a_killed_desired_state_write_leaves_no_temp_file_after_restart(crash_trace):
    """SIGKILL between the temp write and the rename of ``agent/desired.dsse``: after the
    restart and convergence, the temp file should be gone (it is not: one stale file per
    such crash, for ever)."""
    rig = crash_trace
    saved = rig.trace.index("agent.desired.saved", rig.mark)
    k = rig.trace[:saved].count("atomic_write.before_rename")  # the desired file's own write
    assert rig.trace[saved - 2] == "atomic_write.before_rename"
    versions, data = crash_and_restart(rig, "desired-temp", f"atomic_write.before_rename:{k}")
    assert versions is not None, "the point was not reached"
    assert not leftovers(data), f"stale temp files after convergence: {leftovers(data)}"


# Runs the agent with ``MqttClient.start`` returning only once the first connect's hooks ran:
# a broker that answers before ``Agent._open_mqtt`` returns, made certain.
_EARLY_CONNECT = """
import sys, time
import edge_runtime.mqtt as m
_start = m.MqttClient.start
def start(self):
    _start(self)
    self.wait_connected(10)
    time.sleep(0.5)  # the connect hooks run on the dispatcher thread
m.MqttClient.start = start
from edge_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_early_connect_still_subscribes(amqtt_broker, model_files, zoo, tmp_path):
    dev = "dev-early-1"
    root = Keys().write_root(tmp_path / "root.json")
    rest = free_port()
    cfg = write_config(tmp_path / "agent.toml", device_id=dev, data_dir=tmp_path / "data", broker_url=amqtt_broker.url,
                       trust_root=root, rest_port=rest, socket_path=_short_dir("ef-early-") / "api.sock")
    blobs = blob_dir_with(tmp_path / "blobs", model_files["tiny_v1"])
    x = zoo["tiny_v1"].sample_inputs(seed=5)["x"]
    ref = zoo["tiny_v1"].reference({"x": x})["y"]
    argv = [sys.executable, "-c", _EARLY_CONNECT, "run", "--config", str(cfg)]
    with NotifyListener() as notify, artifact_service(amqtt_broker.url, DirectoryLookup(blobs), "ctl-early"), \
            Observer(amqtt_broker.url, dev) as obs, AgentProcess(cfg, notify=notify, argv=argv) as agent:
        agent.wait_ready(30)
        assert connected_or_dead(agent), f"the first connect's hook failed:\n{agent.log_text()[-2000:]}"
        obs.publish_desired(desired_doc(dev, 1, {"tiny": ("1", manifest_for(model_files["tiny_v1"], "tiny", "1"))}))
        wait_until(lambda: close(predict(rest, "tiny", x), ref), timeout=30, what="tiny v1 answering")
