"""The fleet ACLs on real brokers: the same cases against amqtt run by ``fleetctl broker``
(a subprocess, through the real CLI) and Mosquitto run on the files ``fleetctl broker
mosquitto`` writes (its generated ``mosquitto.conf``, as is).

"Not delivered" is proven without sleeping: after the forbidden message, a marker the
client may get is sent by the same publisher; once the marker is in, the forbidden one
would have come before it (per-publisher order holds on both brokers). Where the brokers
differ (amqtt answers a forbidden SUBSCRIBE with SUBACK 0x80 and refuses bad client ids at
CONNECT; Mosquitto grants the SUBACK and filters delivery, and accepts the CONNECT but
denies every ACL check to a client id with ``+``/``#``), each case says so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from controller.cli import main as fleetctl
from controller.credentials import UserDB, mosquitto_files
from edge_runtime.mqtt import ConnectFailed, Message, MqttClient, MqttConfig, SubscribeRefused
from edge_runtime.protocol import topics
from tests.brokers import _Broker, mosquitto_binary
from tests.helpers import wait_until

PASSWORD = "s3cret-for-tests"
USERS = {"dev-1": "device", "dev-2": "device", "ctl": "controller", "ops": "console", "ops2": "console"}
WAIT = 10.0


class FleetctlBroker(_Broker):
    """``python -m controller.cli broker`` as a subprocess (stops on SIGTERM)."""

    name = "fleetctl-broker"
    stop_signal = signal.SIGTERM

    def __init__(self, *, users: Path, data: Optional[Path] = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.users, self.data = users, data

    def write_config(self) -> None:
        pass

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "controller.cli", "broker", "--bind", f"{self.host}:{self.port}",
               "--users", str(self.users), "-v"]
        return cmd + (["--data", str(self.data)] if self.data else [])


class GeneratedMosquitto(_Broker):
    """``mosquitto -c OUT/mosquitto.conf`` on the files of ``credentials.mosquitto_files``."""

    name = "mosquitto"

    def __init__(self, *, users: Path, **kw: Any) -> None:
        super().__init__(**kw)
        binary = mosquitto_binary()
        assert binary is not None
        self.binary = binary
        # As root Mosquitto switches to "mosquitto", which cannot read a private temp dir.
        self.paths = mosquitto_files(UserDB.load(users), self.workdir / "conf", port=self.port, bind=self.host,
                                     run_as=pwd.getpwuid(os.geteuid()).pw_name)

    def write_config(self) -> None:
        pass

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.paths["conf"])]


def make_users(path: Path) -> Path:
    pw = path.parent / "pw"
    pw.write_text(PASSWORD + "\n")
    for name, role in USERS.items():
        assert fleetctl(["broker", "user", "add", name, "--role", role, "--users", str(path),
                         "--password-file", str(pw)]) == 0
    return path


class Recorder:
    """One connected client that records every message it gets."""

    def __init__(self, broker: _Broker, user: str, client_id: str, password: str = PASSWORD) -> None:
        self.client = MqttClient(MqttConfig(url=broker.url, client_id=client_id, username=user, password=password,
                                            operation_timeout=WAIT))
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client.add_handler("#", self._got)
        self.client.connect(timeout=WAIT)

    def _got(self, msg: Message) -> None:
        with self._lock:
            self.messages.append(msg)

    def got(self, topic: str, payload: Optional[bytes] = None) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic and (payload is None or m.payload == payload)]

    def wait_for(self, topic: str, payload: bytes) -> Message:
        return wait_until(lambda: self.got(topic, payload), timeout=WAIT, what=f"{payload!r} on {topic}")[0]

    def subscribe(self, topic_filter: str) -> bool:
        """True when granted, False on SUBACK 0x80."""
        try:
            self.client.subscribe([(topic_filter, 1)])
            return True
        except SubscribeRefused:
            return False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        try:
            self.client.disconnect(timeout=2)
        except Exception:
            pass


class Fleet:
    """A running broker of one kind and the clients the cases open on it."""

    def __init__(self, kind: str, broker: _Broker) -> None:
        self.kind, self.broker = kind, broker
        self._clients: list[Recorder] = []
        self.n = 0

    def client(self, user: str, client_id: Optional[str] = None, password: str = PASSWORD) -> Recorder:
        r = Recorder(self.broker, user, client_id or user, password)
        self._clients.append(r)
        return r

    def unique(self, what: str) -> bytes:
        self.n += 1
        return f"{what}-{self.n}".encode()

    def close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def fleet(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    kind = request.param
    if kind == "mosquitto" and mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (.ci/run installs Debian's mosquitto package)")
    work = tmp_path_factory.mktemp(f"acl-{kind}")
    users = make_users(work / "users.json")
    broker: _Broker = (FleetctlBroker(users=users, workdir=work / "b") if kind == "amqtt"
                       else GeneratedMosquitto(users=users, workdir=work / "b"))
    broker.workdir.mkdir(parents=True, exist_ok=True)
    try:
        broker.start()
        yield Fleet(kind, broker)
    finally:
        broker.close()


@pytest.fixture
def f(fleet: Fleet) -> Iterator[Fleet]:
    """The module's broker, with the clients a case opened closed after it."""
    try:
        yield fleet
    finally:
        fleet.close_clients()


