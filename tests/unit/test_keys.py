"""Controller key management: the key directory (init, rotate, show), the signing helpers and
``fleetctl keys``. Every root written is checked the way a device checks it: each signature
verified with ``dsse.verify_one`` against the keys the root itself (or its predecessor) lists,
and each threshold counted separately."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from controller.cli import main
from controller.keys import (
    KeyDir,
    KeyDirBusy,
    KeyDirExists,
    KeyDirMissing,
    KeySpecError,
    NotEnoughKeys,
    PassphraseError,
    PassphraseRequired,
    WrongPassphrase,
)
from controller.signing import (
    SigningError,
    canonical_json,
    sign_body,
    sign_command,
    sign_desired,
    sign_manifest,
)
from edge_runtime.protocol import dsse
from edge_runtime.protocol.signed import (
    PAYLOAD_TYPES,
    ROLES,
    CommandHeader,
    DesiredHeader,
    Root,
    SignedBody,
    Target,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class Manifest(SignedBody):
    """A stand-in for ``messages.Manifest``: the helpers sign any pydantic body."""

    type: Literal["manifest"] = "manifest"
    name: str
    sha256: str
    size: int


# ---- helpers ---------------------------------------------------------------------------------


def load_root(path: Path) -> tuple[dsse.Envelope, Root]:
    envelope = dsse.Envelope.from_json(path.read_bytes())
    return envelope, Root.model_validate_json(envelope.payload)


def valid_signers(envelope: dsse.Envelope, root: Root, role: str) -> set[str]:
    """Keyids of ``root``'s ``role`` whose signature on ``envelope`` verifies (each key once)."""
    good = set()
    for sig in envelope.signatures:
        if sig.keyid in root.roles[role].keyids:
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(root.keys[sig.keyid].public))
            if dsse.verify_one(envelope, sig, public):
                good.add(sig.keyid)
    return good


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes (for "nothing changed" checks); the lock file is not state."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def keydir(tmp_path: Path) -> KeyDir:
    kd = KeyDir(tmp_path / "keys")
    kd.init(now=NOW)
    return kd


# ---- init ------------------------------------------------------------------------------------


def test_init_writes_keys_with_private_modes(keydir: KeyDir) -> None:
    root = keydir.root()
    assert mode(keydir.path) == 0o700 and mode(keydir.keys_dir) == 0o700
    counts = {role: len(root.roles[role].keyids) for role in ROLES}
    assert counts == {"root": 3, "deploy": 1, "command": 1}
    for role in ROLES:
        for kid in root.roles[role].keyids:
            private, public = keydir.key_file(kid), keydir.key_file(kid, private=False)
            assert private is not None and public is not None
            assert private.name == f"{role}-{kid[:16]}.key"
            assert mode(private) == 0o600, private
            assert mode(public) == 0o644, public
            assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
            loaded = load_pem_public_key(public.read_bytes())
            assert isinstance(loaded, Ed25519PublicKey) and dsse.keyid(loaded) == kid
            assert dsse.keyid(keydir.private_key(kid).public_key()) == kid
    assert (keydir.path / "root.1.json").read_bytes() == (keydir.path / "root.json").read_bytes()
    assert not list(keydir.path.rglob(".*.tmp")), "atomic writes leave no temp files"


def test_root_json_is_a_dsse_envelope_signed_by_its_root_threshold(keydir: KeyDir) -> None:
    envelope, root = load_root(keydir.path / "root.json")
    assert envelope.payload_type == PAYLOAD_TYPES["root"]
    assert root.version == 1 and root.type == "root"
    assert root.issued_at == NOW and root.expires == NOW + timedelta(days=365)
    assert root.roles["root"].threshold == 2
    assert len(envelope.signatures) == 3
    assert len(valid_signers(envelope, root, "root")) >= root.roles["root"].threshold
    assert valid_signers(envelope, root, "root") == set(root.roles["root"].keyids)
    # Only root keys sign a root: a deploy key's signature would be noise a device ignores.
    assert {s.keyid for s in envelope.signatures} <= set(root.roles["root"].keyids)
    assert envelope.payload == canonical_json(root)
    assert b'"issued_at":"2026-03-01T12:00:00Z"' in envelope.payload


