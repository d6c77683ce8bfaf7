"""The device's root of trust: which signed documents it accepts, and the floors that only rise.

This module owns the *decision*. It takes bytes and a reference time, returns typed
documents or raises a typed ``Rejection``, and does no I/O and reads no clock (STYLE.md #1);
``trust_store`` persists what it accepted. python-tuf's ``TrustedMetadataSet`` is the model:
one guarded object, ``TrustedState``, built from a trusted root and the persisted floors,
that only moves forward. It is immutable: every ``verify_*`` returns a *new* state (inside a
``Verified``) or raises, so on a rejection nothing the device holds has changed.

    kind      payloadType (signed.PAYLOAD_TYPES)   role     floor         equal floor
    root      ...edgefleet.root+json               root     version       ALREADY_CURRENT
    desired   ...edgefleet.desired+json            deploy   generation    ALREADY_CURRENT
    command   ...edgefleet.command+json            command  seq           ALREADY_CURRENT
    manifest  ...edgefleet.manifest+json           deploy   -             -

The checks, in this order; the first that fails decides the reason (tests pin each step):

 1. size            ``len(bytes) > max_bytes`` → ``too_large``, before any parsing; so is an
                    envelope carrying more than ``MAX_SIGNATURES`` signatures (step 4 would
                    otherwise spend one Ed25519 verification on each).
 2. envelope        not JSON / not exactly the DSSE shape / bad base64 → ``malformed``.
 3. payloadType     not the kind's type → ``malformed``: it is a different kind of document,
                    whoever signed it, and it is refused before any signature is checked.
    pin             (optional) the payload's sha256 is not the one a trusted document named
                    → ``hash_mismatch``.
 4. signatures      against the role of the *trusted* root (see ``_require_threshold``):
                    threshold met by distinct role keys → pass (other signatures ignored);
                    else a role key's signature failed → ``bad_signature``;
                    else no role key signed at all and some keyid is outside the role →
                    ``unknown_key``; else → ``threshold`` (too few distinct role keys,
                    including duplicates by one key and an empty signature list).
 5. body            the payload is only parsed once it is signed: bad JSON, wrong shape,
                    missing fields, unknown ``spec_version`` major, a ``type`` that is not the
                    kind → ``malformed``.
 6. target          names another device or a group this device is not in → ``wrong_device``.
 7. floor           lower than the floor → ``rollback``; equal → ``Outcome.ALREADY_CURRENT``,
                    benign and final (nothing changes, the caller does nothing).
 8. freshness       the trusted root or the document has expired at the effective time →
                    ``expired``.

Effective time is ``max(now, floors.highest_time_seen)``. ``highest_time_seen`` rises to the
``issued_at`` of every accepted document: a *signed* time, so boards without a real-time clock
learn the time from the controller, a clock set back cannot revive an expired document, and a
local clock spoofed forward is never persisted (it would freeze the device for good).

Root rotation (``update_root``), as TUF specifies it: root N+1 must be signed by a threshold of
root N (step 4 against N), must be exactly version N+1 (lower → ``rollback``, equal →
``ALREADY_CURRENT``, a skipped version → ``threshold``, because its predecessor's signatures
cannot be checked by a device that does not hold that predecessor), and must be signed by a
threshold of its own root role. Its expiry is *not* checked there (TUF 5.3.4's note): a device
offline for longer than a root's lifetime must still walk N+1, N+2, ... to the current root;
an expired trusted root refuses every document instead (step 8, TUF 5.3.10, the freeze check).
The generation/seq floors survive a rotation: resetting them would let documents still signed
by keys that stayed in the role be replayed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Generic, Literal, Optional, TypeVar, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_runtime.protocol import dsse
from edge_runtime.protocol.dsse import Envelope, EnvelopeError
from edge_runtime.protocol.signed import PAYLOAD_TYPES, ROLE_OF, CommandHeader, DesiredHeader, Role, Root, SignedBody

MAX_BYTES = dsse.MAX_ENVELOPE_BYTES
MAX_SIGNATURES = 32  # far above any sane role; bounds the Ed25519 work one message can cost
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
KINDS = ("root", "desired", "command", "manifest")


class Reason(str, Enum):
    """Why a document was refused: a fixed set (DESIGN.md, Trust), used verbatim in events."""

    BAD_SIGNATURE = "bad_signature"
    THRESHOLD = "threshold"
    UNKNOWN_KEY = "unknown_key"
    ROLLBACK = "rollback"
    EXPIRED = "expired"
    WRONG_DEVICE = "wrong_device"
    HASH_MISMATCH = "hash_mismatch"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"


class Outcome(str, Enum):
    """What an accepted (not rejected) document means. ``ALREADY_CURRENT`` is benign: the
    device holds this generation / seq / root version already (a broker re-delivery, a
    controller re-publishing after a reconnect) and must not act on it again."""

    ACCEPTED = "accepted"
    ALREADY_CURRENT = "already_current"


class Rejection(Exception):
    """A document was refused; ``reason`` says why, and nothing the device holds changed."""

    def __init__(self, reason: Reason, message: str, *, kind: str | None = None) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.kind = kind

    def to_dict(self) -> dict[str, Any]:
        """The shape a device event carries: ``{"type": "rejected", "reason", "kind", "message"}``."""
        return {"type": "rejected", "reason": self.reason.value, "kind": self.kind, "message": self.message}


class Floors(BaseModel):
    """What the device has seen, persisted with the root; every field only ever rises."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root_version: int = Field(ge=1)
    generation: Optional[int] = Field(default=None, ge=0)  # desired state; None = none accepted yet
    seq: Optional[int] = Field(default=None, ge=0)  # commands
    highest_time_seen: datetime = EPOCH  # the clock floor for expiry

    @field_validator("highest_time_seen")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("highest_time_seen must carry a time zone")
        return v

    def covers(self, other: Floors) -> bool:
        """True when every floor here is at or above ``other``'s (a state may replace another
        on disk only if it covers it)."""

        def ge(a: Optional[int], b: Optional[int]) -> bool:
            return b is None or (a is not None and a >= b)

        return (
            self.root_version >= other.root_version
            and ge(self.generation, other.generation)
            and ge(self.seq, other.seq)
            and self.highest_time_seen >= other.highest_time_seen
        )


