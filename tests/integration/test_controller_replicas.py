"""Two ``fleetctl serve --shared`` replicas on Mosquitto against one real PostgreSQL (a
throwaway cluster, tests/pg.py), with real device agents:

- every telemetry sample the devices published is stored exactly once, and both replicas
  took part (the shared subscription split the stream);
- a replayed sample (the same bytes published again) is not stored twice;
- one replica SIGKILLed mid-rollout: the other finishes the rollout.
"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from controller import schema
from controller.apiclient import ApiClient
from edge_runtime.mqtt import Message, MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from tests.fleetkit import ControllerProcess, DeviceFleet, make_keys, push_model
from tests.helpers import wait_until
from tests.pg import pg_cluster, pg_url  # noqa: F401 - fixtures

DEVICES = ["rep-a", "rep-b", "rep-c"]
NAME = "kws"


def stored_seqs(db_url: str) -> dict[str, list[int]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(schema.telemetry.c.device_id, schema.telemetry.c.seq)).all()
    finally:
        engine.dispose()
    out: dict[str, list[int]] = {}
    for device, seq in rows:
        out.setdefault(device, []).append(int(seq))
    return {d: sorted(s) for d, s in out.items()}


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value from a replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class TelemetryLog:
    """Every telemetry sample on the broker, as the devices published them."""

    def __init__(self, url: str) -> None:
        self.seen: dict[str, set[int]] = {}
        self.raw: list[Message] = []
        self._lock = threading.Lock()
        self.client = MqttClient(MqttConfig(url=url))
        self.client.add_handler(topics.all_devices("telemetry"), self._on)
        self.client.connect(timeout=10)
        self.client.subscribe([(topics.all_devices("telemetry"), 1)], timeout=10)

    def _on(self, msg: Message) -> None:
        t = messages.decode("telemetry", msg.payload)
        with self._lock:
            self.seen.setdefault(topics.parse(msg.topic).device, set()).add(t.seq)  # type: ignore[arg-type]
            self.raw.append(msg)

    def snapshot(self) -> dict[str, list[int]]:
        with self._lock:
            return {d: sorted(s) for d, s in self.seen.items()}

    def close(self) -> None:
        self.client.disconnect()


@pytest.fixture
def replicas(mosquitto_broker: Any, pg_url: str, tmp_path: Path):  # noqa: F811
    keys = make_keys(tmp_path / "keys")
    a = ControllerProcess(mosquitto_broker.url, tmp_path / "ctl-a", keys, db_url=pg_url, instance="rep-ctl-a",
                          extra=("--shared",))
    b = ControllerProcess(mosquitto_broker.url, tmp_path / "ctl-b", keys, db_url=pg_url, instance="rep-ctl-b",
                          extra=("--shared",))
    try:
        for c in (a, b):
            wait_until(lambda c=c: c.alive and "connected to" in c.log_text(), timeout=30,
                       what=f"{c.instance} connected")
        yield keys, a, b
    finally:
        for c in (a, b):
            c.__exit__(None, None, None)


def test_two_shared_replicas_store_every_telemetry_sample_exactly_once(replicas, mosquitto_broker, pg_url, tmp_path):
    keys, a, b = replicas
    log = TelemetryLog(mosquitto_broker.url)
    fleet = DeviceFleet(mosquitto_broker.url, tmp_path / "devs", keys, DEVICES, telemetry_interval_s=1.0)
    try:
        fleet.wait_ready()
        wait_until(lambda: all(len(log.snapshot().get(d, [])) >= 6 for d in DEVICES), timeout=60,
                   what="six samples from every device")
        for d in DEVICES:
            assert fleet.stop(d) == 0
        published = log.snapshot()
        wait_until(lambda: stored_seqs(pg_url) == published, timeout=30,
                   what="the database to hold exactly the published samples")

        # both replicas took samples in: the shared subscription split the stream
        per_replica = [scrape(c.metrics_port).get('edgefleet_ingest_messages_total{kind="telemetry",result="stored"}', 0)
                       for c in (a, b)]
        assert all(n > 0 for n in per_replica), per_replica
        assert sum(per_replica) == sum(len(s) for s in published.values())

        # a replay of the very same bytes is taken in again by one replica, and not stored
        replay = log.raw[0]
        with MqttClient(MqttConfig(url=mosquitto_broker.url)) as c:  # connects
            c.publish(replay.topic, replay.payload, qos=1, timeout=10)
        wait_until(lambda: sum(scrape(r.metrics_port).get(
            'edgefleet_ingest_messages_total{kind="telemetry",result="duplicate"}', 0) for r in (a, b)) == 1,
            timeout=20, what="the replay counted as a duplicate")
        assert stored_seqs(pg_url) == published
    finally:
        fleet.close()
        log.close()


def test_a_replica_killed_mid_rollout_leaves_the_other_to_finish_it(replicas, mosquitto_broker, pg_url, tmp_path,
                                                                      model_files):
    keys, a, b = replicas
    with DeviceFleet(mosquitto_broker.url, tmp_path / "devs", keys, DEVICES) as fleet:
        fleet.wait_ready()
        with ApiClient(mosquitto_broker.url, timeout=20) as api:
            wait_until(lambda: sum(d["online"] for d in api.call("devices.list")) == 3, timeout=30,
                       what="three devices online")
            push_model(api, model_files["tiny_v1"], NAME, "1")
            push_model(api, model_files["tiny_v2"], NAME, "2")
            first = api.call("deploy", model=NAME, version="1", to="all", soak_s=0.5)
            wait_until(lambda: api.call("rollouts.show", id=first["id"])["state"] == "succeeded", timeout=90,
                       what="v1 everywhere")

            row = api.call("deploy", model=NAME, version="2", to="all", canary_pct=33, waves=[100], soak_s=3)
            wait_until(lambda: api.call("rollouts.show", id=row["id"])["counts"].get("done", 0) >= 1, timeout=60,
                       what="the canary done")
            a.kill()
            final = wait_until(lambda: (lambda r: r if r["state"] in ("succeeded", "aborted") else None)(
                api.call("rollouts.show", id=row["id"])), timeout=90, what="the rollout to finish on replica b")
            assert final["state"] == "succeeded", final
            assert final["counts"] == {"done": 3}
            assert b.alive
            rows = {d["id"]: d for d in api.call("devices.list")}
            assert all(rows[d]["models"] == {NAME: "2"} for d in DEVICES), rows
