"""DSSE envelopes (the in-toto / sigstore signing envelope) with Ed25519 signatures.

    envelope := {"payloadType": TYPE, "payload": base64(BODY), "signatures": [{"keyid": ID, "sig": base64(SIG)}]}
    SIG      := Ed25519(private key, PAE(TYPE, BODY))
    PAE      := "DSSEv1" SP LEN(TYPE) SP TYPE SP LEN(BODY) SP BODY      (LEN: decimal byte count)
    ID       := hex sha256 of the raw 32-byte public key

Exactly the DSSE v1 spec, so any independent DSSE implementation verifies what we sign
(tests check securesystemslib's, and ``openssl pkeyutl -verify -rawin`` for a raw signature).
This module only encodes, decodes and checks single signatures; which keys and how many
are needed is ``trust``'s business. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAX_ENVELOPE_BYTES = 256 * 1024


class EnvelopeError(ValueError):
    """The bytes are not a well-formed DSSE envelope (maps to the ``malformed`` reason)."""


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def keyid(key: Ed25519PublicKey | bytes) -> str:
    """Hex sha256 of the raw 32-byte public key."""
    raw = key if isinstance(key, bytes) else raw_public_key(key)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
        """Parse an envelope; anything not exactly the DSSE shape is an ``EnvelopeError``.

        Raises:
            EnvelopeError: too large, not JSON, wrong shape, bad base64.
        """
        if len(data) > max_bytes:
            raise EnvelopeError(f"envelope of {len(data)} bytes exceeds {max_bytes}")
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EnvelopeError(f"not JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Envelope:
        if not isinstance(obj, dict) or set(obj) != {"payloadType", "payload", "signatures"}:
            raise EnvelopeError("expected exactly the keys payloadType, payload, signatures")
        ptype, payload, sigs = obj["payloadType"], obj["payload"], obj["signatures"]
        if not isinstance(ptype, str) or not isinstance(payload, str) or not isinstance(sigs, list):
            raise EnvelopeError("payloadType and payload must be strings, signatures a list")
        out = []
        for s in sigs:
            if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) or not isinstance(s.get("sig"), str):
                raise EnvelopeError("each signature needs string keyid and sig")
            out.append(Signature(s["keyid"], _b64(s["sig"])))
        return cls(ptype, _b64(payload), tuple(out))


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise EnvelopeError(f"bad base64: {exc}") from exc


def sign(payload_type: str, body: bytes, keys: list[Ed25519PrivateKey]) -> Envelope:
    """An envelope over ``body`` signed by every key in ``keys``."""
    message = pae(payload_type, body)
    sigs = tuple(Signature(keyid(k.public_key()), k.sign(message)) for k in keys)
    return Envelope(payload_type, body, sigs)


def verify_one(envelope: Envelope, signature: Signature, public: Ed25519PublicKey) -> bool:
    """Whether ``signature`` is ``public``'s valid signature over the envelope's PAE."""
    try:
        public.verify(signature.sig, pae(envelope.payload_type, envelope.payload))
        return True
    except InvalidSignature:
        return False
