"""edge_runtime.mqtt against real brokers: amqtt and Mosquitto, as subprocesses.

Every wait is on an event, a queue or a deadline poll; nothing sleeps and hopes.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed in this venv")

from edge_runtime.mqtt import (  # noqa: E402
    ConnectFailed,
    Message,
    MqttClient,
    MqttConfig,
    MqttError,
    MqttTimeout,
    NotConnected,
    PublishTimeout,
    SubscribeTimeout,
    Will,
)
from tests.brokers import AmqttBroker, free_port, make_broker, mosquitto_binary  # noqa: E402
from tests.brokers import amqtt_broker, broker, mosquitto_broker  # noqa: E402,F401 - fixtures
from tests.helpers import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.disconnect(timeout=5)


def client(broker, made: list[MqttClient], *, connect: bool = True, hooks: dict | None = None, **cfg) -> MqttClient:
    cfg.setdefault("reconnect_min_delay", 0.05)
    cfg.setdefault("reconnect_max_delay", 0.3)
    cfg.setdefault("keepalive", 5)
    c = MqttClient(MqttConfig(url=broker.url, **cfg), **(hooks or {}))
    made.append(c)
    if connect:
        c.connect(timeout=5)
    return c


def get(q: "queue.Queue[Message]", timeout: float = 5.0) -> Message:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message within {timeout}s") from None


@pytest.mark.parametrize("qos", [0, 1])
def test_round_trip(broker, clients, qos):
    sub = client(broker, clients, client_id="sub")
    pub = client(broker, clients, client_id="pub")
    inbox = sub.queue("fleet/v1/dev/+/telemetry")
    assert sub.subscribe([("fleet/v1/dev/+/telemetry", qos)], timeout=5) == [qos]
    for i in range(20):
        pub.publish("fleet/v1/dev/d1/telemetry", f"m{i}".encode(), qos=qos, timeout=5)
    got = [get(inbox) for _ in range(20)]
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]  # in order, none lost
    assert {(m.topic, m.qos, m.retain) for m in got} == {("fleet/v1/dev/d1/telemetry", qos, False)}


def test_retained_message_reaches_a_late_subscriber_and_can_be_cleared(broker, clients):
    pub = client(broker, clients)
    pub.publish("fleet/v1/dev/d1/state", b'{"online":true}', qos=1, retain=True, timeout=5)
    late = client(broker, clients)
    inbox = late.queue("fleet/v1/dev/d1/state")
    late.subscribe([("fleet/v1/dev/d1/state", 1)], timeout=5)
    m = get(inbox)
    assert (m.payload, m.retain, m.qos) == (b'{"online":true}', True, 1)
    # A live publish to a subscriber is not flagged retained, even if it was sent retained.
    pub.publish("fleet/v1/dev/d1/state", b'{"online":true,"n":2}', qos=1, retain=True, timeout=5)
    assert get(inbox).retain is False
    # An empty retained payload clears it: the next subscriber gets nothing.
    pub.publish("fleet/v1/dev/d1/state", b"", qos=1, retain=True, timeout=5)
    marker = client(broker, clients)
    q2 = marker.queue("#")
    marker.subscribe([("fleet/v1/dev/d1/state", 1), ("mark", 1)], timeout=5)
    marker.publish("mark", b"x", qos=1, timeout=5)
    assert get(q2).topic == "mark"  # the marker came back and no retained state came first


def test_handlers_and_hooks_run_off_the_network_thread(broker, clients):
    """A handler may publish and wait for the PUBACK (request/response)."""
    server = client(broker, clients, client_id="server")
    server.add_handler("req/+", lambda m: server.publish("rep/" + m.topic.split("/")[1], m.payload[::-1], qos=1, timeout=5))
    server.subscribe([("req/+", 1)], timeout=5)
    caller = client(broker, clients)
    replies = caller.queue("rep/#")
    caller.subscribe([("rep/#", 1)], timeout=5)
    caller.publish("req/abc", b"hello", qos=1, timeout=5)
    m = get(replies)
    assert (m.topic, m.payload) == ("rep/abc", b"olleh")


WILL_CHILD = textwrap.dedent("""
    import sys, threading
    from edge_runtime.mqtt import MqttClient, MqttConfig, Will
    url, topic = sys.argv[1], sys.argv[2]
    c = MqttClient(MqttConfig(url=url, client_id="doomed", keepalive=5,
                              will=Will(topic=topic, payload=b"offline", qos=1, retain=True)))
    c.connect(timeout=10)
    c.publish(topic, b"online", qos=1, retain=True, timeout=10)
    threading.Event().wait()
