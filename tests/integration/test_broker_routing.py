"""The embedded broker's indexed routing on a live broker: ``FleetBroker`` (with the fleet
plugins and a users file, as ``fleetctl broker`` runs it) on an asyncio loop in a thread
of the test process, real MQTT clients (``edge_runtime.mqtt``) over TCP.

The broker runs in-process so that a case can wait, with a deadline, for the broker to
have *processed* an UNSUBSCRIBE or a DISCONNECT (the client API does not wait for either)
by polling the broker's own tables, and can check after each step that the index routes
every topic as amqtt's linear walk would. "Not delivered" is shown as in
test_broker_acl.py: a marker sent after the message by the same publisher arrives, so the
message would have arrived before it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

pytest.importorskip("amqtt.broker")

from amqtt.broker import Broker  # noqa: E402

from controller.broker import FleetBroker, broker_config  # noqa: E402
from controller.cli import main as fleetctl  # noqa: E402
from edge_runtime.mqtt import Message, MqttClient, MqttConfig  # noqa: E402
from edge_runtime.protocol import topics  # noqa: E402
from tests.brokers import free_port  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

PASSWORD = "s3cret-for-routing-tests"
USERS = {"dev-1": "device", "dev-2": "device", "ctl": "controller", "ctl2": "controller"}
WAIT = 10.0


class LiveBroker:
    """A started ``FleetBroker`` on its own event loop thread."""

    def __init__(self, users: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-broker", daemon=True)
        self.thread.start()
        config = broker_config(f"127.0.0.1:{self.port}", users, None, False)

        async def start() -> FleetBroker:
            broker = FleetBroker(config)
            await broker.start()
            return broker

        self.broker: FleetBroker = self.call(start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def inspect(self, fn: Any) -> Any:
        """``fn()`` run on the broker's loop (its tables are not thread-safe)."""
        async def run() -> Any:
            return fn()
        return self.call(run())

    def holders(self, topic_filter: str) -> list[str]:
        return self.inspect(lambda: [s.client_id for s, _ in self.broker._subscriptions.get(topic_filter, [])])

    def session_state(self, client_id: str) -> Optional[str]:
        def state() -> Optional[str]:
            entry = self.broker._sessions.get(client_id)
            return entry[0].transitions.state if entry else None
        return self.inspect(state)

    def routes_like_amqtt(self, topic: str) -> bool:
        """The index's answer for ``topic`` equals amqtt's walk over the live table."""
        def compare() -> bool:
            table = self.broker._subscriptions
            walk = [f for f in dict.keys(table) if Broker._matches(self.broker, topic, f)]
            return [f for f, _ in table.route(topic)] == walk
        return bool(self.inspect(compare))

    def close(self) -> None:
        try:
            self.call(self.broker.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()


class Client:
    """One connected client recording every message it gets."""

    def __init__(self, broker: LiveBroker, user: str, client_id: Optional[str] = None, *, clean: bool = True) -> None:
        self.client_id = client_id or user
        self.client = MqttClient(MqttConfig(url=broker.url, client_id=self.client_id, username=user,
                                            password=PASSWORD, clean_start=clean, operation_timeout=WAIT))
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client.add_handler("#", self._got)
        self.client.connect(timeout=WAIT)

    def _got(self, msg: Message) -> None:
        with self._lock:
            self.messages.append(msg)

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str, payload: bytes) -> None:
        wait_until(lambda: payload in self.payloads(topic), timeout=WAIT, what=f"{payload!r} on {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        try:
            self.client.disconnect(timeout=WAIT)
        except Exception:
            pass


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveBroker, list[Client]]]:
    users, pw = tmp_path / "users.json", tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    for name, role in USERS.items():
        assert fleetctl(["broker", "user", "add", name, "--role", role, "--users", str(users),
                         "--password-file", str(pw)]) == 0
    broker = LiveBroker(users)
    clients: list[Client] = []
    try:
        yield broker, clients
    finally:
        for c in clients:
            c.close()
        broker.close()


TELEMETRY_1 = topics.device_topic("dev-1", "telemetry")
TELEMETRY_2 = topics.device_topic("dev-2", "telemetry")
DESIRED_1 = topics.desired("dev-1")
DESIRED_2 = topics.desired("dev-2")
MARKER = topics.CTL_STATE  # every device and controller may read it


def everything_routes_like_amqtt(broker: LiveBroker) -> None:
    for topic in (TELEMETRY_1, TELEMETRY_2, DESIRED_1, DESIRED_2, MARKER, topics.cmd("dev-1"),
                  topics.device_topic("dev-1", "state"), "$SYS/broker/uptime"):
        assert broker.routes_like_amqtt(topic), topic


def test_wildcard_and_exact_subscribers_get_each_message_once_per_filter(live: Any) -> None:
    broker, clients = live
    ctl = Client(broker, "ctl")
    clients.append(ctl)
    ctl.client.subscribe([(topics.all_devices("telemetry"), 1), (TELEMETRY_1, 1), (MARKER, 1)])
    dev = Client(broker, "dev-1")
    clients.append(dev)
    everything_routes_like_amqtt(broker)
    dev.publish(TELEMETRY_1, b"t1")
    dev.publish(topics.device_topic("dev-1", "events"), b"e1")  # ctl holds no filter for it
    ctl.client.publish(MARKER, b"m1", qos=1)
    ctl.wait_for(MARKER, b"m1")
    wait_until(lambda: len(ctl.payloads(TELEMETRY_1)) == 2, timeout=WAIT, what="t1 through both filters")
    assert ctl.payloads(TELEMETRY_1) == [b"t1", b"t1"]  # amqtt sends once per matching filter
    assert ctl.payloads(topics.device_topic("dev-1", "events")) == []