def test_root_json_verifies_with_an_independent_dsse_implementation(keydir: KeyDir) -> None:
    sslib_dsse = pytest.importorskip("securesystemslib.dsse")
    from securesystemslib.signer import SSlibKey

    envelope, root = load_root(keydir.path / "root.json")
    other = sslib_dsse.Envelope.from_dict(json.loads((keydir.path / "root.json").read_bytes()))
    keys = [SSlibKey(kid, "ed25519", "ed25519", {"public": root.keys[kid].public}) for kid in root.roles["root"].keyids]
    verified = other.verify(keys, root.roles["root"].threshold)
    # It stops counting once the threshold is met.
    assert len(verified) >= root.roles["root"].threshold and set(verified) <= set(root.roles["root"].keyids)


def test_init_counts_and_thresholds_are_honoured(tmp_path: Path) -> None:
    kd = KeyDir(tmp_path / "k")
    kd.init(root_keys=5, root_threshold=3, deploy_keys=3, deploy_threshold=2, command_keys=2, command_threshold=2,
            expires_days=30, now=NOW)
    root = kd.root()
    assert [(len(root.roles[r].keyids), root.roles[r].threshold) for r in ROLES] == [(5, 3), (3, 2), (2, 2)]
    assert root.expires == NOW + timedelta(days=30)
    assert len(set(root.keys)) == 10, "every key is distinct"


@pytest.mark.parametrize("setup", ["initialised", "stray_file", "is_a_file"])
def test_init_refuses_to_overwrite(setup: str, tmp_path: Path) -> None:
    target = tmp_path / "k"
    if setup == "initialised":
        KeyDir(target).init(now=NOW)
    elif setup == "stray_file":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("a file")
    before = snapshot(target) if target.is_dir() else target.read_bytes()
    with pytest.raises(KeyDirExists, match="choose a new --dir|choose another --dir"):
        KeyDir(target).init(now=NOW)
    after = snapshot(target) if target.is_dir() else target.read_bytes()
    assert after == before


def test_init_adopts_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    KeyDir(tmp_path / "k").init(now=NOW)
    assert KeyDir(tmp_path / "k").root().version == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"root_threshold": 4}, "threshold 4"),
    ({"root_keys": 0}, "between 1 and"),
    ({"deploy_threshold": 0}, "threshold 0"),
    ({"expires_days": 0}, "expires_days"),
])
def test_init_refuses_impossible_specs_before_touching_disk(kwargs: dict[str, int], match: str, tmp_path: Path) -> None:
    with pytest.raises(KeySpecError, match=match):
        KeyDir(tmp_path / "k").init(**kwargs)
    assert not (tmp_path / "k").exists()


# ---- passphrases -----------------------------------------------------------------------------


def test_passphrase_round_trip_and_typed_errors(tmp_path: Path) -> None:
    kd = KeyDir(tmp_path / "k")
    kd.init(passphrase="correct horse", now=NOW)
    kid = kd.root().roles["deploy"].keyids[0]
    path = kd.key_file(kid)
    assert path is not None and path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert mode(path) == 0o600
    assert dsse.keyid(kd.private_key(kid, passphrase="correct horse").public_key()) == kid
    assert dsse.keyid(kd.private_key(kid, passphrase=b"correct horse").public_key()) == kid
    with pytest.raises(PassphraseRequired, match="passphrase"):
        kd.private_key(kid)
    with pytest.raises(WrongPassphrase, match="does not decrypt"):
        kd.private_key(kid, passphrase="wrong")
    with pytest.raises(PassphraseRequired):
        kd.signing_keys("deploy")
    assert all(e["encrypted"] for r in kd.show()["roles"].values() for e in r["keys"])


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PassphraseError, match="empty"):
        KeyDir(tmp_path / "k").init(passphrase="")
    assert not (tmp_path / "k").exists()


# ---- rotate ----------------------------------------------------------------------------------


