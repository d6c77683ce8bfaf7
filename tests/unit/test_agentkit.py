"""tests.agentkit without the daemon: its signed documents pass the device's real trust
checks, its config passes the real loader, its notify socket hears the real sd_notify,
its process wrapper manages real processes, its observer sees a real broker."""

from __future__ import annotations

import hashlib
import signal
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydantic
import pytest

from edge_runtime.agent import sdnotify
from edge_runtime.agent.config import load_config
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt import MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.trust import Outcome, Rejection, TrustedState
from tests.agentkit import (
    AgentProcess,
    Keys,
    NotifyListener,
    Observer,
    agent_command,
    command_doc,
    desired_doc,
    manifest_for,
    write_config,
)
from tests.helpers import free_port, wait_until

UTC = timezone.utc
DEV = "dev-kit-1"


@pytest.fixture(scope="module")
def manifests(model_files: dict[str, Path], zoo) -> dict[str, dict]:
    inputs = zoo["tiny_v1"].sample_inputs()
    return {
        "v1": manifest_for(model_files["tiny_v1"], "kws", "1"),
        "v2": manifest_for(model_files["tiny_v2"], "kws", "2", health=messages.HealthSpec.of(inputs)),
    }


def trusted(keys: Keys) -> TrustedState:
    return TrustedState.bootstrap(keys.root_json, device_id=DEV)


# -- trust ----------------------------------------------------------------------------------


def test_keys_make_a_root_valid_now(tmp_path):
    keys = Keys()
    assert keys.issued_at < datetime.now(UTC) < keys.expires - timedelta(days=364)
    assert keys.write_root(tmp_path / "etc" / "root.json").read_bytes() == keys.root_json
    assert trusted(keys).root.version == 1


def test_manifest_for_reads_the_model(manifests, model_files):
    m1, m2 = manifests["v1"], manifests["v2"]
    data = model_files["tiny_v1"].read_bytes()
    assert m1["sha256"] == hashlib.sha256(data).hexdigest() and m1["size"] == len(data)
    assert [t["name"] for t in m1["signature"]["inputs"]] == ["x"]
    assert "health" not in m1 and set(m2["health"]["inputs"]) == {"x"}
    assert m1["sha256"] != m2["sha256"]


def test_desired_docs_pass_the_device_trust_checks(manifests):
    keys = Keys()
    state = trusted(keys)
    now = datetime.now(UTC)
    doc = desired_doc(DEV, 3, {"kws": ("2", manifests["v2"])})
    verified = state.verify_desired(doc, now, body_model=messages.DesiredState)
    assert verified.outcome is Outcome.ACCEPTED
    assert verified.body.generation == 3 and verified.body.models["kws"].manifest.health is not None
    # the generation floor holds: the same generation is benign, a lower one a rollback
    again = verified.state.verify_desired(desired_doc(DEV, 3, {}), now, body_model=messages.DesiredState)
    assert again.outcome is Outcome.ALREADY_CURRENT
    with pytest.raises(Rejection) as older:
        verified.state.verify_desired(desired_doc(DEV, 2, {}), now, body_model=messages.DesiredState)
    assert older.value.reason.value == "rollback"


@pytest.mark.parametrize("case, doc_kw, reason", [
    ("another device", {"target": {"device": "dev-other"}}, "wrong_device"),
    ("expired", {"issued_at": datetime.now(UTC) - timedelta(days=2),
                 "expires": datetime.now(UTC) - timedelta(days=1)}, "expired"),
    ("signed by the command key", {"signers": ("command1",)}, "unknown_key"),  # not a deploy key
    ("signed by an unknown key", {"signers": ("stranger",)}, "unknown_key"),
])
def test_desired_docs_can_be_made_to_fail(manifests, case, doc_kw, reason):
    with pytest.raises(Rejection) as exc:
        trusted(Keys()).verify_desired(desired_doc(DEV, 1, {"kws": ("1", manifests["v1"])}, **doc_kw),
                                       datetime.now(UTC), body_model=messages.DesiredState)
    assert exc.value.reason.value == reason, case


def test_command_docs_pass_the_device_trust_checks():
    state = trusted(Keys())
    now = datetime.now(UTC)
    v = state.verify_command(command_doc(DEV, 7, "diagnostics", {"log_lines": 5}), now, body_model=messages.Command)
    assert v.outcome is Outcome.ACCEPTED and v.body.seq == 7 and v.body.args.log_lines == 5
    ping = state.verify_command(command_doc(DEV, 1, "ping"), now, body_model=messages.Command)
    assert ping.body.name == "ping"