# Bodies parsed when the caller does not pass its own model: the headers ``trust`` checks,
# with any further fields allowed (``messages`` defines the full, strict documents).
class AnyDesired(DesiredHeader):
    model_config = ConfigDict(extra="allow")


class AnyCommand(CommandHeader):
    model_config = ConfigDict(extra="allow")


class AnyManifest(SignedBody):
    model_config = ConfigDict(extra="allow")
    type: Literal["manifest"] = "manifest"


B = TypeVar("B", bound=SignedBody)


@dataclass(frozen=True)
class Verified(Generic[B]):
    """A document that passed: its parsed body and the state to hold from now on.

    ``state`` is the same object as before when ``outcome`` is ``ALREADY_CURRENT``; persist
    it (``trust_store.TrustStore.save``) before acting on ``body``.
    """

    kind: str
    outcome: Outcome
    body: B
    state: TrustedState
    digest: str  # hex sha256 of the signed payload: pins, dedupes and names it in events

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


@dataclass(frozen=True)
class _Spec:
    floor: Optional[str]  # the Floors field this kind raises, if any
    base: type[SignedBody]  # a body_model must subclass this
    default: type[SignedBody]
    targeted: bool


_SPECS: dict[str, _Spec] = {
    "desired": _Spec("generation", DesiredHeader, AnyDesired, True),
    "command": _Spec("seq", CommandHeader, AnyCommand, True),
    "manifest": _Spec(None, SignedBody, AnyManifest, False),
}


