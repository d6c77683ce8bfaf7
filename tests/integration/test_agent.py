"""The device agent (``edge-runtime run``) end to end, as a subprocess, on real brokers
(amqtt and Mosquitto): signed desired states install models that answer over REST, bad
documents are rejected and change nothing, the health gate rolls back, signed commands
run once, the agent serves with its broker down, stops cleanly (or dies and its Will
speaks), refuses a bad config, and reloads on SIGHUP.

Every wait is a deadline poll on what the test can observe (MQTT messages seen by an
``Observer``, notify datagrams, REST answers); no bare sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from controller.artifact_service import ArtifactService
from edge_runtime.agent.commands import RESTART_EXIT_CODE
from edge_runtime.commands import EX_CONFIG
from edge_runtime.protocol import messages, topics
from edge_runtime.store.layout import StoreLayout
from edge_runtime.protocol.trust_store import TrustStore
from tests.agentkit import (
    AgentProcess, Keys, NotifyListener, Observer, agent_command, command_doc, desired_doc, manifest_for,
    serve_artifacts, write_config,
)
from tests.helpers import free_port, runtime_cmd, wait_until
from tests.netproxy import TcpProxy, _Link

DEVICE = "dev-agent-1"
NAME = "tiny"
TELEMETRY_S = 1.0
UTC = timezone.utc


# -- shared data ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def manifests(model_files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Manifest dicts of tiny v1 and v2 (no health block)."""
    return {"1": manifest_for(model_files["tiny_v1"], NAME, "1"), "2": manifest_for(model_files["tiny_v2"], NAME, "2")}