def test_rotate_replacing_the_deploy_key(keydir: KeyDir) -> None:
    v1_bytes = (keydir.path / "root.json").read_bytes()
    v1 = keydir.root()
    old_deploy = v1.roles["deploy"].keyids
    envelope = keydir.rotate(replace={"deploy": 1}, now=NOW + timedelta(days=1))
    v2 = keydir.root()
    assert v2.version == 2 and envelope.to_json() == (keydir.path / "root.json").read_bytes()
    assert len(v2.roles["deploy"].keyids) == 1 and v2.roles["deploy"].keyids != old_deploy
    assert v2.roles["root"] == v1.roles["root"] and v2.roles["command"] == v1.roles["command"]
    assert not set(old_deploy) & set(v2.keys), "a retired key is no longer listed at all"
    # History: v1 untouched, v2 identical to root.json.
    assert (keydir.path / "root.1.json").read_bytes() == v1_bytes
    assert (keydir.path / "root.2.json").read_bytes() == (keydir.path / "root.json").read_bytes()
    # The old private key is kept, still private, in retired/.
    retired = keydir.retired_dir / f"deploy-{old_deploy[0][:16]}.key"
    assert retired.exists() and mode(retired) == 0o600
    assert keydir.key_file(old_deploy[0]) is None
    new = keydir.key_file(v2.roles["deploy"].keyids[0])
    assert new is not None and mode(new) == 0o600
    assert keydir.show()["retired"] == [retired.name]


def test_rotate_is_signed_by_both_old_and_new_root_thresholds(keydir: KeyDir) -> None:
    v1 = keydir.root()
    envelope = keydir.rotate(replace={"root": 3}, thresholds={"root": 2}, now=NOW)
    v2 = keydir.root()
    assert not set(v1.roles["root"].keyids) & set(v2.roles["root"].keyids), "a whole new root key set"
    old_signers = valid_signers(envelope, v1, "root")
    new_signers = valid_signers(envelope, v2, "root")
    assert len(old_signers) >= v1.roles["root"].threshold
    assert len(new_signers) >= v2.roles["root"].threshold
    assert old_signers.isdisjoint(new_signers)
    assert len(envelope.signatures) == 6
    assert len(list(keydir.retired_dir.glob("root-*.key"))) == 3


def test_rotate_chain_each_step_signed_by_its_predecessor(keydir: KeyDir) -> None:
    keydir.rotate(add={"root": 1}, thresholds={"root": 3}, now=NOW)
    keydir.rotate(replace={"command": 2}, thresholds={"command": 2}, now=NOW)
    keydir.rotate(remove=[keydir.root().roles["root"].keyids[0]], now=NOW)
    for version in (2, 3, 4):
        prev_env, prev = load_root(keydir.path / f"root.{version - 1}.json")
        envelope, root = load_root(keydir.path / f"root.{version}.json")
        assert root.version == version
        assert len(valid_signers(envelope, prev, "root")) >= prev.roles["root"].threshold
        assert len(valid_signers(envelope, root, "root")) >= root.roles["root"].threshold
        # Each key signs once even when it belongs to both root N and N+1.
        assert len({s.keyid for s in envelope.signatures}) == len(envelope.signatures)
    final = keydir.root()
    assert (len(final.roles["root"].keyids), final.roles["root"].threshold) == (3, 3)
    assert (len(final.roles["command"].keyids), final.roles["command"].threshold) == (2, 2)


def test_rotate_with_a_root_key_offline(keydir: KeyDir, tmp_path: Path) -> None:
    """Root keys may live offline: a threshold of them is enough to rotate; fewer is refused."""
    v1 = keydir.root()
    offline = tmp_path / "offline"
    offline.mkdir()
    first = keydir.key_file(v1.roles["root"].keyids[0])
    assert first is not None
    shutil.move(str(first), offline / first.name)
    envelope = keydir.rotate(replace={"deploy": None}, now=NOW)
    assert valid_signers(envelope, v1, "root") == set(v1.roles["root"].keyids[1:])

    second = keydir.key_file(v1.roles["root"].keyids[1])
    assert second is not None
    shutil.move(str(second), offline / second.name)
    before = snapshot(keydir.path)
    with pytest.raises(NotEnoughKeys, match="copy the offline ones back"):
        keydir.rotate(replace={"deploy": 1}, now=NOW)
    assert snapshot(keydir.path) == before, "a refused rotation writes nothing"
    with pytest.raises(NotEnoughKeys):
        keydir.signing_keys("root")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"replace": {"bogus": 1}}, KeySpecError, "unknown role"),
    ({"thresholds": {"deploy": 2}}, KeySpecError, "threshold 2"),
    ({"remove": ["0123"]}, KeySpecError, "at least 8"),
    ({"remove": ["ffffffffffffffff"]}, KeySpecError, "matches no key"),
    ({"add": {"deploy": 0}}, KeySpecError, "between 1 and"),
    ({"expires_days": 0}, KeySpecError, "expires_days"),
])
def test_rotate_refuses_impossible_changes(keydir: KeyDir, kwargs: dict[str, Any], error: type[Exception],
                                           match: str) -> None:
    before = snapshot(keydir.path)
    with pytest.raises(error, match=match):
        keydir.rotate(**kwargs)
    assert snapshot(keydir.path) == before


