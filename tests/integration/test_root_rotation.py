"""Key rotation without re-provisioning, end to end: ``fleetctl serve`` and real device
agents (subprocesses) on a real broker, and the real ``fleetctl keys rotate``.

1. A running controller and device: ``keys rotate --replace deploy`` while both run; the
   device receives root v2 over ``fleet/v1/trust/root/2`` and persists it, the controller
   stores its ``root_rotated`` event, and a deploy made after the rotation -- signed only by
   the new deploy key, the old one retired -- is accepted and served. Nothing restarts.
2. A device offline during two rotations walks v2 then v3 when it returns, and takes the
   next deploy like the device that stayed online.
3. A real agent fed roots straight from the test: a bad v2 is refused (a ``rejected`` event,
   nothing changes), a v3 ahead of v2 waits, the good v2 brings v2 then v3, and the desired
   state refused for an unknown key before is accepted after the rotation on its own.
4. The broker ACLs on amqtt and Mosquitto: a device reads the retained roots and cannot
   publish one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controller.apiclient import ApiClient
from tests import trustkit
from tests.agentkit import AgentProcess, Keys, NotifyListener, Observer, desired_doc, write_config
from tests.fleetkit import ControllerProcess, DeviceFleet, make_keys, push_model
from tests.helpers import free_port, wait_until
from tests.integration.test_broker_acl import Fleet, f, fleet, observer  # noqa: F401 - the broker fixtures
from edge_runtime.protocol import topics

NAME = "kws"
FINAL = ("succeeded", "aborted")


def rotate(keys: Path, *args: str) -> dict[str, Any]:
    """``fleetctl keys rotate --dir KEYS ARGS --json`` as a subprocess (the real CLI)."""
    out = subprocess.run([sys.executable, "-m", "controller.cli", "keys", "rotate", "--dir", str(keys), *args, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def trusted_version(fleet: DeviceFleet, device: str) -> int:
    """The root version in the device's persisted trust state (0 before it exists)."""
    path = fleet.base / device / "data" / "trust" / "state.json"
    try:
        return int(json.loads(path.read_bytes())["floors"]["root_version"])
    except (OSError, ValueError, KeyError):
        return 0


def events(api: ApiClient, device: str, step: str) -> list[dict[str, Any]]:
    return [e for e in api.call("devices.show", id=device)["events"] if e["step"] == step]


def served_version(fleet: DeviceFleet, device: str) -> Any:
    with urllib.request.urlopen(f"{fleet.rest_url(device)}/v1/models/{NAME}", timeout=10) as r:
        status = json.loads(r.read())
    return next((v["version"] for v in status.get("model_version_status", []) if v.get("state") == "AVAILABLE"), None)


def deploy(api: ApiClient, version: str) -> dict[str, Any]:
    row = api.call("deploy", model=NAME, version=version, to="all", soak_s=0.5)
    return wait_until(lambda: (lambda r: r if r["state"] in FINAL else None)(api.call("rollouts.show", id=row["id"])),
                      timeout=120, interval=0.3, what=f"rollout {row['id']} to finish")


def deploy_keyids(keys: Path) -> set[str]:
    from controller.keys import KeyDir

    return set(KeyDir(keys).root().roles["deploy"].keyids)


@pytest.fixture
def rig(amqtt_broker: Any, tmp_path: Path, request: Any):
    devices = request.param
    keys = make_keys(tmp_path / "keys")
    ctl = ControllerProcess(amqtt_broker.url, tmp_path / "ctl", keys)
    devs = DeviceFleet(amqtt_broker.url, tmp_path / "devs", keys, devices)
    try:
        ctl.wait_online()
        devs.wait_ready()
        with ApiClient(amqtt_broker.url, timeout=20) as api:
            wait_until(lambda: {d["id"] for d in api.call("devices.list") if d["online"]} >= set(devices),
                       timeout=30, what="every device online at the controller")
            yield keys, ctl, devs, api
    finally:
        devs.close()
        ctl.__exit__(None, None, None)