def test_bad_bodies_fail_before_signing(manifests):
    with pytest.raises(pydantic.ValidationError):
        desired_doc(DEV, 1, {"kws": ("9", manifests["v1"])})  # version differs from the manifest's
    with pytest.raises(pydantic.ValidationError):
        desired_doc(DEV, 1, {"other": ("1", manifests["v1"])})  # name differs from the manifest's
    with pytest.raises(pydantic.ValidationError):
        command_doc(DEV, 1, "reboot")  # not a command
    with pytest.raises(pydantic.ValidationError):
        command_doc(DEV, 1, "set-config", {})  # needs a setting
    with pytest.raises(EdgeRuntimeError):
        manifest_for(Path(__file__), "kws", "1")  # not a model file: the engine refuses it


# -- config -----------------------------------------------------------------------------------


def test_write_config_round_trips_through_load_config(tmp_path):
    root = Keys().write_root(tmp_path / "root.json")
    port = free_port()
    path = write_config(tmp_path / "agent.toml", device_id=DEV, data_dir=tmp_path / "data",
                        broker_url="mqtt://127.0.0.1:1883", trust_root=root, rest_port=port,
                        telemetry_interval_s=0.5, socket_path=tmp_path / "api.sock",
                        extra={"groups": ["cams", "eu"], "limits": {"chunk_size": 4096}, "tier": "cloud"})
    cfg = load_config(path, env={})
    assert cfg.device_id == DEV and cfg.groups == ("cams", "eu") and cfg.tier == "cloud"
    assert cfg.data_dir == tmp_path / "data" and cfg.trust_root == root
    assert cfg.telemetry_interval_s == 0.5
    assert cfg.broker.url == "mqtt://127.0.0.1:1883"
    assert (cfg.broker.reconnect_initial_s, cfg.broker.reconnect_max_s) == (0.2, 2.0)
    assert cfg.api.rest_port == port and cfg.api.socket_path == tmp_path / "api.sock"
    assert cfg.limits.chunk_timeout_s == 2.0 and cfg.limits.chunk_size == 4096  # merged, not replaced


def test_write_config_without_a_trust_root_and_with_odd_strings(tmp_path):
    data_dir = tmp_path / 'we"ird \\ dir'
    path = write_config(tmp_path / "agent.toml", device_id=DEV, data_dir=data_dir,
                        broker_url="mqtt://localhost", trust_root=None, rest_port=0)
    cfg = load_config(path, env={})
    assert cfg.trust_root is None and cfg.data_dir == data_dir and cfg.api.rest_port == 0


# -- notify -----------------------------------------------------------------------------------


def test_notify_listener_hears_sd_notify(monkeypatch):
    with NotifyListener() as listener:
        assert len(listener.path) < 100
        monkeypatch.setenv("NOTIFY_SOCKET", listener.env()["NOTIFY_SOCKET"])
        t0 = time.monotonic()
        assert sdnotify.notify(status="starting")
        assert sdnotify.notify(ready=True, status="up")
        got = listener.wait_for("READY=1", 5)
        assert got.at >= t0 and got.fields == {"READY": "1", "STATUS": "up"}
        assert listener.wait_for("STATUS", 5).fields["STATUS"] == "starting"  # the first one with a STATUS
        assert [n.text for n in listener.messages()] == ["STATUS=starting", "READY=1\nSTATUS=up"]
        assert listener.find("READY=1", after=got.at) is None
        with pytest.raises(AssertionError):
            listener.wait_for("STOPPING=1", 0.2)


# -- the process wrapper (with a stand-in command until the daemon lands) ----------------------

STAND_IN = textwrap.dedent("""
    import signal, subprocess, sys, time
    from edge_runtime.agent import sdnotify
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("child", child.pid, flush=True)
    def stop(*_):
        sdnotify.notify(stopping=True)
        child.terminate(); child.wait()
        print("stopped", file=sys.stderr, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    sdnotify.notify(ready=True)
    while True:
        time.sleep(1)
""")