def observer(f: Fleet) -> Recorder:
    """A controller client that sees everything under fleet/v1/."""
    obs = f.client("ctl", f"obs-{f.n}-{f.unique('o').decode()}")
    assert obs.subscribe(topics.PREFIX + "/#")
    return obs


# -- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("user,password", [("dev-1", "wrong"), ("nobody", PASSWORD), ("ctl", "")],
                         ids=["wrong-password", "unknown-user", "empty-password"])
def test_bad_credentials_are_refused(f: Fleet, user: str, password: str) -> None:
    with pytest.raises(ConnectFailed) as err:
        f.client(user, password=password)
    assert err.value.reason.startswith("refused")


@pytest.mark.parametrize("user,client_id", [("dev-1", "dev-1+x"), ("dev-1", "dev-1#x"), ("dev-1", "dev-1/x"),
                                             ("ctl", "ctl+x"), ("ctl", "ctl/x")])
def test_client_ids_with_wildcards_or_slashes(f: Fleet, user: str, client_id: str) -> None:
    if f.kind == "amqtt":
        with pytest.raises(ConnectFailed) as err:
            f.client(user, client_id)
        assert err.value.reason.startswith("refused")
        return
    # Mosquitto accepts the CONNECT. For a client id with '+' or '#' it skips the
    # 'pattern' lines ("ACL denying access to client with dangerous client id"): a device,
    # whose rights are all patterns, can do nothing; a controller's 'user' lines do not
    # involve the client id and still apply. A '/' changes nothing: devices' patterns use
    # %u, and a console's %c reply topic with a '/' is no topic the controller answers on.
    obs = observer(f)
    odd = f.client(user, client_id)
    sent, marker = f.unique("from-odd-id"), f.unique("marker")
    odd.publish(topics.telemetry("dev-1"), sent)
    # The marker comes from another client, but only after Mosquitto acknowledged the
    # first publish; it routes a message before it sends the PUBACK, in one thread.
    obs.client.publish(topics.telemetry("dev-1"), marker, qos=1)
    obs.wait_for(topics.telemetry("dev-1"), marker)
    delivered = user == "ctl" or "/" in client_id
    assert bool(obs.got(topics.telemetry("dev-1"), sent)) == delivered


def test_device_client_id_must_be_its_username(f: Fleet) -> None:
    if f.kind == "amqtt":
        with pytest.raises(ConnectFailed):
            f.client("dev-1", "dev-2")
        return
    # Mosquitto cannot tie the client id to the user; the rights follow the username (%u),
    # so dev-1 calling itself "dev-2" still publishes only as dev-1.
    obs = observer(f)
    liar = f.client("dev-1", "dev-2-liar")
    bad, marker = f.unique("as-dev-2"), f.unique("marker")
    liar.publish(topics.telemetry("dev-2"), bad)
    liar.publish(topics.telemetry("dev-1"), marker)
    obs.wait_for(topics.telemetry("dev-1"), marker)
    assert not obs.got(topics.telemetry("dev-2"), bad)


# -- devices -----------------------------------------------------------------------------


def test_device_publishes_its_own_reports_but_not_under_another_id(f: Fleet) -> None:
    obs = observer(f)
    dev = f.client("dev-1")
    state, tele, foreign = f.unique("state"), f.unique("tele"), f.unique("forged")
    dev.publish(topics.state("dev-1"), state, retain=True)
    dev.publish(topics.telemetry("dev-1"), tele)
    obs.wait_for(topics.state("dev-1"), state)
    obs.wait_for(topics.telemetry("dev-1"), tele)

    for topic in (topics.state("dev-2"), topics.telemetry("dev-2"), topics.events("dev-2")):
        dev.publish(topic, foreign)
    marker = f.unique("marker")
    dev.publish(topics.events("dev-1"), marker)
    obs.wait_for(topics.events("dev-1"), marker)
    assert not [m for m in obs.messages if m.payload == foreign]