@pytest.fixture(scope="session")
def sample(zoo: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One input and the reference output of each version for it."""
    inputs = zoo["tiny_v1"].sample_inputs()
    return inputs["x"], {"1": zoo["tiny_v1"].reference(inputs)["y"], "2": zoo["tiny_v2"].reference(inputs)["y"]}


# -- the rig ----------------------------------------------------------------------------


@dataclass
class Rig:
    """Everything around one agent: broker, chunk server, keys, config, notify, observer."""

    broker: Any
    tmp: Path
    short: Path  # a short dir for the API socket (AF_UNIX paths stop at 108 bytes)
    keys: Keys
    root: Path
    data_dir: Path
    config: Path
    rest_port: int
    notify: NotifyListener
    service: ArtifactService
    obs: Observer
    sample: tuple[np.ndarray, dict[str, np.ndarray]]
    manifests: dict[str, dict[str, Any]]
    stack: contextlib.ExitStack
    agent: Optional[AgentProcess] = None
    docs: dict[int, bytes] = field(default_factory=dict)

    def write_config(self, *, broker_url: Optional[str] = None, telemetry_interval_s: float = TELEMETRY_S,
                     **kw: Any) -> Path:
        return write_config(self.config, device_id=DEVICE, data_dir=self.data_dir,
                            broker_url=broker_url or self.broker.url, trust_root=self.root, rest_port=self.rest_port,
                            telemetry_interval_s=telemetry_interval_s, socket_path=self.short / "api.sock", **kw)

    def start(self) -> AgentProcess:
        """Start the agent and wait for READY=1 (not for the broker)."""
        agent = AgentProcess(self.config, notify=self.notify)
        self.stack.enter_context(agent)  # always terminated (then killed) at teardown
        self.agent = agent
        agent.wait_ready(30)
        return agent

    def wait_birth(self, timeout: float = 20) -> messages.DeviceState:
        return self.obs.wait_for(lambda o: next((s for s in o.states if s.online), None), timeout, what="the birth")

    # -- documents --------------------------------------------------------------------

    def desired(self, generation: int, version: str, *, manifest: Optional[dict[str, Any]] = None,
                **kw: Any) -> bytes:
        doc = desired_doc(DEVICE, generation, {NAME: (version, manifest or self.manifests[version])}, **kw)
        self.docs.setdefault(generation, doc)
        return doc

    def reconcile(self, generation: int, version: str, *, timeout: float = 20, **kw: Any) -> None:
        """Publish a desired state and wait until it is reconciled and the state says so."""
        self.obs.publish_desired(self.desired(generation, version, **kw))
        self.obs.wait_for(lambda o: events(o, "reconciled", generation=generation), timeout,
                          what=f"reconciled generation {generation}")
        self.obs.wait_for(lambda o: o.last_state and o.last_state.generation == generation
                          and NAME in o.last_state.models, timeout, what=f"state of generation {generation}")

    # -- REST -------------------------------------------------------------------------

    def predict(self) -> np.ndarray:
        x, _ = self.sample
        body = json.dumps({"instances": x.tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.rest_port}/v1/models/{NAME}:predict", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return np.asarray(json.load(resp)["predictions"], np.float32)

    def serves(self, version: str) -> bool:
        return bool(np.allclose(self.predict(), self.sample[1][version], atol=1e-4, rtol=1e-4))

    def wait_serving(self, version: str, timeout: float = 15) -> None:
        wait_until(lambda: self.serves(version), timeout=timeout, what=f"REST answering with v{version}")

    # -- files ------------------------------------------------------------------------

    def store_state(self) -> bytes:
        return StoreLayout.at(self.data_dir).state.read_bytes()

    def trust_state(self) -> bytes:
        return TrustStore(self.data_dir).path.read_bytes()


def events(obs: Observer, step: Optional[str] = None, *, since: int = 0, **match: Any) -> list[messages.Event]:
    return [e for e in obs.events[since:]
            if (step is None or e.step == step) and all(getattr(e, k) == v for k, v in match.items())]


@pytest.fixture
def rig(broker: Any, tmp_path: Path, model_files: dict[str, Path], manifests: dict[str, dict[str, Any]],
        sample: tuple[np.ndarray, dict[str, np.ndarray]]) -> Iterator[Rig]:
    """A rig with the config written and the agent not started yet."""
    with contextlib.ExitStack() as stack:
        short = Path(tempfile.mkdtemp(prefix="ef-agent-"))
        stack.callback(shutil.rmtree, short, True)
        ctl, service = serve_artifacts(stack, broker.url, [model_files["tiny_v1"], model_files["tiny_v2"]],
                                       tmp_path / "blobs", client_id="ctl-agent-test")
        keys = Keys()
        notify = stack.enter_context(NotifyListener())
        obs = stack.enter_context(Observer(broker.url, DEVICE))
        r = Rig(broker=broker, tmp=tmp_path, short=short, keys=keys, root=keys.write_root(tmp_path / "root.json"),
                data_dir=tmp_path / "data", config=tmp_path / "agent.toml", rest_port=free_port(), notify=notify,
                service=service, obs=obs, sample=sample, manifests=manifests, stack=stack)
        r.write_config()
        # The agent is entered last, so it is stopped first (before the observer and the broker).
        yield r


@pytest.fixture
def running(rig: Rig) -> Rig:
    """The rig with the agent READY and its birth seen."""
    rig.start()
    rig.wait_birth()
    return rig


# -- 1. install and upgrade -------------------------------------------------------------


def test_desired_state_installs_then_upgrades(running: Rig) -> None:
    r, obs = running, running.obs
    r.reconcile(1, "1")

    mine = [e for e in obs.events if (e.model == NAME and e.version == "1") or e.step == "reconciled"]
    first = {}
    for e in mine:
        first.setdefault(e.step, e)
    for step in ("downloading", "verifying", "active", "reconciled"):
        assert step in first, f"no {step} event: {obs.summary()}"
    seqs = [first[s].seq for s in ("downloading", "verifying", "active", "reconciled")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4, seqs
    seen = list(dict.fromkeys(e.seq for e in obs.events))  # first delivery of each, in arrival order
    assert seen == sorted(seen), f"events out of seq order: {seen}"
    assert first["reconciled"].generation == 1

    state = obs.last_state
    assert state.online and state.generation == 1 and state.models[NAME].active == "1"
    r.wait_serving("1")

    r.reconcile(2, "2")
    r.wait_serving("2")
    state = obs.wait_for(lambda o: o.last_state if o.last_state.models[NAME].active == "2" else None, 10,
                         what="v2 active in the state")
    assert state.generation == 2
    assert {v.version for v in state.models[NAME].versions} >= {"1", "2"}


# -- 2. rejections ------------------------------------------------------------------------


def _tamper_payload(doc: bytes) -> bytes:
    env = json.loads(doc)
    payload = bytearray(base64.b64decode(env["payload"]))
    i = payload.index(b'"generation"') + 2  # inside the key: still a JSON string
    payload[i] ^= 0x01
    env["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(env, separators=(",", ":")).encode()


def _tamper_signature(doc: bytes) -> bytes:
    env = json.loads(doc)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[5] ^= 0x80
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(env, separators=(",", ":")).encode()


def test_bad_documents_are_rejected_and_change_nothing(running: Rig) -> None:
    r, obs = running, running.obs
    r.reconcile(1, "1")
    r.reconcile(2, "2")
    r.wait_serving("2")

    past = datetime.now(UTC) - timedelta(days=2)
    cases = [
        ("tampered payload", _tamper_payload(desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])})),
         "bad_signature"),
        ("tampered signature", _tamper_signature(desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])})),
         "bad_signature"),
        ("expired", desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])}, issued_at=past,
                                expires=past + timedelta(hours=1)), "expired"),
        ("replayed generation 1", r.docs[1], "rollback"),
        ("another device", desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])}, target={"device": "dev-other"}),
         "wrong_device"),
        ("unknown signer", desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])}, signers=("rogue",)),
         "unknown_key"),
        ("signed by a command key", desired_doc(DEVICE, 3, {NAME: ("1", r.manifests["1"])}, signers=("command1",)),
         "unknown_key"),
    ]
    for what, doc, reason in cases:
        store, trust = r.store_state(), r.trust_state()
        n = len(obs.events)
        obs.publish_desired(doc)
        got = obs.wait_for(lambda o: events(o, "rejected", since=n), 15, what=f"rejection of {what}")
        assert got[0].reason == reason, f"{what}: {got[0]}"
        assert got[0].figures.get("kind") == "desired"
        others = [e for e in obs.events[n:] if e.step != "rejected"]
        assert not others, f"{what} changed something: {others}"
        assert r.store_state() == store, f"{what}: store state.json changed"
        assert r.trust_state() == trust, f"{what}: trust state.json changed"
        assert r.serves("2"), f"{what}: REST no longer serves v2"
        assert obs.last_state.generation == 2 and obs.last_state.models[NAME].active == "2"

    # Generation 2 again is ALREADY_CURRENT: silent. Two telemetry messages later (the loop
    # ran at least one full tick after receiving it), there is still no event.
    store, trust = r.store_state(), r.trust_state()
    n, t = len(obs.events), len(obs.telemetry)
    obs.publish_desired(r.docs[2])
    obs.wait_for(lambda o: len(o.telemetry) >= t + 3, 10, what="three telemetry ticks")
    assert obs.events[n:] == [], f"generation 2 again was not silent: {obs.events[n:]}"
    assert r.store_state() == store and r.trust_state() == trust
    assert r.serves("2")


# -- 3. health gate -----------------------------------------------------------------------


def test_health_gate_rolls_back_and_does_not_retry(running: Rig, model_files: dict[str, Path],
                                                   zoo: dict[str, Any]) -> None:
    r, obs = running, running.obs
    r.reconcile(1, "1")
    r.wait_serving("1")

    inputs = zoo["tiny_v2"].sample_inputs(seed=3)
    wrong = {"y": zoo["tiny_v2"].reference(inputs)["y"] + 1.0}
    bad = manifest_for(model_files["tiny_v2"], NAME, "2", health=messages.HealthSpec.of(inputs, wrong))
    sha2 = bad["sha256"]

    n = len(obs.events)
    obs.publish_desired(r.desired(2, "2", manifest=bad))
    rolled = obs.wait_for(lambda o: events(o, "rolled_back", since=n, model=NAME, version="2"), 20,
                          what="rolled_back of v2")[0]
    assert rolled.reason == "health_check_failed", rolled
    assert rolled.figures, f"no health figures: {rolled}"
    assert r.serves("1")
    obs.wait_for(lambda o: events(o, "reconciled", since=n, generation=2), 10, what="reconciled 2")
    assert obs.wait_for(lambda o: o.last_state.generation == 2 and o.last_state, 10,
                        what="state of generation 2").models[NAME].active == "1"

    fetched = sum(c for (sha, _), c in r.service.served_offsets.items() if sha == sha2)
    assert fetched > 0
    n = len(obs.events)
    obs.publish_desired(r.desired(3, "2", manifest=bad))
    refused = obs.wait_for(lambda o: events(o, "refused", since=n, model=NAME, generation=3), 20,
                           what="refused at generation 3")[0]
    assert refused.reason == "health_check_failed" and refused.version == "2"
    obs.wait_for(lambda o: events(o, "reconciled", since=n, generation=3), 10, what="reconciled 3")
    assert not events(obs, "downloading", since=n), obs.summary()
    assert not [e for e in obs.events[n:] if e.step in ("verifying", "loading", "health_check", "active")]
    assert sum(c for (sha, _), c in r.service.served_offsets.items() if sha == sha2) == fetched
    assert r.serves("1")


# -- 4. commands --------------------------------------------------------------------------


def _reply(obs: Observer, seq: int, timeout: float = 10) -> messages.Reply:
    return obs.wait_for(lambda o: next((x for x in o.replies if x.seq == seq), None), timeout,
                        what=f"the reply to command seq {seq}")


def test_signed_commands(running: Rig) -> None:
    r, obs = running, running.obs
    agent = r.agent
    assert agent is not None

    # The birth goes out before the agent subscribes (see test_subscribes_before_the_birth),
    # so a command sent right after it can be lost: send ping seq 1 until it is answered (a
    # re-delivery of the same seq is ignored by the agent, so it still runs once).
    ping = command_doc(DEVICE, 1, "ping")

    def answered() -> Optional[messages.Reply]:
        found = next((x for x in obs.replies if x.seq == 1), None)
        if found is None and time.monotonic() >= resend[0]:
            obs.send_command(ping)
            resend[0] = time.monotonic() + 0.5
        return found

    resend = [0.0]
    pong = wait_until(answered, timeout=15, what="the reply to ping seq 1")
    assert [x.seq for x in obs.replies].count(1) == 1
    assert pong.ok and pong.command == "ping" and pong.result["pong"] is True

    obs.send_command(command_doc(DEVICE, 2, "diagnostics", {"log_lines": 50}))
    diag = _reply(obs, 2)
    assert diag.ok and "models" in diag.result and diag.result["device_id"] == DEVICE
    assert diag.result["log"] and all(isinstance(line, str) for line in diag.result["log"])

    t = len(obs.telemetry)
    obs.send_command(command_doc(DEVICE, 3, "set-config", {"telemetry_interval_s": 2}))
    applied = _reply(obs, 3)
    assert applied.ok and applied.result["applied"] == {"telemetry_interval_s": 2}
    obs.wait_for(lambda o: [m for m in o.telemetry[t:] if m.interval_s == 2], 10, what="telemetry at 2 s")

    once = command_doc(DEVICE, 4, "ping")
    obs.send_command(once)
    obs.send_command(once)
    obs.send_command(command_doc(DEVICE, 5, "ping"))
    _reply(obs, 5)  # replies are queued in order: the duplicate would be before this one
    assert [x.seq for x in obs.replies].count(4) == 1, [x.seq for x in obs.replies]

    n = len(obs.replies)
    obs.send_command(command_doc(DEVICE, 3, "ping"))
    stale = obs.wait_for(lambda o: [x for x in o.replies[n:] if not x.ok], 10, what="the rollback reply")[0]
    assert stale.error is not None and stale.error.reason == "rollback", stale

    obs.send_command(command_doc(DEVICE, 6, "restart", {"reason": "test"}))
    restart = _reply(obs, 6)
    assert restart.ok and restart.result["exit_code"] == RESTART_EXIT_CODE
    assert agent.wait_exit(15) == RESTART_EXIT_CODE


# -- 5. broker down at start ------------------------------------------------------------


def test_serves_with_the_broker_down_then_births(rig: Rig, model_files: dict[str, Path]) -> None:
    r = rig
    install = subprocess.run(runtime_cmd("install", str(model_files["tiny_v1"]), "--data-dir", str(r.data_dir),
                                         "--name", NAME, "--version", "1"),
                             capture_output=True, text=True, timeout=60)
    assert install.returncode == 0, install.stderr
    with TcpProxy(r.broker.host, r.broker.port) as proxy:
        proxy.cut()
        r.write_config(broker_url=proxy.url)
        r.start()  # READY=1 with nothing to connect to
        r.wait_serving("1")
        assert not r.obs.states and proxy.accepted == 0
        proxy.restore()
        birth = r.wait_birth(20)
        assert birth.models[NAME].active == "1"
        assert r.serves("1")


class RecordingProxy(TcpProxy):
    """A ``TcpProxy`` that also keeps every byte each client sent upstream."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.sent: list[bytearray] = []
        super().__init__(*a, **kw)

    def _pump(self, link: _Link, src: Any, dst: Any, up: bool) -> None:
        if not up:
            return super()._pump(link, src, dst, up)
        buf = bytearray()
        with self._lock:
            self.sent.append(buf)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)

    def packets(self, n: int = 0) -> list[tuple[int, str]]:
        """(MQTT packet type, PUBLISH topic or "") of what client connection ``n`` sent."""
        with self._lock:
            data = bytes(self.sent[n]) if len(self.sent) > n else b""
        out, i = [], 0
        while i + 2 <= len(data):
            kind, j, length, shift = data[i] >> 4, i + 1, 0, 0
            while j < len(data):
                length |= (data[j] & 0x7F) << shift
                shift += 7
                j += 1
                if not data[j - 1] & 0x80:
                    break
            if j + length > len(data):
                break  # a partial packet
            topic = ""
            if kind == 3:
                tlen = int.from_bytes(data[j:j + 2], "big")
                topic = data[j + 2:j + 2 + tlen].decode("utf-8", "replace")
            out.append((kind, topic))
            i = j + length
        return out