def test_rotate_refuses_a_role_left_without_keys(keydir: KeyDir) -> None:
    deploy = keydir.root().roles["deploy"].keyids[0]
    with pytest.raises(KeySpecError, match="role deploy"):
        keydir.rotate(remove=[deploy[:12]])


def test_rotate_removing_a_key_lowers_nothing_silently(keydir: KeyDir) -> None:
    root_keys = keydir.root().roles["root"].keyids
    keydir.rotate(remove=[root_keys[2][:10]], now=NOW)
    v2 = keydir.root()
    assert v2.roles["root"].keyids == root_keys[:2] and v2.roles["root"].threshold == 2
    assert (keydir.retired_dir / f"root-{root_keys[2][:16]}.key").exists()


def test_rotate_encrypted_dir_needs_the_passphrase(tmp_path: Path) -> None:
    kd = KeyDir(tmp_path / "k")
    kd.init(passphrase="pw", now=NOW)
    before = snapshot(kd.path)
    with pytest.raises(PassphraseRequired):
        kd.rotate(replace={"deploy": 1})
    with pytest.raises(WrongPassphrase):
        kd.rotate(replace={"deploy": 1}, passphrase="nope")
    assert snapshot(kd.path) == before
    kd.rotate(replace={"deploy": 1}, passphrase="pw", now=NOW)
    new = kd.key_file(kd.root().roles["deploy"].keyids[0])
    assert new is not None and b"ENCRYPTED" in new.read_bytes()


def test_rotate_without_init_is_key_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyDirMissing, match="keys init"):
        KeyDir(tmp_path / "nothing").rotate()