@pytest.mark.parametrize("rig", [["rot-a"]], indirect=True)
def test_a_rotated_deploy_key_reaches_a_running_device_and_signs_the_next_deploy(rig, model_files):
    keys, ctl, devs, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, model_files["tiny_v2"], NAME, "2")
    assert deploy(api, "1")["state"] == "succeeded"
    assert trusted_version(devs, "rot-a") == 1
    ctl_pid, dev_pid = ctl.proc.pid, devs.agents["rot-a"].pid
    old_deploy = deploy_keyids(keys)

    assert rotate(keys, "--replace", "deploy")["version"] == 2
    new_deploy = deploy_keyids(keys)
    assert new_deploy and not new_deploy & old_deploy  # the old deploy key left the role
    wait_until(lambda: trusted_version(devs, "rot-a") == 2, timeout=30, what="rot-a to persist root v2")
    rotated = wait_until(lambda: events(api, "rot-a", "root_rotated"), timeout=30,
                         what="the root_rotated event stored in the controller")
    assert rotated[0]["figures"] == {"from_version": 1, "to_version": 2}
    assert "root of trust v1 -> v2" in ctl.log_text()

    row = deploy(api, "2")
    assert row["state"] == "succeeded", row
    assert served_version(devs, "rot-a") == "2"
    # The document the device holds is signed only by the new deploy key.
    envelope = json.loads((devs.base / "rot-a" / "data" / "agent" / "desired.dsse").read_bytes())
    assert {s["keyid"] for s in envelope["signatures"]} == new_deploy
    assert not events(api, "rot-a", "rejected")
    # Neither process restarted.
    assert ctl.alive and ctl.proc.pid == ctl_pid
    assert devs.agents["rot-a"].alive and devs.agents["rot-a"].pid == dev_pid


@pytest.mark.parametrize("rig", [["rot-on", "rot-off"]], indirect=True)
def test_a_device_offline_during_two_rotations_walks_the_chain_when_it_returns(rig, model_files):
    keys, ctl, devs, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, model_files["tiny_v2"], NAME, "2")
    assert deploy(api, "1")["state"] == "succeeded"
    devs.stop("rot-off")
    wait_until(lambda: not next(d for d in api.call("devices.list") if d["id"] == "rot-off")["online"],
               timeout=30, what="rot-off offline at the controller")

    assert rotate(keys, "--replace", "deploy")["version"] == 2
    wait_until(lambda: trusted_version(devs, "rot-on") == 2, timeout=30, what="rot-on at root v2")
    assert rotate(keys, "--replace", "deploy")["version"] == 3
    wait_until(lambda: trusted_version(devs, "rot-on") == 3, timeout=30, what="rot-on at root v3")
    assert trusted_version(devs, "rot-off") == 1

    devs.start("rot-off").wait_ready()
    wait_until(lambda: trusted_version(devs, "rot-off") == 3, timeout=60, what="rot-off to walk to root v3")
    steps = wait_until(lambda: (lambda e: e if len(e) >= 2 else None)(events(api, "rot-off", "root_rotated")),
                       timeout=30, what="rot-off's two root_rotated events")
    assert sorted((e["figures"]["from_version"], e["figures"]["to_version"]) for e in steps) == [(1, 2), (2, 3)]

    row = deploy(api, "2")
    assert row["state"] == "succeeded", row
    for d in ("rot-on", "rot-off"):
        assert served_version(devs, d) == "2"
        assert not events(api, d, "rejected"), events(api, d, "rejected")


# -- a real agent, roots from the test -------------------------------------------------------