def child_pid(agent: AgentProcess) -> int:
    line = wait_until(lambda: next((x for x in agent.log_text().splitlines() if x.startswith("child ")), None),
                      timeout=10, what="the child's pid")
    return int(line.split()[1])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_agent_command_is_the_real_cli(tmp_path):
    assert agent_command(tmp_path / "a.toml")[:4] == [sys.executable, "-m", "edge_runtime.cli", "run"]


def test_agent_process_ready_terminate_and_log(tmp_path):
    cfg = tmp_path / "agent.toml"
    with NotifyListener() as notify:
        with AgentProcess(cfg, notify=notify, argv=[sys.executable, "-c", STAND_IN]) as agent:
            agent.wait_ready(20)
            child = child_pid(agent)
            assert agent.alive and pid_alive(child)
            assert agent.terminate() == 0
            assert notify.find("STOPPING=1") is not None
            assert "stopped" in agent.log_text()
            assert not pid_alive(child)
        # a second run appends to the same log; log_text() shows only its own part
        with AgentProcess(cfg, notify=notify, argv=[sys.executable, "-c", STAND_IN]) as again:
            again.wait_ready(20)  # its own READY, not the first run's
            child2 = child_pid(again)
            assert again.kill() == -signal.SIGKILL
            wait_until(lambda: not pid_alive(child2), timeout=10, what="the session's child to die with it")
            assert again.log_text().count("child ") == 1
            assert again.log_text(all_runs=True).count("child ") == 2


def test_wait_ready_fails_fast_with_the_log_when_the_process_dies(tmp_path):
    script = "import sys; print('config is bad', file=sys.stderr); sys.exit(3)"
    with NotifyListener() as notify, AgentProcess(tmp_path / "a.toml", notify=notify,
                                                  argv=[sys.executable, "-c", script]) as agent:
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match="config is bad") as exc:
            agent.wait_ready(30)
        assert time.monotonic() - t0 < 10 and "exit code 3" in str(exc.value)


def test_agent_process_drops_inherited_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_DEVICE_ID", "from-the-test-runner")
    script = "import os; print(sorted(k for k in os.environ if k.startswith('EDGE_RUNTIME_')))"
    with NotifyListener() as notify, AgentProcess(tmp_path / "a.toml", notify=notify,
                                                  env_extra={"EDGE_RUNTIME_TIER": "cloud"},
                                                  argv=[sys.executable, "-c", script]) as agent:
        assert agent.wait_exit(20) == 0
        assert "['EDGE_RUNTIME_TIER']" in agent.log_text()


# -- the observer -----------------------------------------------------------------------------


def test_observer_sees_the_device_topics_and_publishes_documents(broker):
    device = MqttClient(MqttConfig(url=broker.url, client_id=DEV))
    device.connect(timeout=5)
    try:
        birth = messages.DeviceState(online=True, boot_id="b1", bd_seq=1, runtime_version="0",
                                     capabilities=messages.Capabilities(cores=1, memory_bytes=1))
        device.publish(topics.state(DEV), messages.encode(birth), qos=1, retain=True, timeout=5)
        desired = device.queue(topics.desired(DEV))
        cmds = device.queue(topics.cmd(DEV))
        device.subscribe([(topics.desired(DEV), 1), (topics.cmd(DEV), 1)], timeout=5)

        with Observer(broker.url, DEV) as obs:
            obs.wait_for(lambda o: o.last_state, 10, what="the retained birth")
            assert obs.states[0].boot_id == "b1"
            event = messages.Event(seq=1, at=datetime.now(UTC), step="downloading", model="kws")
            device.publish(topics.events(DEV), messages.encode(event), qos=1, timeout=5)
            device.publish(topics.reply(DEV), b"not json", qos=1, timeout=5)
            obs.wait_for(lambda o: o.events and o.undecodable, 10, what="an event and a bad reply")
            assert obs.events[0].step == "downloading" and obs.undecodable[0][0] == topics.reply(DEV)

            obs.publish_desired(b"signed bytes")
            got = desired.get(timeout=5)
            assert (got.payload, got.retain) == (b"signed bytes", False)  # live delivery
            obs.send_command(b"cmd bytes")
            assert cmds.get(timeout=5).payload == b"cmd bytes"
            obs.clear_desired()
            assert desired.get(timeout=5).payload == b""

            with pytest.raises(AssertionError, match="observer of"):
                obs.wait_for(lambda o: o.telemetry, 0.2, what="telemetry")
    finally:
        device.disconnect()
