"""The controller's store: every read and write of the SQL database, one transaction each.

SQLAlchemy Core over ``schema.py``; ``Store.open("sqlite:///PATH")`` or
``Store.open("postgresql+psycopg://user@host:port/db")``. SQLite runs in WAL mode with
``synchronous=FULL`` (an acknowledged write survives kill -9). Several controller
replicas may share one PostgreSQL database: every write that could race is either an
idempotent insert (``ON CONFLICT DO NOTHING`` on the natural key) or a compare-and-set on
a ``revision`` column, never read-modify-write without a guard.

Ingest is idempotent: ``add_telemetry``/``add_event``/``record_reply`` return False for a
(device, seq) already stored, and change nothing then. ``apply_state`` ignores a state
older than the one held (a stale Will: lower ``bd_seq`` for the same boot).

Errors: ``StoreError`` (an ``EdgeRuntimeError``) with subclasses ``NotFound``, ``Conflict``
(a CAS lost, or a duplicate where one is not allowed) and ``StoreUnavailable`` (the
database cannot be reached or opened; the message says which URL and why).

Records returned are plain frozen dataclasses (below), never SQLAlchemy rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "Store", "StoreError", "NotFound", "Conflict", "StoreUnavailable",
    "DeviceRecord", "ReleaseRecord", "Assignment", "DesiredRecord", "RolloutRecord", "StepRecord",
    "CommandRecord", "ModelWindow",
]


class StoreError(EdgeRuntimeError):
    code = "store_error"


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"


class StoreUnavailable(StoreError):
    code = "unavailable"


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    registered_at: float
    online: bool
    groups: tuple[str, ...] = ()
    boot_id: Optional[str] = None
    bd_seq: Optional[int] = None
    state_at: Optional[float] = None
    last_seen: Optional[float] = None
    runtime_version: Optional[str] = None
    tier: Optional[str] = None
    capabilities: Optional[dict[str, Any]] = None
    reported: dict[str, Any] = field(default_factory=dict)  # DeviceState.models (json)
    reported_generation: Optional[int] = None
    last_telemetry: Optional[dict[str, Any]] = None

    def active_version(self, model: str) -> Optional[str]:
        """The version the device last reported active for ``model``."""
        entry = self.reported.get(model) or {}
        return entry.get("active")


@dataclass(frozen=True)
class ReleaseRecord:
    model: str
    version: str
    sha256: str
    size: int
    manifest: dict[str, Any]  # messages.ModelManifest (json)
    envelope: str  # DSSE JSON of the signed Manifest
    created_at: float
    created_by: str


@dataclass(frozen=True)
class Assignment:
    device_id: str
    model: str
    version: str
    route: str = "local"
    install: bool = True


@dataclass(frozen=True)
class DesiredRecord:
    device_id: str
    generation: int
    changed_at: float
    envelope: Optional[str] = None
    signed_generation: Optional[int] = None
    signed_at: Optional[float] = None
    expires_at: Optional[float] = None


@dataclass(frozen=True)
class StepRecord:
    rollout_id: int
    device_id: str
    wave: int
    previous_version: Optional[str]
    state: str
    generation: Optional[int] = None
    started_at: Optional[float] = None
    deadline: Optional[float] = None
    finished_at: Optional[float] = None
    reason: Optional[str] = None
    detail: Optional[str] = None


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    model: str
    version: str
    target: str
    plan: dict[str, Any]
    state: str
    wave: int
    wave_started_at: Optional[float]
    soak_until: Optional[float]
    reason: Optional[str]
    figures: Optional[dict[str, Any]]
    created_at: float
    updated_at: float
    finished_at: Optional[float]
    created_by: str
    revision: int
    steps: tuple[StepRecord, ...] = ()


@dataclass(frozen=True)
class CommandRecord:
    device_id: str
    seq: int
    name: str
    args: dict[str, Any]
    issued_at: float
    issued_by: str
    state: str
    reply: Optional[dict[str, Any]] = None
    replied_at: Optional[float] = None


@dataclass(frozen=True)
class ModelWindow:
    """Calls, errors and the calls-weighted mean p95 of one model version over a set of
    devices and a time window (the rollout gates' input)."""

    calls: int = 0
    errors: int = 0
    p95_ms: Optional[float] = None
    samples: int = 0

    @property
    def error_rate(self) -> Optional[float]:
        return self.errors / self.calls if self.calls else None


class Store:
    """See the module docstring. Thread-safe (a SQLAlchemy engine with a connection pool)."""

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> "Store":
        """Connect to ``url``, create the tables when ``create`` (idempotent), check the
        schema version.

        Raises:
            StoreUnavailable: cannot connect / open, or the schema version is newer than ours.
            ValueError: not a sqlite:// or postgresql+psycopg:// URL.
        """
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- devices and groups -----------------------------------------------------------------

    def register_device(self, device_id: str, *, groups: tuple[str, ...] = (), now: float) -> DeviceRecord:
        """Create the device if unknown (groups created as needed); add it to ``groups``. Idempotent."""
        raise NotImplementedError

    def apply_state(self, device_id: str, state: dict[str, Any], *, now: float) -> bool:
        """Take in a ``DeviceState`` (json dict): registers an unknown device; updates online,
        boot_id, bd_seq, runtime_version, capabilities (tier from them), reported models and
        generation, state_at, last_seen. A death (online False) only marks it offline and
        only when its (boot_id, bd_seq) is the current one or newer (a stale Will is ignored).
        The device's ``groups`` in a birth are added to its memberships. Returns whether
        anything changed."""
        raise NotImplementedError

    def touch(self, device_id: str, *, now: float) -> None:
        """last_seen = now (any message from a known device)."""
        raise NotImplementedError

    def get_device(self, device_id: str) -> DeviceRecord:
        """Raises NotFound."""
        raise NotImplementedError

    def list_devices(self, *, group: Optional[str] = None) -> list[DeviceRecord]:
        """All devices (or a group's), sorted by id."""
        raise NotImplementedError

    def resolve_target(self, target: str) -> list[str]:
        """Device ids of ``device:ID`` | ``group:NAME`` | ``all``, sorted.

        Raises:
            NotFound: an unknown device or group. ValueError: a malformed target.
        """
        raise NotImplementedError

    def add_group(self, name: str, devices: tuple[str, ...] = (), *, now: float) -> None:
        """Create the group if missing and add ``devices`` (registering unknown ones)."""
        raise NotImplementedError

    def remove_group(self, name: str, devices: tuple[str, ...] = ()) -> None:
        """Remove ``devices`` from the group, or delete the group when ``devices`` is empty.

        Raises:
            NotFound: no such group.
        """
        raise NotImplementedError

    def list_groups(self) -> dict[str, list[str]]:
        """Group name -> sorted member ids."""
        raise NotImplementedError

    # -- releases ---------------------------------------------------------------------------

    def add_release(self, release: ReleaseRecord) -> None:
        """Raises Conflict: (model, version) exists with a different sha256 (same sha: no-op)."""
        raise NotImplementedError

    def get_release(self, model: str, version: str) -> ReleaseRecord:
        """Raises NotFound."""
        raise NotImplementedError

    def list_releases(self, model: Optional[str] = None) -> list[ReleaseRecord]:
        """Sorted by model, then created_at."""
        raise NotImplementedError

    def release_by_sha(self, sha256: str) -> Optional[ReleaseRecord]:
        raise NotImplementedError

    # -- artifact bytes and uploads ------------------------------------------------------------

    def begin_upload(self, upload_id: str, *, model: str, version: str, size: int, sha256: str,
                     created_by: str, now: float) -> None:
        """Start receiving a file (idempotent for the same upload_id and fields).

        Raises:
            Conflict: the release (model, version) exists with another sha256, or upload_id
                exists with other fields.
        """
        raise NotImplementedError

    def add_upload_part(self, upload_id: str, offset: int, data: bytes) -> int:
        """Store bytes at ``offset`` (a redelivered part is a no-op); returns the bytes held so far.

        Raises:
            NotFound: no such upload. ValueError: past the declared size.
        """
        raise NotImplementedError

    def finish_upload(self, upload_id: str) -> tuple[str, int]:
        """Check the parts are contiguous, total ``size`` and hash to ``sha256``; move them into
        blob_parts (re-cut into BLOB_PART_BYTES parts; a blob already held is kept) and drop
        the upload. Returns (sha256, size).

        Raises:
            NotFound: no such upload. StoreError: missing bytes or a digest mismatch (the
                message says which); the upload is dropped on a mismatch.
        """
        raise NotImplementedError

    def has_blob(self, sha256: str) -> bool:
        raise NotImplementedError

    def write_blob_to(self, sha256: str, path: str) -> int:
        """Write the blob's bytes to ``path`` (the caller makes it atomic); returns the size.

        Raises:
            NotFound: no such blob.
        """
        raise NotImplementedError

    def put_blob(self, sha256: str, data_path: str) -> None:
        """Store the file at ``data_path`` as blob ``sha256`` (verified); no-op when held.

        Raises:
            StoreError: the file does not hash to ``sha256``.
        """
        raise NotImplementedError

    # -- desired state ----------------------------------------------------------------------

    def assignments(self, device_id: str) -> list[Assignment]:
        """The device's assignments, sorted by model."""
        raise NotImplementedError

    def set_assignments(self, changes: dict[str, dict[str, Optional[Assignment]]], *, now: float) -> dict[str, int]:
        """Apply ``{device_id: {model: Assignment | None (remove)}}`` in one transaction and
        bump each changed device's desired generation by one (a device whose assignments end
        up identical keeps its generation). Returns {device_id: generation} for every device
        named. The first generation of a device is 1."""
        raise NotImplementedError

    def get_desired(self, device_id: str) -> Optional[DesiredRecord]:
        raise NotImplementedError

    def list_desired(self) -> list[DesiredRecord]:
        raise NotImplementedError

    def record_signed(self, device_id: str, generation: int, envelope: str, *, signed_at: float,
                      expires_at: float) -> bool:
        """Remember the document signed for ``generation``; ignored (False) when the device's
        generation has moved past it meanwhile."""
        raise NotImplementedError

    # -- rollouts ---------------------------------------------------------------------------

    def create_rollout(self, *, model: str, version: str, target: str, plan: dict[str, Any],
                       steps: list[tuple[str, int, Optional[str]]], created_by: str, now: float) -> RolloutRecord:
        """A new rollout in state "pending" with one step per (device_id, wave, previous_version),
        steps in state "pending".

        Raises:
            Conflict: another rollout of the same model is pending/running/paused.
        """
        raise NotImplementedError

    def get_rollout(self, rollout_id: int) -> RolloutRecord:
        """With its steps (sorted by wave, device). Raises NotFound."""
        raise NotImplementedError

    def list_rollouts(self, *, states: Optional[tuple[str, ...]] = None) -> list[RolloutRecord]:
        """Newest first, without steps."""
        raise NotImplementedError

    def update_rollout(self, rollout_id: int, revision: int, *, fields: dict[str, Any],
                       steps: dict[str, dict[str, Any]], now: float) -> RolloutRecord:
        """Compare-and-set: when the rollout's revision is still ``revision``, set ``fields``
        (columns of ``rollouts``) and each step's fields ({device_id: {column: value}}),
        bump the revision and updated_at, all in one transaction; return the new record.

        Raises:
            Conflict: the revision moved (another replica or the console got there first).
        """
        raise NotImplementedError

    def steps_for_device(self, device_id: str, *, active_only: bool = True) -> list[StepRecord]:
        """The device's steps in rollouts that are not finished (or all)."""
        raise NotImplementedError

    # -- ingest -----------------------------------------------------------------------------

    def add_telemetry(self, device_id: str, sample: dict[str, Any], *, now: float) -> bool:
        """Store a ``Telemetry`` sample (json dict) once: False if (device, seq) is held.
        On a new one also: telemetry_models rows (per-model deltas of the cumulative
        ``calls``/``errors`` against the device's previous sample of the same boot_id; the
        whole count on a new boot), the hourly rollups, devices.last_telemetry (when seq is
        the newest) and last_seen. Registers an unknown device."""
        raise NotImplementedError

    def add_event(self, device_id: str, event: dict[str, Any], *, now: float) -> bool:
        """Store an ``Event`` once: False if (device, seq) is held."""
        raise NotImplementedError

    def recent_events(self, *, device_id: Optional[str] = None, model: Optional[str] = None,
                      since: Optional[float] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events newest first, each the stored payload plus "device_id" and "received_at"."""
        raise NotImplementedError

    def recent_telemetry(self, *, device_id: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Samples newest first, each the payload plus "device_id" and "received_at"."""
        raise NotImplementedError

    def model_window(self, model: str, version: str, *, devices: Optional[list[str]] = None,
                     since: float, until: Optional[float] = None) -> ModelWindow:
        """Sum of calls/errors and calls-weighted p95 over telemetry_models rows of
        (model, version) with ``since <= at < until`` (from the given devices only)."""
        raise NotImplementedError

    def latency_percentiles(self, *, since: float) -> dict[tuple[str, str], dict[str, float]]:
        """{(model, version): {"p50": ..., "p95": ..., "p99": ...}} over telemetry_models p95 values
        since ``since`` (for /metrics)."""
        raise NotImplementedError

    def expire_telemetry(self, *, before: float) -> int:
        """Delete raw telemetry, telemetry_models and events received before ``before``;
        rollups stay. Returns rows deleted."""
        raise NotImplementedError

    # -- commands ---------------------------------------------------------------------------

    def next_command(self, device_id: str, name: str, args: dict[str, Any], *, issued_by: str,
                     now: float) -> CommandRecord:
        """Allocate the device's next command seq (strictly greater than any before, also
        across replicas) and record the command as "sent"."""
        raise NotImplementedError

    def record_reply(self, device_id: str, reply: dict[str, Any], *, now: float) -> bool:
        """Attach a ``Reply`` to its command (by seq): False when there is no such command or
        it already has a reply."""
        raise NotImplementedError

    def get_command(self, device_id: str, seq: int) -> CommandRecord:
        """Raises NotFound."""
        raise NotImplementedError

    # -- audit and counters -----------------------------------------------------------------

    def audit(self, actor: str, action: str, target: Optional[str] = None, detail: Optional[dict[str, Any]] = None,
              *, now: float) -> None:
        raise NotImplementedError

    def list_audit(self, *, limit: int = 100) -> list[dict[str, Any]]:
        raise NotImplementedError

    def counts(self) -> dict[str, Any]:
        """{"devices": n, "online": n, "rollouts": {state: n}, "telemetry": n, "events": n} (for /metrics)."""
        raise NotImplementedError

    def size_bytes(self) -> Optional[int]:
        """The database's size on disk (SQLite file(s) / pg_database_size), for the benchmark."""
        raise NotImplementedError
