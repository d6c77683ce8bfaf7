"""Every report the broker acknowledged to a device is stored, also when the controller
is SIGKILLed while it holds reports it has not committed yet.

The controller PUBACKs a report only after the transaction that stored it committed, and
(with a stable ``--instance``, not ``--shared``) keeps a persistent session, so what it
held when it died, and what arrived while it was down, comes again when it returns.
Mosquitto is the broker here: amqtt does not keep messages for a session it sees as
anonymous. The database is held locked from this process (one SQLite writer at a time)
so the controller provably has reports in memory, not on disk, when it is killed: with
paho's automatic acknowledgement those were lost.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest

from edge_runtime.mqtt import MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from tests.brokers import MosquittoBroker, mosquitto_binary
from tests.fleetkit import ControllerProcess, make_keys, scrape
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

DEVICES = 10
PER_DEVICE = 30


def telemetry(seq: int) -> bytes:
    return messages.encode(messages.Telemetry(
        seq=seq, at=datetime.now(timezone.utc), interval_s=1,
        system=messages.SystemFigures(cpu_percent=5, memory_total_bytes=100, memory_available_bytes=50)))


def stored(db: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    finally:
        con.close()


def test_reports_held_in_memory_at_a_sigkill_are_stored_after_the_restart(tmp_path):
    keys = make_keys(tmp_path / "keys")
    with MosquittoBroker() as broker:
        ctl = ControllerProcess(broker.url, tmp_path / "ctl", keys, instance="durable")
        with ctl:
            ctl.wait_online(60)
            db = str(ctl.data / "controller.db")
            lock = sqlite3.connect(db, timeout=30, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # the controller's writer now waits for the database
            pub = MqttClient(MqttConfig(url=broker.url, client_id="publisher"))
            pub.connect(timeout=10)
            try:
                half = PER_DEVICE // 2
                for seq in range(1, half + 1):
                    for k in range(DEVICES):
                        pub.publish(topics.telemetry(f"dev-{k}"), telemetry(seq), qos=1, timeout=10)
                # the controller has taken reports in and cannot store them
                wait_until(lambda: scrape(ctl.metrics_port).get('edgefleet_ingest_received_total{kind="telemetry"}', 0) > 0,
                           timeout=30, what="the controller to receive telemetry")
                ctl.kill()
                lock.execute("ROLLBACK")
                assert stored(db) == 0  # nothing was stored before the kill
                for seq in range(half + 1, PER_DEVICE + 1):  # and more while it is down
                    for k in range(DEVICES):
                        pub.publish(topics.telemetry(f"dev-{k}"), telemetry(seq), qos=1, timeout=10)
            finally:
                lock.close()
                pub.disconnect()
            ctl.start()
            ctl.wait_online(60)
            wait_until(lambda: stored(db) >= DEVICES * PER_DEVICE, timeout=60,
                       what=f"all {DEVICES * PER_DEVICE} acknowledged reports stored")
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                per_device = dict(con.execute("SELECT device_id, count(DISTINCT seq) FROM telemetry GROUP BY device_id"))
            finally:
                con.close()
            assert per_device == {f"dev-{k}": PER_DEVICE for k in range(DEVICES)}