def test_a_real_agent_orders_the_roots_refuses_a_bad_one_and_rechecks_the_refused_document(amqtt_broker: Any,
                                                                                             tmp_path: Path) -> None:
    v1 = Keys()  # trustkit's keys: root1-3 (2 of 3), deploy1/deploy2, command1

    def root(version: int) -> bytes:
        body = trustkit.root_body(version, deploy=(f"deploy{version + 1}",), issued_at=v1.issued_at,
                                  expires=v1.expires)
        return trustkit.sign("root", body, ["root1", "root2"])

    def bad_signature(data: bytes) -> bytes:
        def flip(o: dict[str, Any]) -> None:
            sig = o["signatures"][0]["sig"]
            o["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]

        return trustkit.edit(data, flip)

    device, data_dir = "rot-agent", tmp_path / "data"
    config = write_config(tmp_path / "agent.toml", device_id=device, data_dir=data_dir, broker_url=amqtt_broker.url,
                          trust_root=v1.write_root(tmp_path / "root.json"), rest_port=free_port(),
                          telemetry_interval_s=60, socket_path=Path("/tmp") / f"ef-rot-{free_port()}.sock")
    state_file = data_dir / "trust" / "state.json"

    def version() -> int:
        return trustkit.floors_of(state_file).root_version

    with NotifyListener() as notify, Observer(amqtt_broker.url, device) as obs, \
            AgentProcess(config, notify=notify) as agent:
        agent.wait_ready(30)
        obs.wait_for(lambda o: any(st.online for st in o.states), 20, what="the birth")

        def steps(step: str) -> list[Any]:
            return [e for e in obs.events if e.step == step]

        # a desired state signed by deploy4, which only root v3 names: refused for now
        obs.publish_desired(desired_doc(device, 5, {}, signers=("deploy4",)))
        obs.wait_for(lambda o: [e for e in steps("rejected") if e.reason == "unknown_key"], 20,
                     what="the desired state refused (unknown_key)")
        publish = obs.client.publish
        publish(topics.trust_root(2), bad_signature(root(2)), qos=1, retain=True)
        bad = obs.wait_for(lambda o: [e for e in steps("rejected") if e.figures.get("kind") == "root"], 20,
                           what="the bad root refused")
        assert bad[0].reason == "bad_signature"
        before = state_file.read_bytes()
        publish(topics.trust_root(3), root(3), qos=1, retain=True)  # ahead of v2: held
        assert version() == 1 and state_file.read_bytes() == before and not steps("root_rotated")
        publish(topics.trust_root(2), root(2), qos=1, retain=True)
        rotated = obs.wait_for(lambda o: (lambda r: r if len(r) >= 2 else None)(steps("root_rotated")), 20,
                               what="two root_rotated events")
        assert [(e.figures["from_version"], e.figures["to_version"]) for e in rotated] == [(1, 2), (2, 3)]
        assert version() == 3
        # the refused desired state was checked again after the rotation, without a re-publish
        obs.wait_for(lambda o: [e for e in steps("reconciled") if e.generation == 5], 20,
                     what="generation 5 reconciled")

        # restarted: still v3, and the retained chain on the broker is only re-delivered (no events)
        n = len(obs.events)
        agent.terminate()
        again = AgentProcess(config, notify=notify)
        with again:
            again.wait_ready(30)
            obs.wait_for(lambda o: len([s for s in o.states if s.online]) >= 2, 20, what="the second birth")
            assert version() == 3
            marker = desired_doc(device, 6, {}, signers=("deploy4",))
            obs.publish_desired(marker)
            obs.wait_for(lambda o: [e for e in o.events[n:] if e.step == "reconciled" and e.generation == 6], 20,
                         what="generation 6 reconciled after the restart")
            assert not [e for e in obs.events[n:] if e.step in ("root_rotated", "rejected")]


# -- the broker ACLs --------------------------------------------------------------------------


def test_devices_read_the_retained_roots_and_cannot_publish_one(f: Fleet) -> None:  # noqa: F811
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    good = f.unique("root-v2")
    ctl.publish(topics.trust_root(2), good, retain=True)
    obs = observer(f)
    obs.wait_for(topics.trust_root(2), good)  # retained: the controller's publish is in

    dev = f.client("dev-1")
    assert dev.subscribe(topics.TRUST_ROOTS)
    dev.wait_for(topics.trust_root(2), good)

    forged = f.unique("forged-root")
    dev.publish(topics.trust_root(2), forged, retain=True)
    dev.publish(topics.trust_root(3), forged, retain=True)
    marker = f.unique("marker")
    dev.publish(topics.telemetry("dev-1"), marker)  # after the forged ones, from the same publisher
    obs.wait_for(topics.telemetry("dev-1"), marker)
    ops = f.client("ops", f"ops-{f.unique('o').decode()}")
    ops.publish(topics.trust_root(2), forged, retain=True)
    ops.publish(topics.trust_root(4), forged, retain=True)
    marker = f.unique("marker")
    ops.publish(topics.API_REQUEST, marker)
    obs.wait_for(topics.API_REQUEST, marker)
    assert not [m for m in obs.messages if m.payload == forged]
    # the retained root is still the controller's
    late = f.client("dev-2")
    assert late.subscribe(topics.TRUST_ROOTS)
    late.wait_for(topics.trust_root(2), good)
