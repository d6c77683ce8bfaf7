"""The controller's parts over a real SQLite store and real keys, without a broker:
desired documents (built, signed, verified by the device's own trust code, re-signed
before they expire), ingest (bad input refused with a reason and nothing stored,
redeliveries counted once; the batching writer acknowledges only after a commit and holds
on while the database is down), commands (seq per device, bad args cost no seq)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from controller.commands import CommandSender
from controller.desired import DesiredPublisher
from controller.ingest import Ingest, Ingested, IngestWriter
from controller.store import Assignment, ReleaseRecord, Store, StoreUnavailable
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.trust import Rejection, TrustedState
from tests.fleetkit import make_keys
from tests.helpers import wait_until
from tests.agentkit import manifest_for

T0 = float(int(time.time()))  # the root make_keys writes is valid from now for a year


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts(tmp_path: Path, model_files: dict[str, Path]) -> Any:
    from controller.keys import KeyDir

    keys = KeyDir(make_keys(tmp_path / "keys"))
    store = Store.open(f"sqlite:///{tmp_path / 'ctl.db'}")
    clock = Clock()
    sent: list[tuple[str, bytes]] = []
    manifest = manifest_for(model_files["tiny_v1"], "kws", "1")
    store.register_device("dev-1", now=T0)
    store.add_release(ReleaseRecord(model="kws", version="1", sha256=manifest["sha256"], size=manifest["size"],
                                    manifest=manifest, envelope="{}", created_at=T0, created_by="test"))
    yield keys, store, clock, sent
    store.close()


def trusted(keys: Any) -> TrustedState:
    return TrustedState.bootstrap((Path(keys.path) / "root.json").read_bytes(), device_id="dev-1")


def test_desired_is_signed_for_the_device_verified_by_its_trust_and_resigned_before_expiry(parts):
    keys, store, clock, sent = parts
    publisher = DesiredPublisher(store, keys, lambda t, p: sent.append((t, p)), clock=clock,
                                 valid_for=timedelta(hours=2))
    assert publisher.publish("dev-1") is None  # nothing assigned yet: nothing to publish
    store.set_assignments({"dev-1": {"kws": Assignment("dev-1", "kws", "1")}}, now=T0)
    assert publisher.publish("dev-1") == 1
    topic, doc = sent[-1]
    assert topic == topics.desired("dev-1")
    when = datetime.fromtimestamp(clock.now, timezone.utc)
    verified = trusted(keys).verify_desired(doc, when, body_model=messages.DesiredState)
    assert verified.accepted and verified.body.generation == 1
    assert verified.body.models["kws"].version == "1"
    with pytest.raises(Rejection) as rejected:  # another device refuses it
        TrustedState.bootstrap((Path(keys.path) / "root.json").read_bytes(), device_id="dev-2").verify_desired(doc, when)
    assert rejected.value.reason == "wrong_device"

    # fresh: the same bytes go out again, nothing re-signed
    assert publisher.publish("dev-1") == 1 and sent[-1][1] == doc and publisher.signed == 1
    clock.now += 30 * 60
    assert publisher.refresh_expiring() == 0
    # past half its validity: re-signed, same generation, later expiry; the device takes it as current
    clock.now += 31 * 60
    assert publisher.refresh_expiring() == 1 and publisher.signed == 2
    fresh = sent[-1][1]
    assert fresh != doc
    body = json.loads(__import__("base64").b64decode(json.loads(fresh)["payload"]))
    assert body["generation"] == 1
    assert datetime.fromisoformat(body["expires"].replace("Z", "+00:00")).timestamp() > clock.now + 3600
    state = verified.state
    again = state.verify_desired(fresh, datetime.fromtimestamp(clock.now, timezone.utc))
    assert again.body.generation == 1  # benign: the generation it holds

    # a new assignment: a new generation, signed at once
    store.set_assignments({"dev-1": {"kws": None}}, now=clock.now)
    assert publisher.publish("dev-1") == 2


def test_ingest_refuses_bad_input_with_a_reason_and_stores_nothing(parts):
    _keys, store, clock, _sent = parts
    ingest = Ingest(store, clock=clock)
    topic = topics.telemetry("dev-1")
    good = messages.Telemetry(seq=7, at=datetime.fromtimestamp(T0, timezone.utc), interval_s=1,
                              system=messages.SystemFigures(cpu_percent=5, memory_total_bytes=100,
                                                            memory_available_bytes=50))
    payload = messages.encode(good)
    cases = {
        "malformed": [b"{not json", b'{"seq": -1}', b"[]", payload.replace(b'"seq":7', b'"seq":-7')],
        "too_large": [b"{" + b" " * (70 * 1024) + b"}"],
    }
    for reason, payloads in cases.items():
        for p in payloads:
            assert ingest.handle(topic, p) is None
        assert ingest.rejected[reason] == len(payloads)
    assert ingest.handle("fleet/v1/dev/dev-1/desired", payload) is None  # not a report
    assert ingest.handle("elsewhere/x", payload) is None
    assert store.recent_telemetry() == []

    first = ingest.handle(topic, payload)
    assert first is not None and first.new
    again = ingest.handle(topic, payload)  # a redelivery
    assert again is not None and not again.new
    assert ingest.stored["telemetry"] == 1 and ingest.duplicates["telemetry"] == 1
    assert [t["seq"] for t in store.recent_telemetry()] == [7]


def _telemetry(seq: int) -> bytes:
    return messages.encode(messages.Telemetry(
        seq=seq, at=datetime.fromtimestamp(T0, timezone.utc), interval_s=1,
        system=messages.SystemFigures(cpu_percent=5, memory_total_bytes=100, memory_available_bytes=50)))


def test_ingest_batch_keeps_the_good_when_the_database_refuses_one(parts, monkeypatch):
    _keys, store, clock, _sent = parts
    ingest = Ingest(store, clock=clock)
    real = store.ingest_many

    def refuse_seq_3(reports):
        if any(r.data.get("seq") == 3 for r in reports):
            raise RuntimeError("the database refused seq 3")
        return real(reports)

    monkeypatch.setattr(store, "ingest_many", refuse_seq_3)
    out = ingest.handle_many([(topics.telemetry("dev-1"), _telemetry(seq), T0) for seq in (1, 2, 3, 4)]
                             + [(topics.telemetry("dev-1"), b"{bad", T0)])
    assert [o is not None and o.new for o in out] == [True, True, False, True, False]
    assert out[2] is None and out[4] is None
    assert sorted(t["seq"] for t in store.recent_telemetry()) == [1, 2, 4]
    assert ingest.rejected["store_error"] == 1 and ingest.rejected["malformed"] == 1


def test_ingest_writer_acknowledges_after_the_commit_and_waits_out_an_outage(parts, monkeypatch):
    """Messages are handed back (to be acknowledged) in arrival order, each only once its
    batch is stored; while the database is unavailable nothing is handed back and nothing is
    lost: the batch is retried until it goes in."""
    _keys, store, clock, _sent = parts
    ingest = Ingest(store, clock=clock)
    real = store.ingest_many
    down = threading.Event()
    down.set()
    attempts: list[int] = []

    def flaky(reports):
        attempts.append(len(reports))
        if down.is_set():
            raise StoreUnavailable("database test is unavailable")
        return real(reports)

    monkeypatch.setattr(store, "ingest_many", flaky)
    done: list[tuple[int, bool, int]] = []
    all_done = threading.Event()

    def on_done(item: int, result: Ingested | None) -> None:
        # what was handed back is on disk already
        held = {t["seq"] for t in store.recent_telemetry(limit=1000)}
        done.append((item, result is not None and result.new, item in held))
        if len(done) == 40:
            all_done.set()

    writer: IngestWriter[int] = IngestWriter(ingest, on_done, max_batch=16, retry_max_s=0.05)
    writer.start()
    try:
        for seq in range(1, 41):
            writer.put(seq, topics.telemetry("dev-1"), _telemetry(seq))
        wait_until(lambda: len(attempts) >= 3, timeout=10, what="the writer retrying the batch")
        assert done == []  # retried, nothing acknowledged
        down.clear()
        assert all_done.wait(10)
    finally:
        writer.stop()
    assert [d[0] for d in done] == list(range(1, 41))  # arrival order
    assert all(new and stored for _, new, stored in done)
    assert max(attempts) <= 16 and writer.batches >= 3


def test_ingest_writer_stop_stores_what_was_queued(parts):
    _keys, store, clock, _sent = parts
    done: list[int] = []
    writer: IngestWriter[int] = IngestWriter(Ingest(store, clock=clock), lambda item, _r: done.append(item))
    writer.start()
    for seq in range(1, 201):
        writer.put(seq, topics.telemetry("dev-2"), _telemetry(seq))
    writer.stop()
    assert done == list(range(1, 201))
    assert len(store.recent_telemetry(device_id="dev-2", limit=500)) == 200


def test_commands_get_growing_seqs_and_bad_args_cost_no_seq(parts):
    keys, store, clock, sent = parts
    sender = CommandSender(store, keys, lambda t, p: sent.append((t, p)), clock=clock)
    with pytest.raises(ValueError):
        sender.send("dev-1", "set-config", {"telemetry_interval_s": 0.001}, actor="t", wait_s=0)
    a = sender.send("dev-1", "ping", {}, actor="t", wait_s=0)
    b = sender.send("dev-1", "diagnostics", {"log_lines": 5}, actor="t", wait_s=0)
    assert (a.seq, b.seq) == (1, 2) and a.state == "sent"
    when = datetime.fromtimestamp(clock.now, timezone.utc)
    state = trusted(keys)
    for (topic, doc), seq in zip(sent, (1, 2)):
        assert topic == topics.cmd("dev-1")
        v = state.verify_command(doc, when, body_model=messages.Command)
        assert v.accepted and v.body.seq == seq
        state = v.state
    with pytest.raises(Rejection) as replay:  # the device's floor refuses the same command again
        state.verify_command(sent[0][1], when)
    assert replay.value.reason == "rollback"
