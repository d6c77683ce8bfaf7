"""End to end: ``fleetctl serve`` and real device agents on a real broker, all subprocesses,
real keys, real signatures, real models.

1. canary then all: v1 everywhere, then v2 with a canary; every device answers REST with v2.
2. a version that fails the device health gate aborts at the canary; every device serves v1.
3. the controller SIGKILLed mid-rollout and restarted finishes the rollout.
4. a device offline at rollout time converges when it returns.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.apiclient import ApiClient
from tests.fleetkit import ControllerProcess, DeviceFleet, ctl_state, make_keys, push_model, scrape
from tests.helpers import wait_until

DEVICES = ["dev-a", "dev-b", "dev-c"]
NAME = "kws"
FINAL = ("succeeded", "aborted")


@pytest.fixture(scope="module")
def broken_model(models_dir: Path) -> Path:
    """Loads fine, every output is NaN: the device's health gate refuses it."""
    from edge_runtime.modelgen import zoo as z

    return z.broken_mlp().save(models_dir / "tiny_broken.tflite")


@pytest.fixture
def rig(amqtt_broker: Any, tmp_path: Path):
    keys = make_keys(tmp_path / "keys")
    ctl = ControllerProcess(amqtt_broker.url, tmp_path / "ctl", keys)
    fleet = DeviceFleet(amqtt_broker.url, tmp_path / "devs", keys, DEVICES)
    try:
        ctl.wait_online()
        fleet.wait_ready()
        with ApiClient(amqtt_broker.url, timeout=20) as api:
            wait_until(lambda: {d["id"] for d in api.call("devices.list") if d["online"]} >= set(DEVICES),
                       timeout=30, what="every device online at the controller")
            yield ctl, fleet, api
    finally:
        fleet.close()
        ctl.__exit__(None, None, None)


def predict(fleet: DeviceFleet, device: str, x: np.ndarray) -> dict[str, Any]:
    body = json.dumps({"instances": x.tolist()}).encode()
    req = urllib.request.Request(f"{fleet.rest_url(device)}/v1/models/{NAME}:predict", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def served_version(fleet: DeviceFleet, device: str) -> Any:
    with urllib.request.urlopen(f"{fleet.rest_url(device)}/v1/models/{NAME}", timeout=10) as r:
        status = json.loads(r.read())
    versions = status.get("model_version_status", [])
    return next((v["version"] for v in versions if v.get("state") == "AVAILABLE"), None)


def wait_final(api: ApiClient, rollout_id: int, timeout: float = 120.0) -> dict[str, Any]:
    return wait_until(lambda: (lambda r: r if r["state"] in FINAL else None)(api.call("rollouts.show", id=rollout_id)),
                      timeout=timeout, interval=0.3, what=f"rollout {rollout_id} to finish")


def deploy_all(api: ApiClient, version: str, **plan: Any) -> dict[str, Any]:
    row = api.call("deploy", model=NAME, version=version, to="all", soak_s=plan.pop("soak_s", 0.5), **plan)
    return wait_final(api, row["id"])


def test_canary_then_all_succeeds_and_every_device_serves_the_new_version(rig, model_files, zoo):
    ctl, fleet, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, model_files["tiny_v2"], NAME, "2")
    assert {(r["model"], r["version"]) for r in api.call("models.list")} == {(NAME, "1"), (NAME, "2")}

    first = deploy_all(api, "1")
    assert first["state"] == "succeeded", first
    second = deploy_all(api, "2", canary_pct=33, waves=[100])
    assert second["state"] == "succeeded", second
    assert second["waves"] == 2 and second["counts"] == {"done": 3}
    canary = [s for s in second["steps"] if s["wave"] == 0]
    assert len(canary) == 1 and canary[0]["previous_version"] == "1"
    # the canary was done before the rest started
    rest = [s for s in second["steps"] if s["wave"] == 1]
    assert all(s["started_at"] >= canary[0]["finished_at"] for s in rest)

    inputs = zoo["tiny_v2"].sample_inputs()
    want = zoo["tiny_v2"].reference(inputs)["y"]
    for d in DEVICES:
        assert served_version(fleet, d) == "2"
        got = np.asarray(predict(fleet, d, inputs["x"])["predictions"], np.float32)
        assert np.allclose(got, want, atol=1e-4, rtol=1e-4)
    show = api.call("devices.show", id=DEVICES[0])
    assert show["device"]["models"] == {NAME: "2"}
    assert any(e["step"] == "active" and e.get("version") == "2" for e in show["events"])