""")


def test_last_will_is_published_when_the_client_process_is_sigkilled(broker, clients):
    watcher = client(broker, clients)
    inbox = watcher.queue("fleet/v1/dev/doomed/state")
    watcher.subscribe([("fleet/v1/dev/doomed/state", 1)], timeout=5)
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, broker.url, "fleet/v1/dev/doomed/state"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert get(inbox, 15).payload == b"online"
        child.kill()
        child.wait(5)
        assert get(inbox, 10).payload == b"offline"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    # The Will was retained: a newcomer learns the device is offline.
    late = client(broker, clients)
    q = late.queue("fleet/v1/dev/doomed/state")
    late.subscribe([("fleet/v1/dev/doomed/state", 1)], timeout=5)
    m = get(q)
    assert (m.payload, m.retain) == (b"offline", True)


def test_clean_disconnect_does_not_publish_the_will(broker, clients):
    watcher = client(broker, clients)
    inbox = watcher.queue("#")
    watcher.subscribe([("will/x", 1), ("mark", 1)], timeout=5)
    c = client(broker, clients, will=Will(topic="will/x", payload=b"dead", qos=1, retain=False))
    c.disconnect()
    watcher.publish("mark", b"", qos=1, timeout=5)
    assert get(inbox).topic == "mark"


def test_publish_and_subscribe_time_out_when_the_broker_is_frozen(broker, clients):
    c = client(broker, clients)
    broker.pause()  # SIGSTOP: the socket stays open, nothing answers
    try:
        t0 = time.monotonic()
        with pytest.raises(PublishTimeout):
            c.publish("a/b", b"x", qos=1, timeout=0.5)
        with pytest.raises(SubscribeTimeout):
            c.subscribe([("a/#", 1)], timeout=0.5)
        assert time.monotonic() - t0 < 3
    finally:
        broker.resume()
    c.publish("a/b", b"y", qos=1, timeout=5)  # the session survived the freeze


def test_publish_fails_fast_when_the_broker_is_killed(broker, clients):
    lost = threading.Event()
    c = client(broker, clients, hooks={"on_disconnect": lambda reason: lost.set()})
    broker.kill()
    t0 = time.monotonic()
    with pytest.raises((NotConnected, MqttTimeout)):
        for _ in range(100):  # until the client notices: each attempt is bounded
            c.publish("a/b", b"x", qos=1, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert lost.wait(5)
    with pytest.raises(NotConnected):
        c.publish("a/b", b"x", qos=1, timeout=0.5)
    with pytest.raises(NotConnected):
        c.subscribe([("a/#", 1)], timeout=0.5)


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_reconnects_after_the_broker_comes_back_and_hooks_resubscribe(broker, clients, how):
    connects: "queue.Queue[bool]" = queue.Queue()
    holder: list[MqttClient] = []

    def on_connect(session_present: bool) -> None:
        holder[0].subscribe([("fleet/v1/dev/d1/desired", 1)], timeout=5)  # blocking call inside a hook
        connects.put(session_present)

    c = client(broker, clients, connect=False, client_id="agent", hooks={"on_connect": on_connect})
    holder.append(c)
    inbox = c.queue("fleet/v1/dev/d1/desired")
    c.connect(timeout=5)
    assert connects.get(timeout=5) is False
    ctl = client(broker, clients, connect=False, client_id="ctl")

    if how == "kill":
        broker.kill()
        wait_until(lambda: not c.is_connected, timeout=5, what="the client to notice the broker died")
        broker.start()
    else:
        broker.restart()
    assert connects.get(timeout=10) is False  # hook fired again: a restarted broker forgot the session
    assert c.connects == 2
    ctl.connect(timeout=5)
    ctl.publish("fleet/v1/dev/d1/desired", b"gen-2", qos=1, timeout=5)
    assert get(inbox).payload == b"gen-2"  # the re-subscription works


def test_start_connects_in_the_background_once_the_broker_appears(clients, tmp_path):
    b = AmqttBroker(workdir=tmp_path)
    try:
        c = MqttClient(MqttConfig(url=b.url, reconnect_min_delay=0.05, reconnect_max_delay=0.2))
        clients.append(c)
        c.start()  # nothing listens yet
        assert not c.wait_connected(0.3)
        assert c.last_error and c.last_error.startswith("unreachable")
        with pytest.raises(NotConnected):
            c.publish("a", b"", qos=1)
        b.start()
        assert c.wait_connected(10)
        c.publish("a", b"", qos=1, timeout=5)
    finally:
        b.close()


def test_connect_to_a_closed_port_fails_within_the_timeout():
    c = MqttClient(MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}"))
    t0 = time.monotonic()
    with pytest.raises(ConnectFailed) as err:
        c.connect(timeout=2)
    assert time.monotonic() - t0 < 2.5
    assert err.value.reason.startswith("unreachable")
    c.disconnect()


def test_connect_to_a_frozen_broker_times_out(amqtt_broker):
    amqtt_broker.pause()
    try:
        c = MqttClient(MqttConfig(url=amqtt_broker.url))
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed) as err:
            c.connect(timeout=0.7)
        assert time.monotonic() - t0 < 2
        assert err.value.reason == "timeout"
        c.disconnect()
    finally:
        amqtt_broker.resume()


def test_mosquitto_refusal_carries_the_brokers_reason(tmp_path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found")
    (tmp_path / "pw").write_text("")
    b = make_broker("mosquitto", workdir=tmp_path, anonymous=False, extra_lines=(f"password_file {tmp_path / 'pw'}",))
    b.start()
    try:
        for protocol in ("3.1.1", "5"):
            c = MqttClient(MqttConfig(url=b.url, username="nobody", password="x", protocol=protocol))
            with pytest.raises(ConnectFailed) as err:
                c.connect(timeout=5)
            assert err.value.reason.startswith("refused:")
            assert "authori" in err.value.reason.lower()
            c.disconnect()
    finally:
        b.close()


def test_mqtt5_on_mosquitto(mosquitto_broker, clients):
    c = client(mosquitto_broker, clients, protocol="5")
    inbox = c.queue("v5/#")
    assert c.subscribe([("v5/#", 1)], timeout=5) == [1]
    c.publish("v5/a", b"x", qos=1, timeout=5)
    assert get(inbox).payload == b"x"


def test_amqtt_refuses_mqtt5(amqtt_broker):
    """amqtt 0.12 speaks MQTT 3.1.1 only: an MQTT 5 client gets a typed ConnectFailed."""
    c = MqttClient(MqttConfig(url=amqtt_broker.url, protocol="5"))
    with pytest.raises(ConnectFailed):
        c.connect(timeout=3)
    c.disconnect()


@pytest.mark.parametrize("kwargs,field", [
    ({"url": "http://x"}, "url"),
    ({"url": "mqtt://"}, "url"),
    ({"url": "mqtt://h:99999"}, "url"),
    ({"url": "mqtt://h/path"}, "url"),
    ({"url": "mqtt://h", "ca_file": "ca.pem"}, "ca_file"),
    ({"url": "mqtts://h", "cert_file": "c.pem"}, "cert_file"),
    ({"url": "mqtt://h", "protocol": "3"}, "protocol"),
    ({"url": "mqtt://h", "keepalive": -1}, "keepalive"),
    ({"url": "mqtt://h", "connect_timeout": 0}, "connect_timeout"),
    ({"url": "mqtt://h", "clean_start": False}, "client_id"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MqttConfig(**kwargs)


def test_config_url_parts():
    c = MqttConfig(url="mqtts://dev%401:s3cret@broker.local", ca_file="ca.pem", cert_file="c.pem", key_file="k.pem")
    assert (c.host, c.port, c.tls, c.credentials()) == ("broker.local", 8883, True, ("dev@1", "s3cret"))
    assert MqttConfig(url="mqtt://127.0.0.1").port == 1883
    assert issubclass(PublishTimeout, MqttError)


def test_manual_ack_holds_the_puback_until_the_handler_acks(mosquitto_broker, clients):
    """With manual_ack and a persistent session, a message the handler never acknowledged
    comes again when the session resumes; an acknowledged one does not; a message to a
    handler that does not ack itself is acknowledged once the handler returned."""
    cfg = dict(client_id="ctl-manual", clean_start=False, manual_ack=True)
    sub = client(mosquitto_broker, clients, **cfg)
    held: "queue.Queue[Message]" = queue.Queue()
    sub.add_handler("work/#", held.put, acks=True)
    plain = sub.queue("auto/#")
    sub.subscribe([("work/#", 1), ("auto/#", 1)], timeout=5)
    pub = client(mosquitto_broker, clients)
    for name in ("a", "b", "c"):
        pub.publish(f"work/{name}", name.encode(), qos=1, timeout=5)
    pub.publish("auto/x", b"x", qos=1, timeout=5)
    got = [get(held) for _ in range(3)]
    assert [m.payload for m in got] == [b"a", b"b", b"c"]
    assert get(plain).payload == b"x"
    sub.ack(got[1])  # only b is done
    # a round trip after the PUBACK: the broker has it before the session ends
    sub.publish("auto/mark", b"mark", qos=1, timeout=5)
    assert get(plain).payload == b"mark"
    sub.disconnect(timeout=5)

    again = client(mosquitto_broker, clients, connect=False, **cfg)
    redelivered: "queue.Queue[Message]" = queue.Queue()
    again.add_handler("work/#", redelivered.put, acks=True)
    auto_again = again.queue("auto/#")
    again.connect(timeout=5)  # the handlers are in place before the session resumes
    firsts = [get(redelivered) for _ in range(2)]
    assert sorted(m.payload for m in firsts) == [b"a", b"c"]
    for m in firsts:
        again.ack(m)
    pub.publish("work/z", b"z", qos=1, timeout=5)  # a marker behind anything else queued
    assert get(redelivered).payload == b"z"
    assert redelivered.empty() and auto_again.empty()  # b, x and mark were acknowledged: not again


def test_publish_without_waiting_is_delivered(broker, clients):
    sub = client(broker, clients)
    inbox = sub.queue("nowait/#")
    sub.subscribe([("nowait/#", 1)], timeout=5)
    pub = client(broker, clients)
    for i in range(50):
        pub.publish(f"nowait/{i}", str(i).encode(), qos=1, wait=False)
    assert sorted(int(get(inbox).payload) for _ in range(50)) == list(range(50))
