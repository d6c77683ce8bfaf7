"""The persisted, versioned store state (``state.json``) and the pure rules that change it.

One file holds everything the store knows, replaced atomically on every write, so a reader
always sees one consistent picture. Install states are plain strings in a versioned record
(Mender's write-ahead state data); ``revision`` goes up by one on every write so that the
serving daemon, polling it, notices what another process (the CLI) changed.

The functions here are decisions over plain data: no I/O, no clock. ``store.py`` reads,
applies them, and writes.

Example (format 1)::

    {
      "format": 1,
      "revision": 12,
      "models": {
        "kws": {
          "active": "2",
          "previous": ["1"],
          "versions": {
            "1": {"sha256": "9f2c...", "size": 10412, "installed_at": "2025-01-05T10:00:00Z",
                  "signature": {"inputs": [...], "outputs": [...]}},
            "2": {"sha256": "77ab...", "size": 10412, "installed_at": "2025-01-06T09:30:00Z",
                  "signature": null}
          },
          "last_result": {"version": "2", "outcome": "active", "reason": null, "detail": null,
                          "at": "2025-01-06T09:30:01Z"},
          "install": null
        }
      }
    }
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.errors import StoreCorrupt, VersionNotFound
from edge_runtime.store.layout import STATE_FORMAT

# The install state machine, in order. Terminal states: active, rolled_back.
INSTALL_STATES: tuple[str, ...] = (
    "downloading",
    "verifying",
    "staged",
    "loading",
    "health_check",
    "active",
    "rolled_back",
)
InstallState = Literal["downloading", "verifying", "staged", "loading", "health_check", "active", "rolled_back"]

# How an install ended: active; refused (bad input, nothing changed); interrupted (a crash
# before the bytes were verified, cleaned up at start-up); rolled_back (loaded or checked
# and found wanting, or a crash loop; the old version kept serving).
Outcome = Literal["active", "refused", "interrupted", "rolled_back"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA_PATTERN = r"^[0-9a-f]{64}$"


def valid_model_name(name: str) -> bool:
    """Model names end up in logs, URLs and file listings: keep them plain."""
    return bool(_NAME_RE.match(name))


def valid_version(version: str) -> bool:
    return bool(_VERSION_RE.match(version))


class _Record(BaseModel):
    # Unknown keys mean a writer we do not understand: refuse rather than drop them.
    model_config = ConfigDict(extra="forbid")


class VersionRecord(_Record):
    """One installed version: which blob holds it and what it looked like when checked."""

    sha256: str = Field(pattern=_SHA_PATTERN)
    size: int = Field(ge=0)
    installed_at: datetime
    # The model's input/output signature (``Signature.to_dict()``) as found at install time.
    signature: Optional[dict[str, Any]] = None


class LastResult(_Record):
    """How the most recent install of a model ended."""

    version: str
    outcome: Outcome
    reason: Optional[str] = None  # a stable token, as in InstallError.reason
    detail: Optional[str] = None  # the human-readable message
    at: datetime


class InstallRecord(_Record):
    """The one in-progress install of a model; written before each step runs (write-ahead)."""

    version: str
    token: str = Field(pattern=r"^[0-9a-f]{8,64}$")  # names its files under tmp/
    # Expected values until "verifying" has checked the bytes, then the measured ones.
    sha256: Optional[str] = Field(default=None, pattern=_SHA_PATTERN)
    size: Optional[int] = Field(default=None, ge=0)
    state: InstallState
    # Times the state machine entered "loading" for this install. Persisted before the load
    # runs, so a load that kills the process still counts; recovery stops at a cap.
    attempts: int = Field(default=0, ge=0)
    started_at: datetime
    error: Optional[str] = None
    health: bool = False  # a health check was saved beside the bytes (layout.health)
    signature: Optional[dict[str, Any]] = None


class ModelState(_Record):
    active: Optional[str] = None
    previous: list[str] = Field(default_factory=list)  # most recent first
    versions: dict[str, VersionRecord] = Field(default_factory=dict)
    last_result: Optional[LastResult] = None
    install: Optional[InstallRecord] = None


class StoreState(_Record):
    format: Literal[1] = STATE_FORMAT
    revision: int = Field(default=0, ge=0)
    models: dict[str, ModelState] = Field(default_factory=dict)


def parse_state(data: bytes, *, where: str = "state.json") -> StoreState:
    """Parse the bytes of ``state.json``.

    Raises:
        StoreCorrupt: not JSON, an unknown format, or a record that does not validate.
    """
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreCorrupt(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise StoreCorrupt(f"{where}: expected a JSON object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != STATE_FORMAT:
        hint = (
            "written by a newer runtime? upgrade this one"
            if isinstance(fmt, int) and fmt > STATE_FORMAT
            else "not a store state file"
        )
        raise StoreCorrupt(
            f"{where}: unknown state format {fmt!r}; this runtime reads format {STATE_FORMAT} ({hint})"
        )
    try:
        return StoreState.model_validate(raw)
    except ValidationError as exc:
        raise StoreCorrupt(f"{where}: invalid store state: {exc}") from exc


def dump_state(state: StoreState) -> dict[str, Any]:
    """The JSON-ready form written to disk."""
    return state.model_dump(mode="json")


def state_problems(state: StoreState) -> list[str]:
    """Broken invariants of a parsed state; empty when consistent."""
    problems: list[str] = []
    for name, model in sorted(state.models.items()):
        if not valid_model_name(name):
            problems.append(f"model {name!r}: invalid model name")
        if model.active is not None and model.active not in model.versions:
            problems.append(f"model {name}: active version {model.active} has no version record")
        if model.active is None and model.previous:
            problems.append(f"model {name}: previous versions but no active one")
        if len(set(model.previous)) != len(model.previous):
            problems.append(f"model {name}: previous versions repeat: {model.previous}")
        if model.active in model.previous:
            problems.append(f"model {name}: active version {model.active} is also listed as previous")
        for version in model.previous:
            if version not in model.versions:
                problems.append(f"model {name}: previous version {version} has no version record")
        kept = set(model.previous) | ({model.active} if model.active else set())
        for version in sorted(set(model.versions) - kept):
            problems.append(f"model {name}: version record {version} is neither active nor previous")
    return problems


def with_active(
    model: ModelState, version: str, *, keep_previous: int, record: VersionRecord | None = None
) -> ModelState:
    """The model after ``version`` becomes active.

    The version it replaces becomes ``previous[0]``; only ``keep_previous`` previous versions
    stay, and the records of the rest go (their blobs are then unreferenced, for ``gc``).
    ``record`` adds (or replaces) the version's record, for a fresh install.

    Raises:
        VersionNotFound: ``version`` has no record and none is given.
        ValueError: ``keep_previous`` < 1.
    """
    if keep_previous < 1:
        raise ValueError(f"keep_previous must be >= 1, got {keep_previous}")
    versions = dict(model.versions)
    if record is not None:
        versions[version] = record
    if version not in versions:
        installed = ", ".join(sorted(versions)) or "none"
        raise VersionNotFound(f"version {version} is not installed (installed: {installed})")
    previous: list[str] = []
    for candidate in [model.active, *model.previous]:
        if candidate is not None and candidate != version and candidate not in previous:
            previous.append(candidate)
    kept = previous[:keep_previous]
    versions = {v: r for v, r in versions.items() if v == version or v in kept}
    return model.model_copy(update={"active": version, "previous": kept, "versions": versions})


def rollback_target(model: ModelState, *, name: str = "") -> str:
    """The version a rollback returns to: the most recent previous one.

    The version rolled back from becomes ``previous[0]`` (``with_active``), so nothing is
    deleted and a second rollback goes forward again.

    Raises:
        VersionNotFound: there is no previous version.
    """
    if not model.previous:
        label = f"model {name}" if name else "this model"
        raise VersionNotFound(f"{label} has no previous version to roll back to (active: {model.active})")
    return model.previous[0]


def referenced_blobs(state: StoreState) -> set[str]:
    """Every blob digest something in the state still needs (versions and installs)."""
    refs: set[str] = set()
    for model in state.models.values():
        refs.update(r.sha256 for r in model.versions.values())
        if model.install is not None and model.install.sha256 is not None:
            refs.add(model.install.sha256)
    return refs
