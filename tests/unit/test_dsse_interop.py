"""Our DSSE envelopes against independent implementations (DESIGN.md, Trust: "An independent
DSSE implementation must verify them").

- securesystemslib's ``dsse.Envelope`` verifies what ``dsse.sign`` makes, and we verify what it
  makes (both ways, through the JSON each side writes, not through shared objects);
- ``openssl pkeyutl -verify -rawin`` verifies a raw Ed25519 signature over our PAE, and we
  verify one that ``openssl pkeyutl -sign -rawin`` made.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from edge_runtime.protocol import dsse
from edge_runtime.protocol.signed import PAYLOAD_TYPES
from edge_runtime.protocol.trust import Outcome
from tests.trustkit import NOW, desired, doc_body, key, kid, state

PTYPE = PAYLOAD_TYPES["desired"]
BODY = json.dumps(doc_body("desired", generation=1), separators=(",", ":")).encode()
OPENSSL = shutil.which("openssl") or ("/usr/bin/openssl" if Path("/usr/bin/openssl").exists() else None)


def sslib_key(name: str) -> SSlibKey:
    # our keyid (sha256 of the raw key), not securesystemslib's default (sha256 of its JSON form)
    return SSlibKey.from_crypto(key(name).public_key(), keyid=kid(name))


def test_pae_matches_securesystemslib() -> None:
    for ptype, body in [(PTYPE, BODY), ("", b""), ("ü/type", b"\x00\xff binary"), ("t", b"x" * 1000)]:
        assert dsse.pae(ptype, body) == SslibEnvelope(body, ptype, {}).pae()
    assert dsse.pae("a", b"bc") == b"DSSEv1 1 a 2 bc"  # the spec's own definition, by hand


def test_securesystemslib_verifies_our_envelope() -> None:
    ours = dsse.sign(PTYPE, BODY, [key("deploy1"), key("deploy2")])
    theirs = SslibEnvelope.from_dict(json.loads(ours.to_json()))
    assert theirs.payload == BODY and theirs.payload_type == PTYPE
    accepted = theirs.verify([sslib_key("deploy1"), sslib_key("deploy2")], 2)
    assert set(accepted) == {kid("deploy1"), kid("deploy2")}
    # and it refuses the same things we do: a changed payload, a stranger's key
    tampered = SslibEnvelope.from_dict(json.loads(ours.to_json()))
    tampered.payload = BODY.replace(b'"generation":1', b'"generation":2')
    with pytest.raises(VerificationError):
        tampered.verify([sslib_key("deploy1")], 1)
    with pytest.raises(VerificationError):
        SslibEnvelope.from_dict(json.loads(ours.to_json())).verify([sslib_key("attacker")], 1)


def test_we_verify_a_securesystemslib_envelope() -> None:
    theirs = SslibEnvelope(BODY, PTYPE, {})
    theirs.sign(CryptoSigner(key("deploy1"), sslib_key("deploy1")))
    data = json.dumps(theirs.to_dict()).encode()  # their JSON, their key order and spacing
    envelope = dsse.Envelope.from_json(data)
    assert dsse.verify_one(envelope, envelope.signatures[0], key("deploy1").public_key())
    verified = state().verify_desired(data, NOW)  # and the whole device-side check passes
    assert verified.outcome is Outcome.ACCEPTED and verified.body.generation == 1


def test_same_key_same_signature_both_ways() -> None:
    """Ed25519 is deterministic: both implementations must produce identical signature bytes."""
    ours = dsse.sign(PTYPE, BODY, [key("deploy1")])
    theirs = SslibEnvelope(BODY, PTYPE, {})
    sig = theirs.sign(CryptoSigner(key("deploy1"), sslib_key("deploy1")))
    assert bytes.fromhex(sig.signature) == ours.signatures[0].sig


needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl (3.x, for pkeyutl -rawin) is not installed")


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30)


@needs_openssl
def test_openssl_verifies_a_raw_signature_over_our_pae(tmp_path: Path) -> None:
    envelope = dsse.Envelope.from_json(desired(1))
    sig = envelope.signatures[0]
    assert sig.keyid == kid("deploy1")
    (tmp_path / "pub.pem").write_bytes(key("deploy1").public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "pae.bin").write_bytes(dsse.pae(envelope.payload_type, envelope.payload))
    (tmp_path / "sig.bin").write_bytes(sig.sig)
    args = ["pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-rawin",
            "-in", str(tmp_path / "pae.bin"), "-sigfile", str(tmp_path / "sig.bin")]
    ok = _openssl(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    # the signature covers the PAE, not the bare payload: openssl must refuse it over the payload alone
    (tmp_path / "pae.bin").write_bytes(envelope.payload)
    bad = _openssl(*args)
    assert bad.returncode != 0, bad.stdout


@needs_openssl
def test_we_verify_a_signature_openssl_made(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(key("deploy1").private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (tmp_path / "pae.bin").write_bytes(dsse.pae(PTYPE, BODY))
    made = _openssl("pkeyutl", "-sign", "-inkey", str(tmp_path / "key.pem"), "-rawin",
                    "-in", str(tmp_path / "pae.bin"), "-out", str(tmp_path / "sig.bin"))
    assert made.returncode == 0, made.stderr
    sig = (tmp_path / "sig.bin").read_bytes()
    data = json.dumps({"payloadType": PTYPE, "payload": base64.b64encode(BODY).decode(),
                       "signatures": [{"keyid": kid("deploy1"), "sig": base64.b64encode(sig).decode()}]}).encode()
    assert state().verify_desired(data, NOW).accepted