def test_device_may_publish_requests(f: Fleet) -> None:
    obs = observer(f)
    dev = f.client("dev-1")
    req = f.unique("chunk-req")
    topic = topics.artifact_request("ab" * 32)
    dev.publish(topic, req)
    obs.wait_for(topic, req)
    call = f.unique("infer")
    dev.publish(topics.infer("dev-2", "m1"), call)
    obs.wait_for(topics.infer("dev-2", "m1"), call)


def test_device_cannot_read_another_devices_desired_state(f: Fleet) -> None:
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    obs = observer(f)
    secret, mine = f.unique("desired-of-dev-2"), f.unique("desired-of-dev-1")
    ctl.publish(topics.desired("dev-2"), secret, retain=True)
    ctl.publish(topics.desired("dev-1"), mine, retain=True)
    obs.wait_for(topics.desired("dev-1"), mine)

    # Connects after a controller holds fleet/v1/# and both retained documents exist
    # (amqtt 0.12.1 alone would push every retained match of anyone's filter on CONNECT).
    dev = f.client("dev-1")
    granted = dev.subscribe(topics.desired("dev-2"))
    granted_wild = dev.subscribe(topics.all_devices("desired"))
    assert dev.subscribe(topics.desired("dev-1"))
    dev.wait_for(topics.desired("dev-1"), mine)  # retained: delivery works
    if f.kind == "amqtt":
        assert (granted, granted_wild) == (False, False)  # SUBACK 0x80
    else:
        assert (granted, granted_wild) == (True, True)  # Mosquitto grants, then filters delivery

    live, marker = f.unique("live-desired-of-dev-2"), f.unique("marker")
    ctl.publish(topics.desired("dev-2"), live)
    ctl.publish(topics.desired("dev-1"), marker)
    dev.wait_for(topics.desired("dev-1"), marker)
    assert not dev.got(topics.desired("dev-2")), "dev-1 read dev-2's desired state"


def test_device_cannot_publish_its_own_desired_or_commands(f: Fleet) -> None:
    obs = observer(f)
    dev = f.client("dev-1")
    forged = f.unique("forged-desired")
    dev.publish(topics.desired("dev-1"), forged, retain=True)
    dev.publish(topics.cmd("dev-1"), forged)
    dev.publish(topics.CTL_STATE, forged, retain=True)
    marker = f.unique("marker")
    dev.publish(topics.telemetry("dev-1"), marker)
    obs.wait_for(topics.telemetry("dev-1"), marker)
    assert not [m for m in obs.messages if m.payload == forged]


def test_device_reads_its_inbox_and_controller_state(f: Fleet) -> None:
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    dev = f.client("dev-1")
    assert dev.subscribe(topics.inbox_filter("dev-1"))
    assert dev.subscribe(topics.CTL_STATE)
    chunk, online = f.unique("chunk"), f.unique("online")
    ctl.publish(topics.chunk_inbox("dev-1", "cd" * 32), chunk)
    ctl.publish(topics.CTL_STATE, online, retain=True)
    dev.wait_for(topics.chunk_inbox("dev-1", "cd" * 32), chunk)
    dev.wait_for(topics.CTL_STATE, online)


# -- controller and console --------------------------------------------------------------


def test_controller_may_do_everything(f: Fleet) -> None:
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    dev = f.client("dev-1")
    assert dev.subscribe(topics.cmd("dev-1"))
    for name, _ in topics.controller_subscriptions():
        assert ctl.subscribe(name), name
    cmd = f.unique("cmd")
    ctl.publish(topics.cmd("dev-1"), cmd)
    dev.wait_for(topics.cmd("dev-1"), cmd)
    tele = f.unique("tele")
    dev.publish(topics.telemetry("dev-1"), tele)
    ctl.wait_for(topics.telemetry("dev-1"), tele)


def test_controller_shared_subscription(f: Fleet) -> None:
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    shared = topics.shared("replicas", topics.all_devices("events"))
    assert ctl.subscribe(shared)  # allowed on both; amqtt 0.12.1 stores it but never matches it
    if f.kind == "amqtt":
        return
    dev = f.client("dev-1")
    ev = f.unique("event")
    dev.publish(topics.events("dev-1"), ev)
    ctl.wait_for(topics.events("dev-1"), ev)


def test_console_calls_the_api_and_reads_only_its_own_replies(f: Fleet) -> None:
    ctl = f.client("ctl", f"ctl-{f.unique('c').decode()}")
    assert ctl.subscribe(topics.API_REQUEST)
    ops = f.client("ops", "ops-1")
    req = f.unique("req")
    ops.publish(topics.API_REQUEST, req)
    ctl.wait_for(topics.API_REQUEST, req)

    assert ops.subscribe(topics.api_reply("ops-1"))
    other_granted = ops.subscribe(topics.api_reply("ops2-1"))
    assert other_granted == (f.kind == "mosquitto")
    theirs, mine = f.unique("reply-for-ops2"), f.unique("reply-for-ops")
    ctl.publish(topics.api_reply("ops2-1"), theirs)
    ctl.publish(topics.api_reply("ops-1"), mine)
    ops.wait_for(topics.api_reply("ops-1"), mine)
    assert not ops.got(topics.api_reply("ops2-1"))