@dataclass(frozen=True)
class TrustedState:
    """The trusted root and the floors; immutable, and it only moves forward.

    Build one with ``bootstrap`` (provisioning: a self-signed ``root.json``) or ``restore``
    (start-up: what ``trust_store`` persisted); then feed it documents with ``verify`` /
    ``verify_desired`` / ``verify_command`` / ``verify_manifest`` / ``update_root``.
    """

    root_envelope: Envelope
    root: Root
    floors: Floors
    device_id: str
    groups: frozenset[str] = frozenset()
    # role -> keyid -> public key, decoded once per root and handed on to every successor
    # state of the same root (decoding the keys again per document costs as much as parsing
    # the document). Derived from ``root``: never pass it yourself.
    _role_keys: Optional[Mapping[str, Mapping[str, Ed25519PublicKey]]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.floors.root_version != self.root.version:
            raise ValueError(f"floors are for root v{self.floors.root_version}, the root is v{self.root.version}")
        object.__setattr__(self, "groups", frozenset(self.groups))
        if self._role_keys is None:
            object.__setattr__(self, "_role_keys", _role_keys(self.root))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def bootstrap(
        cls, root_json: bytes, *, device_id: str, groups: frozenset[str] | set[str] = frozenset(), max_bytes: int = MAX_BYTES
    ) -> TrustedState:
        """Trust a ``root.json`` at provisioning: it must be signed by a threshold of its own
        root keys. Its expiry is not checked here (the clock of a board being provisioned
        may be anywhere); an expired root simply accepts nothing until it is rotated.

        Raises:
            Rejection: any reason of steps 1-5 of the module docstring.
        """
        envelope, root = _self_signed_root(root_json, max_bytes)
        floors = Floors(root_version=root.version, highest_time_seen=root.issued_at)
        return cls(envelope, root, floors, device_id, frozenset(groups))

    @classmethod
    def restore(
        cls,
        root_envelope: Envelope,
        floors: Floors,
        *,
        device_id: str,
        groups: frozenset[str] | set[str] = frozenset(),
    ) -> TrustedState:
        """Rebuild the state persisted by ``trust_store``. The root is re-checked against its
        own threshold (a few Ed25519 verifications) so that a damaged file is noticed.

        Raises:
            Rejection: the stored root does not verify, or ``floors`` are for another version
                (``malformed``).
        """
        envelope, root = _self_signed_root(root_envelope.to_json(), None)
        if floors.root_version != root.version:
            raise Rejection(
                Reason.MALFORMED, f"floors are for root v{floors.root_version}, the stored root is v{root.version}", kind="root"
            )
        return cls(envelope, root, floors, device_id, frozenset(groups))

    def record(self) -> dict[str, Any]:
        """What ``trust_store`` persists: the root envelope and the floors (JSON-ready)."""
        return {"root": self.root_envelope.to_dict(), "floors": self.floors.model_dump(mode="json")}

    # -- verification -------------------------------------------------------------------

    def verify(
        self,
        kind: str,
        data: bytes,
        now: datetime,
        *,
        body_model: type[SignedBody] | None = None,
        pinned: str | None = None,
        max_bytes: int = MAX_BYTES,
    ) -> Verified[Any]:
        """Verify a signed document of ``kind`` (one of ``KINDS``) received as ``data``.

        ``body_model`` parses the payload (default: the kind's header with extra fields
        allowed; it must subclass that header). ``pinned`` is the hex sha256 a trusted
        document gave for this payload (a desired state naming its manifests). For
        ``root``, this is ``update_root`` and ``now`` is not used.

        Raises:
            Rejection: the document is refused; the module docstring lists reason precedence.
            ValueError: ``kind`` is not a kind, or ``now`` is naive (caller bugs, not data).
            TypeError: ``body_model`` does not subclass the kind's header.
        """
        if kind == "root":
            if body_model is not None or pinned is not None:
                raise TypeError("root documents take neither body_model nor pinned")
            return self.update_root(data, max_bytes=max_bytes)
        spec = _SPECS.get(kind)
        if spec is None:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        model = body_model or spec.default
        if not (isinstance(model, type) and issubclass(model, spec.base)):
            raise TypeError(f"body_model for {kind} must subclass {spec.base.__name__}")
        when = self.effective_time(now)

        envelope = _open(kind, data, max_bytes)
        digest = hashlib.sha256(envelope.payload).hexdigest()
        if pinned is not None and digest != pinned.lower():
            raise Rejection(Reason.HASH_MISMATCH, f"payload sha256 {digest} is not the pinned {pinned}", kind=kind)
        role = ROLE_OF[kind]
        assert self._role_keys is not None  # set in __post_init__
        _require_threshold(envelope, self.root.roles[role], self._role_keys, role, f"root v{self.root.version}", kind)
        body = _parse(model, envelope.payload, kind)

        if spec.targeted:
            target = body.target  # type: ignore[attr-defined]
            if not target.matches(self.device_id, self.groups):
                named = f"device {target.device}" if target.device is not None else f"group {target.group}"
                raise Rejection(Reason.WRONG_DEVICE, f"addressed to {named}, this is {self.device_id}", kind=kind)
        if spec.floor is not None:
            value: int = getattr(body, spec.floor)
            floor: Optional[int] = getattr(self.floors, spec.floor)
            if floor is not None and value < floor:
                raise Rejection(Reason.ROLLBACK, f"{spec.floor} {value} is below the floor {floor}", kind=kind)
            if floor is not None and value == floor:
                return Verified(kind, Outcome.ALREADY_CURRENT, body, self, digest)
        self._require_fresh(body, when, kind)

        update: dict[str, Any] = {"highest_time_seen": max(self.floors.highest_time_seen, body.issued_at)}
        if spec.floor is not None:
            update[spec.floor] = getattr(body, spec.floor)
        return Verified(kind, Outcome.ACCEPTED, body, self._with(self.floors.model_copy(update=update)), digest)

    def verify_desired(
        self, data: bytes, now: datetime, *, body_model: type[DesiredHeader] | None = None, max_bytes: int = MAX_BYTES
    ) -> Verified[Any]:
        """``verify("desired", ...)``: a desired state for this device (floor: generation).

        Raises:
            Rejection: see ``verify``.
        """
        return self.verify("desired", data, now, body_model=body_model, max_bytes=max_bytes)

    def verify_command(
        self, data: bytes, now: datetime, *, body_model: type[CommandHeader] | None = None, max_bytes: int = MAX_BYTES
    ) -> Verified[Any]:
        """``verify("command", ...)``: a one-shot command (floor: seq; an equal seq is a
        re-delivery, ``ALREADY_CURRENT``, and must not run again).

        Raises:
            Rejection: see ``verify``.
        """
        return self.verify("command", data, now, body_model=body_model, max_bytes=max_bytes)

    def verify_manifest(
        self,
        data: bytes,
        now: datetime,
        *,
        body_model: type[SignedBody] | None = None,
        pinned: str | None = None,
        max_bytes: int = MAX_BYTES,
    ) -> Verified[Any]:
        """``verify("manifest", ...)``: a model manifest, signed by the deploy role. Pass
        ``pinned`` (the payload sha256 the accepted desired state names) so that a validly
        signed but different manifest cannot be mixed in.

        Raises:
            Rejection: see ``verify``.
        """
        return self.verify("manifest", data, now, body_model=body_model, pinned=pinned, max_bytes=max_bytes)

    def update_root(self, data: bytes, *, max_bytes: int = MAX_BYTES) -> Verified[Root]:
        """Rotate to root N+1 (the module docstring gives the rule and why expiry waits).

        Raises:
            Rejection: too_large / malformed (steps 1-3, 5); bad_signature / unknown_key /
                threshold against root N, then against N+1's own root role; rollback for a
                lower version; threshold for a skipped version.
        """
        envelope = _open("root", data, max_bytes)
        digest = hashlib.sha256(envelope.payload).hexdigest()
        current = self.root
        assert self._role_keys is not None  # set in __post_init__
        _require_threshold(envelope, current.roles["root"], self._role_keys, "root", f"root v{current.version}", "root")
        new = _parse(Root, envelope.payload, "root")
        if new.version < current.version:
            raise Rejection(Reason.ROLLBACK, f"root v{new.version} is older than the trusted v{current.version}", kind="root")
        if new.version == current.version:
            return Verified("root", Outcome.ALREADY_CURRENT, new, self, digest)
        if new.version > current.version + 1:
            raise Rejection(
                Reason.THRESHOLD,
                f"root v{new.version} skips v{current.version + 1}: each root must be signed by a threshold of the one "
                f"before it, and this device holds v{current.version}; install v{current.version + 1} first",
                kind="root",
            )
        _require_threshold(envelope, new.roles["root"], _role_keys(new), "root", f"root v{new.version} itself", "root")
        floors = self.floors.model_copy(
            update={"root_version": new.version, "highest_time_seen": max(self.floors.highest_time_seen, new.issued_at)}
        )
        state = TrustedState(envelope, new, floors, self.device_id, self.groups)
        return Verified("root", Outcome.ACCEPTED, new, state, digest)

    # -- helpers ------------------------------------------------------------------------

    def effective_time(self, now: datetime) -> datetime:
        """``max(now, highest_time_seen)``: the time expiry is judged at.

        Raises:
            ValueError: ``now`` has no time zone.
        """
        if now.tzinfo is None:
            raise ValueError("now must carry a time zone (datetime.now(timezone.utc))")
        return max(now, self.floors.highest_time_seen)

    def _require_fresh(self, body: SignedBody, when: datetime, kind: str) -> None:
        if self.root.expires <= when:
            raise Rejection(
                Reason.EXPIRED,
                f"the trusted root v{self.root.version} expired at {self.root.expires.isoformat()} "
                f"(effective time {when.isoformat()}); a newer root is needed before anything is accepted",
                kind=kind,
            )
        if body.expires <= when:
            raise Rejection(
                Reason.EXPIRED, f"expired at {body.expires.isoformat()} (effective time {when.isoformat()})", kind=kind
            )

    def _with(self, floors: Floors) -> TrustedState:
        return TrustedState(self.root_envelope, self.root, floors, self.device_id, self.groups, self._role_keys)


# -- artifacts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactRef:
    """The sha256 and size a signed manifest gives for an artifact's bytes."""

    sha256: str
    size: int


def _expected(expected: Any) -> ArtifactRef:
    if isinstance(expected, ArtifactRef):
        return expected
    if isinstance(expected, Mapping):
        return ArtifactRef(str(expected["sha256"]).lower(), int(expected["size"]))
    return ArtifactRef(str(expected.sha256).lower(), int(expected.size))


def check_artifact(expected: Any, data_or_digest: Union[bytes, str], size: int | None = None) -> None:
    """Check complete artifact bytes (or their hex sha256 plus ``size``) against what a
    signed manifest says. ``expected`` is anything with ``sha256`` and ``size`` (a manifest
    or one entry of it, an ``ArtifactRef``, or a mapping with those keys).

    Raises:
        Rejection: ``too_large`` when longer than signed, ``hash_mismatch`` when shorter or
            when the digest differs.
        ValueError: a digest was given without ``size``.
    """
    ref = _expected(expected)
    if isinstance(data_or_digest, (bytes, bytearray, memoryview)):
        size = len(data_or_digest)
        digest = hashlib.sha256(data_or_digest).hexdigest()
    else:
        if size is None:
            raise ValueError("check_artifact(expected, digest, size): size is required with a digest")
        digest = data_or_digest.lower()
    if size > ref.size:
        raise Rejection(Reason.TOO_LARGE, f"artifact of {size} bytes exceeds the signed size {ref.size}", kind="artifact")
    if size != ref.size or digest != ref.sha256:
        raise Rejection(
            Reason.HASH_MISMATCH,
            f"artifact is {size} bytes with sha256 {digest}; signed: {ref.size} bytes, {ref.sha256}",
            kind="artifact",
        )


class ArtifactCheck:
    """Streamed form of ``check_artifact`` for a transfer in chunks: ``update`` refuses the
    chunk that would pass the signed size *before* hashing or keeping it (a transfer past
    the signed size stops at once: the endless-data attack), ``finish`` checks the digest."""

    def __init__(self, expected: Any) -> None:
        self.expected = _expected(expected)
        self.received = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        """Account for the next chunk.

        Raises:
            Rejection: ``too_large`` once the bytes would exceed the signed size.
        """
        if self.received + len(chunk) > self.expected.size:
            raise Rejection(
                Reason.TOO_LARGE,
                f"transfer passed the signed size {self.expected.size} at {self.received + len(chunk)} bytes",
                kind="artifact",
            )
        self.received += len(chunk)
        self._hash.update(chunk)

    def finish(self) -> str:
        """The digest, once all the bytes arrived and match.

        Raises:
            Rejection: ``hash_mismatch`` when short or when the sha256 differs.
        """
        digest = self._hash.hexdigest()
        if self.received != self.expected.size or digest != self.expected.sha256:
            raise Rejection(
                Reason.HASH_MISMATCH,
                f"received {self.received} bytes with sha256 {digest}; signed: {self.expected.size} bytes, "
                f"{self.expected.sha256}",
                kind="artifact",
            )
        return digest


# -- the steps ----------------------------------------------------------------------------


def _role_keys(root: Root) -> dict[str, dict[str, Ed25519PublicKey]]:
    keys = {kid: Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry.public)) for kid, entry in root.keys.items()}
    return {name: {kid: keys[kid] for kid in role.keyids} for name, role in root.roles.items()}


