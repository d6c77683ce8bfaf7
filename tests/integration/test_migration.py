"""End to end: make-before-break migration on a real ``fleetctl serve`` subprocess and the
embedded broker, with simulated devices (tests/simfleet.py) that verify the signed desired
states, fetch the model's chunks, and report each model's active version and route.

1. ``fleetctl migrate kws --source SRC --to NODE --wait --json`` (a real console process)
   for a model NODE lacks: NODE is given the model and runs it *before* SRC's route
   changes (its ``active`` event precedes SRC's route change in the controller's store),
   then SRC reports route == NODE and keeps its local copy, and the migration ends
   ``done``; the migration is listed, and ``fleetctl plan --json`` answers over the fleet.
2. a target that never runs the model (a device that never reads its desired state) runs
   into the deploy deadline: the migration reverts -- SRC's route stays local, the
   assignment the migration added on the target is removed -- and ends ``reverted`` with
   failure ``deploy_timeout``; ``--wait`` exits 1 and says so.

Not here yet: "every call during the move succeeds" with real remote inference (forwarded
calls and local fallback) comes with the runtime's remote-inference side, on real agents
(tests/fleetkit.DeviceFleet) under a load generator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.apiclient import ApiClient
from controller.store import Store
from tests.fleetkit import ControllerProcess, make_keys, push_model
from tests.helpers import wait_until
from tests.simfleet import SimFleet

NAME = "kws"
SRC, NODE, MUTE = "src-00000", "node-00000", "mute-00000"


class Rig:
    def __init__(self, broker_url: str, ctl: ControllerProcess, api: ApiClient, fleets: dict[str, SimFleet]) -> None:
        self.broker_url, self.ctl, self.api, self.fleets = broker_url, ctl, api, fleets

    def device(self, device_id: str) -> Any:
        return self.fleets[device_id.split("-")[0]].devices[device_id]

    def fleetctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", *argv, "--broker", self.broker_url,
                               "--timeout", "20"], capture_output=True, text=True, timeout=120)


@pytest.fixture
def rig(amqtt_broker: Any, tmp_path: Path, model_files: dict[str, Path]) -> Iterator[Rig]:
    keys = make_keys(tmp_path / "keys")
    root = (keys / "root.json").read_bytes()
    ctl = ControllerProcess(amqtt_broker.url, tmp_path / "ctl", keys)
    fleets = {
        "src": SimFleet(amqtt_broker.url, 1, prefix="src", telemetry_hz=1.0, initial_models={}, root_json=root),
        "node": SimFleet(amqtt_broker.url, 1, prefix="node", telemetry_hz=1.0, initial_models={}, root_json=root),
        # connected and online, but never subscribes: it never sees a desired state
        "mute": SimFleet(amqtt_broker.url, 1, prefix="mute", telemetry_hz=1.0, initial_models={}, root_json=root,
                         subscribe=False),
    }
    try:
        ctl.wait_online()
        for fleet in fleets.values():
            fleet.start()
        with ApiClient(amqtt_broker.url, timeout=20) as api:
            wait_until(lambda: {d["id"] for d in api.call("devices.list") if d["online"]} >= {SRC, NODE, MUTE},
                       timeout=30, what="every simulated device online at the controller")
            push_model(api, model_files["tiny_v1"], NAME, "1")
            row = api.call("deploy", model=NAME, version="1", to=f"device:{SRC}", soak_s=0)
            wait_until(lambda: api.call("rollouts.show", id=row["id"])["state"] == "succeeded", timeout=60,
                       interval=0.3, what=f"{NAME}@1 on {SRC}")
            yield Rig(amqtt_broker.url, ctl, api, fleets)
    finally:
        for fleet in fleets.values():
            fleet.close(graceful=False)
        ctl.__exit__(None, None, None)


def assignments(api: ApiClient, device: str) -> list[tuple[str, str, str, bool]]:
    return [(a["model"], a["version"], a["route"], a["install"]) for a in api.call("devices.show", id=device)["assignments"]]


def test_migrating_to_a_node_that_lacks_the_model_deploys_first_then_switches(rig: Rig) -> None:
    assert assignments(rig.api, NODE) == []
    assert rig.device(SRC).models[NAME].route == "local"

    done = rig.fleetctl("migrate", NAME, "--source", SRC, "--to", NODE, "--wait", "--interval", "0.2", "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert (row["state"], row["from_node"], row["to_node"], row["target_had"], row["failure"]) == (
        "done", SRC, NODE, False, None), row

    # the target runs it, the source routes there and keeps its local copy for fallback
    assert assignments(rig.api, NODE) == [(NAME, "1", "local", True)]
    assert assignments(rig.api, SRC) == [(NAME, "1", NODE, True)]
    src, node = rig.device(SRC), rig.device(NODE)
    assert node.models[NAME].active == "1" and src.models[NAME].route == NODE and src.models[NAME].active == "1"
    assert rig.api.call("devices.show", id=SRC)["device"]["reported"][NAME]["route"] == NODE

    # make before break: the target was active before the source's route changed
    store = Store.open(rig.ctl.db_url, create=False)
    try:
        active = [e for e in store.recent_events(device_id=NODE, model=NAME) if e["step"] == "active"]
        desired = store.get_desired(SRC)
        assert active and desired is not None
        assert max(e["received_at"] for e in active) <= desired.changed_at
        assert [m.state for m in store.list_migrations()] == ["done"]
    finally:
        store.close()

    listed = rig.fleetctl("migrations", "ls", "--all", "--json")
    assert listed.returncode == 0 and [m["id"] for m in json.loads(listed.stdout)] == [row["id"]]
    shown = rig.fleetctl("migrations", "show", str(row["id"]))
    assert shown.returncode == 0 and "done" in shown.stdout and f"{SRC}: {SRC} -> {NODE}" in shown.stdout
    # a second migration to where the calls already go is refused
    again = rig.fleetctl("migrate", NAME, "--source", SRC, "--to", NODE, "--json")
    assert again.returncode == 1 and "already go to" in again.stderr

    plan = rig.fleetctl("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    result = json.loads(plan.stdout)
    # simulated devices are all edge nodes: NODE's own assignment counts as a workload too
    assert result["workloads"] == 2 and result["nodes"] == 3 and isinstance(result["moves"], list)


def test_a_target_that_never_runs_the_model_reverts_at_the_deploy_deadline(rig: Rig) -> None:
    out = rig.fleetctl("migrate", NAME, "--source", SRC, "--to", MUTE, "--deploy-timeout", "3s", "--wait",
                       "--interval", "0.2", "--json")
    assert out.returncode == 1, out.stderr
    row = json.loads(out.stdout)
    assert (row["state"], row["failure"], row["target_had"]) == ("reverted", "deploy_timeout", False), row
    assert "reverted: deploy_timeout" in out.stderr
    assert assignments(rig.api, MUTE) == []  # what the migration added is gone
    assert assignments(rig.api, SRC) == [(NAME, "1", "local", True)]
    assert rig.device(SRC).models[NAME].route == "local"
    assert rig.api.call("migrations.list") == [row] or rig.api.call("migrations.list")[0]["id"] == row["id"]