def test_rotate_while_another_rotation_holds_the_lock_is_busy(keydir: KeyDir) -> None:
    fd = os.open(keydir.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(KeyDirBusy, match="wait for it"):
            keydir.rotate()
    finally:
        os.close(fd)
    assert keydir.rotate(now=NOW) is not None and keydir.root().version == 2


def test_rotate_retires_key_files_left_by_a_crashed_rotation(keydir: KeyDir) -> None:
    """A rotation killed after writing new key files but before root.json leaves keys no root
    names; they were never trusted, and the next rotation moves them out of keys/."""
    orphan = Ed25519PrivateKey.generate()
    keydir._write_key("deploy", orphan, None)
    kid = dsse.keyid(orphan.public_key())
    keydir.rotate(now=NOW)
    assert keydir.key_file(kid) is None
    assert (keydir.retired_dir / f"deploy-{kid[:16]}.key").exists()
    assert keydir.root().version == 2


def test_show_reports_roles_keys_and_dates(keydir: KeyDir) -> None:
    info = keydir.show()
    assert info["version"] == 1 and info["history"] == [1]
    assert info["issued_at"] == "2026-03-01T12:00:00Z" and info["expires"] == "2027-03-01T12:00:00Z"
    assert info["root_signatures"] == 3
    assert {r: s["threshold"] for r, s in info["roles"].items()} == {"root": 2, "deploy": 1, "command": 1}
    for role, spec in info["roles"].items():
        for entry in spec["keys"]:
            assert entry["file"] == f"keys/{role}-{entry['keyid'][:16]}.key"
            assert entry["encrypted"] is False


# ---- signing helpers -------------------------------------------------------------------------


def _fields(kind: str) -> dict[str, Any]:
    if kind == "desired":
        return {"target": {"device": "dev-1"}, "generation": 7}
    if kind == "command":
        return {"target": {"group": "lab"}, "seq": 3}
    return {"name": "detector", "sha256": "ab" * 32, "size": 1234}


@pytest.mark.parametrize("kind,helper,model,role,window", [
    ("desired", sign_desired, DesiredHeader, "deploy", timedelta(days=7)),
    ("command", sign_command, CommandHeader, "command", timedelta(minutes=5)),
    ("manifest", sign_manifest, Manifest, "deploy", timedelta(days=365)),
])
def test_sign_helpers_use_the_role_keys_and_round_trip(keydir: KeyDir, kind: str, helper: Any,
                                                       model: type[SignedBody], role: str, window: timedelta) -> None:
    envelope = helper(keydir, _fields(kind), model=model, now=NOW)
    assert envelope.payload_type == PAYLOAD_TYPES[kind]
    root = keydir.root()
    assert valid_signers(envelope, root, role) == set(root.roles[role].keyids)
    assert len(envelope.signatures) == root.roles[role].threshold
    body = model.model_validate_json(envelope.payload)
    assert body.type == kind and body.issued_at == NOW and body.expires == NOW + window
    assert canonical_json(body) == envelope.payload, "re-encoding the parsed body gives the same bytes"
    # Through the wire form too.
    again = dsse.Envelope.from_json(envelope.to_json())
    assert model.model_validate_json(again.payload) == body


def test_sign_helpers_sign_with_a_threshold_of_role_keys(tmp_path: Path) -> None:
    kd = KeyDir(tmp_path / "k")
    kd.init(deploy_keys=3, deploy_threshold=2, now=NOW)
    envelope = sign_desired(kd, _fields("desired"), now=NOW)
    root = kd.root()
    assert len(envelope.signatures) == 2
    assert len(valid_signers(envelope, root, "deploy")) == 2


def test_sign_helpers_follow_a_rotation(keydir: KeyDir) -> None:
    before = sign_desired(keydir, _fields("desired"), now=NOW)
    keydir.rotate(replace={"deploy": 1}, now=NOW)
    after = sign_desired(keydir, _fields("desired"), now=NOW)
    assert {s.keyid for s in after.signatures} == set(keydir.root().roles["deploy"].keyids)
    assert {s.keyid for s in before.signatures}.isdisjoint({s.keyid for s in after.signatures})


def test_sign_helpers_keep_a_finished_body_and_explicit_times(keydir: KeyDir) -> None:
    body = CommandHeader(target=Target(device="d1"), seq=1, issued_at=NOW, expires=NOW + timedelta(hours=1))
    envelope = sign_command(keydir, body)
    assert CommandHeader.model_validate_json(envelope.payload) == body
    custom = sign_desired(keydir, _fields("desired"), now=NOW, valid_for=timedelta(hours=2))
    assert DesiredHeader.model_validate_json(custom.payload).expires == NOW + timedelta(hours=2)


@pytest.mark.parametrize("case,match", [
    ("manifest_without_model", "model="),
    ("invalid_fields", "invalid"),
    ("naive_now", "no time zone"),
])
def test_sign_helpers_refuse_bad_input(keydir: KeyDir, case: str, match: str) -> None:
    with pytest.raises(SigningError, match=match):
        if case == "manifest_without_model":
            sign_manifest(keydir, _fields("manifest"))
        elif case == "invalid_fields":
            sign_desired(keydir, {"target": {"device": "d"}, "generation": -1}, now=NOW)
        else:
            sign_desired(keydir, _fields("desired"), now=datetime(2026, 1, 1))


def test_sign_body_refuses_a_kind_that_is_not_the_body_type() -> None:
    key = Ed25519PrivateKey.generate()
    body = DesiredHeader(target=Target(device="d"), generation=1, issued_at=NOW, expires=NOW + timedelta(days=1))
    with pytest.raises(SigningError, match="signed as 'command'"):
        sign_body(body, "command", [key])
    with pytest.raises(SigningError, match="unknown document kind"):
        sign_body(body, "bogus", [key])
    with pytest.raises(SigningError, match="no keys"):
        sign_body(body, "desired", [])
    twice = sign_body(body, "desired", [key, key])
    assert len(twice.signatures) == 1, "a key counts once, so it signs once"


def test_canonical_json_is_sorted_compact_utf8_and_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    body = Manifest(name="détecteur", sha256="00" * 32, size=1,
                    issued_at=datetime(2026, 3, 1, 14, 0, 0, tzinfo=plus_two),
                    expires=datetime(2026, 3, 2, 12, 0, 0, 500, tzinfo=timezone.utc))
    data = canonical_json(body)
    text = data.decode("utf-8")
    assert '"issued_at":"2026-03-01T12:00:00Z"' in text
    assert '"expires":"2026-03-02T12:00:00.000500Z"' in text
    assert "détecteur" in text and " " not in text.replace("détecteur", "")
    obj = json.loads(data)
    assert list(obj) == sorted(obj)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert Manifest.model_validate_json(data) == body


# ---- fleetctl keys ---------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_init_show_rotate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    code, out, _ = run(capsys, "keys", "init", "--dir", d, "--root-keys", "4", "--root-threshold", "3", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["version"] == 1 and info["roles"]["root"]["threshold"] == 3
    assert len(info["roles"]["root"]["keyids"]) == 4
    old_deploy = info["roles"]["deploy"]["keyids"]

    code, out, _ = run(capsys, "keys", "rotate", "--dir", d, "--replace", "deploy:2", "--threshold", "deploy:2",
                       "--root-threshold", "2", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["version"] == 2 and info["history"] == [1, 2]
    assert info["roles"]["root"]["threshold"] == 2
    assert len(info["roles"]["deploy"]["keyids"]) == 2 and not set(old_deploy) & set(info["roles"]["deploy"]["keyids"])
    assert info["retired"] == [f"deploy-{old_deploy[0][:16]}.key"]

    code, out, _ = run(capsys, "keys", "show", "--dir", d, "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    v1_env, v1 = load_root(Path(d) / "root.1.json")
    v2_env, v2 = load_root(Path(d) / "root.json")
    assert len(valid_signers(v2_env, v1, "root")) >= 3 and len(valid_signers(v2_env, v2, "root")) >= 2


def test_cli_show_table(keydir: KeyDir, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys", "show", "--dir", str(keydir.path))
    assert code == 0
    assert "root v1" in out and "expires 2027-03-01T12:00:00Z" in out
    header = out.splitlines()[1]
    assert header.split() == ["role", "threshold", "keyid", "file", "encrypted"]
    kid = keydir.root().roles["deploy"].keyids[0]
    assert any(line.split()[:4] == ["deploy", "1", "of", "1"] and kid[:16] in line for line in out.splitlines())
    assert out.count("2 of 3") == 3


def test_cli_errors_exit_1_with_guidance(keydir: KeyDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keys", "init", "--dir", str(keydir.path), "--json")
    assert code == 1
    assert json.loads(out)["error"]["type"] == "key_dir_exists"
    assert "fleetctl keys rotate" in err
    code, _, err = run(capsys, "keys", "show", "--dir", str(tmp_path / "absent"))
    assert code == 1 and "fleetctl keys init" in err
    code, out, _ = run(capsys, "keys", "rotate", "--dir", str(keydir.path), "--threshold", "deploy:2", "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "invalid_key_spec"


@pytest.mark.parametrize("argv", [
    ["keys", "rotate", "--dir", "x", "--replace", "bogus"],
    ["keys", "rotate", "--dir", "x", "--replace", "deploy:0"],
    ["keys", "rotate", "--dir", "x", "--threshold", "deploy"],
    ["keys", "init", "--dir", "x", "--root-keys", "zero"],
    ["keys", "init", "--dir", "x", "--passphrase-file", "f", "--passphrase-env", "V"],
    ["keys", "show"],
])
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_cli_passphrase_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "s3cret")
    code, out, _ = run(capsys, "keys", "init", "--dir", d, "--passphrase-env", "EDGEFLEET_KEY_PASSPHRASE", "--json")
    assert code == 0
    assert all(e["encrypted"] for r in json.loads(out)["roles"].values() for e in r["keys"])

    code, out, err = run(capsys, "keys", "rotate", "--dir", d, "--replace", "deploy", "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "passphrase_required"
    assert "--passphrase-file" in err

    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    code, out, _ = run(capsys, "keys", "rotate", "--dir", d, "--replace", "deploy", "--passphrase-file", str(wrong),
                       "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "wrong_passphrase"

    right = tmp_path / "right"
    right.write_text("s3cret\n")  # the trailing newline an editor adds is not part of it
    code, out, _ = run(capsys, "keys", "rotate", "--dir", d, "--replace", "deploy", "--passphrase-file", str(right),
                       "--json")
    assert code == 0 and json.loads(out)["version"] == 2

    code, _, err = run(capsys, "keys", "rotate", "--dir", d, "--passphrase-env", "EDGEFLEET_UNSET_VAR_XYZ")
    assert code == 1 and "is not set" in err
    code, _, err = run(capsys, "keys", "rotate", "--dir", d, "--passphrase-file", str(tmp_path / "missing"))
    assert code == 1 and "cannot read the passphrase file" in err


def test_cli_init_under_a_file_is_a_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file-system failure (here: the parent is a file) exits 1 with a message, no traceback."""
    (tmp_path / "plain").write_text("not a directory")
    code, out, err = run(capsys, "keys", "init", "--dir", str(tmp_path / "plain" / "k"), "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "key_dir_error"
    assert "writable" in err