_PUBLISH, _SUBSCRIBE = 3, 8


def test_subscribes_before_the_birth(rig: Rig) -> None:
    """A controller treats the birth as "the device listens now": the subscriptions must be
    in place before it goes out, or a command sent on seeing it is dropped by the broker."""
    r = rig
    with RecordingProxy(r.broker.host, r.broker.port) as proxy:
        r.write_config(broker_url=proxy.url)
        r.start()
        r.wait_birth()
        wait_until(lambda: any(k == _SUBSCRIBE for k, _ in proxy.packets()), timeout=10, what="the SUBSCRIBE")
        kinds = proxy.packets()
        birth = next(i for i, (k, t) in enumerate(kinds) if k == _PUBLISH and t == topics.state(DEVICE))
        subscribe = next(i for i, (k, _) in enumerate(kinds) if k == _SUBSCRIBE)
        assert subscribe < birth, f"the birth (packet {birth}) went out before the SUBSCRIBE (packet {subscribe})"


# -- 6. stopping and dying --------------------------------------------------------------


def test_sigterm_exits_clean_and_says_offline(running: Rig) -> None:
    r, obs = running, running.obs
    agent = r.agent
    assert agent is not None
    birth = r.wait_birth()
    started = time.monotonic()
    code = agent.terminate(timeout=15)
    assert time.monotonic() - started < 10
    assert code == 0, agent.log_text()[-3000:]
    assert r.notify.find("STOPPING=1", after=agent.started_at) is not None
    last = obs.wait_for(lambda o: o.last_state if not o.last_state.online else None, 10, what="offline state")
    assert last.boot_id == birth.boot_id and last.bd_seq == birth.bd_seq


