"""What every signed document says about itself, and the root of trust's own format.

A signed document is a DSSE envelope (``dsse``) whose payload is one of these JSON bodies.
Every body carries its ``type``, ``spec_version``, ``issued_at`` and ``expires``; the
targeted ones (desired state, commands) name their ``target`` device or group and carry a
monotonic ``generation`` (desired state) or ``seq`` (commands). The concrete bodies live in
``messages``; ``trust`` checks these common fields for any of them.

    kind       payloadType                               signed by role   floor
    root       application/vnd.edgefleet.root+json       root (N and N+1) version
    desired    application/vnd.edgefleet.desired+json    deploy           generation
    manifest   application/vnd.edgefleet.manifest+json   deploy           -
    command    application/vnd.edgefleet.command+json    command          seq
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_VERSION = "1.1"  # 1.1: ModelFigures.demand_rate (telemetry)
SPEC_MAJOR = 1
PAYLOAD_TYPES: dict[str, str] = {
    "root": "application/vnd.edgefleet.root+json",
    "desired": "application/vnd.edgefleet.desired+json",
    "manifest": "application/vnd.edgefleet.manifest+json",
    "command": "application/vnd.edgefleet.command+json",
}
ROLE_OF: dict[str, str] = {"root": "root", "desired": "deploy", "manifest": "deploy", "command": "command"}
ROLES = ("root", "deploy", "command")
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_KEYID = r"^[0-9a-f]{64}$"


class Strict(BaseModel):
    """Signed bodies: unknown fields refused (a signer we do not understand), immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SignedBody(Strict):
    type: str
    spec_version: str = SPEC_VERSION
    issued_at: datetime
    expires: datetime

    @field_validator("spec_version")
    @classmethod
    def _known_major(cls, v: str) -> str:
        major = v.split(".", 1)[0]
        if not major.isdigit() or int(major) != SPEC_MAJOR:
            raise ValueError(f"unsupported spec_version {v!r}; this runtime speaks {SPEC_MAJOR}.x")
        return v

    @field_validator("issued_at", "expires")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamps must carry a time zone (use UTC, e.g. 2026-01-01T00:00:00Z)")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> SignedBody:
        if self.expires <= self.issued_at:
            raise ValueError("expires must be after issued_at")
        return self


class Target(Strict):
    """Exactly one of a device id or a group name."""

    device: Optional[str] = Field(default=None, pattern=_ID)
    group: Optional[str] = Field(default=None, pattern=_ID)

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.device is None) == (self.group is None):
            raise ValueError("a target names exactly one of 'device' or 'group'")
        return self

    def matches(self, device_id: str, groups: frozenset[str] | set[str]) -> bool:
        return self.device == device_id if self.device is not None else self.group in groups


class TargetedBody(SignedBody):
    target: Target


class DesiredHeader(TargetedBody):
    """The trust-relevant part of a desired state (``messages.DesiredState`` adds the rest)."""

    type: Literal["desired"] = "desired"
    generation: int = Field(ge=0)


class CommandHeader(TargetedBody):
    """The trust-relevant part of a command (``messages.Command`` adds the rest)."""

    type: Literal["command"] = "command"
    seq: int = Field(ge=0)


class KeyEntry(Strict):
    keytype: Literal["ed25519"] = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex of the raw 32-byte key


class Role(Strict):
    keyids: list[str] = Field(min_length=1)
    threshold: int = Field(ge=1)

    @field_validator("keyids")
    @classmethod
    def _keyids(cls, v: list[str]) -> list[str]:
        import re

        if len(set(v)) != len(v) or not all(re.match(_KEYID, k) for k in v):
            raise ValueError("keyids must be distinct hex sha256 strings")
        return v

    @model_validator(mode="after")
    def _reachable(self) -> Role:
        if self.threshold > len(self.keyids):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.keyids)} keys of the role")
        return self


class Root(SignedBody):
    """``root.json``'s payload: the keys and thresholds every other signature is judged by."""

    type: Literal["root"] = "root"
    version: int = Field(ge=1)
    keys: dict[str, KeyEntry]
    roles: dict[str, Role]

    @model_validator(mode="after")
    def _consistent(self) -> Root:
        from edge_runtime.protocol.dsse import keyid

        if set(self.roles) != set(ROLES):
            raise ValueError(f"roles must be exactly {', '.join(ROLES)}")
        for kid, entry in self.keys.items():
            if keyid(bytes.fromhex(entry.public)) != kid:
                raise ValueError(f"key {kid[:12]}... is not the sha256 of its public key")
        for name, role in self.roles.items():
            missing = [k for k in role.keyids if k not in self.keys]
            if missing:
                raise ValueError(f"role {name} names unknown keys {[m[:12] for m in missing]}")
        return self
