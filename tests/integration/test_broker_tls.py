"""Mutual TLS on real brokers, with certificates from a real fleet CA (``controller.ca``):
Mosquitto run on the files ``fleetctl broker mosquitto --tls-*`` writes, and amqtt run as
``fleetctl broker --tls-*``, both subprocesses on loopback.

Refusals are read off the wire: a raw TLS socket sends a CONNECT and either gets a CONNACK
(its return code) or the broker ends the TLS session (an alert, a reset, EOF) without one.

Where the brokers differ, on a device certificate whose name is not the client id:

* amqtt (``FleetAuthPlugin``) reads the certificate and refuses the CONNECT (CONNACK 5).
* Mosquitto 2 cannot refuse it (with ``use_identity_as_username`` it consults no password
  file or auth plugin), so the generated listener has ``use_username_as_clientid``: the
  client id a client sends is replaced by the certificate name. The test proves that the
  lie is neutralised: the broker treats the client as the certificate's device (it takes
  over that device's own connection, not the named one's), and it gets only that device's
  rights.

Then the whole fleet over mutual TLS on Mosquitto: a real ``edge-runtime run`` agent, a
real ``fleetctl serve`` and a console (``ApiClient``), each with its own certificate, roll
out a signed model that the device installs and serves.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import ssl
import struct
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from controller.apiclient import ApiClient
from controller.ca import FleetCA
from controller.cli import main as fleetctl
from controller.credentials import UserDB, generate_password
from edge_runtime.mqtt import Message, MqttClient, MqttConfig
from edge_runtime.protocol import topics
from tests.brokers import _Broker, mosquitto_binary
from tests.fleetkit import ControllerProcess, DeviceFleet, make_keys, push_model
from tests.helpers import free_port, wait_until

WAIT = 10.0
DEVICES = ("dev-1", "dev-2")
# Mosquitto's client id is the certificate name: one certificate per simultaneous client.
CONTROLLERS = ("ctl-a", "ctl-obs")
CONSOLES = ("op-1",)


# -- the fleet's certificates ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    certs: dict[str, tuple[Path, Path]]  # name -> (cert, key), issued by the fleet CA
    foreign: tuple[Path, Path]  # a "dev-1" device certificate from another CA
    impostor: tuple[Path, Path]  # a *device* certificate named "ctl-a", a controller in the users file
    users: Path  # the users file: the roles of the controllers and consoles

    def context(self, name: Optional[str] = None, *, foreign: bool = False, impostor: bool = False) -> ssl.SSLContext:
        """A client TLS context trusting the fleet CA, with ``name``'s certificate (or none)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if foreign or impostor:
            ctx.load_cert_chain(*map(str, self.foreign if foreign else self.impostor))
        elif name is not None:
            ctx.load_cert_chain(*map(str, self.certs[name]))
        return ctx

    def mqtt(self, name: str) -> dict[str, str]:
        cert, key = self.certs[name]
        return {"ca_file": str(self.ca_file), "cert_file": str(cert), "key_file": str(key)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = FleetCA.init(base / "ca", common_name="edgefleet test fleet CA")
    certs: dict[str, tuple[Path, Path]] = {}
    for name, role, hosts in [("broker", "broker", ("127.0.0.1", "localhost")),
                              *((d, "device", ()) for d in DEVICES),
                              *((c, "controller", ()) for c in CONTROLLERS),
                              *((o, "operator", ()) for o in CONSOLES)]:
        paths = ca.write(ca.issue(name, role, hosts=hosts), base / "issued")
        certs[name] = (paths["cert"], paths["key"])
    other = FleetCA.init(base / "other-ca", common_name="someone else's CA")
    foreign = other.write(other.issue("dev-1", "device"), base / "foreign")
    # The fleet CA refuses a name in a second role (CANameTaken): the impostor is signed with
    # the CA's key outside its ledger, as someone holding a copy of the key could.
    bypass = base / "ca-key-copy"
    bypass.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(base / "ca" / name, bypass / name)
    rogue = FleetCA.open(bypass)
    impostor = rogue.write(rogue.issue("ctl-a", "device"), base / "impostor")
    users = UserDB(base / "users.json")
    for name in CONTROLLERS:
        users.add(name, "controller", generate_password())
    for name in CONSOLES:
        users.add(name, "console", generate_password())
    users.save()
    return Pki(ca.ca_file, certs, (foreign["cert"], foreign["key"]), (impostor["cert"], impostor["key"]), users.path)


# -- the brokers ---------------------------------------------------------------------------


class TlsBroker(_Broker):
    """A broker whose only listener is mutual TLS; ``argv`` runs it."""

    def __init__(self, name: str, argv: list[str], pki: Pki, **kw: Any) -> None:
        self.name = name
        super().__init__(**kw)
        self.argv = argv
        self.ping_ssl_context = pki.context(CONTROLLERS[-1])

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return self.argv


def mosquitto_tls(pki: Pki, workdir: Path) -> TlsBroker:
    port = free_port()
    out = workdir / "conf"
    cert, key = pki.certs["broker"]
    # As root Mosquitto switches to "mosquitto", which cannot read a private temp dir.
    assert fleetctl(["broker", "mosquitto", "--users", str(pki.users), "--out", str(out),
                     "--bind", f"127.0.0.1:{port}", "--run-as", pwd.getpwuid(os.geteuid()).pw_name,
                     "--tls-ca", str(pki.ca_file), "--tls-cert", str(cert), "--tls-key", str(key)]) == 0
    binary = mosquitto_binary()
    assert binary is not None
    return TlsBroker("mosquitto", [binary, "-c", str(out / "mosquitto.conf")], pki, port=port, workdir=workdir)


def amqtt_tls(pki: Pki, workdir: Path) -> TlsBroker:
    port = free_port()
    cert, key = pki.certs["broker"]
    argv = [sys.executable, "-m", "controller.cli", "broker", "--users", str(pki.users), "-v",
            "--tls-ca", str(pki.ca_file), "--tls-cert", str(cert), "--tls-key", str(key),
            "--bind-tls", f"127.0.0.1:{port}"]
    return TlsBroker("amqtt", argv, pki, port=port, workdir=workdir)


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def broker(request: Any, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    kind = request.param
    if kind == "mosquitto" and mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (.ci/run installs Debian's mosquitto package)")
    work = tmp_path_factory.mktemp(f"tls-{kind}")
    b = (amqtt_tls if kind == "amqtt" else mosquitto_tls)(pki, work)
    try:
        b.start()
        yield b
    finally:
        b.close()


# -- raw MQTT over TLS -----------------------------------------------------------------------


def _connect_packet(client_id: str, clean: bool = True) -> bytes:
    """MQTT 3.1.1 CONNECT: keepalive 30, no username."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04" + (b"\x02" if clean else b"\x00") + b"\x00\x1e" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def open_session(broker: TlsBroker, ctx: ssl.SSLContext, client_id: str, clean: bool = True) -> tuple[str, Any]:
    """("connack", (code, socket)) -- the socket stays open when the code is 0 -- or
    ("refused", what ended the TLS session before any CONNACK)."""
    raw = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    try:
        s = ctx.wrap_socket(raw, server_hostname=broker.host)
        s.sendall(_connect_packet(client_id, clean))
        data = b""
        while len(data) < 4:
            chunk = s.recv(4 - len(data))
            if not chunk:
                raw.close()
                return "refused", "EOF"
            data += chunk
    except (ssl.SSLError, ConnectionError) as exc:
        raw.close()
        return "refused", f"{type(exc).__name__}: {exc}"
    assert data[0] == 0x20, data
    if data[3] != 0:
        s.close()
    return "connack", (data[3], s)


def connack(broker: TlsBroker, ctx: ssl.SSLContext, client_id: str, clean: bool = True) -> Any:
    """The CONNACK code, or ("refused", why); the connection is closed."""
    kind, value = open_session(broker, ctx, client_id, clean)
    if kind == "refused":
        return kind, value
    code, s = value
    s.close()
    return code


class Client:
    """A connected ``MqttClient`` with a certificate that records what it receives."""

    def __init__(self, broker: TlsBroker, pki: Pki, name: str, client_id: Optional[str] = None) -> None:
        self.client = MqttClient(MqttConfig(url=broker.url, client_id=client_id or name, operation_timeout=WAIT,
                                            **pki.mqtt(name)))
        self.messages: list[Message] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self.client.add_handler("#", self._got)
        self.client.add_disconnect_hook(self._gone)
        self.client.connect(timeout=WAIT)

    def _got(self, msg: Message) -> None:
        with self._lock:
            self.messages.append(msg)

    def _gone(self, *_: Any) -> None:
        with self._lock:
            self.disconnects += 1

    def got(self, topic: str, payload: Optional[bytes] = None) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic and (payload is None or m.payload == payload)]

    def wait_for(self, topic: str, payload: bytes) -> Message:
        return wait_until(lambda: self.got(topic, payload), timeout=WAIT, what=f"{payload!r} on {topic}")[0]

    def subscribe(self, *filters: str) -> None:
        self.client.subscribe([(f, 1) for f in filters])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        try:
            self.client.disconnect(timeout=2)
        except Exception:
            pass


@pytest.fixture
def clients(broker: TlsBroker, pki: Pki) -> Iterator[Any]:
    """``clients(name, client_id=None)`` opens a ``Client``; all are closed after the test."""
    opened: list[Client] = []

    def open_client(name: str, client_id: Optional[str] = None) -> Client:
        c = Client(broker, pki, name, client_id)
        opened.append(c)
        return c

    try:
        yield open_client
    finally:
        for c in opened:
            c.close()


# -- who may connect -----------------------------------------------------------------------


def test_generated_mosquitto_listener_requires_certificates(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.certs["broker"]
    assert fleetctl(["broker", "mosquitto", "--users", str(pki.users), "--out", str(tmp_path), "--tls-ca",
                     str(pki.ca_file), "--tls-cert", str(cert), "--tls-key", str(key)]) == 0
    conf = (tmp_path / "mosquitto.conf").read_text().splitlines()
    for line in ("listener 8883 127.0.0.1", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "tls_version tlsv1.2", "allow_anonymous false",
                 f"cafile {pki.ca_file.resolve()}"):
        assert line in conf
    assert not [line for line in conf if line.startswith(("password_file", "psk"))]
    assert not (tmp_path / "passwd").exists()


def test_a_fleet_certificate_connects(broker: TlsBroker, pki: Pki) -> None:
    assert connack(broker, pki.context("dev-1"), "dev-1") == 0
    assert connack(broker, pki.context("ctl-a"), "ctl-a") == 0


def test_no_client_certificate_is_refused(broker: TlsBroker, pki: Pki) -> None:
    result = connack(broker, pki.context(None), "dev-1")
    assert isinstance(result, tuple) and result[0] == "refused", result


def test_a_certificate_from_another_ca_is_refused(broker: TlsBroker, pki: Pki) -> None:
    result = connack(broker, pki.context(foreign=True), "dev-1")
    assert isinstance(result, tuple) and result[0] == "refused", result


def test_a_device_certificate_under_another_client_id(broker: TlsBroker, pki: Pki, clients: Any) -> None:
    if broker.name == "amqtt":
        assert connack(broker, pki.context("dev-1"), "dev-2") == 5  # refused: not authorised
        # Also when dev-2 has a persistent session, online or not (amqtt hands a resuming
        # client the stored session, with the TLS object of the connection that made it).
        kind, value = open_session(broker, pki.context("dev-2"), "dev-2", clean=False)
        assert kind == "connack" and value[0] == 0
        try:
            assert connack(broker, pki.context("dev-1"), "dev-2", clean=False) == 5
        finally:
            value[1].close()
        assert connack(broker, pki.context("dev-1"), "dev-2", clean=False) == 5
        assert connack(broker, pki.context("dev-2"), "dev-2", clean=False) == 0  # its own: resumed
        assert connack(broker, pki.context("dev-2"), "dev-2", clean=True) == 0  # and dropped
        return
    # Mosquitto accepts the CONNECT and renames the client after its certificate.
    # Proof 1: the liar takes over dev-1's own connection, not dev-2's.
    kind, value = open_session(broker, pki.context("dev-1"), "dev-1")
    assert kind == "connack" and value[0] == 0
    real_dev_1 = value[1]
    dev_2 = clients("dev-2")
    ctl = clients("ctl-obs")
    ctl.subscribe(topics.PREFIX + "/#")
    liar = clients("dev-1", "dev-2")
    try:
        assert real_dev_1.recv(1) == b""  # Mosquitto closed it: "dev-1" connected again
    except TimeoutError:
        pytest.fail("the client with dev-1's certificate and client id dev-2 did not take over dev-1's "
                    "connection: Mosquitto did not rename it after its certificate")
    finally:
        real_dev_1.close()
    # Proof 2: dev-2 is still on its first connection (a takeover would have closed it
    # before the liar's CONNACK, so this round trip would have seen the disconnect).
    marker = b"dev-2-still-here"
    dev_2.publish(topics.telemetry("dev-2"), marker)
    ctl.wait_for(topics.telemetry("dev-2"), marker)
    assert (dev_2.client.connects, dev_2.disconnects) == (1, 0)
    # Proof 3: the liar has dev-1's rights only.
    forged, own = b"forged-as-dev-2", b"liar-as-dev-1"
    liar.publish(topics.telemetry("dev-2"), forged)
    liar.publish(topics.telemetry("dev-1"), own)
    ctl.wait_for(topics.telemetry("dev-1"), own)
    assert not ctl.got(topics.telemetry("dev-2"), forged)


def test_one_name_in_two_roles(broker: TlsBroker, pki: Pki) -> None:
    """A device certificate named like a controller of the users file: amqtt reads the
    certificate's role (OU) and refuses the conflict; Mosquitto cannot read the OU, so the
    name's users-file role applies -- which is why the fleet CA refuses to issue one name in
    two roles (``CANameTaken``; this certificate was made outside its ledger)."""
    code = connack(broker, pki.context(impostor=True), "ctl-a")
    assert code == (5 if broker.name == "amqtt" else 0)


# -- what each may do ----------------------------------------------------------------------


def test_a_device_cannot_publish_under_another_devices_prefix(clients: Any) -> None:
    ctl = clients("ctl-obs")
    ctl.subscribe(topics.PREFIX + "/#")
    dev = clients("dev-1")
    state, forged = b"dev-1-state", b"forged-by-dev-1"
    dev.publish(topics.state("dev-1"), state, retain=True)
    for topic in (topics.state("dev-2"), topics.telemetry("dev-2"), topics.events("dev-2"), topics.desired("dev-1")):
        dev.publish(topic, forged)
    marker = b"dev-1-marker"
    dev.publish(topics.events("dev-1"), marker)
    ctl.wait_for(topics.state("dev-1"), state)
    ctl.wait_for(topics.events("dev-1"), marker)  # published after the forged ones
    assert not [m for m in ctl.messages if m.payload == forged]


def test_a_device_cannot_read_another_devices_desired_state(clients: Any) -> None:
    ctl = clients("ctl-a")
    ctl.subscribe(topics.PREFIX + "/#")
    secret, mine = b"desired-of-dev-2", b"desired-of-dev-1"
    ctl.publish(topics.desired("dev-2"), secret, retain=True)
    ctl.publish(topics.desired("dev-1"), mine, retain=True)
    ctl.wait_for(topics.desired("dev-1"), mine)
    dev = clients("dev-1")
    for f in (topics.desired("dev-2"), topics.all_devices("desired"), topics.desired("dev-1")):
        try:
            dev.subscribe(f)
        except Exception:  # amqtt refuses with SUBACK 0x80, Mosquitto grants and filters
            pass
    dev.wait_for(topics.desired("dev-1"), mine)
    live, marker = b"live-desired-of-dev-2", b"desired-marker"
    ctl.publish(topics.desired("dev-2"), live)
    ctl.publish(topics.desired("dev-1"), marker)
    dev.wait_for(topics.desired("dev-1"), marker)
    assert not dev.got(topics.desired("dev-2")), "dev-1 read dev-2's desired state"


def test_the_controller_certificate_subscribes_to_the_fleet(clients: Any) -> None:
    ctl = clients("ctl-a")
    ctl.subscribe(*(f for f, _ in topics.controller_subscriptions()))
    dev = clients("dev-2")
    dev.subscribe(topics.cmd("dev-2"))
    tele, cmd = b"dev-2-telemetry", b"cmd-for-dev-2"
    dev.publish(topics.telemetry("dev-2"), tele)
    ctl.wait_for(topics.telemetry("dev-2"), tele)
    ctl.publish(topics.cmd("dev-2"), cmd)
    dev.wait_for(topics.cmd("dev-2"), cmd)


# -- the whole fleet over mutual TLS ------------------------------------------------------------


@pytest.fixture
def mosquitto_only(broker: TlsBroker) -> TlsBroker:
    if broker.name != "mosquitto":
        pytest.skip("the end-to-end run is on Mosquitto (issue 7); amqtt's TLS is covered above")
    return broker


def served_version(url: str, name: str) -> Any:
    with urllib.request.urlopen(f"{url}/v1/models/{name}", timeout=10) as r:
        status = json.loads(r.read())
    return next((v["version"] for v in status.get("model_version_status", []) if v.get("state") == "AVAILABLE"), None)


def test_agent_and_controller_over_mutual_tls_roll_out_a_signed_model(mosquitto_only: TlsBroker, pki: Pki,
                                                                      tmp_path: Path, model_files: Any,
                                                                      zoo: Any) -> None:
    broker = mosquitto_only
    keys = make_keys(tmp_path / "keys")
    ctl_cert, ctl_key = pki.certs["ctl-a"]
    ctl = ControllerProcess(broker.url, tmp_path / "ctl", keys, instance="ctl-a",
                            extra=("--tls-ca", str(pki.ca_file), "--tls-cert", str(ctl_cert), "--tls-key", str(ctl_key)))
    fleet = DeviceFleet(broker.url, tmp_path / "devs", keys, ["dev-1"], extra={"broker": pki.mqtt("dev-1")})
    try:
        fleet.wait_ready()
        with ApiClient(broker.url, timeout=20, **pki.mqtt("op-1")) as api:
            assert api.client_id == "op-1"  # the certificate's name: Mosquitto's client id for it

            def controller_online() -> bool:
                assert ctl.alive, ctl.log_text()[-4000:]
                return bool(api.controller and api.controller.online and api.controller.instance == "ctl-a")

            wait_until(controller_online, timeout=30, what="fleetctl serve online over mTLS")
            wait_until(lambda: any(d["id"] == "dev-1" and d["online"] for d in api.call("devices.list")),
                       timeout=30, what="dev-1 online at the controller")
            push_model(api, model_files["tiny_v1"], "kws", "1")
            row = api.call("deploy", model="kws", version="1", to="all", soak_s=0.5)
            final = wait_until(lambda: (lambda r: r if r["state"] in ("succeeded", "aborted") else None)(
                api.call("rollouts.show", id=row["id"])), timeout=90, interval=0.3, what="the rollout to finish")
            assert final["state"] == "succeeded", final
        assert served_version(fleet.rest_url("dev-1"), "kws") == "1"
        inputs = zoo["tiny_v1"].sample_inputs()
        body = json.dumps({"instances": inputs["x"].tolist()}).encode()
        req = urllib.request.Request(f"{fleet.rest_url('dev-1')}/v1/models/kws:predict", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            got = np.asarray(json.loads(r.read())["predictions"], np.float32)
        assert np.allclose(got, zoo["tiny_v1"].reference(inputs)["y"], atol=1e-4, rtol=1e-4)
    finally:
        fleet.close()
        ctl.__exit__(None, None, None)
    log = broker.log_tail(400)
    assert "as dev-1 (" in log and "u'dev-1'" in log and "u'ctl-a'" in log and "u'op-1'" in log, log
