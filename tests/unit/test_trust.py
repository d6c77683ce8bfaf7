"""The device's root of trust (``protocol/trust.py``, ``protocol/trust_store.py``).

In python-tuf's style: one named row per case, ``(state, document, reference time) →
rejection reason or outcome``; each row runs as its own sub-test. Then the properties no
table can enumerate (hypothesis: any byte mutation of a valid envelope is refused and the
persisted state is byte-identical afterwards; floors only rise), the trust store, and a
crash test that SIGKILLs a real subprocess at every crash point while it persists the state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.protocol.dsse import Envelope
from edge_runtime.protocol.signed import PAYLOAD_TYPES
from edge_runtime.protocol.trust import (
    EPOCH,
    MAX_BYTES,
    MAX_SIGNATURES,
    ArtifactCheck,
    ArtifactRef,
    Floors,
    Outcome,
    Reason,
    Rejection,
    TrustedState,
    check_artifact,
)
from edge_runtime.protocol.trust_store import (
    FORMAT,
    AlreadyProvisioned,
    NotProvisioned,
    TrustStore,
    TrustStoreCorrupt,
)
from tests.trustkit import (
    DEVICE,
    GROUPS,
    NOW,
    T0,
    command,
    desired,
    doc_body,
    edit,
    kid,
    manifest,
    root_body,
    root_json,
    sign,
    state,
)

REPO = Path(__file__).resolve().parents[2]
DAY = timedelta(days=1)


# -- envelope surgery ---------------------------------------------------------------------


def corrupt_sig(data: bytes, index: int = 0) -> bytes:
    """Flip one bit of signature ``index`` (still valid base64, still 64 bytes)."""

    def f(o: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(o["signatures"][index]["sig"]))
        sig[10] ^= 0x01
        o["signatures"][index]["sig"] = base64.b64encode(bytes(sig)).decode()

    return edit(data, f)


def relabel(data: bytes, index: int, keyid: str) -> bytes:
    return edit(data, lambda o: o["signatures"][index].__setitem__("keyid", keyid))


def with_payload(data: bytes, body: Union[dict[str, Any], bytes]) -> bytes:
    """Swap the payload, keep the signatures: a tampered document."""
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return edit(data, lambda o: o.__setitem__("payload", base64.b64encode(raw).decode()))


def drop_sigs(data: bytes) -> bytes:
    return edit(data, lambda o: o.__setitem__("signatures", []))


def repeat_sig(data: bytes, times: int) -> bytes:
    return edit(data, lambda o: o.__setitem__("signatures", o["signatures"] * times))


def digest_of(data: bytes) -> str:
    return hashlib.sha256(Envelope.from_json(data).payload).hexdigest()


def on(root: bytes, **floors: Any) -> Callable[[], TrustedState]:
    return lambda: state(root, **floors)


def at(**floors: Any) -> Callable[[], TrustedState]:
    return lambda: state(None, **floors)


def rotated(*roots: bytes) -> Callable[[], TrustedState]:
    def build() -> TrustedState:
        s = state()
        for r in roots:
            s = s.update_root(r).state
        return s

    return build


# -- the table ------------------------------------------------------------------------------

ROOT_DEPLOY_2 = lambda: root_json(deploy=("deploy1", "deploy2", "deploy3"), deploy_threshold=2)  # noqa: E731


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    data: Callable[[], bytes]
    expect: Union[Reason, Outcome]
    state: Callable[[], TrustedState] = at()
    now: datetime = NOW
    kw: dict[str, Any] = field(default_factory=dict)


CASES: list[Case] = [
    # --- desired state: the happy paths -------------------------------------------------
    Case("desired/valid", "desired", lambda: desired(1), Outcome.ACCEPTED),
    Case("desired/first_generation_zero", "desired", lambda: desired(0), Outcome.ACCEPTED),
    Case("desired/group_target", "desired", lambda: desired(1, target={"group": "cams"}), Outcome.ACCEPTED),
    Case("desired/minor_spec_version", "desired", lambda: desired(1, spec_version="1.7"), Outcome.ACCEPTED),
    Case("desired/higher_generation", "desired", lambda: desired(6), Outcome.ACCEPTED, at(generation=5)),
    Case("desired/threshold_2_met", "desired", lambda: desired(1, signers=["deploy1", "deploy3"]), Outcome.ACCEPTED,
         lambda: state(ROOT_DEPLOY_2())),
    # surplus signatures do not matter once a threshold of role keys verified (DSSE, TUF)
    Case("desired/extra_bad_signature_after_threshold", "desired",
         lambda: corrupt_sig(desired(1, signers=["deploy1", "deploy2"]), 1), Outcome.ACCEPTED),
    Case("desired/extra_unknown_key_after_threshold", "desired",
         lambda: desired(1, signers=["deploy1", "attacker"]), Outcome.ACCEPTED),
    # a board without a real-time clock boots in 1970: the clock floor (the root's issued_at) stands in
    Case("desired/clock_at_epoch_uses_floor", "desired", lambda: desired(1), Outcome.ACCEPTED, now=EPOCH),
    # --- signatures -------------------------------------------------------------------------
    Case("desired/bad_signature", "desired", lambda: corrupt_sig(desired(1)), Reason.BAD_SIGNATURE),
    Case("desired/tampered_payload", "desired",
         lambda: with_payload(desired(1), doc_body("desired", generation=99)), Reason.BAD_SIGNATURE),
    Case("desired/signature_under_wrong_keyid", "desired",
         lambda: relabel(desired(1, signers=["deploy1"]), 0, kid("deploy2")),
         Reason.BAD_SIGNATURE),
    Case("desired/below_threshold", "desired", lambda: desired(1, signers=["deploy1"]), Reason.THRESHOLD,
         lambda: state(ROOT_DEPLOY_2())),
    Case("desired/duplicate_signatures_by_one_key", "desired", lambda: desired(1, signers=["deploy1", "deploy1"]),
         Reason.THRESHOLD, lambda: state(ROOT_DEPLOY_2())),
    Case("desired/no_signatures", "desired", lambda: drop_sigs(desired(1)), Reason.THRESHOLD),
    Case("desired/unknown_key", "desired", lambda: desired(1, signers=["attacker"]), Reason.UNKNOWN_KEY),
    Case("desired/key_of_the_command_role", "desired", lambda: desired(1, signers=["command1"]), Reason.UNKNOWN_KEY),
    Case("desired/key_of_the_root_role", "desired", lambda: desired(1, signers=["root1"]), Reason.UNKNOWN_KEY),
    # precedence: bad_signature > unknown_key (only when no role key signed) > threshold
    Case("desired/precedence_bad_over_threshold", "desired",
         lambda: corrupt_sig(desired(1, signers=["deploy1", "deploy2"]), 1), Reason.BAD_SIGNATURE,
         lambda: state(ROOT_DEPLOY_2())),
    Case("desired/precedence_bad_over_unknown", "desired",
         lambda: corrupt_sig(desired(1, signers=["attacker", "deploy1"]), 1), Reason.BAD_SIGNATURE),
    Case("desired/precedence_threshold_over_unknown", "desired",
         lambda: desired(1, signers=["attacker", "deploy1"]), Reason.THRESHOLD, lambda: state(ROOT_DEPLOY_2())),
    # signatures are checked before the payload is parsed: unsigned garbage is a key problem
    Case("desired/precedence_signature_before_parse", "desired",
         lambda: sign("desired", b"not json", ["attacker"]), Reason.UNKNOWN_KEY),
    # --- freshness ------------------------------------------------------------------------
    Case("desired/expired", "desired",
         lambda: desired(1, issued_at=T0 - 10 * DAY, expires=T0 + DAY / 2), Reason.EXPIRED),
    Case("desired/expired_clock_set_back", "desired",
         lambda: desired(6, issued_at=T0 - 10 * DAY, expires=T0 + 10 * DAY), Reason.EXPIRED,
         at(generation=5, highest_time_seen=T0 + 20 * DAY), now=T0 - 100 * DAY),
    Case("desired/trusted_root_expired", "desired", lambda: desired(1, expires=T0 + 60 * DAY), Reason.EXPIRED,
         lambda: state(root_json(expires=T0 + 2 * DAY)), now=T0 + 3 * DAY),
    # --- floors: equal is benign, lower is rollback ---------------------------------------------
    Case("desired/equal_generation_already_current", "desired", lambda: desired(5), Outcome.ALREADY_CURRENT,
         at(generation=5)),
    Case("desired/lower_generation_rollback", "desired", lambda: desired(4), Reason.ROLLBACK, at(generation=5)),
    Case("desired/precedence_rollback_over_expired", "desired",
         lambda: desired(4, issued_at=T0 - 10 * DAY, expires=T0 - DAY), Reason.ROLLBACK, at(generation=5)),
    Case("desired/equal_generation_expired_still_benign", "desired",
         lambda: desired(5, issued_at=T0 - 10 * DAY, expires=T0 - DAY), Outcome.ALREADY_CURRENT, at(generation=5)),
    # --- target ---------------------------------------------------------------------------
    Case("desired/wrong_device", "desired", lambda: desired(1, target={"device": "dev-2"}), Reason.WRONG_DEVICE),
    Case("desired/wrong_group", "desired", lambda: desired(1, target={"group": "us"}), Reason.WRONG_DEVICE),
    Case("desired/precedence_wrong_device_over_rollback", "desired",
         lambda: desired(1, target={"device": "dev-2"}), Reason.WRONG_DEVICE, at(generation=5)),
    # --- payloadType / kind -----------------------------------------------------------------
    Case("desired/payload_type_mismatch", "desired",
         lambda: sign("desired", doc_body("desired", generation=1), ["deploy1"], payload_type=PAYLOAD_TYPES["manifest"]),
         Reason.MALFORMED),
    Case("desired/command_envelope_on_desired", "desired", lambda: command(1), Reason.MALFORMED),
    Case("desired/manifest_body_in_desired_envelope", "desired",
         lambda: sign("desired", doc_body("manifest", sha256="00" * 32, size=1), ["deploy1"]), Reason.MALFORMED),
    # --- malformed ----------------------------------------------------------------------------
    Case("desired/malformed_not_json", "desired", lambda: b"not json", Reason.MALFORMED),
    Case("desired/malformed_invalid_utf8", "desired", lambda: b"\xff\xfe{}", Reason.MALFORMED),
    Case("desired/malformed_empty", "desired", lambda: b"", Reason.MALFORMED),
    Case("desired/malformed_json_list", "desired", lambda: b"[]", Reason.MALFORMED),
    Case("desired/malformed_deep_nesting", "desired", lambda: b"[" * 100_000, Reason.MALFORMED),
    Case("desired/malformed_missing_signatures", "desired",
         lambda: edit(desired(1), lambda o: o.pop("signatures")), Reason.MALFORMED),
    Case("desired/malformed_extra_envelope_field", "desired",
         lambda: edit(desired(1), lambda o: o.__setitem__("extra", 1)), Reason.MALFORMED),
    Case("desired/malformed_signature_not_object", "desired",
         lambda: edit(desired(1), lambda o: o.__setitem__("signatures", ["x"])), Reason.MALFORMED),
    Case("desired/malformed_bad_base64_payload", "desired",
         lambda: edit(desired(1), lambda o: o.__setitem__("payload", "!!not base64!!")), Reason.MALFORMED),
    Case("desired/malformed_bad_base64_signature", "desired",
         lambda: edit(desired(1), lambda o: o["signatures"][0].__setitem__("sig", "abc")), Reason.MALFORMED),
    Case("desired/malformed_payload_not_json", "desired", lambda: sign("desired", b"not json", ["deploy1"]),
         Reason.MALFORMED),
    Case("desired/malformed_unknown_spec_major", "desired", lambda: desired(1, spec_version="2.0"), Reason.MALFORMED),
    Case("desired/malformed_missing_generation", "desired",
         lambda: sign("desired", doc_body("desired"), ["deploy1"]), Reason.MALFORMED),
    Case("desired/malformed_missing_target", "desired",
         lambda: sign("desired", {k: v for k, v in doc_body("desired", generation=1).items() if k != "target"},
                      ["deploy1"]), Reason.MALFORMED),
    Case("desired/malformed_missing_expires", "desired",
         lambda: sign("desired", {k: v for k, v in doc_body("desired", generation=1).items() if k != "expires"},
                      ["deploy1"]), Reason.MALFORMED),
    Case("desired/malformed_negative_generation", "desired", lambda: desired(-1), Reason.MALFORMED),
    Case("desired/malformed_naive_timestamp", "desired",
         lambda: sign("desired", {**doc_body("desired", generation=1), "expires": "2026-03-01T00:00:00"}, ["deploy1"]),
         Reason.MALFORMED),
    Case("desired/malformed_expires_before_issued", "desired",
         lambda: desired(1, issued_at=T0, expires=T0 - DAY), Reason.MALFORMED),
    Case("desired/malformed_target_both_device_and_group", "desired",
         lambda: desired(1, target={"device": DEVICE, "group": "cams"}), Reason.MALFORMED),
    # --- size -------------------------------------------------------------------------------
    Case("desired/too_large", "desired", lambda: desired(1, blob="x" * MAX_BYTES), Reason.TOO_LARGE),
    Case("desired/too_large_checked_before_parsing", "desired", lambda: b"\x00" * (MAX_BYTES + 1), Reason.TOO_LARGE),
    Case("desired/too_large_caller_limit", "desired", lambda: desired(1), Reason.TOO_LARGE, kw={"max_bytes": 200}),
    Case("desired/too_many_signatures", "desired", lambda: repeat_sig(desired(1, signers=["attacker"]), MAX_SIGNATURES + 1),
         Reason.TOO_LARGE),
    # --- commands -----------------------------------------------------------------------------
    Case("command/valid", "command", lambda: command(1), Outcome.ACCEPTED),
    Case("command/equal_seq_already_current", "command", lambda: command(7), Outcome.ALREADY_CURRENT, at(seq=7)),
    Case("command/lower_seq_rollback", "command", lambda: command(6), Reason.ROLLBACK, at(seq=7)),
    Case("command/signed_by_deploy_key", "command", lambda: command(1, signers=["deploy1"]), Reason.UNKNOWN_KEY),
    Case("command/bad_signature", "command", lambda: corrupt_sig(command(1)), Reason.BAD_SIGNATURE),
    Case("command/wrong_device", "command", lambda: command(1, target={"device": "dev-2"}), Reason.WRONG_DEVICE),
    Case("command/group_target", "command", lambda: command(1, target={"group": "eu"}), Outcome.ACCEPTED),
    Case("command/expired", "command", lambda: command(1, expires=T0 + DAY / 2), Reason.EXPIRED),
    Case("command/desired_envelope_on_command", "command", lambda: desired(1), Reason.MALFORMED),
    Case("command/malformed_missing_seq", "command", lambda: sign("command", doc_body("command"), ["command1"]),
         Reason.MALFORMED),
    # --- manifests ------------------------------------------------------------------------------
    Case("manifest/valid", "manifest", lambda: manifest(), Outcome.ACCEPTED),
    Case("manifest/pinned", "manifest", lambda: manifest(), Outcome.ACCEPTED,
         kw={"pinned": "PLACEHOLDER"}),  # filled in by the test: the real digest
    Case("manifest/pinned_mismatch", "manifest", lambda: manifest(name="other"), Reason.HASH_MISMATCH,
         kw={"pinned": "PLACEHOLDER"}),
    Case("manifest/signed_by_command_key", "manifest", lambda: manifest(signers=["command1"]), Reason.UNKNOWN_KEY),
    Case("manifest/tampered_payload", "manifest",
         lambda: with_payload(manifest(), doc_body("manifest", sha256="11" * 32, size=5)), Reason.BAD_SIGNATURE),
    Case("manifest/expired", "manifest", lambda: manifest(expires=T0 + DAY / 2), Reason.EXPIRED),
    Case("manifest/desired_body_in_manifest_envelope", "manifest",
         lambda: sign("manifest", doc_body("desired", generation=1), ["deploy1"]), Reason.MALFORMED),
    # --- root rotation ---------------------------------------------------------------------------
    Case("root/rotation_valid", "root", lambda: root_json(2), Outcome.ACCEPTED),
    Case("root/rotation_replacing_a_root_key", "root",
         lambda: root_json(2, signers=["root1", "root3", "root4"], root=("root1", "root2", "root4")), Outcome.ACCEPTED),
    Case("root/rotation_missing_old_threshold", "root",
         lambda: root_json(2, signers=["root1", "root4", "root5"], root=("root4", "root5", "root6")), Reason.THRESHOLD),
    Case("root/rotation_missing_new_threshold", "root",
         lambda: root_json(2, signers=["root1", "root2"], root=("root1", "root4", "root5")), Reason.THRESHOLD),
    Case("root/rotation_signed_only_by_new_keys", "root",
         lambda: root_json(2, signers=["root4", "root5"], root=("root4", "root5", "root6")), Reason.UNKNOWN_KEY),
    Case("root/rotation_duplicate_signatures_by_one_key", "root", lambda: root_json(2, signers=["root1", "root1"]),
         Reason.THRESHOLD),
    Case("root/skipped_version", "root", lambda: root_json(3), Reason.THRESHOLD),
    Case("root/equal_version_already_current", "root", lambda: root_json(1), Outcome.ALREADY_CURRENT),
    Case("root/lower_version_rollback", "root", lambda: root_json(1), Reason.ROLLBACK, rotated(root_json(2))),
    Case("root/bad_signature", "root", lambda: corrupt_sig(root_json(2), 1), Reason.BAD_SIGNATURE),
    Case("root/tampered_payload", "root", lambda: with_payload(root_json(2), root_body(2, root_threshold=1)),
         Reason.BAD_SIGNATURE),
    Case("root/signed_by_deploy_keys", "root", lambda: root_json(2, signers=["deploy1", "deploy2"]), Reason.UNKNOWN_KEY),
    Case("root/payload_type_mismatch", "root",
         lambda: sign("root", root_body(2), ["root1", "root2"], payload_type=PAYLOAD_TYPES["desired"]), Reason.MALFORMED),
    Case("root/malformed_role_missing", "root",
         lambda: sign("root", {**root_body(2), "roles": {k: v for k, v in root_body(2)["roles"].items() if k != "command"}},
                      ["root1", "root2"]), Reason.MALFORMED),
    Case("root/malformed_unreachable_threshold", "root", lambda: root_json(2, root_threshold=4), Reason.MALFORMED),
    Case("root/malformed_unknown_spec_major", "root",
         lambda: sign("root", {**root_body(2), "spec_version": "2.0"}, ["root1", "root2"]), Reason.MALFORMED),
    Case("root/too_large", "root", lambda: b" " * (MAX_BYTES + 1), Reason.TOO_LARGE),
    # TUF 5.3.4: an intermediate root's expiry does not matter; the trusted root's does (see below)
    Case("root/expired_intermediate_accepted", "root",
         lambda: root_json(2, issued_at=T0 - 400 * DAY, expires=T0 - 30 * DAY), Outcome.ACCEPTED),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trust_case(case: Case) -> None:
    before = state_before = case.state()
    record = json.dumps(before.record(), sort_keys=True)
    data = case.data()
    kw = dict(case.kw)
    if kw.get("pinned") == "PLACEHOLDER":
        kw["pinned"] = digest_of(manifest())
    if isinstance(case.expect, Reason):
        with pytest.raises(Rejection) as info:
            before.verify(case.kind, data, case.now, **kw)
        assert info.value.reason is case.expect, str(info.value)
        assert info.value.kind == case.kind
        assert info.value.to_dict()["reason"] == case.expect.value
    else:
        verified = before.verify(case.kind, data, case.now, **kw)
        assert verified.outcome is case.expect
        assert verified.digest == digest_of(data)
        if case.expect is Outcome.ALREADY_CURRENT:
            assert verified.state is before  # benign means *nothing* changes
        else:
            assert verified.state.floors.covers(before.floors)
            if case.kind != "manifest":  # manifests have no floor of their own
                assert verified.state != before
    # the state a rejection (or anything) was judged by is untouched
    assert json.dumps(state_before.record(), sort_keys=True) == record


def test_every_reason_has_a_case() -> None:
    covered = {c.expect for c in CASES}
    assert set(Reason) | set(Outcome) <= covered, set(Reason) - covered


def test_the_reasons_are_exactly_the_design_set() -> None:
    assert [r.value for r in Reason] == [
        "bad_signature", "threshold", "unknown_key", "rollback", "expired",
        "wrong_device", "hash_mismatch", "too_large", "malformed",
    ]


# -- what an accepted document does to the state --------------------------------------------


def test_accepting_raises_exactly_the_kind_floor_and_the_clock_floor() -> None:
    s = state()
    d = s.verify_desired(desired(3, issued_at=T0 + 2 * DAY, expires=T0 + 9 * DAY), NOW)
    assert d.state.floors == Floors(root_version=1, generation=3, seq=None, highest_time_seen=T0 + 2 * DAY)
    c = d.state.verify_command(command(4, issued_at=T0 + 3 * DAY), NOW)
    assert c.state.floors == Floors(root_version=1, generation=3, seq=4, highest_time_seen=T0 + 3 * DAY)
    m = c.state.verify_manifest(manifest(issued_at=T0 + 4 * DAY), NOW)
    assert m.state.floors == c.state.floors.model_copy(update={"highest_time_seen": T0 + 4 * DAY})
    assert d.body.models[0]["name"] == "m0"  # extra fields survive the default header model
    assert s.floors.generation is None  # immutable: the old state is still the old state


def test_a_clock_far_ahead_is_never_persisted_as_the_floor() -> None:
    """Only signed times raise the floor: a spoofed-forward local clock cannot freeze the device."""
    v = state().verify_desired(desired(1), T0 + 20 * DAY)  # the clock runs ahead of every signed time
    assert v.state.floors.highest_time_seen == T0


def test_clock_floor_learned_from_a_document_stops_a_clock_set_back() -> None:
    s = state().verify_desired(desired(1, issued_at=T0 + 20 * DAY, expires=T0 + 50 * DAY), NOW).state
    stale = desired(2, issued_at=T0, expires=T0 + 10 * DAY)  # captured and held back by an attacker
    with pytest.raises(Rejection) as info:
        s.verify_desired(stale, T0 + 5 * DAY)  # the device clock says the document is still fresh
    assert info.value.reason is Reason.EXPIRED


def test_body_model_is_the_callers_schema() -> None:
    from pydantic import ConfigDict

    from edge_runtime.protocol.signed import DesiredHeader

    class Strict(DesiredHeader):
        model_config = ConfigDict(extra="forbid")

    with pytest.raises(Rejection) as info:
        state().verify_desired(desired(1), NOW, body_model=Strict)  # "models" is not in Strict
    assert info.value.reason is Reason.MALFORMED
    with pytest.raises(TypeError):
        state().verify_desired(desired(1), NOW, body_model=Floors)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        state().verify("firmware", desired(1), NOW)
    with pytest.raises(ValueError):
        state().verify_desired(desired(1), NOW.replace(tzinfo=None))


# -- rotation ---------------------------------------------------------------------------------


def test_rotation_replaces_a_deploy_key_and_keeps_the_floors() -> None:
    s = state().verify_desired(desired(5), NOW).state
    v2 = root_json(2, deploy=("deploy3",))
    r = s.update_root(v2)
    assert r.accepted and r.state.root.version == 2 and r.state.floors.root_version == 2
    assert r.state.floors.generation == 5  # floors survive a rotation (no replay by retained keys)
    with pytest.raises(Rejection) as info:
        r.state.verify_desired(desired(6, signers=["deploy1"]), NOW)  # the retired key
    assert info.value.reason is Reason.UNKNOWN_KEY
    assert r.state.verify_desired(desired(6, signers=["deploy3"]), NOW).accepted
    with pytest.raises(Rejection) as info:
        r.state.verify_desired(desired(5, signers=["deploy3"]), NOW).state.verify_desired(desired(4, signers=["deploy3"]), NOW)
    assert info.value.reason is Reason.ROLLBACK


def test_an_offline_device_walks_a_chain_of_expired_roots_and_is_frozen_until_current() -> None:
    """TUF 5.3.4/5.3.10: intermediate roots may have expired; an expired *trusted* root accepts nothing."""
    late = T0 + 800 * DAY
    v2 = root_json(2, issued_at=T0 + 100 * DAY, expires=T0 + 465 * DAY)
    v3 = root_json(3, issued_at=T0 + 790 * DAY, expires=T0 + 1200 * DAY)
    s = state().update_root(v2).state
    with pytest.raises(Rejection) as info:  # frozen on an expired root: nothing is accepted
        s.verify_desired(desired(1, issued_at=late, expires=late + DAY), late)
    assert info.value.reason is Reason.EXPIRED and "root" in info.value.message
    s = s.update_root(v3).state
    assert s.floors.highest_time_seen == T0 + 790 * DAY
    assert s.verify_desired(desired(1, issued_at=late, expires=late + DAY), late).accepted


def test_bootstrap_requires_a_self_signed_threshold() -> None:
    for data, reason in [
        (root_json(1, signers=["root1"]), Reason.THRESHOLD),
        (root_json(1, signers=["deploy1", "deploy2"]), Reason.UNKNOWN_KEY),
        (corrupt_sig(root_json(1), 0), Reason.BAD_SIGNATURE),
        (b"{}", Reason.MALFORMED),
        (desired(1), Reason.MALFORMED),
    ]:
        with pytest.raises(Rejection) as info:
            TrustedState.bootstrap(data, device_id=DEVICE)
        assert info.value.reason is reason, info.value
    s = TrustedState.bootstrap(root_json(1), device_id=DEVICE, groups={"cams"})
    assert s.floors == Floors(root_version=1, highest_time_seen=T0) and s.groups == frozenset({"cams"})


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=8), min_size=1, max_size=12))
def test_floors_only_rise(generations: list[int]) -> None:
    """Whatever order generations arrive in: accepted iff above every earlier one, benign iff equal."""
    s = state()
    high: Optional[int] = None
    for g in generations:
        if high is not None and g < high:
            with pytest.raises(Rejection) as info:
                s.verify_desired(desired(g), NOW)
            assert info.value.reason is Reason.ROLLBACK
            continue
        v = s.verify_desired(desired(g), NOW)
        assert v.outcome is (Outcome.ALREADY_CURRENT if g == high else Outcome.ACCEPTED)
        assert v.state.floors.covers(s.floors)
        s, high = v.state, g
    assert s.floors.generation == high


@dataclass(frozen=True)
class Subject:
    """A valid envelope, the state it is judged by, and whether every signature is needed."""

    kind: str
    root: Callable[[], bytes]
    floors: dict[str, Any]
    data: Callable[[], bytes]
    exact: bool  # signed by exactly a threshold: any change to a signature must be refused


SUBJECTS = {
    "desired_exact_threshold": Subject("desired", ROOT_DEPLOY_2, {"generation": 5},
                                       lambda: desired(6, signers=["deploy1", "deploy2"]), True),
    "desired_surplus_signature": Subject("desired", root_json, {"generation": 5},
                                         lambda: desired(6, signers=["deploy1", "deploy2"]), False),
    "command": Subject("command", root_json, {"seq": 7}, lambda: command(8), True),
    "root_rotation": Subject("root", root_json, {}, lambda: root_json(2, signers=["root1", "root2"]), True),
}


@dataclass
class Prepared:
    subject: Subject
    store_dir: Path
    data: bytes
    before: bytes  # the persisted state file before any mutation
    after: bytes  # the file after persisting the *unmutated* envelope's result
    expected: TrustedState


@pytest.fixture(scope="module", params=sorted(SUBJECTS))
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    subject = SUBJECTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    store = TrustStore(d)
    s = store.provision(subject.root(), device_id=DEVICE, groups=GROUPS)
    store.save(TrustedState(s.root_envelope, s.root, s.floors.model_copy(update=subject.floors), DEVICE, GROUPS))
    before = store.path.read_bytes()
    data = subject.data()
    loaded = store.load(device_id=DEVICE, groups=GROUPS)
    verified = loaded.verify(subject.kind, data, NOW)
    assert verified.accepted
    store.save(verified.state)
    after = store.path.read_bytes()
    store.path.write_bytes(before)
    return Prepared(subject, d, data, before, after, verified.state)


mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, val in ops:
        if op == "replace" and out:
            i = pos % len(out)
            out[i] = (out[i] + val) % 256  # val in 1..255: the byte always changes
        elif op == "insert":
            out.insert(pos % (len(out) + 1), val)
        elif op == "delete" and out:
            del out[pos % len(out)]
    return bytes(out)


def judge_mutation(p: Prepared, mutated: bytes, loaded: Optional[TrustedState] = None, *, persist: bool = True) -> str:
    """Run the agent's step (load, verify, persist on acceptance) on ``mutated``; check the property.

    Refused → the state file is byte-identical. Accepted → only because the mutation left the
    *signed statement* identical: DSSE signs (payloadType, payload), not the envelope's JSON, so
    JSON whitespace, a non-canonical base64 padding bit, or (when the envelope carries surplus
    signatures) damage to one signature the threshold did not need leave the same document; then the
    result is exactly the unmutated one's, and so is the persisted file.
    """
    store = TrustStore(p.store_dir)
    s = store.load(device_id=DEVICE, groups=GROUPS) if loaded is None else loaded
    try:
        verified = s.verify(p.subject.kind, mutated, NOW)
    except Rejection:
        assert store.path.read_bytes() == p.before
        return "rejected"
    orig, mut = Envelope.from_json(p.data), Envelope.from_json(mutated)
    assert (mut.payload_type, mut.payload) == (orig.payload_type, orig.payload)
    if p.subject.exact:
        assert {(x.keyid, x.sig) for x in mut.signatures} == {(x.keyid, x.sig) for x in orig.signatures}
    assert verified.accepted and verified.state == p.expected
    if persist:
        if loaded is not None:
            store.load(device_id=DEVICE, groups=GROUPS)
        store.save(verified.state)
        try:
            assert store.path.read_bytes() == p.after
        finally:
            store.path.write_bytes(p.before)
    return "same document"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_any_byte_mutation_is_refused_and_changes_nothing(prepared: Prepared, ops: list[tuple[str, int, int]]) -> None:
    mutated = mutate(prepared.data, ops)
    if mutated == prepared.data:
        return
    judge_mutation(prepared, mutated)


def padding_bit_positions(data: bytes) -> set[int]:
    """The last base64 character before ``=`` padding: it carries bits base64 decoding ignores."""
    return {i - 1 for i in range(1, len(data)) if data[i : i + 1] == b"=" and data[i - 1 : i] != b"="}


def test_every_single_byte_flip_is_refused_or_the_same_document(prepared: Prepared) -> None:
    """Exhaustive over positions (hypothesis samples; this visits every byte, three ways), and
    pins *where* an accepted mutation may be: a base64 padding character, or — only with a
    surplus signature — inside one signature while the other still meets the threshold."""
    data = prepared.data
    allowed = padding_bit_positions(data)
    if not prepared.subject.exact:  # threshold 1, two deploy signatures: either one suffices alone
        for sig in json.loads(data)["signatures"]:
            text = json.dumps(sig, separators=(",", ":")).encode()
            start = data.index(text)
            allowed |= set(range(start, start + len(text)))
    loaded = TrustStore(prepared.store_dir).load(device_id=DEVICE, groups=GROUPS)
    same: set[int] = set()
    for i in range(len(data)):
        for flip in (0x01, 0x20, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= flip
            if judge_mutation(prepared, bytes(mutated), loaded, persist=False) == "same document":
                same.add(i)
    assert same <= allowed, sorted(same - allowed)
    assert TrustStore(prepared.store_dir).path.read_bytes() == prepared.before


# -- artifacts ------------------------------------------------------------------------------------

BLOB = b"model bytes" * 100
REF = ArtifactRef(hashlib.sha256(BLOB).hexdigest(), len(BLOB))

ARTIFACT_CASES: list[tuple[str, Any, Union[bytes, str], Optional[int], Optional[Reason]]] = [
    ("exact_bytes", REF, BLOB, None, None),
    ("exact_digest", {"sha256": REF.sha256, "size": REF.size}, REF.sha256, REF.size, None),
    ("one_byte_more", REF, BLOB + b"x", None, Reason.TOO_LARGE),
    ("one_byte_less", REF, BLOB[:-1], None, Reason.HASH_MISMATCH),
    ("same_size_other_bytes", REF, b"X" + BLOB[1:], None, Reason.HASH_MISMATCH),
    ("digest_larger_size", REF, REF.sha256, REF.size + 1, Reason.TOO_LARGE),
    ("wrong_digest", REF, "00" * 32, REF.size, Reason.HASH_MISMATCH),
]


@pytest.mark.parametrize("name,expected,data,size,reason", ARTIFACT_CASES, ids=[c[0] for c in ARTIFACT_CASES])
def test_check_artifact(name: str, expected: Any, data: Union[bytes, str], size: Optional[int], reason: Optional[Reason]) -> None:
    if reason is None:
        check_artifact(expected, data, size)
        return
    with pytest.raises(Rejection) as info:
        check_artifact(expected, data, size)
    assert info.value.reason is reason


def test_a_transfer_past_the_signed_size_stops_at_once() -> None:
    check = ArtifactCheck(REF)
    check.update(BLOB[:600])
    check.update(BLOB[600:])  # exactly the signed size
    with pytest.raises(Rejection) as info:
        check.update(b"x")  # the first byte past it is refused, not buffered
    assert info.value.reason is Reason.TOO_LARGE and check.received == REF.size
    assert check.finish() == REF.sha256
    short = ArtifactCheck(REF)
    short.update(BLOB[:10])
    with pytest.raises(Rejection) as info:
        short.finish()
    assert info.value.reason is Reason.HASH_MISMATCH
    with pytest.raises(Rejection) as info:
        ArtifactCheck(REF).update(b"\0" * (REF.size + 1))  # one oversize chunk: refused whole
    assert info.value.reason is Reason.TOO_LARGE


# -- the store ------------------------------------------------------------------------------------


def test_store_provision_load_save(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    with pytest.raises(NotProvisioned):
        store.load(device_id=DEVICE)
    with pytest.raises(Rejection):
        store.provision(root_json(1, signers=["root1"]), device_id=DEVICE)
    assert not store.exists()  # a refused root.json writes nothing
    s = store.provision(root_json(1), device_id=DEVICE, groups=GROUPS)
    with pytest.raises(AlreadyProvisioned):
        store.provision(root_json(1), device_id=DEVICE)
    record = json.loads(store.path.read_bytes())
    assert record["format"] == FORMAT and set(record) == {"format", "root", "floors"}
    v = s.verify_desired(desired(3), NOW)
    assert store.save(v.state) is True
    assert store.save(v.state.verify_desired(desired(3), NOW).state) is False  # already current: no write
    r = v.state.update_root(root_json(2)).state
    store.save(r)
    again = TrustStore(tmp_path).load(device_id=DEVICE, groups=GROUPS)
    assert again == r and again.floors.generation == 3 and again.root.version == 2
    with pytest.raises(ValueError):
        store.save(s)  # backward: refused
    with pytest.raises(RuntimeError):
        TrustStore(tmp_path).save(r)  # never loaded


def _with_root(o: dict[str, Any], surgery: Callable[[bytes], bytes]) -> bytes:
    return json.dumps({**o, "root": json.loads(surgery(json.dumps(o["root"]).encode()))}).encode()


DAMAGE: dict[str, Callable[[dict[str, Any], bytes], bytes]] = {
    "not_json": lambda o, raw: b"{",
    "empty": lambda o, raw: b"",
    "truncated": lambda o, raw: raw[: len(raw) // 2],
    "unknown_format": lambda o, raw: json.dumps({**o, "format": 2}).encode(),
    "floors_for_another_root": lambda o, raw: json.dumps({**o, "floors": {**o["floors"], "root_version": 2}}).encode(),
    "root_signature_damaged": lambda o, raw: _with_root(o, lambda r: corrupt_sig(r, 0)),
    "root_payload_swapped": lambda o, raw: _with_root(o, lambda r: with_payload(r, root_body(1, root_threshold=1))),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_store_refuses_a_damaged_file(tmp_path: Path, name: str) -> None:
    damage = DAMAGE[name]
    store = TrustStore(tmp_path)
    store.provision(root_json(1), device_id=DEVICE)
    raw = store.path.read_bytes()
    store.path.write_bytes(damage(json.loads(raw), raw))
    with pytest.raises(TrustStoreCorrupt):
        TrustStore(tmp_path).load(device_id=DEVICE)


# -- SIGKILL while persisting -----------------------------------------------------------------------

WORKER = REPO / "tests" / "trustkit.py"

# Mender-style: the crash point a write is killed at → which state the file must hold afterwards.
CRASH_TABLE = {
    "trust.save.begin": "old",
    "atomic_write.before_rename": "old",  # the temp is complete and fsynced, but not renamed
    "atomic_write.after_rename": "new",
    "trust.save.done": "new",
}

OPS: list[tuple[str, Callable[[], bytes], str]] = [  # (name, document, outcome of a clean run)
    ("00-provision", lambda: root_json(1), "accepted"),
    ("01-desired", lambda: desired(1), "accepted"),
    ("02-root", lambda: root_json(2, deploy=("deploy3",), issued_at=T0 + DAY / 2), "accepted"),
    ("03-desired", lambda: desired(2, signers=["deploy3"], issued_at=T0 + DAY / 2), "accepted"),
    ("04-command", lambda: command(1), "accepted"),
    ("05-desired", lambda: desired(2, signers=["deploy3"], issued_at=T0 + DAY / 2), "already_current"),
    ("06-desired", lambda: desired(1, signers=["deploy3"]), "rollback"),
    ("07-command", lambda: command(2, issued_at=T0 + DAY * 0.75), "accepted"),
]


def expected_records() -> list[Optional[dict[str, Any]]]:
    """The record persisted after each op, computed with the pure object (None: not provisioned)."""
    out: list[Optional[dict[str, Any]]] = []
    s: Optional[TrustedState] = None
    for name, data, _ in OPS:
        kind = name.split("-", 1)[1]
        if kind == "provision":
            s = TrustedState.bootstrap(data(), device_id=DEVICE, groups=GROUPS)
        else:
            assert s is not None
            try:
                s = s.verify(kind, data(), NOW).state
            except Rejection:
                pass
        out.append({"format": FORMAT, **s.record()})
    return out


def run_worker(data_dir: Path, ops_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), "apply", str(data_dir), str(ops_dir), NOW.isoformat()],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=REPO,
    )


def file_bytes(record: Optional[dict[str, Any]]) -> Optional[bytes]:
    # what durable.atomic_write_json writes for ``record``
    return None if record is None else json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"


def test_sigkill_at_every_crash_point_leaves_the_old_or_the_new_state(tmp_path: Path) -> None:
    ops_dir = tmp_path / "ops"
    ops_dir.mkdir()
    for name, data, _ in OPS:
        (ops_dir / f"{name}.json").write_bytes(data())
    records = expected_records()

    # 1. a clean run, tracing the crash points: which op each belongs to; benign and refused ops write nothing
    trace = tmp_path / "trace"
    clean = run_worker(tmp_path / "clean", ops_dir, {"EDGEFLEET_CRASH_TRACE": str(trace)})
    assert clean.returncode == 0, clean.stderr
    assert [json.loads(line)["outcome"] for line in clean.stdout.splitlines()] == [o for _, _, o in OPS]
    points: list[tuple[int, int, str]] = []  # (N, op index, crash point)
    op = -1
    for line in trace.read_text().splitlines():
        if line.startswith("#op "):
            op = [n for n, _, _ in OPS].index(line[4:])
        else:
            points.append((len(points) + 1, op, line))
    assert {p for _, _, p in points} == set(CRASH_TABLE)
    writers = sorted({i for _, i, _ in points})
    assert writers == [i for i, (_, _, o) in enumerate(OPS) if o == "accepted"]
    assert (tmp_path / "clean" / "trust" / "state.json").read_bytes() == file_bytes(records[-1])

    # 2. kill at each point; the file holds exactly the table's state; a re-run of every op converges
    def one(case: tuple[int, int, str]) -> str:
        n, i, point = case
        d = tmp_path / f"crash-{n}"
        killed = run_worker(d, ops_dir, {"EDGEFLEET_CRASH_AT": str(n)})
        assert killed.returncode == -9, (n, point, killed.returncode, killed.stderr)
        old = records[i - 1] if i > 0 else None  # before provisioning there is nothing
        want = old if CRASH_TABLE[point] == "old" else records[i]
        path = d / "trust" / "state.json"
        assert (path.read_bytes() if path.exists() else None) == file_bytes(want), (n, OPS[i][0], point)
        store = TrustStore(d)
        if want is None:
            with pytest.raises(NotProvisioned):
                store.load(device_id=DEVICE)
        else:
            assert {"format": FORMAT, **store.load(device_id=DEVICE, groups=GROUPS).record()} == want
        stale = store.clean_stale()
        assert bool(stale) == (point == "atomic_write.before_rename"), (n, point, stale)
        # replaying every op after the crash (as a restarted agent would) ends where a clean run ends
        resumed = run_worker(d, ops_dir, {})
        assert resumed.returncode == 0, resumed.stderr
        assert path.read_bytes() == file_bytes(records[-1]), (n, point)
        return point

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        done = list(pool.map(one, points))
    assert len(done) == len(points) == 4 * len(writers)


def test_signed_body_with_a_duplicate_key_is_malformed_not_last_one_wins() -> None:
    """Two parsers that resolve duplicates differently would read two documents from one
    signature; trust uses the wire's strict parser, which refuses them."""
    from tests.trustkit import NOW, doc_body, sign, state

    body = json.dumps(doc_body("desired", generation=1)).encode()
    payload = body[:-1] + b',"generation":9}'  # "generation" twice
    with pytest.raises(Rejection) as info:
        state().verify_desired(sign("desired", payload, ["deploy1"]), NOW)
    assert info.value.reason is Reason.MALFORMED
    assert "duplicate" in str(info.value)