def test_a_version_failing_the_health_gate_aborts_at_the_canary_and_all_serve_the_previous(rig, model_files,
                                                                                          broken_model):
    ctl, fleet, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, broken_model, NAME, "3")
    assert deploy_all(api, "1")["state"] == "succeeded"

    row = deploy_all(api, "3", canary_pct=33, waves=[50, 100])
    assert row["state"] == "aborted", row
    assert "health_check_failed" in (row["reason"] or ""), row
    canary = [s for s in row["steps"] if s["wave"] == 0]
    assert [s["state"] for s in canary] in (["reverting"], ["reverted"])
    assert all(s["state"] == "pending" for s in row["steps"] if s["wave"] > 0), row["steps"]
    wait_until(lambda: all(s["state"] in ("pending", "reverted")
                           for s in api.call("rollouts.show", id=row["id"])["steps"]),
               timeout=60, what="the canary reverted")
    for d in DEVICES:
        assert served_version(fleet, d) == "1"


def test_the_controller_killed_mid_rollout_finishes_it_after_a_restart(rig, model_files):
    ctl, fleet, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, model_files["tiny_v2"], NAME, "2")
    assert deploy_all(api, "1")["state"] == "succeeded"

    row = api.call("deploy", model=NAME, version="2", to="all", canary_pct=33, waves=[100], soak_s=3)
    wait_until(lambda: api.call("rollouts.show", id=row["id"])["counts"].get("done", 0) >= 1,
               timeout=60, what="the canary done")
    ctl.kill()
    # the broker published the controller's Last Will: STATE says nobody is steering
    wait_until(lambda: (lambda st: st is not None and not st.online)(ctl_state(ctl.broker_url)), timeout=30,
               what="the controller's Will (offline STATE)")
    ctl.start()
    ctl.wait_online()
    final = wait_final(api, row["id"])
    assert final["state"] == "succeeded", final
    for d in DEVICES:
        assert served_version(fleet, d) == "2"


def test_a_device_offline_at_rollout_time_converges_when_it_returns(rig, model_files):
    ctl, fleet, api = rig
    push_model(api, model_files["tiny_v1"], NAME, "1")
    push_model(api, model_files["tiny_v2"], NAME, "2")
    assert deploy_all(api, "1")["state"] == "succeeded"

    assert fleet.stop("dev-c") == 0
    wait_until(lambda: not next(d for d in api.call("devices.list") if d["id"] == "dev-c")["online"],
               timeout=30, what="dev-c offline at the controller")
    row = deploy_all(api, "2")
    assert row["state"] == "succeeded", row
    steps = {s["device_id"]: s["state"] for s in row["steps"]}
    assert steps == {"dev-a": "done", "dev-b": "done", "dev-c": "waiting"}

    fleet.start("dev-c").wait_ready(60)
    wait_until(lambda: {s["device_id"]: s["state"] for s in api.call("rollouts.show", id=row["id"])["steps"]}
               .get("dev-c") == "done", timeout=60, what="dev-c done after it came back")
    assert served_version(fleet, "dev-c") == "2"


def test_commands_telemetry_and_metrics_through_the_controller(rig, model_files):
    ctl, fleet, api = rig
    reply = api.call("cmd", device="dev-a", name="ping", wait_s=15)
    assert reply["state"] == "ok" and reply["reply"]["ok"] is True, reply
    second = api.call("cmd", device="dev-a", name="ping", wait_s=15)
    assert second["seq"] > reply["seq"]  # a fresh seq per command: the device's floor refuses a replay
    wait_until(lambda: len({t["device_id"] for t in api.call("telemetry.recent", limit=50)}) == 3, timeout=30,
               what="telemetry from every device")
    top = {row["id"]: row for row in api.call("top")}
    assert set(top) == set(DEVICES) and all(r["online"] and r["cpu_percent"] is not None for r in top.values())

    push_model(api, model_files["tiny_v1"], NAME, "1")
    assert deploy_all(api, "1")["state"] == "succeeded"
    m = scrape(ctl.metrics_port)
    assert m['edgefleet_devices{state="online"}'] == 3
    assert m['edgefleet_rollouts{state="succeeded"}'] == 1
    assert m['edgefleet_ingest_messages_total{kind="telemetry",result="stored"}'] >= 3
    assert m['edgefleet_ingest_messages_total{kind="event",result="stored"}'] >= 3
    assert m["edgefleet_commands_sent_total"] == 2
    audit = [a["action"] for a in api.call("audit.list", limit=20)]
    assert {"cmd.ping", "models.push", "deploy"} <= set(audit), audit
