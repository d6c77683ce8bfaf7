"""The demand the placement planner is fed: a workload's rate is what its source's own API
received (wherever the calls ran, never the calls an executor ran for others), reported as
``demand_rate`` and read by the controller -- which falls back to the old estimate for
agents that predate it. (The other measured input, ``service_ms`` as the time a call held
an interpreter, is tested with the engine in ``test_engine.py``.)

Real engines on real models throughout; the two ends of remote inference are wired in memory
(the executor's ``ServingNode`` answers the caller's ``RemoteCaller`` through ``on_reply``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from controller.fleet_snapshot import build_snapshot
from controller.store import Assignment, Store
from edge_runtime.agent.remote import RemoteCaller, RemoteSettings, merge_figures
from edge_runtime.agent.serving_node import ServingNode
from edge_runtime.agent.telemetry import TelemetryCollector
from edge_runtime.engine import Engine
from edge_runtime.errors import ExecutorUnreachable
from edge_runtime.protocol import messages, topics
from tests.agentkit import manifest_for
from tests.storekit import add_kws_release

DEV, NODE = "dev-1", "node-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- demand_rate: what the device's own API received --------------------------------------------


class Pair:
    """A device whose ``tiny`` is routed to an executor node, both with real engines, wired
    in memory as the daemon wires them (the node runs peers' calls on ``for_peers()``)."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, device_copy: bool) -> None:
        self.node_engine = Engine(pool_size=1)
        self.node_engine.swap("tiny", "1", path)
        self.engine = Engine(pool_size=1)
        if device_copy:
            self.engine.swap("tiny", "1", path)
        self.connected = True
        spec = messages.ModelSpec.model_validate({"version": "1", "manifest": manifest, "route": NODE})
        self.node = ServingNode(NODE, self.node_engine.for_peers(),
                                lambda topic, payload: self.caller.on_reply(payload), workers=1, queue_size=8)
        self.caller = RemoteCaller(
            DEV, self.engine, route=lambda n: NODE if n == "tiny" else "local",
            spec=lambda n: spec if n == "tiny" else None,
            publish=lambda topic, payload: self.node.offer(topic, payload), connected=lambda: self.connected,
            settings=RemoteSettings(deadline_ms=30_000))
        self.clock = Clock()
        self.device_telemetry = TelemetryCollector(
            self.engine, data_dir=path.parent, device_id=DEV, clock=self.clock,
            extra=lambda: merge_figures(self.caller.figures()), routes=lambda: {"tiny": NODE})
        self.node_telemetry = TelemetryCollector(self.node_engine, data_dir=path.parent, device_id=NODE,
                                                 clock=self.clock, extra=self.node.figures)

    def call(self, x: np.ndarray) -> str:
        """One call of the device's local API (as REST and the fast path make it)."""
        remote = self.caller.resolve("tiny")
        assert remote is not None
        return remote.predict(remote.signature.feeds({"x": x}))[2]

    def collect(self, seconds: float) -> tuple[messages.ModelFigures, messages.ModelFigures]:
        self.clock.now += seconds
        return (self.device_telemetry.collect(0).models["tiny"], self.node_telemetry.collect(0).models["tiny"])


@pytest.fixture
def tiny(model_files: dict[str, Path], zoo: dict[str, Any]) -> dict[str, Any]:
    path = model_files["tiny_v1"]
    return {"path": path, "manifest": manifest_for(path, "tiny", "1"), "x": zoo["tiny_v1"].sample_inputs()["x"]}


@pytest.fixture
def pair(tiny: dict[str, Any]) -> Iterator[Pair]:
    p = Pair(tiny["path"], tiny["manifest"], device_copy=True)
    p.node.start()
    yield p
    p.node.stop()


def test_a_routed_models_demand_stays_with_its_source_not_its_executor(pair: Pair, tiny: dict[str, Any]) -> None:
    x = tiny["x"]
    for _ in range(4):
        assert pair.call(x) == NODE  # forwarded, the node answers
    pair.connected = False
    for _ in range(2):
        assert pair.call(x) == "local"  # the node cannot be reached: the local copy answers
    for _ in range(2):
        pair.node_engine.predict("tiny", {"x": x})  # the node's own applications call it too
    device, node = pair.collect(2.0)

    # The device: 6 calls received, 4 forwarded, 2 run here -- its demand is all 6.
    assert (device.forwarded, device.fallbacks, device.route) == (4, 2, NODE)
    assert device.rate == pytest.approx(1.0)  # its engine ran the 2 fallbacks
    assert device.demand_rate == pytest.approx(3.0)
    # The node: its engine ran 6 calls, 4 of them for the device -- its own demand is 2.
    assert (node.calls, node.served_for_peers) == (6, 4)
    assert node.rate == pytest.approx(3.0)
    assert node.demand_rate == pytest.approx(1.0)

    # An interval rate, not a cumulative one: a quiet interval is 0 on both.
    device, node = pair.collect(5.0)
    assert (device.demand_rate, node.demand_rate, device.rate, node.rate) == (0.0, 0.0, 0.0, 0.0)
    assert (device.forwarded, node.served_for_peers) == (4, 4)  # the counters stay cumulative

    pair.connected = True
    for _ in range(5):
        pair.call(x)
    device, node = pair.collect(0.5)
    assert device.demand_rate == pytest.approx(10.0) and device.rate == 0.0
    assert node.demand_rate == 0.0 and node.rate == pytest.approx(10.0)


def test_demand_without_a_local_copy_counts_forward_failures(tiny: dict[str, Any]) -> None:
    """A routed model with nothing on disk is reported from the remote counters alone; calls
    the executor could not answer are demand all the same (the node is overloaded or gone,
    which is what the planner must see)."""
    pair = Pair(tiny["path"], tiny["manifest"], device_copy=False)
    pair.node.start()
    try:
        pair.call(tiny["x"])
        pair.connected = False
        for _ in range(3):
            with pytest.raises(ExecutorUnreachable):
                pair.call(tiny["x"])
        device, node = pair.collect(4.0)
    finally:
        pair.node.stop()
    assert (device.calls, device.forwarded, device.forward_failures) == (0, 1, 3)
    assert device.rate == 0.0 and device.demand_rate == pytest.approx(1.0)
    assert node.demand_rate == 0.0 and node.rate == pytest.approx(0.25)


def test_demand_counters_seen_before_the_collector_are_its_baseline(tiny: dict[str, Any], tmp_path: Path) -> None:
    engine = Engine(pool_size=1)
    engine.swap("tiny", "1", tiny["path"])
    extra = {"tiny": {"forwarded": 40, "forward_failures": 2}, "solo": {"forwarded": 7}}
    clock = Clock()
    collector = TelemetryCollector(engine, data_dir=tmp_path, device_id=DEV, clock=clock, extra=lambda: extra)
    engine.predict("tiny", {"x": tiny["x"]})
    extra = {"tiny": {"forwarded": 43, "forward_failures": 2}, "solo": {"forwarded": 9}, "new": {"forwarded": 4}}
    clock.now += 2.0
    models = collector.collect(1).models
    assert models["tiny"].demand_rate == pytest.approx((1 + 3) / 2)
    assert models["solo"].demand_rate == pytest.approx(2 / 2)
    assert models["new"].demand_rate == pytest.approx(4 / 2)  # first seen now: counted from zero
    extra = {"tiny": {"forwarded": 1}}  # a counter that went back (a fresh caller): from zero again
    clock.now += 1.0
    assert collector.collect(2).models["tiny"].demand_rate == pytest.approx(1.0)


def test_demand_rate_is_optional_on_the_wire() -> None:
    """Older agents (before spec 1.1) do not send it: their telemetry still decodes, and a
    1.0 controller reads a 1.1 agent's telemetry with the field dropped."""
    assert messages.SPEC_MINOR >= 1
    old = {"spec_version": "1.0", "seq": 1, "at": "2026-01-01T00:00:00Z", "interval_s": 10.0,
           "system": {"cpu_percent": 1.0, "memory_total_bytes": 1, "memory_available_bytes": 1},
           "models": {"kws": {"calls": 3, "rate": 0.5}}}
    import json

    fig = messages.decode("telemetry", json.dumps(old).encode()).models["kws"]
    assert fig.demand_rate is None and fig.rate == 0.5
    new = messages.Telemetry.model_validate({**old, "spec_version": messages.SPEC_VERSION,
                                             "models": {"kws": {"rate": 0.5, "demand_rate": 2.0}}})
    wire = json.loads(messages.encode(new))
    assert wire["models"]["kws"]["demand_rate"] == 2.0 and wire["spec_version"] == messages.SPEC_VERSION
    assert "demand_rate" not in json.loads(messages.encode(messages.Telemetry.model_validate(old)))["models"]["kws"]
    with pytest.raises(messages.ProtocolError):
        messages.decode("telemetry", json.dumps({**old, "models": {"kws": {"demand_rate": -1.0}}}).encode())


# -- the controller's workloads ---------------------------------------------------------------

V = "1"
T0 = 1_700_000_000.0


def _birth(store: Store, device: str, *, tier: str = "edge", online: bool = True,
           models: Optional[dict[str, str]] = None) -> None:
    store.apply_state(device, messages.DeviceState(
        online=online, boot_id="b", bd_seq=1, runtime_version="0.9",
        capabilities=messages.Capabilities(cores=2, memory_bytes=1 << 30, tier=tier),
        models={n: messages.InstalledModel(active=V, route=r) for n, r in (models or {}).items()},
    ).model_dump(mode="json"), now=T0)


def _telemetry(store: Store, device: str, seq: int, figures: dict[str, dict[str, Any]]) -> None:
    tel = messages.Telemetry(seq=seq, at="2024-01-01T00:00:00Z", boot_id="b", interval_s=1.0,
                             system=messages.SystemFigures(cpu_percent=10, memory_total_bytes=1 << 30,
                                                           memory_available_bytes=1 << 29),
                             models={m: messages.ModelFigures(version=V, **f) for m, f in figures.items()})
    # as ingest stores it: what a device did not send stays absent
    store.add_telemetry(device, tel.model_dump(mode="json", exclude_none=True), now=T0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    add_kws_release(s, V, created_at=T0)
    yield s
    s.close()


def _rates(store: Store) -> dict[str, tuple[float, str]]:
    snap = build_snapshot(store, now=T0)
    return {w.source: (w.rate, w.executor) for w in snap.workloads if w.model == "kws"}


# Three edge devices: a runs kws itself and is the executor of b; c runs its own copy.
# a's engine ran 150 calls/s: its own 100 and b's 50. b's engine is idle (it forwards).
# Figures per device: None = the device sends no demand_rate (an agent before 1.1).
_CASES = {
    "new agents: each workload is its source's demand": (
        {"a": (150.0, 100.0), "b": (0.0, 50.0), "c": (30.0, 30.0)}, {"a": 100.0, "b": 50.0, "c": 30.0}),
    "old agents: the old estimate (a routed source looks idle)": (
        {"a": (150.0, None), "b": (0.0, None), "c": (30.0, None)}, {"a": 150.0, "b": 0.0, "c": 30.0}),
    "old executor, new source: the executor minus what the source sends": (
        {"a": (150.0, None), "b": (0.0, 50.0), "c": (30.0, 30.0)}, {"a": 100.0, "b": 50.0, "c": 30.0}),
    "new executor, old source": (
        {"a": (150.0, 100.0), "b": (0.0, None), "c": (30.0, None)}, {"a": 100.0, "b": 0.0, "c": 30.0}),
}


@pytest.mark.parametrize("case", list(_CASES), ids=list(_CASES))
def test_snapshot_workload_rates(store: Store, case: str) -> None:
    reported, expected = _CASES[case]
    routes = {"a": "local", "b": "a", "c": "local"}
    for dev, route in routes.items():
        _birth(store, dev, models={"kws": route})
    store.set_assignments({d: {"kws": Assignment(d, "kws", V, route=r)} for d, r in routes.items()}, now=T0)
    for seq, (dev, (rate, demand)) in enumerate(sorted(reported.items()), 1):
        fig: dict[str, Any] = {"rate": rate, "route": routes[dev]}
        if demand is not None:
            fig["demand_rate"] = demand
        _telemetry(store, dev, seq, {"kws": fig})
    got = _rates(store)
    assert {d: r for d, (r, _) in got.items()} == pytest.approx(expected)
    assert {d: ex for d, (_, ex) in got.items()} == {"a": "a", "b": "a", "c": "c"}


def test_snapshot_keeps_a_forwarded_workloads_rate_after_the_move(store: Store) -> None:
    """The bug this fixes: once cam's kws runs on the cloud node, cam's engine is idle; its
    workload must still weigh 200 calls/s (else the planner thinks it is free and the cloud
    node's own figures carry the load with no workload to move back)."""
    _birth(store, "cam", models={"kws": "cloud"})
    _birth(store, "cloud", tier="cloud", models={"kws": "local"})
    store.set_assignments({"cam": {"kws": Assignment("cam", "kws", V, route="cloud")},
                           "cloud": {"kws": Assignment("cloud", "kws", V)}}, now=T0)
    _telemetry(store, "cam", 1, {"kws": {"rate": 0.0, "demand_rate": 200.0, "route": "cloud", "forwarded": 9000}})
    _telemetry(store, "cloud", 1, {"kws": {"rate": 200.0, "demand_rate": 0.0, "served_for_peers": 9000,
                                           "service_ms": 4.0}})
    assert _rates(store) == {"cam": (200.0, "cloud")}
    _birth(store, "cam", online=False, models={"kws": "cloud"})  # offline: its calls are not coming
    assert _rates(store) == {"cam": (0.0, "cloud")}