def test_unsubscribed_client_receives_nothing_more(live: Any) -> None:
    broker, clients = live
    ctl, other = Client(broker, "ctl"), Client(broker, "ctl2")
    clients += [ctl, other]
    wild = topics.all_devices("telemetry")
    ctl.client.subscribe([(wild, 1), (TELEMETRY_2, 1), (MARKER, 1)])
    other.client.subscribe([(wild, 1)])
    dev = Client(broker, "dev-2")
    clients.append(dev)
    dev.publish(TELEMETRY_2, b"before")
    wait_until(lambda: ctl.payloads(TELEMETRY_2) == [b"before", b"before"], timeout=WAIT, what="both copies")

    ctl.client.unsubscribe([wild, TELEMETRY_2])
    wait_until(lambda: "ctl" not in broker.holders(wild) and "ctl" not in broker.holders(TELEMETRY_2),
               timeout=WAIT, what="the broker to process the UNSUBSCRIBE")
    assert broker.holders(wild) == ["ctl2"]  # the filter stays for the other holder
    everything_routes_like_amqtt(broker)
    dev.publish(TELEMETRY_2, b"after")
    other.wait_for(TELEMETRY_2, b"after")
    ctl.client.publish(MARKER, b"marker", qos=1)  # after "after" reached the other holder
    ctl.wait_for(MARKER, b"marker")
    assert ctl.payloads(TELEMETRY_2) == [b"before", b"before"]


def test_clean_session_that_disconnected_receives_nothing_more(live: Any) -> None:
    broker, clients = live
    wild = topics.all_devices("telemetry")
    gone = Client(broker, "ctl")
    gone.client.subscribe([(wild, 1)])
    gone.close()
    wait_until(lambda: broker.session_state("ctl") is None and broker.holders(wild) == [],
               timeout=WAIT, what="the clean session's cleanup")
    assert wild not in broker.inspect(lambda: list(broker.broker._subscriptions))
    everything_routes_like_amqtt(broker)

    back = Client(broker, "ctl")  # same client id, clean: its old filter must not come back
    clients.append(back)
    back.client.subscribe([(MARKER, 1)])
    dev = Client(broker, "dev-1")
    clients.append(dev)
    dev.publish(TELEMETRY_1, b"t")
    back.client.publish(MARKER, b"marker", qos=1)
    back.wait_for(MARKER, b"marker")
    assert back.payloads(TELEMETRY_1) == []


def test_persistent_offline_session_gets_its_qos1_messages_stored(live: Any) -> None:
    broker, clients = live
    wild = topics.all_devices("telemetry")
    ctl = Client(broker, "ctl", clean=False)
    ctl.client.subscribe([(wild, 1), (TELEMETRY_1, 1)])
    ctl.close()
    wait_until(lambda: broker.session_state("ctl") == "disconnected", timeout=WAIT,
               what="the persistent session to go offline")
    assert broker.holders(wild) == ["ctl"] and broker.holders(TELEMETRY_1) == ["ctl"]
    everything_routes_like_amqtt(broker)

    dev = Client(broker, "dev-1")
    clients.append(dev)
    dev.publish(TELEMETRY_1, b"while-offline")
    stored = lambda: broker.inspect(lambda: broker.broker._sessions["ctl"][0].retained_messages.qsize())  # noqa: E731
    wait_until(lambda: stored() == 2, timeout=WAIT, what="one stored copy per filter")

    back = Client(broker, "ctl", clean=False)
    clients.append(back)
    wait_until(lambda: back.payloads(TELEMETRY_1) == [b"while-offline", b"while-offline"], timeout=WAIT,
               what="the stored messages on reconnect")


def test_a_device_never_receives_another_devices_topic(live: Any) -> None:
    """Routing finds dev-2's subscription for a matching topic only through filters dev-2
    holds; the RECEIVE check still runs per subscriber (the ACL plugin refuses dev-2 a
    filter on dev-1's topics at SUBSCRIBE, so the broker's table is filled directly here
    to prove the delivery check, not the subscribe check, stops it)."""
    broker, clients = live
    dev2 = Client(broker, "dev-2")
    clients.append(dev2)
    dev2.client.subscribe([(MARKER, 1)])

    async def sneak_in() -> None:  # as if dev-2 held a filter covering dev-1's desired state
        session = broker.broker._sessions["dev-2"][0]
        broker.broker._subscriptions.setdefault(topics.all_devices("desired"), []).append((session, 1))
        broker.broker._subscriptions.setdefault(DESIRED_1, []).append((session, 1))

    broker.call(sneak_in())
    everything_routes_like_amqtt(broker)
    ctl = Client(broker, "ctl")
    clients.append(ctl)
    ctl.publish(DESIRED_1, b"for-dev-1")
    ctl.publish(DESIRED_2, b"for-dev-2")
    ctl.publish(MARKER, b"marker")
    dev2.wait_for(MARKER, b"marker")
    dev2.wait_for(DESIRED_2, b"for-dev-2")  # through the sneaked-in wildcard: its own topic
    assert dev2.payloads(DESIRED_1) == []
