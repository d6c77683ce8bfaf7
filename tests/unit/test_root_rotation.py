"""The agent's side of root rotation over the wire (agent/documents.py ``offer_root``), on a
real trust store: roots applied one version at a time and persisted before the gate moves,
gaps held until filled, old and current roots ignored, bad roots refused with nothing
changed, the result surviving a restart, and a desired state refused under the old root
accepted once the new one is trusted.

Chain used here (tests/trustkit.py keys): v1 is trustkit's default root (deploy keys
deploy1/deploy2); each later version replaces the deploy key with ``deployN+1``, signed by
root1 and root2 (in every version's root role).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.agent import documents
from edge_runtime.agent.documents import MAX_PENDING_ROOTS, DocumentGate, claimed_root_version
from edge_runtime.protocol.trust import Reason
from edge_runtime.protocol.trust_store import TrustStore
from tests import trustkit
from tests.trustkit import DEVICE, NOW, T0


def root(version: int, *, signers: tuple[str, ...] = ("root1", "root2"), **kw: Any) -> bytes:
    """Root ``version`` of the test chain: its deploy key is ``deploy{version + 1}``."""
    kw.setdefault("deploy", (f"deploy{version + 1}",) if version > 1 else trustkit.DEPLOY_KEYS)
    kw.setdefault("issued_at", T0 + timedelta(hours=version))
    return trustkit.root_json(version, signers, **kw)


def desired_doc(generation: int, *, signer: str = "deploy1", issued_at: datetime = T0,
                expires: datetime = T0 + timedelta(days=30)) -> bytes:
    body = trustkit.doc_body("desired", issued_at=issued_at, expires=expires, generation=generation, models={})
    return trustkit.sign("desired", body, (signer,))


def corrupt_sig(data: bytes, index: int = 0) -> bytes:
    def f(o: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(o["signatures"][index]["sig"]))
        sig[7] ^= 0x01
        o["signatures"][index]["sig"] = base64.b64encode(bytes(sig)).decode()

    return trustkit.edit(data, f)


@dataclass
class Device:
    data: Path
    store: TrustStore
    gate: DocumentGate

    def snapshot(self) -> bytes:
        return self.store.path.read_bytes()

    def persisted_version(self) -> int:
        return trustkit.floors_of(self.store.path).root_version

    def restart(self) -> Device:
        store = TrustStore(self.data)
        return Device(self.data, store, DocumentGate(self.data, store, store.load(device_id=DEVICE)))


@pytest.fixture
def dev(tmp_path: Path) -> Device:
    data = tmp_path / "data"
    store = TrustStore(data)
    state = store.provision(root(1), device_id=DEVICE)
    return Device(data, store, DocumentGate(data, store, state))


# -- in order ------------------------------------------------------------------------------


def test_the_next_root_is_verified_persisted_and_its_keys_count_from_then_on(dev: Device) -> None:
    assert dev.gate.offer_desired(desired_doc(1, signer="deploy3"), NOW).rejection.reason is Reason.UNKNOWN_KEY
    result = dev.gate.offer_root(root(2), topic_version=2)
    assert result.rotated == (2,) and result.from_version == 1
    assert not result.rejections and not result.waiting and not result.ignored
    assert dev.gate.trusted.root.version == 2
    assert dev.persisted_version() == 2
    assert TrustStore(dev.data).load(device_id=DEVICE).root_envelope.to_json() == root(2)
    # deploy3 is root v2's deploy key; deploy1 left the role
    assert dev.gate.offer_desired(desired_doc(2, signer="deploy3"), NOW).outcome == "accepted"
    assert dev.gate.offer_desired(desired_doc(3, signer="deploy1"), NOW).rejection.reason is Reason.UNKNOWN_KEY


def test_floors_survive_a_rotation(dev: Device) -> None:
    assert dev.gate.offer_desired(desired_doc(7), NOW).outcome == "accepted"
    assert dev.gate.offer_command(trustkit.command(4, name="ping", args={}), NOW).outcome == "accepted"
    dev.gate.offer_root(root(2), topic_version=2)
    floors = trustkit.floors_of(dev.store.path)
    assert (floors.root_version, floors.generation, floors.seq) == (2, 7, 4)
    assert dev.gate.offer_desired(desired_doc(6, signer="deploy3"), NOW).rejection.reason is Reason.ROLLBACK


# -- gaps and order ------------------------------------------------------------------------


def test_a_root_that_skips_a_version_waits_for_the_missing_one(dev: Device) -> None:
    before = dev.snapshot()
    result = dev.gate.offer_root(root(3), topic_version=3)
    assert result.waiting == (3,) and result.rotated == () and not result.rejections
    assert dev.snapshot() == before and dev.gate.trusted.root.version == 1
    result = dev.gate.offer_root(root(2), topic_version=2)
    assert result.rotated == (2, 3) and result.waiting == ()
    assert dev.persisted_version() == 3
    assert dev.gate.offer_desired(desired_doc(1, signer="deploy4"), NOW).outcome == "accepted"


@pytest.mark.parametrize("order", [(5, 3, 4, 2), (2, 3, 4, 5), (4, 5, 2, 3), (5, 4, 3, 2)])
def test_roots_in_any_order_end_on_the_newest(dev: Device, order: tuple[int, ...]) -> None:
    applied: list[int] = []
    for v in order:
        applied += dev.gate.offer_root(root(v), topic_version=v).rotated
    assert applied == [2, 3, 4, 5]
    assert dev.gate.trusted.root.version == 5 and dev.persisted_version() == 5


def test_a_root_too_far_ahead_is_not_held(dev: Device) -> None:
    far = 1 + MAX_PENDING_ROOTS + 1
    assert dev.gate.offer_root(root(far), topic_version=far).waiting == ()
    edge = 1 + MAX_PENDING_ROOTS
    assert dev.gate.offer_root(root(edge), topic_version=edge).waiting == (edge,)


# -- replays -------------------------------------------------------------------------------


def test_old_and_current_roots_are_ignored_without_a_rejection(dev: Device) -> None:
    dev.gate.offer_root(root(2), topic_version=2)
    dev.gate.offer_root(root(3), topic_version=3)
    before = dev.snapshot()
    for v in (1, 2, 3):
        result = dev.gate.offer_root(root(v), topic_version=v)
        assert result.ignored and not result.rotated and not result.rejections, v
    # an old version signed by nobody at all is still only "old": no event, nothing read
    assert dev.gate.offer_root(root(2, signers=()), topic_version=2).ignored
    assert dev.snapshot() == before and dev.gate.trusted.root.version == 3


# -- bad roots change nothing --------------------------------------------------------------

BAD_ROOTS = {
    "bad_signature": (lambda: corrupt_sig(root(2)), Reason.BAD_SIGNATURE),
    "one_root_key_only": (lambda: root(2, signers=("root1",)), Reason.THRESHOLD),
    "signed_by_deploy_keys": (lambda: root(2, signers=("deploy1", "deploy2")), Reason.UNKNOWN_KEY),
    "new_root_keys_not_signed_by_old": (
        lambda: root(2, signers=("root4", "root5"), root=("root4", "root5", "root6")), Reason.UNKNOWN_KEY),
    "new_threshold_not_met": (
        lambda: root(2, signers=("root1", "root2"), root=("root1", "root4", "root5")), Reason.THRESHOLD),
    "not_json": (lambda: b"{not json", Reason.MALFORMED),
    "deploy_payload_type": (lambda: trustkit.sign("root", trustkit.root_body(2), ("root1", "root2"),
                                                  payload_type="application/vnd.edgefleet.desired+json"),
                            Reason.MALFORMED),
    "too_large": (lambda: b" " * (documents.MAX_ROOT_BYTES + 1), Reason.TOO_LARGE),
    "claims_another_version_than_its_topic": (lambda: root(3), Reason.MALFORMED),
}


@pytest.mark.parametrize("name", sorted(BAD_ROOTS))
def test_a_bad_root_is_refused_and_nothing_changes(dev: Device, name: str) -> None:
    make, reason = BAD_ROOTS[name]
    dev.gate.offer_root(root(3), topic_version=3)  # held for the gap
    before = dev.snapshot()
    result = dev.gate.offer_root(make(), topic_version=2)
    assert [r.reason for r in result.rejections] == [reason]
    assert result.rejections[0].kind == "root"
    assert result.rotated == ()
    assert dev.snapshot() == before and dev.gate.trusted.root.version == 1
    # the good v2 still applies afterwards, and takes the held v3 with it
    assert dev.gate.offer_root(root(2), topic_version=2).rotated == (2, 3)


def test_a_held_root_that_turns_out_bad_is_refused_when_its_turn_comes(dev: Device) -> None:
    assert dev.gate.offer_root(corrupt_sig(root(3), 1), topic_version=3).waiting == (3,)
    result = dev.gate.offer_root(root(2), topic_version=2)
    assert result.rotated == (2,)
    assert [r.reason for r in result.rejections] == [Reason.BAD_SIGNATURE]
    assert dev.persisted_version() == 2
    assert dev.gate.offer_root(root(3), topic_version=3).rotated == (3,)  # the good one, next connect


def test_a_newer_delivery_of_a_held_version_replaces_the_old(dev: Device) -> None:
    dev.gate.offer_root(corrupt_sig(root(3)), topic_version=3)
    dev.gate.offer_root(root(3), topic_version=3)
    assert dev.gate.offer_root(root(2), topic_version=2).rotated == (2, 3)


def test_a_failed_write_moves_nothing(dev: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    before = dev.snapshot()

    def disk_full(_state: Any) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dev.store, "save", disk_full)
    with pytest.raises(OSError):
        dev.gate.offer_root(root(2), topic_version=2)
    assert dev.gate.trusted.root.version == 1 and dev.snapshot() == before
    monkeypatch.undo()
    assert dev.gate.offer_root(root(2), topic_version=2).rotated == (2,)


# -- restart -------------------------------------------------------------------------------


def test_the_rotated_root_survives_a_restart(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(4), NOW)
    dev.gate.offer_root(root(2), topic_version=2)
    dev.gate.offer_root(root(4), topic_version=4)  # held in memory only
    # the controller re-signs generation 4 with the new deploy key: "current", and the file
    # now holds bytes that verify under v2
    resigned = desired_doc(4, signer="deploy3", issued_at=T0 + timedelta(hours=3))
    assert dev.gate.offer_desired(resigned, NOW).outcome == "current"
    assert (dev.data / "agent" / documents.DESIRED_FILE).read_bytes() == resigned
    again = dev.restart()
    assert again.gate.trusted.root.version == 2
    assert again.gate.trusted.floors.generation == 4
    held = again.gate.load_desired(NOW)
    assert held is not None and held.generation == 4
    assert again.gate.offer_root(root(3), topic_version=3).rotated == (3,)  # v4 was not persisted
    assert again.gate.offer_root(root(4), topic_version=4).rotated == (4,)


def test_a_held_desired_state_whose_key_left_stays_in_force(dev: Device) -> None:
    doc = desired_doc(4)
    dev.gate.offer_desired(doc, NOW)
    dev.gate.offer_root(root(2), topic_version=2)  # deploy1 leaves the deploy role
    assert dev.gate.desired is not None and dev.gate.desired.generation == 4
    assert (dev.data / "agent" / documents.DESIRED_FILE).read_bytes() == doc  # nothing deleted
    # the same bytes again (a re-delivery before the controller re-signed): refused, nothing changes
    assert dev.gate.offer_desired(doc, NOW).rejection.reason is Reason.UNKNOWN_KEY
    assert dev.gate.desired.generation == 4


def test_a_current_document_is_not_rewritten_without_a_rotation(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(4), NOW)
    stored = (dev.data / "agent" / documents.DESIRED_FILE).read_bytes()
    other = desired_doc(4, signer="deploy2", issued_at=T0 + timedelta(seconds=1))
    assert dev.gate.offer_desired(other, NOW).outcome == "current"
    assert (dev.data / "agent" / documents.DESIRED_FILE).read_bytes() == stored


# -- the desired state refused under the old root ------------------------------------------


def test_a_desired_state_refused_for_an_unknown_key_passes_after_the_rotation(dev: Device) -> None:
    assert dev.gate.retry_refused_desired(NOW) is None
    doc = desired_doc(5, signer="deploy3")
    assert dev.gate.offer_desired(doc, NOW).rejection.reason is Reason.UNKNOWN_KEY
    assert not (dev.data / "agent" / documents.DESIRED_FILE).exists()
    dev.gate.offer_root(root(2), topic_version=2)
    retried = dev.gate.retry_refused_desired(NOW)
    assert retried is not None and retried.outcome == "accepted" and retried.desired.generation == 5
    assert (dev.data / "agent" / documents.DESIRED_FILE).read_bytes() == doc
    assert dev.gate.retry_refused_desired(NOW) is None  # accepted: nothing left to retry


def test_an_expired_root_is_replaced_and_the_refused_document_then_passes(dev: Device) -> None:
    later = T0 + timedelta(days=400)  # root v1 expired at T0 + 365 days
    doc = desired_doc(1, signer="deploy1", issued_at=later, expires=later + timedelta(days=7))
    assert dev.gate.offer_desired(doc, later).rejection.reason is Reason.EXPIRED
    v2 = root(2, deploy=trustkit.DEPLOY_KEYS, issued_at=later - timedelta(days=1), expires=later + timedelta(days=365))
    assert dev.gate.offer_root(v2, topic_version=2).rotated == (2,)
    retried = dev.gate.retry_refused_desired(later)
    assert retried is not None and retried.outcome == "accepted"


def test_refusals_a_root_cannot_fix_are_not_retried(dev: Device) -> None:
    dev.gate.offer_desired(desired_doc(5), NOW)
    assert dev.gate.offer_desired(desired_doc(4), NOW).rejection.reason is Reason.ROLLBACK
    dev.gate.offer_root(root(2), topic_version=2)
    assert dev.gate.retry_refused_desired(NOW) is None


def test_claimed_version_reads_only_well_formed_envelopes() -> None:
    assert claimed_root_version(root(7)) == 7
    for bad in (b"", b"[]", b"{}", trustkit.sign("root", b"not json", ()), trustkit.sign("root", {"version": "2"}, ()),
                trustkit.sign("root", {"version": True}, ()), trustkit.sign("root", {"version": 0}, ())):
        assert claimed_root_version(bad) is None, bad


