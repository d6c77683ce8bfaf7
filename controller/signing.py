"""Turning a signed body into a DSSE envelope: canonical JSON, the right payloadType, the
right role's keys.

    sign_body(body, kind, keys)        any pydantic ``SignedBody`` → Envelope (the primitive)
    sign_desired(keydir, body)         deploy keys,  valid 7 days unless told otherwise
    sign_manifest(keydir, body)        deploy keys,  valid 365 days
    sign_command(keydir, body)         command keys, valid 5 minutes

Bodies are signed generically: this module knows only ``signed.SignedBody`` and the
headers, never the concrete messages, so any pydantic model with ``type``, ``issued_at`` and
``expires`` can be signed. The convenience functions take either a finished body (signed as
is) or a mapping of fields plus the model to validate it with; for a mapping they fill
``issued_at`` (now, whole seconds, UTC) and ``expires`` (issued_at + the kind's window).

Canonical JSON: keys sorted, no whitespace, UTF-8 (not ASCII-escaped), field aliases, every
datetime converted to UTC and written ISO 8601 with a ``Z``. The device parses the payload,
it never re-serialises it, so canonical form is for reproducibility and review (the same
body always gives the same bytes), not for verification.

Which private keys sign is ``keys.KeyDir``'s business (``signing_keys(role)`` hands out a
threshold of them); this module does no file I/O of its own.

Errors: ``SigningError`` (an ``EdgeRuntimeError``) when a body cannot be signed as asked —
wrong kind, no keys, invalid fields, a timestamp without a time zone. Key-directory errors
(``keys.NotEnoughKeys``, ``keys.PassphraseError``...) pass through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Optional, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import dsse
from edge_runtime.protocol.signed import PAYLOAD_TYPES, ROLE_OF, CommandHeader, DesiredHeader, SignedBody

if TYPE_CHECKING:  # keys imports this module; the convenience functions only call a KeyDir
    from controller.keys import KeyDir

# How long a freshly issued document stays valid. Commands are short-lived so a captured
# one cannot be replayed later; manifests describe immutable artifacts, so they live long.
VALIDITY: dict[str, timedelta] = {
    "desired": timedelta(days=7),
    "command": timedelta(minutes=5),
    "manifest": timedelta(days=365),
    "root": timedelta(days=365),
}

BodyOrFields = Union[SignedBody, Mapping[str, Any]]


class SigningError(EdgeRuntimeError):
    """A body cannot be signed as asked (wrong kind, no keys, invalid or ambiguous fields)."""

    code = "signing_error"
    http_status = 400


def utc_now() -> datetime:
    """The current time in UTC, whole seconds (what ``issued_at`` defaults to)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso_z(value: datetime) -> str:
    """``value`` in UTC as ISO 8601 with a ``Z`` (microseconds only when non-zero).

    Raises:
        SigningError: ``value`` carries no time zone, so its instant is ambiguous.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise SigningError(f"timestamp {value.isoformat()} has no time zone; use an aware datetime in UTC")
    utc = value.astimezone(timezone.utc)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "Z"


def _plain(value: Any) -> Any:
    """The model dump with datetimes in canonical form; everything else left for JSON."""
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def canonical_json(body: BaseModel) -> bytes:
    """The canonical bytes of ``body``: sorted keys, compact, UTF-8, datetimes ``...Z``.

    Raises:
        SigningError: a datetime without a time zone, or a value JSON cannot represent (NaN).
    """
    try:
        text = json.dumps(
            _plain(body.model_dump(mode="python", by_alias=True)),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=to_jsonable_python,  # enums, UUIDs, sets... the way pydantic would write them
        )
    except (TypeError, ValueError) as exc:
        raise SigningError(f"cannot encode the {type(body).__name__} body as JSON: {exc}") from exc
    return text.encode("utf-8")


def sign_body(body: SignedBody, kind: str, keys: Sequence[Ed25519PrivateKey]) -> dsse.Envelope:
    """A DSSE envelope of ``body`` as a ``kind`` document, signed once by each distinct key.

    Raises:
        SigningError: unknown ``kind``, ``body.type`` is not ``kind`` (a desired state must
            never go out labelled as a command), or no keys.
    """
    if kind not in PAYLOAD_TYPES:
        raise SigningError(f"unknown document kind {kind!r}; expected one of {', '.join(PAYLOAD_TYPES)}")
    body_type = getattr(body, "type", None)
    if body_type != kind:
        raise SigningError(f"the body says type {body_type!r} but is being signed as {kind!r}; build a {kind} body")
    unique: dict[str, Ed25519PrivateKey] = {}
    for key in keys:
        # A key counts once toward a threshold, so a second signature by it is only noise.
        unique.setdefault(dsse.keyid(key.public_key()), key)
    if not unique:
        raise SigningError(f"no keys to sign the {kind} with; pass at least one {ROLE_OF[kind]} key")
    return dsse.sign(PAYLOAD_TYPES[kind], canonical_json(body), list(unique.values()))


def complete_body(kind: str, body: BodyOrFields, *, model: Optional[type[SignedBody]] = None,
                  now: Optional[datetime] = None, valid_for: Optional[timedelta] = None) -> SignedBody:
    """``body`` itself if it is a finished body; otherwise its fields with ``type``,
    ``issued_at`` and ``expires`` filled in where missing, validated as ``model``.

    Raises:
        SigningError: no ``model`` for a mapping, a naive ``now``/``issued_at``, or fields
            the model rejects (the message lists them).
    """
    if isinstance(body, SignedBody):
        return body
    if model is None:
        raise SigningError(f"a {kind} given as a mapping needs model=<its pydantic class> to be validated with")
    fields: dict[str, Any] = {"type": kind, **body}
    if "issued_at" not in fields:
        fields["issued_at"] = now if now is not None else utc_now()
    issued = fields["issued_at"]
    if "expires" not in fields:
        if not isinstance(issued, datetime):
            raise SigningError("issued_at must be a datetime for expires to be computed; or give expires too")
        fields["expires"] = issued + (valid_for if valid_for is not None else VALIDITY[kind])
    for name in ("issued_at", "expires"):
        if isinstance(fields[name], datetime):
            iso_z(fields[name])  # refuses a naive datetime with a message that says what to do
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise SigningError(f"the {kind} body is invalid: {exc}") from exc


def sign_with_role(keydir: KeyDir, kind: str, body: BodyOrFields, *, model: Optional[type[SignedBody]] = None,
                   now: Optional[datetime] = None, valid_for: Optional[timedelta] = None,
                   passphrase: Optional[Union[str, bytes]] = None) -> dsse.Envelope:
    """Complete ``body`` and sign it with a threshold of ``kind``'s role keys from ``keydir``.

    Raises:
        SigningError: see ``complete_body`` and ``sign_body``.
        NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt: from ``keydir``.
    """
    if kind not in ROLE_OF:
        raise SigningError(f"unknown document kind {kind!r}; expected one of {', '.join(ROLE_OF)}")
    finished = complete_body(kind, body, model=model, now=now, valid_for=valid_for)
    return sign_body(finished, kind, keydir.signing_keys(ROLE_OF[kind], passphrase=passphrase))


def sign_desired(keydir: KeyDir, body: BodyOrFields, *, model: Optional[type[SignedBody]] = DesiredHeader,
                 now: Optional[datetime] = None, valid_for: Optional[timedelta] = None,
                 passphrase: Optional[Union[str, bytes]] = None) -> dsse.Envelope:
    """A desired state signed by the deploy role (default validity 7 days).

    Raises:
        SigningError, NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt.
    """
    return sign_with_role(keydir, "desired", body, model=model, now=now, valid_for=valid_for, passphrase=passphrase)


def sign_manifest(keydir: KeyDir, body: BodyOrFields, *, model: Optional[type[SignedBody]] = None,
                  now: Optional[datetime] = None, valid_for: Optional[timedelta] = None,
                  passphrase: Optional[Union[str, bytes]] = None) -> dsse.Envelope:
    """A model manifest signed by the deploy role (default validity 365 days). There is no
    manifest header in ``signed``, so a mapping needs ``model=`` (e.g. ``messages.Manifest``).

    Raises:
        SigningError, NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt.
    """
    return sign_with_role(keydir, "manifest", body, model=model, now=now, valid_for=valid_for, passphrase=passphrase)


def sign_command(keydir: KeyDir, body: BodyOrFields, *, model: Optional[type[SignedBody]] = CommandHeader,
                 now: Optional[datetime] = None, valid_for: Optional[timedelta] = None,
                 passphrase: Optional[Union[str, bytes]] = None) -> dsse.Envelope:
    """A command signed by the command role (default validity 5 minutes).

    Raises:
        SigningError, NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt.
    """
    return sign_with_role(keydir, "command", body, model=model, now=now, valid_for=valid_for, passphrase=passphrase)