def test_console_reads_the_fleet_but_cannot_steer_it(f: Fleet) -> None:
    obs = observer(f)
    ops = f.client("ops", "ops-1")
    assert ops.subscribe(topics.all_devices("telemetry"))
    dev = f.client("dev-1")
    tele = f.unique("tele")
    dev.publish(topics.telemetry("dev-1"), tele)
    ops.wait_for(topics.telemetry("dev-1"), tele)

    forged = f.unique("console-desired")
    ops.publish(topics.desired("dev-1"), forged, retain=True)
    ops.publish(topics.cmd("dev-1"), forged)
    marker = f.unique("marker")
    ops.publish(topics.API_REQUEST, marker)
    obs.wait_for(topics.API_REQUEST, marker)
    assert not [m for m in obs.messages if m.payload == forged]


# -- amqtt only: the embedded broker's own promises ---------------------------------------


@contextlib.contextmanager
def _persisting_broker(tmp_path: Path) -> Iterator[FleetctlBroker]:
    """``fleetctl broker --data`` (not started), closed at the end."""
    pytest.importorskip("aiosqlite", reason="amqtt's SQLite persistence needs aiosqlite")
    broker = FleetctlBroker(users=make_users(tmp_path / "users.json"), data=tmp_path / "data", workdir=tmp_path / "b")
    broker.workdir.mkdir()
    try:
        yield broker
    finally:
        broker.close()


def _dev1_gets_retained(broker: _Broker, payload: bytes) -> None:
    dev = Recorder(broker, "dev-1", "dev-1")
    try:
        assert dev.subscribe(topics.desired("dev-1"))
        assert dev.wait_for(topics.desired("dev-1"), payload).retain
    finally:
        dev.close()


def test_embedded_broker_keeps_retained_desired_state_across_a_restart(tmp_path: Path) -> None:
    with _persisting_broker(tmp_path) as broker:
        broker.start()
        ctl = Recorder(broker, "ctl", "ctl-1")
        assert ctl.subscribe(topics.desired("dev-1"))
        ctl.publish(topics.desired("dev-1"), b"generation-7", retain=True)
        # amqtt sends the PUBACK before it routes the message; its echo proves it was
        # routed, and so retained (the store in SQLite finishes before a clean stop).
        ctl.wait_for(topics.desired("dev-1"), b"generation-7")
        ctl.close()
        broker.stop()  # SIGTERM: a clean stop
        assert broker.proc is not None and broker.proc.returncode == 0, broker.log_tail()
        assert "listening on mqtt://" in broker.log_tail()
        assert (tmp_path / "data" / "broker.sqlite").exists()

        broker.start()
        _dev1_gets_retained(broker, b"generation-7")


def test_a_restarted_broker_listens_only_once_retained_messages_are_restored(tmp_path: Path) -> None:
    """A device reconnecting the moment a restarted broker answers still gets its desired
    state: amqtt restored retained messages only after it had opened its port, and a
    subscription made in between missed them. With a fleet's worth of retained messages
    in the database (20,000, dev-1's restored last), that window is wide."""
    import sqlite3

    with _persisting_broker(tmp_path) as broker:
        broker.start()
        broker.stop()  # the first start created amqtt's tables
        db = sqlite3.connect(tmp_path / "data" / "broker.sqlite")
        with db:
            db.executemany("INSERT INTO stored_messages (topic, data, qos) VALUES (?, ?, 1)",
                           ((topics.desired(f"other-{i}"), b"generation-1") for i in range(20_000)))
            db.execute("INSERT INTO stored_messages (topic, data, qos) VALUES (?, ?, 1)",
                       (topics.desired("dev-1"), b"generation-7"))
        db.close()

        broker.start()  # returns as soon as the port answers a CONNECT
        _dev1_gets_retained(broker, b"generation-7")


def test_a_broker_that_cannot_bind_says_so_in_one_line(tmp_path: Path) -> None:
    """Binding fails after amqtt has started (listeners open last): the CLI still answers
    with its one-line error and exit 1, and the started broker is shut down."""
    import socket
    import subprocess

    users = make_users(tmp_path / "users.json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "controller.cli", "broker", "--bind", f"127.0.0.1:{port}",
                               "--users", str(users), "--data", str(tmp_path / "data")],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"fleetctl broker: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
