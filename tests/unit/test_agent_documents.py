"""The agent's document gate (agent/documents.py) on a real trust store: a desired state is
persisted before its floor moves, re-delivery is benign, refusals change nothing, and a
restarted (possibly offline) device gets back the document it accepted."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from edge_runtime.agent.documents import DESIRED_FILE, DocumentGate
from edge_runtime.protocol.trust import Reason
from edge_runtime.protocol.trust_store import TrustStore
from tests import trustkit
from tests.trustkit import DEVICE, NOW, T0

LATER = T0 + timedelta(days=400)  # past every document's expiry (and the root's)


def desired_doc(generation: int, *, target: Optional[dict[str, str]] = None, issued_at: datetime = T0,
                expires: datetime = T0 + timedelta(days=30), signers: tuple[str, ...] = ("deploy1",)) -> bytes:
    body = trustkit.doc_body("desired", target=target, issued_at=issued_at, expires=expires,
                             generation=generation, models={})
    return trustkit.sign("desired", body, signers)


def command_doc(seq: int, name: str = "ping", args: Optional[dict[str, Any]] = None) -> bytes:
    body = trustkit.doc_body("command", seq=seq, name=name, args=args or {})
    return trustkit.sign("command", body, ("command1",))


def corrupt_sig(data: bytes) -> bytes:
    def f(o: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(o["signatures"][0]["sig"]))
        sig[10] ^= 0x01
        o["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    return trustkit.edit(data, f)


@dataclass
class Device:
    data: Path
    store: TrustStore
    gate: DocumentGate

    @property
    def desired_path(self) -> Path:
        return self.data / "agent" / DESIRED_FILE

    @property
    def state_path(self) -> Path:
        return self.store.path

    def floors(self) -> trustkit.Floors:
        return trustkit.floors_of(self.state_path)

    def snapshot(self) -> tuple[bytes, Optional[bytes]]:
        desired = self.desired_path.read_bytes() if self.desired_path.exists() else None
        return self.state_path.read_bytes(), desired

    def restart(self) -> Device:
        """A new process on the same data dir."""
        store = TrustStore(self.data)
        state = store.load(device_id=DEVICE)
        return Device(self.data, store, DocumentGate(self.data, store, state))


@pytest.fixture
def dev(tmp_path: Path) -> Device:
    data = tmp_path / "data"
    store = TrustStore(data)
    state = store.provision(trustkit.root_json(), device_id=DEVICE)
    return Device(data, store, DocumentGate(data, store, state))


# -- desired states -----------------------------------------------------------------------


def test_accepted_desired_is_written_and_raises_the_floor(dev: Device) -> None:
    doc = desired_doc(3)
    result = dev.gate.offer_desired(doc, NOW)
    assert result.outcome == "accepted"
    assert result.desired is not None and result.desired.generation == 3
    assert result.rejection is None and result.digest is not None
    assert dev.desired_path.read_bytes() == doc
    assert dev.floors().generation == 3
    assert dev.gate.trusted.floors.generation == 3
    assert dev.gate.desired is not None and dev.gate.desired.generation == 3


def test_same_generation_again_is_current_and_writes_nothing(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(3), NOW)
    before = dev.snapshot()
    mtimes = (dev.state_path.stat().st_mtime_ns, dev.desired_path.stat().st_mtime_ns)
    # Same generation, other bytes (issued a second later): still "already have it".
    again = desired_doc(3, issued_at=T0 + timedelta(seconds=1))
    result = dev.gate.offer_desired(again, NOW)
    assert result.outcome == "current"
    assert result.desired is not None and result.desired.generation == 3
    assert dev.snapshot() == before
    assert (dev.state_path.stat().st_mtime_ns, dev.desired_path.stat().st_mtime_ns) == mtimes


def test_lower_generation_is_a_rejected_rollback(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(3), NOW)
    before = dev.snapshot()
    result = dev.gate.offer_desired(desired_doc(2), NOW)
    assert result.outcome == "rejected"
    assert result.rejection is not None and result.rejection.reason is Reason.ROLLBACK
    assert result.desired is None
    assert dev.snapshot() == before
    assert dev.gate.desired is not None and dev.gate.desired.generation == 3


REJECTIONS: list[tuple[str, Callable[[], bytes], datetime, Reason]] = [
    ("tampered_signature", lambda: corrupt_sig(desired_doc(5)), NOW, Reason.BAD_SIGNATURE),
    ("wrong_device", lambda: desired_doc(5, target={"device": "dev-2"}), NOW, Reason.WRONG_DEVICE),
    ("expired", lambda: desired_doc(5, expires=T0 + timedelta(hours=1)), NOW, Reason.EXPIRED),
    ("expired_by_the_clock", lambda: desired_doc(5), T0 + timedelta(days=31), Reason.EXPIRED),
    ("wrong_role", lambda: desired_doc(5, signers=("command1",)), NOW, Reason.UNKNOWN_KEY),
]


@pytest.mark.parametrize("make,now,reason", [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS])
def test_refused_desired_changes_nothing(dev: Device, make: Callable[[], bytes], now: datetime, reason: Reason) -> None:
    dev.gate.offer_desired(desired_doc(3), NOW)
    before = dev.snapshot()
    result = dev.gate.offer_desired(make(), now)
    assert result.outcome == "rejected"
    assert result.rejection is not None
    # unknown_key / threshold precedence is trust's business; the others are exact.
    if reason is Reason.UNKNOWN_KEY:
        assert result.rejection.reason in (Reason.UNKNOWN_KEY, Reason.THRESHOLD)
    else:
        assert result.rejection.reason is reason
    assert dev.snapshot() == before
    assert dev.gate.desired is not None and dev.gate.desired.generation == 3
    assert dev.gate.trusted.floors.generation == 3


def test_refused_first_desired_leaves_no_file(dev: Device) -> None:
    before = dev.snapshot()
    result = dev.gate.offer_desired(corrupt_sig(desired_doc(1)), NOW)
    assert result.outcome == "rejected" and result.rejection.reason is Reason.BAD_SIGNATURE
    assert dev.snapshot() == before
    assert not dev.desired_path.exists()
    assert dev.gate.desired is None


def test_offer_without_persist_writes_no_file(dev: Device) -> None:
    result = dev.gate.offer_desired(desired_doc(2), NOW, persist=False)
    assert result.outcome == "accepted"
    assert not dev.desired_path.exists()
    assert dev.floors().generation == 2


# -- start-up -----------------------------------------------------------------------------


def test_load_desired_without_a_file_is_none(dev: Device) -> None:
    assert dev.gate.load_desired(NOW) is None


def test_load_desired_after_restart_returns_the_stored_state_even_when_expired(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(4), NOW)
    before = dev.snapshot()
    restarted = dev.restart()
    assert restarted.gate.desired is None
    loaded = restarted.gate.load_desired(LATER)  # an offline device, long after expiry
    assert loaded is not None and loaded.generation == 4
    assert restarted.gate.desired == loaded
    assert restarted.snapshot() == before
    # The broker re-delivers the retained document: benign.
    assert restarted.gate.offer_desired(desired_doc(4), NOW).outcome == "current"


def test_stored_desired_below_the_floor_is_ignored(dev: Device) -> None:
    old = desired_doc(2)
    dev.gate.offer_desired(old, NOW)
    dev.gate.offer_desired(desired_doc(5), NOW)
    dev.desired_path.write_bytes(old)  # cannot normally happen
    before = dev.snapshot()
    restarted = dev.restart()
    assert restarted.gate.load_desired(NOW) is None
    assert restarted.gate.desired is None
    assert restarted.snapshot() == before
    assert restarted.floors().generation == 5


def test_stored_desired_that_does_not_verify_is_ignored(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(2), NOW)
    dev.desired_path.write_bytes(corrupt_sig(desired_doc(2)))
    restarted = dev.restart()
    assert restarted.gate.load_desired(NOW) is None
    assert restarted.floors().generation == 2


def test_crash_between_file_and_floor_is_accepted_at_start_and_raises_the_floor(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(2), NOW)
    # The process wrote generation 3's file, then died before the floor moved.
    doc3 = desired_doc(3)
    dev.desired_path.write_bytes(doc3)
    assert dev.floors().generation == 2
    restarted = dev.restart()
    loaded = restarted.gate.load_desired(NOW)
    assert loaded is not None and loaded.generation == 3
    assert restarted.floors().generation == 3
    assert restarted.gate.trusted.floors.generation == 3
    assert restarted.desired_path.read_bytes() == doc3


def test_floor_at_the_document_without_its_file_adopts_the_next_delivery(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(3), NOW, persist=False)  # floor 3, no file
    restarted = dev.restart()
    assert restarted.gate.load_desired(NOW) is None
    doc = desired_doc(3)
    result = restarted.gate.offer_desired(doc, NOW)
    assert result.outcome == "accepted"
    assert restarted.desired_path.read_bytes() == doc
    assert restarted.gate.offer_desired(doc, NOW).outcome == "current"


# -- commands -----------------------------------------------------------------------------


def test_command_accepted_then_current_then_rollback(dev: Device) -> None:
    first = dev.gate.offer_command(command_doc(7), NOW)
    assert first.outcome == "accepted"
    assert first.command is not None and first.command.seq == 7 and first.command.name == "ping"
    assert dev.floors().seq == 7
    state_after = dev.state_path.read_bytes()

    again = dev.gate.offer_command(command_doc(7), NOW)
    assert again.outcome == "current"  # a re-delivery: the caller must not run it again
    assert dev.state_path.read_bytes() == state_after

    lower = dev.gate.offer_command(command_doc(6), NOW)
    assert lower.outcome == "rejected"
    assert lower.rejection is not None and lower.rejection.reason is Reason.ROLLBACK
    assert lower.command is None
    assert dev.state_path.read_bytes() == state_after


def test_command_floor_survives_a_restart(dev: Device) -> None:
    dev.gate.offer_command(command_doc(7), NOW)
    restarted = dev.restart()
    assert restarted.gate.offer_command(command_doc(7), NOW).outcome == "current"
    assert restarted.gate.offer_command(command_doc(8), NOW).outcome == "accepted"


def test_command_and_desired_floors_are_independent(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(5), NOW)
    assert dev.gate.offer_command(command_doc(1), NOW).outcome == "accepted"
    floors = dev.floors()
    assert (floors.generation, floors.seq) == (5, 1)
    assert dev.gate.offer_desired(desired_doc(5), NOW).outcome == "current"


def test_refused_command_changes_nothing(dev: Device) -> None:
    before = dev.snapshot()
    result = dev.gate.offer_command(corrupt_sig(command_doc(1)), NOW)
    assert result.outcome == "rejected" and result.rejection.reason is Reason.BAD_SIGNATURE
    wrong = trustkit.sign("command", trustkit.doc_body("command", target={"device": "dev-9"}, seq=2, name="ping",
                                                       args={}), ("command1",))
    result = dev.gate.offer_command(wrong, NOW)
    assert result.outcome == "rejected" and result.rejection.reason is Reason.WRONG_DEVICE
    assert dev.snapshot() == before
    assert json.loads(dev.state_path.read_bytes())["floors"].get("seq") is None
