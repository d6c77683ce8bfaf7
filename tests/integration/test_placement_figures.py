"""What two real runtimes tell the placement planner, over a real broker (amqtt): a device
whose ``tiny`` is routed to a cloud node reports the calls its own API received as its
``demand_rate`` although the node runs them; the node reports them in its ``rate`` (its
engine ran them) but not in its own ``demand_rate``; and each birth carries the node's
``cores`` -- the configured value, or the CPUs the process may run on (the node is started
pinned to one CPU, as ``taskset`` would).

Rates are per interval: summed over every sample (rate x the interval it covers, from
``uptime_s``) they give back the number of calls exactly. No sleeps, no timed asserts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.api.client import FastPathClient
from edge_runtime.protocol import messages
from tests.agentkit import (
    AgentProcess, Keys, NotifyListener, Observer, desired_doc, manifest_for, serve_artifacts, write_config,
)
from tests.helpers import free_port

DEVICE, NODE = "dev-p1", "cloud-p1"


def _calls(samples: list[messages.Telemetry], model: str, field: str) -> float:
    """The calls a per-interval rate adds up to over ``samples`` (one boot, in seq order)."""
    total, uptime = 0.0, 0.0
    for t in sorted(samples, key=lambda t: t.seq):
        fig = t.models.get(model)
        assert t.uptime_s is not None
        if fig is not None:
            total += (getattr(fig, field) or 0.0) * (t.uptime_s - uptime)
        uptime = t.uptime_s
    return total


def _birth(obs: Observer) -> messages.DeviceState:
    return obs.wait_for(lambda o: next((s for s in o.states if s.online), None), 20, what="a birth")


def test_demand_stays_with_the_source_and_births_carry_cores(amqtt_broker: Any, tmp_path: Path,
                                                             model_files: dict[str, Path], zoo: dict[str, Any]) -> None:
    path = model_files["tiny_v1"]
    manifest = manifest_for(path, "tiny", "1")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with contextlib.ExitStack() as stack:
        short = Path(tempfile.mkdtemp(prefix="ef-figs-"))
        stack.callback(shutil.rmtree, short, True)
        ctl, _ = serve_artifacts(stack, amqtt_broker.url, [path], tmp_path / "blobs", client_id="ctl-figures-test")
        root = Keys().write_root(tmp_path / "root.json")
        notify = stack.enter_context(NotifyListener())
        extras = {NODE: {"tier": "cloud"}, DEVICE: {"cores": 3, "remote": {"deadline_ms": 10_000}}}
        agents, observers, sockets = {}, {}, {}
        for rid in (NODE, DEVICE):
            cfg = write_config(tmp_path / rid / "agent.toml", device_id=rid, data_dir=tmp_path / rid / "data",
                               broker_url=amqtt_broker.url, trust_root=root, rest_port=free_port(),
                               telemetry_interval_s=0.3, socket_path=short / f"{rid}.sock", extra=extras[rid])
            observers[rid] = stack.enter_context(Observer(amqtt_broker.url, rid))
            argv = None
            if rid == NODE and cpus:  # pinned to one CPU, as taskset -c would
                argv = [sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, {%d}); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'edge_runtime.cli', 'run', '--config', %r])"
                        % (cpus[0], str(cfg))]
            agents[rid] = stack.enter_context(AgentProcess(cfg, notify=notify, argv=argv))
            sockets[rid] = short / f"{rid}.sock"
        for rid in agents:
            agents[rid].wait_ready(30)
        node_obs, dev_obs = observers[NODE], observers[DEVICE]

        assert _birth(dev_obs).capabilities.cores == 3  # type: ignore[union-attr]  # configured
        assert _birth(node_obs).capabilities.cores == (1 if cpus else os.cpu_count())  # type: ignore[union-attr]

        node_obs.publish_desired(desired_doc(NODE, 1, {"tiny": ("1", manifest)}))
        node_obs.wait_for(lambda o: any(e.step == "reconciled" and e.generation == 1 for e in o.events), 60,
                          what="the node reconciled")
        dev_obs.publish_desired(desired_doc(DEVICE, 1, {"tiny": ("1", manifest)}, route=NODE))
        dev_obs.wait_for(lambda o: any(e.step == "reconciled" and e.generation == 1 for e in o.events), 60,
                         what="the device reconciled")

        x = zoo["tiny_v1"].sample_inputs()
        routed, own = 7, 4
        with FastPathClient(str(sockets[DEVICE])) as fast:
            for _ in range(routed):
                fast.predict("tiny", x)
        with FastPathClient(str(sockets[NODE])) as fast:
            for _ in range(own):
                fast.predict("tiny", x)

        def settled(o: Observer, check: Any) -> bool:
            fig = o.telemetry[-1].models.get("tiny") if o.telemetry else None
            return fig is not None and check(fig)

        dev_obs.wait_for(lambda o: settled(o, lambda f: f.forwarded + f.fallbacks == routed), 30,
                         what=f"the device's telemetry counting its {routed} calls")
        forwarded = dev_obs.telemetry[-1].models["tiny"].forwarded
        node_obs.wait_for(lambda o: settled(o, lambda f: f.served_for_peers == forwarded and f.calls >= forwarded + own),
                          30, what="the node's telemetry counting its calls")

    assert _calls(dev_obs.telemetry, "tiny", "demand_rate") == pytest.approx(routed)  # all of them, wherever they ran
    assert _calls(node_obs.telemetry, "tiny", "demand_rate") == pytest.approx(own)  # its own callers only
    assert _calls(node_obs.telemetry, "tiny", "rate") == pytest.approx(forwarded + own)  # what its engine ran
    assert any((t.models["tiny"].service_ms or 0) > 0 for t in node_obs.telemetry if "tiny" in t.models)