def test_sigkill_leaves_the_will(running: Rig) -> None:
    r, obs = running, running.obs
    agent = r.agent
    assert agent is not None
    birth = r.wait_birth()
    agent.kill()
    will = obs.wait_for(lambda o: o.last_state if not o.last_state.online else None, 15, what="the Will")
    assert will.boot_id == birth.boot_id and will.bd_seq == birth.bd_seq


# -- 7. bad config (no broker needed) ---------------------------------------------------


def _run_bad(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_") and k != "NOTIFY_SOCKET"}
    return subprocess.run(agent_command(config), capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("extra, field_name", [
    ({"telemetry_interval_s": -1}, "telemetry_interval_s"),
    ({"bogus_key": 1}, "bogus_key"),
    ({"broker": {"keepalive_secs": 5}}, "keepalive_secs"),
])
def test_bad_config_exits_78_naming_the_field(tmp_path: Path, extra: dict[str, Any], field_name: str) -> None:
    root = Keys().write_root(tmp_path / "root.json")
    cfg = write_config(tmp_path / "agent.toml", device_id=DEVICE, data_dir=tmp_path / "data",
                       broker_url=f"mqtt://127.0.0.1:{free_port()}", trust_root=root, rest_port=free_port(),
                       extra=extra)
    done = _run_bad(cfg)
    assert done.returncode == EX_CONFIG == 78, done.stderr
    assert field_name in done.stderr, done.stderr


def test_no_trust_root_exits_78(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "agent.toml", device_id=DEVICE, data_dir=tmp_path / "data",
                       broker_url=f"mqtt://127.0.0.1:{free_port()}", trust_root=None, rest_port=free_port())
    done = _run_bad(cfg)
    assert done.returncode == 78, done.stderr
    assert "trust_root" in done.stderr, done.stderr


# -- 8. SIGHUP ----------------------------------------------------------------------------


def test_sighup_reloads_the_telemetry_interval(running: Rig) -> None:
    r, obs = running, running.obs
    agent = r.agent
    assert agent is not None
    obs.wait_for(lambda o: [m for m in o.telemetry if m.interval_s == TELEMETRY_S], 10, what="telemetry at 1 s")
    r.write_config(telemetry_interval_s=2.5)
    t = len(obs.telemetry)
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGHUP)
    reloading = r.notify.wait_for("RELOADING=1", 10, after=sent, alive=lambda: agent.alive)
    assert "MONOTONIC_USEC" in reloading.fields
    r.notify.wait_for("READY=1", 10, after=reloading.at, alive=lambda: agent.alive)
    obs.wait_for(lambda o: [m for m in o.telemetry[t:] if m.interval_s == 2.5], 10, what="telemetry at 2.5 s")
    assert agent.alive