def _open(kind: str, data: bytes, max_bytes: int | None) -> Envelope:
    """Steps 1-3: size, envelope shape, payloadType."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise Rejection(Reason.TOO_LARGE, f"{len(data)} bytes exceeds the {max_bytes}-byte limit", kind=kind)
    try:
        envelope = Envelope.from_json(bytes(data), max_bytes=len(data))
    except EnvelopeError as exc:
        raise Rejection(Reason.MALFORMED, f"not a DSSE envelope: {exc}", kind=kind) from exc
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise Rejection(
            Reason.TOO_LARGE, f"{len(envelope.signatures)} signatures; at most {MAX_SIGNATURES} are examined", kind=kind
        )
    expected = PAYLOAD_TYPES[kind]
    if envelope.payload_type != expected:
        raise Rejection(Reason.MALFORMED, f"payloadType {envelope.payload_type!r} is not {expected!r}", kind=kind)
    return envelope


def _require_threshold(
    envelope: Envelope,
    role: Role,
    role_keys: Mapping[str, Mapping[str, Ed25519PublicKey]],
    role_name: str,
    whose: str,
    kind: str,
) -> None:
    """Step 4. Each key counts once; the precedence is in the module docstring.

    A role key's failing signature outranks the other reasons because it is the specific
    evidence: the bytes were altered after signing (or the signature was). An unknown key
    only decides when the role did not sign at all, since an envelope may legitimately carry
    signatures for other verifiers (DSSE, TUF). Verification stops once the threshold is met.
    """
    keys = role_keys[role_name]
    valid: set[str] = set()
    failed: set[str] = set()
    unknown: list[str] = []
    for signature in envelope.signatures:
        public = keys.get(signature.keyid)
        if public is None:
            unknown.append(signature.keyid)
            continue
        if signature.keyid in valid:
            continue  # a key counts once, however many signatures carry its keyid
        if dsse.verify_one(envelope, signature, public):
            valid.add(signature.keyid)
            if len(valid) >= role.threshold:
                return
        else:
            failed.add(signature.keyid)
    failed -= valid
    need = f"{role.threshold} of {whose}'s {role_name} keys"
    if failed:
        raise Rejection(
            Reason.BAD_SIGNATURE,
            f"signature by {role_name} key {_short(sorted(failed))} does not verify ({len(valid)} valid; need {need})",
            kind=kind,
        )
    if not valid and unknown:
        raise Rejection(
            Reason.UNKNOWN_KEY, f"signed only by keys outside {whose}'s {role_name} role: {_short(unknown)}", kind=kind
        )
    raise Rejection(
        Reason.THRESHOLD,
        f"{len(valid)} distinct valid signature(s) of {len(envelope.signatures)}; need {need}",
        kind=kind,
    )


def _short(keyids: list[str]) -> str:
    return ", ".join(k[:12] for k in keyids[:4]) + (" ..." if len(keyids) > 4 else "")


def _parse(model: type[B], payload: bytes, kind: str) -> B:
    """Step 5; only ever called on a payload whose signatures passed."""
    from edge_runtime.protocol.messages import strict_json

    try:
        # The same strict parser as every other wire message: a signed body with a
        # duplicate key must not mean one thing here and another to a second parser.
        body = model.model_validate(strict_json(payload))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise Rejection(Reason.MALFORMED, f"{where}: {first.get('msg', 'invalid')}{more}", kind=kind) from exc
    except (ValueError, RecursionError) as exc:
        raise Rejection(Reason.MALFORMED, f"payload: {exc}", kind=kind) from exc
    if body.type != kind:
        raise Rejection(Reason.MALFORMED, f"body type {body.type!r} inside a {kind} envelope", kind=kind)
    return body


def _self_signed_root(root_json: bytes, max_bytes: int | None) -> tuple[Envelope, Root]:
    # At provisioning there is no earlier root: the payload must be parsed to learn the keys
    # that are then required to have signed it (TUF's trusted initial root, but checked).
    envelope = _open("root", root_json, max_bytes)
    root = _parse(Root, envelope.payload, "root")
    _require_threshold(envelope, root.roles["root"], _role_keys(root), "root", f"root v{root.version} itself", "root")
    return envelope, root
