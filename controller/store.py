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
``ingest_many`` writes a batch of reports in one transaction (one commit, one fsync).

Errors (every one an ``EdgeRuntimeError``; the message says what was expected and what to do):

    StoreError
     ├── NotFound          no such device / group / release / rollout / upload / blob / command
     ├── Conflict          a CAS lost, or a duplicate where one is not allowed
     ├── StoreUnavailable  the database cannot be reached or opened (names the URL, no password):
     │                     transient, retry with backoff
     ├── Incomplete        an upload finished with bytes missing (send them, finish again)
     └── DigestMismatch    bytes that do not hash to the declared sha256

Records returned are plain frozen dataclasses (below), never SQLAlchemy rows.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from controller import schema
from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "Store", "StoreError", "NotFound", "Conflict", "StoreUnavailable", "Incomplete", "DigestMismatch",
    "DeviceRecord", "ReleaseRecord", "Assignment", "DesiredRecord", "RolloutRecord", "StepRecord",
    "CommandRecord", "ModelWindow", "Report", "MigrationRecord",
]


class StoreError(EdgeRuntimeError):
    code = "store_error"


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"


class StoreUnavailable(StoreError):
    code = "unavailable"


class Incomplete(StoreError):
    """An upload finished with bytes missing: send them, then finish again."""

    code = "incomplete"


class DigestMismatch(StoreError):
    """Bytes that do not hash to the declared sha256 (the upload is dropped)."""

    code = "hash_mismatch"


T = TypeVar("T")


@dataclass(frozen=True)
class Report:
    """One device report to ingest: ``kind`` is "state", "telemetry", "event" or "reply";
    ``data`` the decoded message as a json dict; ``received_at`` when it arrived."""

    kind: str
    device_id: str
    data: dict[str, Any]
    received_at: float


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
class MigrationRecord:
    """One make-before-break move of (model, source) from ``from_node`` to ``to_node``
    (``controller.migration`` reads and decides it)."""

    id: int
    model: str
    version: str
    source: str
    from_node: str
    to_node: str
    target_had: bool
    state: str
    timeouts: dict[str, Any]
    step_started_at: Optional[float]
    deadline: Optional[float]
    reason: Optional[str]
    prediction: Optional[dict[str, Any]]
    failure: Optional[str]
    detail: Optional[str]
    created_at: float
    updated_at: float
    finished_at: Optional[float]
    created_by: str
    revision: int


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

    # PostgreSQL SQLSTATEs worth running a whole transaction again for: a deadlock the server
    # broke, a serialisation failure. Lock order (device rows sorted by id) makes both rare.
    _RETRY_SQLSTATES = ("40P01", "40001")
    _RETRIES = 5

    def __init__(self, engine: sa.engine.Engine, url: sa.engine.URL) -> None:
        """Use ``Store.open``."""
        self._engine = engine
        self._url = url
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert = sqlite_insert if self._sqlite else pg_insert

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> "Store":
        """Connect to ``url``, create the tables when ``create`` (idempotent), check the
        schema version.

        Raises:
            StoreUnavailable: cannot connect / open, or the schema version is newer than ours.
            ValueError: not a sqlite:// or postgresql+psycopg:// URL.
        """
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ValueError(f"not a database URL: {url!r}; use sqlite:///PATH or "
                             "postgresql+psycopg://USER@HOST:PORT/DB") from exc
        if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
            engine = _sqlite_engine(parsed, create=create)
        elif parsed.drivername in ("postgresql+psycopg", "postgresql"):
            parsed = parsed.set(drivername="postgresql+psycopg")
            engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        else:
            raise ValueError(f"unsupported database URL {_safe(parsed)!r}: use sqlite:///PATH or "
                             "postgresql+psycopg://USER@HOST:PORT/DB")
        store = cls(engine, parsed)
        try:
            store._prepare(create)
        except BaseException:
            engine.dispose()
            raise
        return store

    def _prepare(self, create: bool) -> None:
        try:
            with self._engine.connect() as conn:
                if self._sqlite:
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    if not self._sqlite:
                        # Two replicas starting together must not both CREATE TABLE.
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
                    if create:
                        schema.metadata.create_all(conn)
                        conn.execute(self._insert(schema.meta).values(
                            key="schema_version", value=schema.SCHEMA_VERSION).on_conflict_do_nothing())
                    has_meta = sa.inspect(conn).has_table("meta")
                    version = conn.execute(
                        sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
                    ).scalar_one_or_none() if has_meta else None
        except sa.exc.DBAPIError as exc:
            raise self._unavailable(exc) from exc
        if version is None:
            raise StoreUnavailable(
                f"{_safe(self._url)} holds no controller schema: open it with create=True "
                "(the controller does by default) or point at the right database")
        if int(version) > schema.SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{_safe(self._url)} has schema version {version}, newer than this controller's "
                f"{schema.SCHEMA_VERSION}: upgrade the controller (replicas must run the same release)")

    def close(self) -> None:
        self._engine.dispose()

    @property
    def url(self) -> str:
        """The URL without its password."""
        return _safe(self._url)

    # -- transactions -----------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        orig = getattr(exc, "orig", None) or exc
        what = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        if self._sqlite:
            hint = ("check that the file's directory exists and is writable, and that no other "
                    "process holds a long write lock")
        else:
            hint = ("check that PostgreSQL is running and reachable, and that the user and the "
                    "database exist (createdb), or pass another database URL")
        return StoreUnavailable(f"database {_safe(self._url)} is unavailable: {what}; {hint}")

    def _run(self, fn: Callable[[sa.Connection], T], *, write: bool) -> T:
        """Run ``fn(conn)`` in one transaction (SQLite writers: BEGIN IMMEDIATE, so a
        transaction never upgrades a read lock mid-way); PostgreSQL deadlocks and
        serialisation failures run it again. Driver failures become StoreUnavailable."""
        for attempt in range(self._RETRIES):
            try:
                with self._engine.connect() as conn:
                    if self._sqlite:
                        conn.execution_options(sqlite_begin="IMMEDIATE" if write else "DEFERRED")
                    with conn.begin():
                        return fn(conn)
            except sa.exc.IntegrityError:
                raise
            except sa.exc.DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state in self._RETRY_SQLSTATES and attempt + 1 < self._RETRIES:
                    time.sleep(0.01 * (attempt + 1))
                    continue
                if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or exc.connection_invalidated:
                    raise self._unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(self, fn: Callable[[sa.Connection], T]) -> T:
        return self._run(fn, write=True)

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        return self._run(fn, write=False)

    def _ensure_device(self, conn: sa.Connection, device_id: str, now: float) -> None:
        conn.execute(self._insert(d).values(id=device_id, registered_at=now, online=False, command_seq=0)
                     .on_conflict_do_nothing())

    def _locked_device(self, conn: sa.Connection, device_id: str, now: float) -> sa.RowMapping:
        """The device row, registered first when unknown, locked (see ``_lock_device``)."""
        row = self._lock_device(conn, device_id)
        if row is None:
            self._ensure_device(conn, device_id, now)
            row = self._lock_device(conn, device_id)
            assert row is not None
        return row

    def _lock_device(self, conn: sa.Connection, device_id: str) -> Optional[sa.RowMapping]:
        """The device row, locked until the transaction ends (PostgreSQL; SQLite's writer
        already holds the database)."""
        return conn.execute(sa.select(d).where(d.c.id == device_id).with_for_update()).mappings().first()

    def _join_groups(self, conn: sa.Connection, device_id: str, groups: Iterable[str], now: float) -> int:
        added = 0
        for name in sorted(set(groups)):
            conn.execute(self._insert(schema.groups).values(name=name, created_at=now).on_conflict_do_nothing())
            added += _inserted(conn, self._insert(dg).values(device_id=device_id, group_name=name))
        return added

    # -- devices and groups -----------------------------------------------------------------

    def register_device(self, device_id: str, *, groups: tuple[str, ...] = (), now: float) -> DeviceRecord:
        """Create the device if unknown (groups created as needed); add it to ``groups``. Idempotent."""
        def fn(conn: sa.Connection) -> DeviceRecord:
            self._ensure_device(conn, device_id, now)
            self._join_groups(conn, device_id, groups, now)
            return self._device(conn, device_id)
        return self._write(fn)

    def apply_state(self, device_id: str, state: dict[str, Any], *, now: float) -> bool:
        """Take in a ``DeviceState`` (json dict): registers an unknown device; updates online,
        boot_id, bd_seq, runtime_version, capabilities (tier from them), reported models and
        generation, state_at, last_seen. A death (online False) only marks it offline and
        only when its (boot_id, bd_seq) is the current one or newer (a stale Will is ignored).
        The device's ``groups`` in a birth are added to its memberships. Returns whether
        anything changed.

        ``bd_seq`` is a per-device counter that grows with every process, so it also orders
        boots. A birth is stale (ignored) when the held state is a death of the same
        (boot_id, bd_seq) -- a process's death is its last word -- or when the device is
        online with a higher bd_seq. A birth with a lower bd_seq over an offline device is
        taken (the device's data directory was wiped and its counter started again)."""
        return self._write(lambda conn: self._apply_state(conn, device_id, state, now))

    def _apply_state(self, conn: sa.Connection, device_id: str, state: dict[str, Any], now: float) -> bool:
        online = bool(state.get("online"))
        boot_id = state.get("boot_id")
        bd_seq = state.get("bd_seq")
        cur = self._locked_device(conn, device_id, now)
        same = cur["boot_id"] == boot_id and cur["bd_seq"] == bd_seq
        if not online:
            newer = cur["bd_seq"] is None or (bd_seq is not None and bd_seq > cur["bd_seq"])
            if not (same or newer):
                return False  # a stale Will: a newer process has been born since
            if same and not cur["online"]:
                return False
            conn.execute(sa.update(d).where(d.c.id == device_id).values(
                online=False, boot_id=boot_id, bd_seq=bd_seq, state_at=now))
            return True
        if same and not cur["online"] and cur["state_at"] is not None:
            return False  # this process already died: a late copy of its birth
        if (cur["online"] and cur["bd_seq"] is not None and bd_seq is not None
                and bd_seq < cur["bd_seq"]):
            return False  # an older process's birth after a newer one's
        caps = state.get("capabilities")
        values = {
            "online": True, "boot_id": boot_id, "bd_seq": bd_seq,
            "runtime_version": state.get("runtime_version"),
            "capabilities": caps,
            "tier": (caps or {}).get("tier", "edge") if caps is not None else cur["tier"],
            "reported": state.get("models") or {},
            "reported_generation": state.get("generation"),
        }
        changed = any(cur[k] != v for k, v in values.items())
        conn.execute(sa.update(d).where(d.c.id == device_id).values(
            **values, state_at=now, last_seen=_later(cur["last_seen"], now)))
        changed |= self._join_groups(conn, device_id, state.get("groups") or (), now) > 0
        return changed

    def touch(self, device_id: str, *, now: float) -> None:
        """last_seen = now (any message from a known device)."""
        self._write(lambda conn: conn.execute(
            sa.update(d).where(d.c.id == device_id, sa.or_(d.c.last_seen.is_(None), d.c.last_seen < now))
            .values(last_seen=now)))

    def get_device(self, device_id: str) -> DeviceRecord:
        """Raises NotFound."""
        return self._read(lambda conn: self._device(conn, device_id))

    def _device(self, conn: sa.Connection, device_id: str) -> DeviceRecord:
        row = conn.execute(sa.select(d).where(d.c.id == device_id)).mappings().first()
        if row is None:
            raise NotFound(f"no device {device_id!r}: it has never connected nor been registered "
                           "(fleetctl device list shows the known ones)")
        groups = conn.execute(sa.select(dg.c.group_name).where(dg.c.device_id == device_id)
                              .order_by(dg.c.group_name)).scalars().all()
        return _device_record(row, tuple(groups))

    def list_devices(self, *, group: Optional[str] = None) -> list[DeviceRecord]:
        """All devices (or a group's), sorted by id."""
        def fn(conn: sa.Connection) -> list[DeviceRecord]:
            members: dict[str, list[str]] = {}
            for dev, name in conn.execute(sa.select(dg.c.device_id, dg.c.group_name).order_by(dg.c.group_name)):
                members.setdefault(dev, []).append(name)
            q = sa.select(d).order_by(d.c.id)
            if group is not None:
                q = q.where(d.c.id.in_(sa.select(dg.c.device_id).where(dg.c.group_name == group)))
            return [_device_record(r, tuple(members.get(r["id"], ()))) for r in conn.execute(q).mappings()]
        return self._read(fn)

    def resolve_target(self, target: str) -> list[str]:
        """Device ids of ``device:ID`` | ``group:NAME`` | ``all``, sorted.

        Raises:
            NotFound: an unknown device or group. ValueError: a malformed target.
        """
        kind, _, name = target.partition(":")
        if target == "all":
            return self._read(lambda conn: list(conn.execute(sa.select(d.c.id).order_by(d.c.id)).scalars()))
        if kind not in ("device", "group") or not name:
            raise ValueError(f"malformed target {target!r}: use device:ID, group:NAME or all")

        def fn(conn: sa.Connection) -> list[str]:
            if kind == "device":
                if conn.execute(sa.select(d.c.id).where(d.c.id == name)).first() is None:
                    raise NotFound(f"no device {name!r} (target {target!r}): check the id with fleetctl device list")
                return [name]
            if conn.execute(sa.select(schema.groups.c.name).where(schema.groups.c.name == name)).first() is None:
                raise NotFound(f"no group {name!r} (target {target!r}): create it with fleetctl group add")
            return list(conn.execute(sa.select(dg.c.device_id).where(dg.c.group_name == name)
                                     .order_by(dg.c.device_id)).scalars())
        return self._read(fn)

    def add_group(self, name: str, devices: tuple[str, ...] = (), *, now: float) -> None:
        """Create the group if missing and add ``devices`` (registering unknown ones)."""
        def fn(conn: sa.Connection) -> None:
            conn.execute(self._insert(schema.groups).values(name=name, created_at=now).on_conflict_do_nothing())
            for dev in sorted(set(devices)):
                self._ensure_device(conn, dev, now)
                self._join_groups(conn, dev, (name,), now)
        self._write(fn)

    def remove_group(self, name: str, devices: tuple[str, ...] = ()) -> None:
        """Remove ``devices`` from the group, or delete the group when ``devices`` is empty.

        Raises:
            NotFound: no such group.
        """
        def fn(conn: sa.Connection) -> None:
            g = schema.groups
            if conn.execute(sa.select(g.c.name).where(g.c.name == name)).first() is None:
                raise NotFound(f"no group {name!r}: fleetctl group list shows the existing ones")
            if devices:
                conn.execute(sa.delete(dg).where(dg.c.group_name == name, dg.c.device_id.in_(list(devices))))
            else:
                conn.execute(sa.delete(dg).where(dg.c.group_name == name))
                conn.execute(sa.delete(g).where(g.c.name == name))
        self._write(fn)

    def list_groups(self) -> dict[str, list[str]]:
        """Group name -> sorted member ids."""
        def fn(conn: sa.Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {
                n: [] for n in conn.execute(sa.select(schema.groups.c.name).order_by(schema.groups.c.name)).scalars()}
            for dev, name in conn.execute(sa.select(dg.c.device_id, dg.c.group_name).order_by(dg.c.device_id)):
                out.setdefault(name, []).append(dev)
            return out
        return self._read(fn)

    # -- releases ---------------------------------------------------------------------------

    def add_release(self, release: ReleaseRecord) -> None:
        """Raises Conflict: (model, version) exists with a different sha256 (same sha: no-op)."""
        r = schema.releases

        def fn(conn: sa.Connection) -> None:
            if _inserted(conn, self._insert(r).values(**asdict(release))):
                return
            held = conn.execute(sa.select(r.c.sha256).where(r.c.model == release.model,
                                                            r.c.version == release.version)).scalar_one()
            if held != release.sha256:
                raise Conflict(f"release {release.model} {release.version} already exists with sha256 "
                               f"{held[:12]}..., not {release.sha256[:12]}...: a version is immutable, "
                               "publish the new file under a new version")
        self._write(fn)

    def get_release(self, model: str, version: str) -> ReleaseRecord:
        """Raises NotFound."""
        r = schema.releases

        def fn(conn: sa.Connection) -> ReleaseRecord:
            row = conn.execute(sa.select(r).where(r.c.model == model, r.c.version == version)).mappings().first()
            if row is None:
                raise NotFound(f"no release {model} {version}: publish it first (fleetctl release list shows "
                               "what exists)")
            return ReleaseRecord(**row)
        return self._read(fn)

    def list_releases(self, model: Optional[str] = None) -> list[ReleaseRecord]:
        """Sorted by model, then created_at."""
        r = schema.releases
        q = sa.select(r).order_by(r.c.model, r.c.created_at, r.c.version)
        if model is not None:
            q = q.where(r.c.model == model)
        return self._read(lambda conn: [ReleaseRecord(**row) for row in conn.execute(q).mappings()])

    def release_by_sha(self, sha256: str) -> Optional[ReleaseRecord]:
        r = schema.releases
        q = sa.select(r).where(r.c.sha256 == sha256).order_by(r.c.created_at).limit(1)

        def fn(conn: sa.Connection) -> Optional[ReleaseRecord]:
            row = conn.execute(q).mappings().first()
            return ReleaseRecord(**row) if row is not None else None
        return self._read(fn)

    # -- artifact bytes and uploads ------------------------------------------------------------

    def begin_upload(self, upload_id: str, *, model: str, version: str, size: int, sha256: str,
                     created_by: str, now: float) -> None:
        """Start receiving a file (idempotent for the same upload_id and fields).

        Raises:
            Conflict: the release (model, version) exists with another sha256, or upload_id
                exists with other fields.
            ValueError: a negative size or a sha256 that is not 64 lowercase hex digits.
        """
        if size < 0:
            raise ValueError(f"upload {upload_id}: size must be >= 0, got {size}")
        if not _SHA_RE.fullmatch(sha256):
            raise ValueError(f"upload {upload_id}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
        u, r = schema.uploads, schema.releases
        want = {"model": model, "version": version, "size": size, "sha256": sha256}

        def fn(conn: sa.Connection) -> None:
            held = conn.execute(sa.select(r.c.sha256).where(r.c.model == model, r.c.version == version)).scalar()
            if held is not None and held != sha256:
                raise Conflict(f"release {model} {version} already exists with sha256 {held[:12]}...: "
                               "upload the new file under a new version")
            if _inserted(conn, self._insert(u).values(id=upload_id, created_by=created_by, created_at=now, **want)):
                return
            row = conn.execute(sa.select(u).where(u.c.id == upload_id)).mappings().one()
            other = {k: row[k] for k in want if row[k] != want[k]}
            if other:
                raise Conflict(f"upload {upload_id} already exists for other fields {other}: "
                               "start a new upload with a new id")
        self._write(fn)

    def add_upload_part(self, upload_id: str, offset: int, data: bytes) -> int:
        """Store bytes at ``offset`` (a redelivered part is a no-op); returns the bytes held so far.

        Raises:
            NotFound: no such upload. ValueError: past the declared size.
        """
        u, up = schema.uploads, schema.upload_parts

        def fn(conn: sa.Connection) -> int:
            size = conn.execute(sa.select(u.c.size).where(u.c.id == upload_id)).scalar()
            if size is None:
                raise NotFound(f"no upload {upload_id!r}: it finished, failed or never began; begin it again")
            if offset < 0 or offset + len(data) > size:
                raise ValueError(f"upload {upload_id}: part [{offset}, {offset + len(data)}) lies outside the "
                                 f"declared size {size}")
            conn.execute(self._insert(up).values(upload_id=upload_id, offset=offset, data=bytes(data))
                         .on_conflict_do_nothing())
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(up.c.data)), 0))
                                    .where(up.c.upload_id == upload_id)).scalar_one())
        return self._write(fn)

    def finish_upload(self, upload_id: str) -> tuple[str, int]:
        """Check the parts are contiguous, total ``size`` and hash to ``sha256``; move them into
        blob_parts (re-cut into BLOB_PART_BYTES parts; a blob already held is kept) and drop
        the upload. Returns (sha256, size).

        Raises:
            NotFound: no such upload. Incomplete (a StoreError): missing bytes (the message
                says which range; send them and finish again). DigestMismatch (a StoreError):
                the bytes hash to something else; the upload is dropped.
        """
        u, up = schema.uploads, schema.upload_parts

        def fn(conn: sa.Connection) -> tuple[str, int]:
            row = conn.execute(sa.select(u).where(u.c.id == upload_id).with_for_update()).mappings().first()
            if row is None:
                raise NotFound(f"no upload {upload_id!r}: it finished, failed or never began; begin it again")
            sha, size = row["sha256"], row["size"]
            parts = conn.execute(sa.select(up.c.offset, sa.func.length(up.c.data)).where(up.c.upload_id == upload_id)
                                 .order_by(up.c.offset)).all()
            end = 0
            for off, n in parts:
                if off > end:
                    raise Incomplete(f"upload {upload_id}: bytes [{end}, {off}) of {size} are missing; "
                                     "send them and finish again")
                end = max(end, off + n)
            if end < size:
                raise Incomplete(f"upload {upload_id}: bytes [{end}, {size}) of {size} are missing; "
                                 "send them and finish again")
            held = self._has_blob(conn, sha)
            writer = _PartWriter(conn, self._insert, sha) if not held else None
            h = hashlib.sha256()
            pos = 0
            for off, n in parts:
                if off + n <= pos:
                    continue  # wholly inside bytes already taken (a re-cut redelivery)
                data = conn.execute(sa.select(up.c.data).where(up.c.upload_id == upload_id, up.c.offset == off)
                                    ).scalar_one()
                data = bytes(data)[pos - off:]
                h.update(data)
                pos += len(data)
                if writer is not None:
                    writer.add(data)
            if h.hexdigest() != sha:
                raise _Mismatch(h.hexdigest())
            if writer is not None:
                writer.close()
            conn.execute(sa.delete(up).where(up.c.upload_id == upload_id))
            conn.execute(sa.delete(u).where(u.c.id == upload_id))
            return sha, size

        try:
            return self._write(fn)
        except _Mismatch as exc:
            def drop(conn: sa.Connection) -> Optional[str]:
                conn.execute(sa.delete(up).where(up.c.upload_id == upload_id))
                conn.execute(sa.delete(u).where(u.c.id == upload_id))
                return None
            self._write(drop)
            raise DigestMismatch(f"upload {upload_id}: the bytes hash to {exc.args[0][:12]}..., not the declared "
                                 "sha256; the upload was dropped, send the file again") from None

    def _has_blob(self, conn: sa.Connection, sha256: str) -> bool:
        b = schema.blob_parts
        return conn.execute(sa.select(b.c.idx).where(b.c.sha256 == sha256, b.c.idx == 0)).first() is not None

    def get_upload(self, upload_id: str) -> dict[str, Any]:
        """{id, model, version, size, sha256, created_at, created_by} of an upload in progress.

        Raises:
            NotFound: no such upload (never begun, or already finished).
        """
        u = schema.uploads

        def fn(conn: sa.Connection) -> dict[str, Any]:
            row = conn.execute(sa.select(u).where(u.c.id == upload_id)).mappings().first()
            if row is None:
                raise NotFound(f"no upload {upload_id!r}: begin it with models.upload_begin")
            return dict(row)
        return self._read(fn)

    def has_blob(self, sha256: str) -> bool:
        return self._read(lambda conn: self._has_blob(conn, sha256))

    def blob_size(self, sha256: str) -> Optional[int]:
        """The blob's size in bytes, or None when it is not held."""
        b = schema.blob_parts

        def fn(conn: sa.Connection) -> Optional[int]:
            if not self._has_blob(conn, sha256):
                return None
            return int(conn.execute(sa.select(sa.func.sum(sa.func.length(b.c.data))).where(b.c.sha256 == sha256))
                       .scalar_one())
        return self._read(fn)

    def write_blob_to(self, sha256: str, path: str) -> int:
        """Write the blob's bytes to ``path`` (the caller makes it atomic); returns the size.

        Raises:
            NotFound: no such blob.
        """
        b = schema.blob_parts

        def fn(conn: sa.Connection) -> int:
            if not self._has_blob(conn, sha256):
                raise NotFound(f"no blob {sha256[:12]}... in the store: upload the release's file again")
            total = 0
            with open(path, "wb") as f:
                for idx in itertools.count():
                    data = conn.execute(sa.select(b.c.data).where(b.c.sha256 == sha256, b.c.idx == idx)).scalar()
                    if data is None:
                        break
                    f.write(data)
                    total += len(data)
                f.flush()
                os.fsync(f.fileno())
            return total
        return self._read(fn)

    def put_blob(self, sha256: str, data_path: str) -> None:
        """Store the file at ``data_path`` as blob ``sha256`` (verified); no-op when held.

        Raises:
            StoreError (DigestMismatch): the file does not hash to ``sha256``.
        """
        def fn(conn: sa.Connection) -> None:
            if self._has_blob(conn, sha256):
                return
            h = hashlib.sha256()
            writer = _PartWriter(conn, self._insert, sha256)
            with open(data_path, "rb") as f:
                while chunk := f.read(schema.BLOB_PART_BYTES):
                    h.update(chunk)
                    writer.add(chunk)
            if h.hexdigest() != sha256:
                raise DigestMismatch(f"{data_path} hashes to {h.hexdigest()[:12]}..., not {sha256[:12]}...: "
                                     "nothing was stored; check the file")
            writer.close()
        self._write(fn)

    # -- desired state ----------------------------------------------------------------------

    def assignments(self, device_id: str) -> list[Assignment]:
        """The device's assignments, sorted by model."""
        return self._read(lambda conn: self._assignments(conn, device_id))

    def _assignments(self, conn: sa.Connection, device_id: str) -> list[Assignment]:
        a = schema.assignments
        rows = conn.execute(sa.select(a.c.device_id, a.c.model, a.c.version, a.c.route, a.c.install)
                            .where(a.c.device_id == device_id).order_by(a.c.model)).mappings()
        return [Assignment(**r) for r in rows]

    def set_assignments(self, changes: dict[str, dict[str, Optional[Assignment]]], *, now: float) -> dict[str, int]:
        """Apply ``{device_id: {model: Assignment | None (remove)}}`` in one transaction and
        bump each changed device's desired generation by one (a device whose assignments end
        up identical keeps its generation). Returns {device_id: generation} for every device
        named. The first generation of a device is 1 (a device named but never assigned
        anything is reported as 0).

        Device rows are locked in id order, so concurrent callers (several replicas)
        serialise per device: each change gets its own generation.

        Raises:
            NotFound: a device that is not registered (nothing is changed).
            ValueError: an Assignment whose device_id or model is not the key it is under.
        """
        for dev, models in changes.items():
            for model, asg in models.items():
                if asg is not None and (asg.device_id != dev or asg.model != model):
                    raise ValueError(f"assignment {asg} filed under device {dev!r}, model {model!r}")
        a, ds = schema.assignments, schema.desired

        def fn(conn: sa.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for dev in sorted(changes):
                if self._lock_device(conn, dev) is None:
                    raise NotFound(f"no device {dev!r}: register it (fleetctl device add) before assigning models")
                held = {x.model: x for x in self._assignments(conn, dev)}
                changed = False
                for model, asg in sorted(changes[dev].items()):
                    cur = held.get(model)
                    if asg is None:
                        if cur is not None:
                            conn.execute(sa.delete(a).where(a.c.device_id == dev, a.c.model == model))
                            changed = True
                    elif cur != asg:
                        vals = {"version": asg.version, "route": asg.route, "install": asg.install, "updated_at": now}
                        if cur is None:
                            conn.execute(sa.insert(a).values(device_id=dev, model=model, **vals))
                        else:
                            conn.execute(sa.update(a).where(a.c.device_id == dev, a.c.model == model).values(**vals))
                        changed = True
                if changed:
                    stmt = self._insert(ds).values(device_id=dev, generation=1, changed_at=now)
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[ds.c.device_id],
                        set_={"generation": ds.c.generation + 1, "changed_at": now})
                    conn.execute(stmt)
                out[dev] = int(conn.execute(sa.select(ds.c.generation).where(ds.c.device_id == dev)).scalar() or 0)
            return out
        return self._write(fn)

    def get_desired(self, device_id: str) -> Optional[DesiredRecord]:
        ds = schema.desired

        def fn(conn: sa.Connection) -> Optional[DesiredRecord]:
            row = conn.execute(sa.select(ds).where(ds.c.device_id == device_id)).mappings().first()
            return DesiredRecord(**row) if row is not None else None
        return self._read(fn)

    def list_desired(self) -> list[DesiredRecord]:
        ds = schema.desired
        return self._read(lambda conn: [DesiredRecord(**r) for r in
                                        conn.execute(sa.select(ds).order_by(ds.c.device_id)).mappings()])

    def record_signed(self, device_id: str, generation: int, envelope: str, *, signed_at: float,
                      expires_at: float) -> bool:
        """Remember the document signed for ``generation``; ignored (False) when the device's
        generation has moved past it meanwhile."""
        ds = schema.desired
        return bool(self._write(lambda conn: conn.execute(
            sa.update(ds).where(ds.c.device_id == device_id, ds.c.generation == generation)
            .values(envelope=envelope, signed_generation=generation, signed_at=signed_at, expires_at=expires_at)
        ).rowcount))

    # -- rollouts ---------------------------------------------------------------------------

    def create_rollout(self, *, model: str, version: str, target: str, plan: dict[str, Any],
                       steps: list[tuple[str, int, Optional[str]]], created_by: str, now: float) -> RolloutRecord:
        """A new rollout in state "pending" with one step per (device_id, wave, previous_version),
        steps in state "pending".

        Raises:
            Conflict: another rollout of the same model is pending/running/paused.
        """
        ro, rd = schema.rollouts, schema.rollout_devices
        devices = [dev for dev, _, _ in steps]
        if len(set(devices)) != len(devices):
            raise ValueError(f"rollout of {model} {version}: a device appears in more than one step")

        def fn(conn: sa.Connection) -> RolloutRecord:
            other = conn.execute(sa.select(ro.c.id, ro.c.state).where(
                ro.c.model == model, ro.c.state.in_(schema.ACTIVE_ROLLOUT_STATES))).first()
            if other is not None:
                raise _active_conflict(model, other[0], other[1])
            rid = conn.execute(sa.insert(ro).values(
                model=model, version=version, target=target, plan=plan, state="pending", wave=0,
                created_at=now, updated_at=now, created_by=created_by, revision=0,
            ).returning(ro.c.id)).scalar_one()
            if steps:
                conn.execute(sa.insert(rd), [
                    {"rollout_id": rid, "device_id": dev, "wave": wave, "previous_version": prev, "state": "pending"}
                    for dev, wave, prev in steps])
            return self._rollout(conn, rid, with_steps=True)

        try:
            return self._write(fn)
        except sa.exc.IntegrityError as exc:
            if not _active_index(exc):
                raise
            # ux_rollouts_active_model: another replica created one between our check and insert.
            raise Conflict(f"another rollout of {model} became active at the same moment: "
                           "see fleetctl rollout list, then abort it or wait") from exc

    def get_rollout(self, rollout_id: int) -> RolloutRecord:
        """With its steps (sorted by wave, device). Raises NotFound."""
        return self._read(lambda conn: self._rollout(conn, rollout_id, with_steps=True))

    def _rollout(self, conn: sa.Connection, rollout_id: int, *, with_steps: bool) -> RolloutRecord:
        ro, rd = schema.rollouts, schema.rollout_devices
        row = conn.execute(sa.select(ro).where(ro.c.id == rollout_id)).mappings().first()
        if row is None:
            raise NotFound(f"no rollout {rollout_id}: fleetctl rollout list shows the existing ones")
        steps: tuple[StepRecord, ...] = ()
        if with_steps:
            steps = tuple(StepRecord(**s) for s in conn.execute(
                sa.select(rd).where(rd.c.rollout_id == rollout_id).order_by(rd.c.wave, rd.c.device_id)).mappings())
        return RolloutRecord(**row, steps=steps)

    def list_rollouts(self, *, states: Optional[tuple[str, ...]] = None) -> list[RolloutRecord]:
        """Newest first, without steps."""
        ro = schema.rollouts
        q = sa.select(ro).order_by(ro.c.created_at.desc(), ro.c.id.desc())
        if states is not None:
            q = q.where(ro.c.state.in_(list(states)))
        return self._read(lambda conn: [RolloutRecord(**r) for r in conn.execute(q).mappings()])

    def update_rollout(self, rollout_id: int, revision: int, *, fields: dict[str, Any],
                       steps: dict[str, dict[str, Any]], now: float) -> RolloutRecord:
        """Compare-and-set: when the rollout's revision is still ``revision``, set ``fields``
        (columns of ``rollouts``) and each step's fields ({device_id: {column: value}}),
        bump the revision and updated_at, all in one transaction; return the new record.

        Raises:
            Conflict: the revision moved (another replica or the console got there first),
                or the change would make a second rollout of the model active.
            NotFound: no such rollout, or no step for a device named in ``steps``.
            ValueError: a field that is not a settable column.
        """
        ro, rd = schema.rollouts, schema.rollout_devices
        bad = set(fields) - _ROLLOUT_FIELDS
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} on a rollout; settable: {sorted(_ROLLOUT_FIELDS)}")
        for dev, vals in steps.items():
            bad = set(vals) - _STEP_FIELDS
            if bad:
                raise ValueError(f"cannot set {sorted(bad)} on step {dev}; settable: {sorted(_STEP_FIELDS)}")

        def fn(conn: sa.Connection) -> RolloutRecord:
            _compare_and_set(conn, ro, rollout_id, revision, fields, now, what="rollout",
                             listing="fleetctl rollout list")
            for dev, vals in sorted(steps.items()):
                if not vals:
                    continue
                r = conn.execute(sa.update(rd).where(rd.c.rollout_id == rollout_id, rd.c.device_id == dev)
                                 .values(**vals))
                if r.rowcount == 0:
                    raise NotFound(f"rollout {rollout_id} has no step for device {dev!r}")
            return self._rollout(conn, rollout_id, with_steps=True)

        try:
            return self._write(fn)
        except sa.exc.IntegrityError as exc:
            if not _active_index(exc):
                raise
            raise Conflict(f"rollout {rollout_id}: the change would make a second rollout of its model "
                           "active; finish or abort the other one first") from exc

    def steps_for_device(self, device_id: str, *, active_only: bool = True) -> list[StepRecord]:
        """The device's steps in rollouts that are not finished (or all). ``active_only``
        also keeps steps still in motion (updating, waiting, reverting) in a finished
        rollout: those are tracked to their outcome after success or abort. Sorted by
        rollout id."""
        ro, rd = schema.rollouts, schema.rollout_devices
        q = sa.select(rd).where(rd.c.device_id == device_id).order_by(rd.c.rollout_id)
        if active_only:
            q = q.join(ro, ro.c.id == rd.c.rollout_id).where(sa.or_(
                ro.c.state.in_(schema.ACTIVE_ROLLOUT_STATES), rd.c.state.in_(_MOVING_STEPS)))
        return self._read(lambda conn: [StepRecord(**r) for r in conn.execute(q).mappings()])

    # -- migrations -------------------------------------------------------------------------

    def create_migration(self, *, model: str, version: str, source: str, from_node: str, to_node: str,
                         target_had: bool, timeouts: dict[str, Any], reason: Optional[str],
                         prediction: Optional[dict[str, Any]] = None, created_by: str,
                         now: float) -> MigrationRecord:
        """A new migration in state "pending".

        Raises:
            Conflict: another migration of (model, source) is active (also when another
                replica created one at the same moment).
        """
        mi = schema.migrations

        def fn(conn: sa.Connection) -> MigrationRecord:
            other = conn.execute(sa.select(mi.c.id, mi.c.state).where(
                mi.c.model == model, mi.c.source == source,
                mi.c.state.in_(schema.ACTIVE_MIGRATION_STATES))).first()
            if other is not None:
                raise _migration_conflict(model, source, other[0], other[1])
            mid = conn.execute(sa.insert(mi).values(
                model=model, version=version, source=source, from_node=from_node, to_node=to_node,
                target_had=target_had, state="pending", timeouts=timeouts, reason=reason, prediction=prediction,
                created_at=now, updated_at=now, created_by=created_by, revision=0,
            ).returning(mi.c.id)).scalar_one()
            return self._migration(conn, int(mid))

        try:
            return self._write(fn)
        except sa.exc.IntegrityError as exc:
            if not _migration_index(exc):
                raise
            raise Conflict(f"another migration of {model} for {source} became active at the same moment: "
                           "see fleetctl migrations ls") from exc

    def get_migration(self, migration_id: int) -> MigrationRecord:
        """Raises NotFound."""
        return self._read(lambda conn: self._migration(conn, migration_id))

    def _migration(self, conn: sa.Connection, migration_id: int) -> MigrationRecord:
        mi = schema.migrations
        row = conn.execute(sa.select(mi).where(mi.c.id == migration_id)).mappings().first()
        if row is None:
            raise NotFound(f"no migration {migration_id}: fleetctl migrations ls shows the existing ones")
        return MigrationRecord(**{**row, "target_had": bool(row["target_had"])})

    def list_migrations(self, *, states: Optional[tuple[str, ...]] = None, model: Optional[str] = None,
                        limit: Optional[int] = None) -> list[MigrationRecord]:
        """Newest first."""
        mi = schema.migrations
        q = sa.select(mi).order_by(mi.c.created_at.desc(), mi.c.id.desc())
        if states is not None:
            q = q.where(mi.c.state.in_(list(states)))
        if model is not None:
            q = q.where(mi.c.model == model)
        if limit is not None:
            q = q.limit(limit)
        return self._read(lambda conn: [MigrationRecord(**{**r, "target_had": bool(r["target_had"])})
                                        for r in conn.execute(q).mappings()])

    def update_migration(self, migration_id: int, revision: int, *, fields: dict[str, Any],
                         now: float) -> MigrationRecord:
        """Compare-and-set: when the migration's revision is still ``revision``, set
        ``fields``, bump the revision and updated_at; return the new record.

        Raises:
            Conflict: the revision moved (another replica or the console got there first).
            NotFound: no such migration.
            ValueError: a field that is not a settable column.
        """
        mi = schema.migrations
        bad = set(fields) - _MIGRATION_FIELDS
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} on a migration; settable: {sorted(_MIGRATION_FIELDS)}")

        def fn(conn: sa.Connection) -> MigrationRecord:
            _compare_and_set(conn, mi, migration_id, revision, fields, now, what="migration",
                             listing="fleetctl migrations ls")
            return self._migration(conn, migration_id)

        try:
            return self._write(fn)
        except sa.exc.IntegrityError as exc:
            if not _migration_index(exc):
                raise
            raise Conflict(f"migration {migration_id}: the change would make a second migration of its "
                           "workload active") from exc

    def all_assignments(self, model: Optional[str] = None) -> list[Assignment]:
        """Every device's assignments (of ``model``), sorted by device, model."""
        a = schema.assignments
        q = sa.select(a.c.device_id, a.c.model, a.c.version, a.c.route, a.c.install).order_by(a.c.device_id, a.c.model)
        if model is not None:
            q = q.where(a.c.model == model)
        return self._read(lambda conn: [Assignment(**r) for r in conn.execute(q).mappings()])

    # -- ingest -----------------------------------------------------------------------------

    def ingest_many(self, reports: list[Report]) -> list[bool]:
        """Store ``reports`` in one transaction, each as ``apply_state`` / ``add_telemetry`` /
        ``add_event`` / ``record_reply`` would; returns whether each was new, in the order
        given. All or nothing: an error rolls the whole batch back (retry them one by one
        to find the culprit). Written in device-id order (stable, so one device's reports
        keep theirs): replicas' batches lock device rows in the same order and cannot
        deadlock each other.

        Raises:
            ValueError: an unknown ``kind`` (before anything is written).
        """
        kinds = ("state", "telemetry", "event", "reply")
        for r in reports:
            if r.kind not in kinds:
                raise ValueError(f"report kind: expected one of {list(kinds)}, got {r.kind!r}")
        order = sorted(range(len(reports)), key=lambda i: reports[i].device_id)
        samples = [i for i in order if reports[i].kind == "telemetry"]

        def fn(conn: sa.Connection) -> list[bool]:
            new = [False] * len(reports)
            for i in order:  # states, events, replies first: telemetry touches other columns
                r = reports[i]
                if r.kind == "state":
                    new[i] = self._apply_state(conn, r.device_id, r.data, r.received_at)
                elif r.kind == "event":
                    new[i] = self._add_event(conn, r.device_id, r.data, r.received_at)
                elif r.kind == "reply":
                    new[i] = self._record_reply(conn, r.device_id, r.data, r.received_at)
            if samples:
                stored = self._add_telemetry_many(
                    conn, [(reports[i].device_id, reports[i].data, reports[i].received_at) for i in samples])
                for i, was_new in zip(samples, stored):
                    new[i] = was_new
            return new

        return self._write(fn) if reports else []

    def add_telemetry(self, device_id: str, sample: dict[str, Any], *, now: float) -> bool:
        """Store a ``Telemetry`` sample (json dict) once: False if (device, seq) is held.
        On a new one also: telemetry_models rows (per-model deltas of the cumulative
        ``calls``/``errors`` against the device's previous sample of the same boot_id; the
        whole count on a new boot), the hourly rollups, devices.last_telemetry (when seq is
        the newest) and last_seen. Registers an unknown device.

        "Previous" is by seq. The common case (a sample newer than any held) compares with
        devices.last_telemetry, which survives expiry. A late sample (lower seq than the
        newest) is compared with the held sample just below it, and the held sample just
        above it is re-based on the late one (its row and its rollup hour move by the
        difference), so the totals do not depend on the order samples arrive in. A counter
        lower than its predecessor's (a reset within a boot) counts whole. Rollups of a
        model without a version go under version "".

        The device row is locked for the transaction (SELECT ... FOR UPDATE on PostgreSQL):
        replicas ingesting for one device take turns."""
        return self._write(lambda conn: self._add_telemetry(conn, device_id, sample, now))

    def _add_telemetry_many(self, conn: sa.Connection, items: list[tuple[str, dict[str, Any], float]]) -> list[bool]:
        """``add_telemetry`` for many (device_id, sample, received_at), device ids sorted:
        whether each was new. Set-based, as ingest's throughput needs: one locking read of
        the device rows, one read of the (device, seq) keys held, then executemany inserts
        and device updates, and one rollup upsert per (model, version, hour). A late sample
        (seq not above its device's newest) takes ``_add_telemetry``'s path afterwards."""
        ids = sorted({dev for dev, _, _ in items})
        now0 = min(at for _, _, at in items)
        rows = {r["id"]: dict(r) for r in conn.execute(_DEVICES_LOCKED, {"ids": ids}).mappings()}
        missing = [i for i in ids if i not in rows]
        if missing:
            for device_id in missing:
                self._ensure_device(conn, device_id, now0)
            rows.update({r["id"]: dict(r) for r in conn.execute(_DEVICES_LOCKED, {"ids": missing}).mappings()})
        keys = [(dev, int(sample["seq"])) for dev, sample, _ in items]
        held = {tuple(k) for k in conn.execute(_TELEMETRY_HELD_MANY, {"keys": sorted(set(keys))})}
        new: list[bool] = []
        late: list[tuple[str, dict[str, Any], float]] = []
        dirty: set[str] = set()
        t_rows: list[dict[str, Any]] = []
        tm_rows: list[dict[str, Any]] = []
        ups: dict[tuple[str, str, int], list[float]] = {}
        for (dev, sample, now), key in zip(items, keys):
            if key in held:
                new.append(False)
                continue
            held.add(key)  # a copy later in this batch is a duplicate too
            new.append(True)
            row = rows[dev]
            newest = row["last_telemetry_seq"]
            if newest is not None and key[1] <= newest:
                late.append((dev, sample, now))
                continue
            prev = row["last_telemetry"] if newest is not None else None
            row.update(last_telemetry=sample, last_telemetry_seq=key[1], last_seen=_later(row["last_seen"], now))
            dirty.add(dev)
            at = _ts(sample.get("at"), now)
            t_rows.append({"device_id": dev, "seq": key[1], "at": at, "received_at": now, "payload": sample})
            for model, (calls, errors) in _deltas(sample, prev).items():
                fig = sample["models"][model]
                p95 = fig.get("p95_ms")
                tm_rows.append({"device_id": dev, "seq": key[1], "model": model, "version": fig.get("version"),
                                "at": at, "calls": calls, "errors": errors, "p95_ms": p95})
                _bucket(ups, model, fig.get("version"), at, calls, errors, p95, samples=1)
        if t_rows:
            conn.execute(sa.insert(t), t_rows)
        if tm_rows:
            conn.execute(sa.insert(schema.telemetry_models), tm_rows)
        if dirty:
            conn.execute(_DEVICE_TELEMETRY_UPDATE, [
                {"b_id": dev, "b_last_seen": rows[dev]["last_seen"], "b_last_telemetry": rows[dev]["last_telemetry"],
                 "b_last_telemetry_seq": rows[dev]["last_telemetry_seq"]} for dev in sorted(dirty)])
        for dev, sample, now in late:
            self._add_telemetry(conn, dev, sample, now, ups=ups)
        if ups:
            self._add_rollups(conn, ups)
        return new

    def _add_telemetry(self, conn: sa.Connection, device_id: str, sample: dict[str, Any], now: float, *,
                       ups: Optional[dict[tuple[str, str, int], list[float]]] = None) -> bool:
        """``add_telemetry`` in ``conn``. The hot path of ingest: only statements SQLAlchemy
        caches (its dialect INSERT ... ON CONFLICT is compiled anew every time), and the
        rollups go into ``ups`` when the caller writes them for a whole batch."""
        seq = int(sample["seq"])
        at = _ts(sample.get("at"), now)
        tm = schema.telemetry_models
        dev = self._locked_device(conn, device_id, now)
        # the device row is locked (PostgreSQL: FOR UPDATE; SQLite: one writer), so checking
        # then inserting cannot race another replica ingesting for this device
        if conn.execute(_TELEMETRY_HELD, {"device_id": device_id, "seq": seq}).first() is not None:
            return False
        conn.execute(_TELEMETRY_INSERT, {"device_id": device_id, "seq": seq, "at": at, "received_at": now,
                                         "payload": sample})
        newest = dev["last_telemetry_seq"]
        values: dict[str, Any] = {"last_seen": _later(dev["last_seen"], now)}
        if newest is None or seq > newest:
            prev = dev["last_telemetry"] if newest is not None else None
            after = None
            values.update(last_telemetry=sample, last_telemetry_seq=seq)
        else:
            prev = conn.execute(sa.select(t.c.payload).where(t.c.device_id == device_id, t.c.seq < seq)
                                .order_by(t.c.seq.desc()).limit(1)).scalar()
            after = conn.execute(sa.select(t.c.payload).where(t.c.device_id == device_id, t.c.seq > seq)
                                 .order_by(t.c.seq).limit(1)).scalar()
        conn.execute(sa.update(d).where(d.c.id == device_id).values(**values))

        rows = []
        flush = ups is None
        if ups is None:
            ups = {}
        for model, (calls, errors) in _deltas(sample, prev).items():
            fig = sample["models"][model]
            p95 = fig.get("p95_ms")
            rows.append({"device_id": device_id, "seq": seq, "model": model, "version": fig.get("version"),
                         "at": at, "calls": calls, "errors": errors, "p95_ms": p95})
            _bucket(ups, model, fig.get("version"), at, calls, errors, p95, samples=1)
        if rows:
            conn.execute(sa.insert(tm), rows)  # executemany of a cached statement
        if after is not None:
            self._rebase(conn, device_id, after, sample, ups)
        if flush and ups:
            self._add_rollups(conn, ups)
        return True

    def _rebase(self, conn: sa.Connection, device_id: str, after: dict[str, Any], late: dict[str, Any],
                ups: dict[tuple[str, str, int], list[float]]) -> None:
        """``after``'s predecessor is now ``late``: set its telemetry_models rows to the deltas
        against ``late`` and move its rollup hour by the differences."""
        tm = schema.telemetry_models
        aseq = int(after["seq"])
        held = {r.model: (r.calls, r.errors) for r in conn.execute(
            sa.select(tm.c.model, tm.c.calls, tm.c.errors).where(tm.c.device_id == device_id, tm.c.seq == aseq))}
        at = _ts(after.get("at"), 0.0)
        for model, (calls, errors) in _deltas(after, late).items():
            if model not in held:
                continue  # expired meanwhile: nothing to move
            dc, de = calls - held[model][0], errors - held[model][1]
            if dc == 0 and de == 0:
                continue
            conn.execute(sa.update(tm).where(tm.c.device_id == device_id, tm.c.seq == aseq, tm.c.model == model)
                         .values(calls=calls, errors=errors))
            fig = after["models"][model]
            _bucket(ups, model, fig.get("version"), at, dc, de, fig.get("p95_ms"), samples=0)

    def _add_rollups(self, conn: sa.Connection, ups: dict[tuple[str, str, int], list[float]]) -> None:
        ru = schema.rollups
        stmt = self._insert(ru).values([
            {"model": m, "version": v, "hour": h, "calls": int(x[0]), "errors": int(x[1]),
             "p95_weighted": float(x[2]), "samples": int(x[3])}
            for (m, v, h), x in sorted(ups.items())])
        stmt = stmt.on_conflict_do_update(
            index_elements=[ru.c.model, ru.c.version, ru.c.hour],
            set_={"calls": ru.c.calls + stmt.excluded.calls, "errors": ru.c.errors + stmt.excluded.errors,
                  "p95_weighted": ru.c.p95_weighted + stmt.excluded.p95_weighted,
                  "samples": ru.c.samples + stmt.excluded.samples})
        conn.execute(stmt)

    def add_event(self, device_id: str, event: dict[str, Any], *, now: float) -> bool:
        """Store an ``Event`` once: False if (device, seq) is held."""
        return self._write(lambda conn: self._add_event(conn, device_id, event, now))

    def _add_event(self, conn: sa.Connection, device_id: str, event: dict[str, Any], now: float) -> bool:
        e = schema.events
        values = {
            "device_id": device_id, "seq": int(event["seq"]), "at": _ts(event.get("at"), now), "received_at": now,
            "step": event["step"], "model": event.get("model"), "version": event.get("version"),
            "generation": event.get("generation"), "reason": event.get("reason"), "payload": event,
        }
        return bool(_inserted(conn, self._insert(e).values(**values)))

    def recent_events(self, *, device_id: Optional[str] = None, model: Optional[str] = None,
                      since: Optional[float] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events newest first (by received_at), each the stored payload plus "device_id" and
        "received_at"; ``since`` bounds received_at."""
        e = schema.events
        q = sa.select(e.c.device_id, e.c.received_at, e.c.payload).order_by(
            e.c.received_at.desc(), e.c.device_id, e.c.seq.desc()).limit(limit)
        if device_id is not None:
            q = q.where(e.c.device_id == device_id)
        if model is not None:
            q = q.where(e.c.model == model)
        if since is not None:
            q = q.where(e.c.received_at >= since)
        return self._read(lambda conn: [{**r.payload, "device_id": r.device_id, "received_at": r.received_at}
                                        for r in conn.execute(q)])

    def recent_telemetry(self, *, device_id: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Samples newest first, each the payload plus "device_id" and "received_at"."""
        q = sa.select(t.c.device_id, t.c.received_at, t.c.payload).order_by(
            t.c.received_at.desc(), t.c.device_id, t.c.seq.desc()).limit(limit)
        if device_id is not None:
            q = q.where(t.c.device_id == device_id)
        return self._read(lambda conn: [{**r.payload, "device_id": r.device_id, "received_at": r.received_at}
                                        for r in conn.execute(q)])

    def model_window(self, model: str, version: str, *, devices: Optional[list[str]] = None,
                     since: float, until: Optional[float] = None) -> ModelWindow:
        """Sum of calls/errors and calls-weighted p95 over telemetry_models rows of
        (model, version) with ``since <= at < until`` (from the given devices only).
        ``p95_ms`` is None when no call came with a p95."""
        tm = schema.telemetry_models
        if devices is not None and not devices:
            return ModelWindow()
        has_p95 = tm.c.p95_ms.is_not(None)
        cols = (sa.func.coalesce(sa.func.sum(tm.c.calls), 0), sa.func.coalesce(sa.func.sum(tm.c.errors), 0),
                sa.func.coalesce(sa.func.sum(sa.case((has_p95, tm.c.p95_ms * tm.c.calls), else_=0.0)), 0.0),
                sa.func.coalesce(sa.func.sum(sa.case((has_p95, tm.c.calls), else_=0)), 0),
                sa.func.count())
        base = sa.select(*cols).where(tm.c.model == model, tm.c.version == version, tm.c.at >= since)
        if until is not None:
            base = base.where(tm.c.at < until)

        def fn(conn: sa.Connection) -> ModelWindow:
            acc = [0, 0, 0.0, 0, 0]
            batches = [None] if devices is None else [devices[i:i + 500] for i in range(0, len(devices), 500)]
            for batch in batches:
                q = base if batch is None else base.where(tm.c.device_id.in_(batch))
                for i, v in enumerate(conn.execute(q).one()):
                    acc[i] += float(v or 0) if i == 2 else int(v or 0)  # PostgreSQL sums bigint as numeric
            calls, errors, weighted, weight, samples = acc
            return ModelWindow(calls=int(calls), errors=int(errors),
                               p95_ms=float(weighted) / weight if weight else None, samples=int(samples))
        return self._read(fn)

    def rollups(self, model: Optional[str] = None, *, since: Optional[float] = None) -> list[dict[str, Any]]:
        """Hourly rollups, sorted by model, version, hour: {"model", "version", "hour" (Unix
        hour), "calls", "errors", "samples", "p95_weighted", "p95_ms" (p95_weighted / calls,
        None without calls)}. ``since`` (seconds) keeps the hours that end after it."""
        ru = schema.rollups
        q = sa.select(ru).order_by(ru.c.model, ru.c.version, ru.c.hour)
        if model is not None:
            q = q.where(ru.c.model == model)
        if since is not None:
            q = q.where(ru.c.hour >= int(since // 3600))
        return self._read(lambda conn: [
            {**r, "p95_ms": r["p95_weighted"] / r["calls"] if r["calls"] else None}
            for r in conn.execute(q).mappings()])

    def latency_percentiles(self, *, since: float) -> dict[tuple[str, str], dict[str, float]]:
        """{(model, version): {"p50": ..., "p95": ..., "p99": ...}} over telemetry_models p95 values
        since ``since`` (for /metrics). At most the newest ``_PERCENTILE_ROWS`` values count."""
        tm = schema.telemetry_models
        q = (sa.select(tm.c.model, tm.c.version, tm.c.p95_ms)
             .where(tm.c.at >= since, tm.c.p95_ms.is_not(None), tm.c.version.is_not(None))
             .order_by(tm.c.at.desc()).limit(_PERCENTILE_ROWS))

        def fn(conn: sa.Connection) -> dict[tuple[str, str], dict[str, float]]:
            values: dict[tuple[str, str], list[float]] = {}
            for model, version, p95 in conn.execute(q):
                values.setdefault((model, version), []).append(float(p95))
            out = {}
            for key, vs in sorted(values.items()):
                vs.sort()
                out[key] = {"p50": _percentile(vs, 0.50), "p95": _percentile(vs, 0.95), "p99": _percentile(vs, 0.99)}
            return out
        return self._read(fn)

    def expire_telemetry(self, *, before: float) -> int:
        """Delete raw telemetry, telemetry_models and events received before ``before``;
        rollups stay (and devices.last_telemetry). Returns rows deleted."""
        tm, e = schema.telemetry_models, schema.events

        def fn(conn: sa.Connection) -> int:
            old = sa.select(t.c.seq).where(t.c.device_id == tm.c.device_id, t.c.seq == tm.c.seq,
                                           t.c.received_at < before)
            n = conn.execute(sa.delete(tm).where(sa.exists(old))).rowcount
            n += conn.execute(sa.delete(t).where(t.c.received_at < before)).rowcount
            n += conn.execute(sa.delete(e).where(e.c.received_at < before)).rowcount
            return int(n)
        return self._write(fn)

    # -- commands ---------------------------------------------------------------------------

    def next_command(self, device_id: str, name: str, args: dict[str, Any], *, issued_by: str,
                     now: float) -> CommandRecord:
        """Allocate the device's next command seq (strictly greater than any before, also
        across replicas) and record the command as "sent".

        Raises:
            NotFound: no such device.
        """
        c = schema.commands

        def fn(conn: sa.Connection) -> CommandRecord:
            seq = conn.execute(sa.update(d).where(d.c.id == device_id).values(command_seq=d.c.command_seq + 1)
                               .returning(d.c.command_seq)).scalar()
            if seq is None:
                raise NotFound(f"no device {device_id!r}: cannot send it a command until it is registered")
            rec = CommandRecord(device_id=device_id, seq=int(seq), name=name, args=args, issued_at=now,
                                issued_by=issued_by, state="sent")
            conn.execute(sa.insert(c).values(device_id=device_id, seq=rec.seq, name=name, args=args,
                                             issued_at=now, issued_by=issued_by, state="sent"))
            return rec
        return self._write(fn)

    def record_reply(self, device_id: str, reply: dict[str, Any], *, now: float) -> bool:
        """Attach a ``Reply`` to its command (by seq): False when there is no such command or
        it already has a reply."""
        if reply.get("seq") is None:
            return False
        return self._write(lambda conn: self._record_reply(conn, device_id, reply, now))

    def _record_reply(self, conn: sa.Connection, device_id: str, reply: dict[str, Any], now: float) -> bool:
        seq = reply.get("seq")
        if seq is None:
            return False
        c = schema.commands
        return bool(conn.execute(
            sa.update(c).where(c.c.device_id == device_id, c.c.seq == int(seq), c.c.replied_at.is_(None))
            .values(state="ok" if reply.get("ok") else "failed", reply=reply, replied_at=now)).rowcount)

    def get_command(self, device_id: str, seq: int) -> CommandRecord:
        """Raises NotFound."""
        c = schema.commands

        def fn(conn: sa.Connection) -> CommandRecord:
            row = conn.execute(sa.select(c).where(c.c.device_id == device_id, c.c.seq == seq)).mappings().first()
            if row is None:
                raise NotFound(f"no command {seq} for device {device_id!r}")
            return CommandRecord(**row)
        return self._read(fn)

    # -- audit and counters -----------------------------------------------------------------

    def audit(self, actor: str, action: str, target: Optional[str] = None, detail: Optional[dict[str, Any]] = None,
              *, now: float) -> None:
        self._write(lambda conn: conn.execute(sa.insert(schema.audit).values(
            at=now, actor=actor, action=action, target=target, detail=detail)))

    def list_audit(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: {"id", "at", "actor", "action", "target", "detail"}."""
        au = schema.audit
        q = sa.select(au).order_by(au.c.at.desc(), au.c.id.desc()).limit(limit)
        return self._read(lambda conn: [dict(r) for r in conn.execute(q).mappings()])

    def counts(self) -> dict[str, Any]:
        """{"devices": n, "online": n, "rollouts": {state: n}, "telemetry": n, "events": n} (for /metrics)."""
        ro = schema.rollouts

        def fn(conn: sa.Connection) -> dict[str, Any]:
            devices, online = conn.execute(sa.select(
                sa.func.count(), sa.func.coalesce(sa.func.sum(sa.case((d.c.online, 1), else_=0)), 0))).one()
            states = dict(conn.execute(sa.select(ro.c.state, sa.func.count()).group_by(ro.c.state)).all())
            return {
                "devices": int(devices), "online": int(online),
                "rollouts": {s: int(states.get(s, 0)) for s in sorted(set(_ROLLOUT_STATES) | set(states))},
                "telemetry": int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()),
                "events": int(conn.execute(sa.select(sa.func.count()).select_from(schema.events)).scalar_one()),
            }
        return self._read(fn)

    def size_bytes(self) -> Optional[int]:
        """The database's size on disk (SQLite file(s) / pg_database_size), for the benchmark.
        None for an in-memory SQLite database."""
        if self._sqlite:
            path = self._url.database
            if not path or path == ":memory:":
                return None
            return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
        return int(self._read(lambda conn: conn.execute(
            sa.select(sa.func.pg_database_size(sa.func.current_database()))).scalar_one()))


# -- helpers --------------------------------------------------------------------------------

d = schema.devices
dg = schema.device_groups
t = schema.telemetry

_PG_SCHEMA_LOCK = 0x65646766  # "edgf": the advisory lock held while creating tables
_PERCENTILE_ROWS = 200_000
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ROLLOUT_STATES = ("pending", "running", "paused", "succeeded", "aborted")
_MOVING_STEPS = ("updating", "waiting", "reverting")
_ROLLOUT_FIELDS = frozenset(schema.rollouts.c.keys()) - {"id", "revision", "updated_at"}
_STEP_FIELDS = frozenset(schema.rollout_devices.c.keys()) - {"rollout_id", "device_id"}
_MIGRATION_FIELDS = frozenset(schema.migrations.c.keys()) - {"id", "revision", "updated_at", "created_at",
                                                             "created_by"}


class _Mismatch(Exception):
    """finish_upload's digest check failed: roll back, then drop the upload."""


def _active_conflict(model: str, rid: int, state: str) -> Conflict:
    return Conflict(f"rollout {rid} of {model} is {state}: wait for it to finish, or pause/abort it "
                    "(fleetctl rollout abort) before deploying another version")


def _active_index(exc: sa.exc.IntegrityError) -> bool:
    """Whether ``exc`` is ux_rollouts_active_model refusing a second active rollout of a model
    (PostgreSQL names the index; SQLite names the column)."""
    text = str(exc.orig)
    return "ux_rollouts_active_model" in text or "rollouts.model" in text


def _migration_conflict(model: str, source: str, mid: int, state: str) -> Conflict:
    return Conflict(f"migration {mid} of {model} for {source} is {state}: wait for it to finish "
                    "(fleetctl migrations show) or abort it before starting another")


def _migration_index(exc: sa.exc.IntegrityError) -> bool:
    """Whether ``exc`` is ux_migrations_active_workload refusing a second active migration."""
    text = str(exc.orig)
    return "ux_migrations_active_workload" in text or "migrations.model" in text


_TELEMETRY_HELD = sa.select(sa.literal_column("1")).select_from(t).where(
    t.c.device_id == sa.bindparam("device_id"), t.c.seq == sa.bindparam("seq"))
_TELEMETRY_INSERT = sa.insert(t)
_TELEMETRY_HELD_MANY = sa.select(t.c.device_id, t.c.seq).where(
    sa.tuple_(t.c.device_id, t.c.seq).in_(sa.bindparam("keys", expanding=True)))
# sorted, locked (PostgreSQL): replicas lock device rows in one order
_DEVICES_LOCKED = sa.select(d).where(d.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(d.c.id).with_for_update()
_DEVICE_TELEMETRY_UPDATE = sa.update(d).where(d.c.id == sa.bindparam("b_id")).values(
    last_seen=sa.bindparam("b_last_seen"), last_telemetry=sa.bindparam("b_last_telemetry", type_=d.c.last_telemetry.type),
    last_telemetry_seq=sa.bindparam("b_last_telemetry_seq"))


def _compare_and_set(conn: sa.Connection, table: sa.Table, row_id: int, revision: int, fields: dict[str, Any],
                     now: float, *, what: str, listing: str) -> None:
    """Set ``fields`` on the row when its revision is still ``revision``, bumping revision and
    updated_at (rollouts and migrations share this guard).

    Raises:
        NotFound: no such row. Conflict: the revision moved.
    """
    res = conn.execute(sa.update(table).where(table.c.id == row_id, table.c.revision == revision)
                       .values(**fields, revision=table.c.revision + 1, updated_at=now))
    if res.rowcount == 0:
        held = conn.execute(sa.select(table.c.revision).where(table.c.id == row_id)).scalar()
        if held is None:
            raise NotFound(f"no {what} {row_id}: {listing} shows the existing ones")
        raise Conflict(f"{what} {row_id} is at revision {held}, not {revision}: someone else "
                       "changed it; reload it and decide again")


def _inserted(conn: sa.Connection, stmt: Any) -> int:
    """Run ``INSERT ... ON CONFLICT DO NOTHING RETURNING 1``: 1 when the row went in, 0 when
    its key was held. (``rowcount`` is not reliable here: psycopg reports -1 through
    SQLAlchemy.)"""
    return int(conn.execute(stmt.on_conflict_do_nothing().returning(sa.literal_column("1"))).first() is not None)


def _safe(url: sa.engine.URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_engine(url: sa.engine.URL, *, create: bool) -> sa.engine.Engine:
    path = url.database or ""
    memory = path in ("", ":memory:")
    if not memory:
        parent = os.path.dirname(os.path.abspath(path))
        if create:
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"database {_safe(url)} is unavailable: cannot create {parent}: {exc}; "
                                       "pick a writable directory") from exc
        elif not os.path.exists(path):
            raise StoreUnavailable(f"database {_safe(url)} is unavailable: {path} does not exist; "
                                   "open it with create=True or point at the right file")
    kw: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    if memory:
        kw["poolclass"] = sa.pool.StaticPool
    engine = sa.create_engine(url, **kw)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _ts(value: Any, default: float) -> float:
    """A message's ``at`` (ISO 8601 text, or already seconds) as Unix seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _later(held: Optional[float], now: float) -> float:
    return now if held is None else max(held, now)


def _deltas(sample: dict[str, Any], prev: Optional[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per model of ``sample``: calls and errors since ``prev`` when it is the same boot's
    (a counter that went down restarted: it counts whole), else the whole counts."""
    same_boot = prev is not None and prev.get("boot_id") == sample.get("boot_id")
    before = (prev.get("models") or {}) if same_boot and prev is not None else {}
    out = {}
    for model, fig in (sample.get("models") or {}).items():
        calls, errors = int(fig.get("calls", 0)), int(fig.get("errors", 0))
        old = before.get(model)
        if old is not None:
            pc, pe = int(old.get("calls", 0)), int(old.get("errors", 0))
            calls = calls - pc if calls >= pc else calls
            errors = errors - pe if errors >= pe else errors
        out[model] = (calls, errors)
    return out


def _bucket(ups: dict[tuple[str, str, int], list[float]], model: str, version: Optional[str], at: float,
            calls: int, errors: int, p95: Optional[float], *, samples: int) -> None:
    acc = ups.setdefault((model, version or "", int(at // 3600)), [0, 0, 0.0, 0])
    acc[0] += calls
    acc[1] += errors
    acc[2] += (p95 or 0.0) * calls
    acc[3] += samples


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _device_record(row: sa.RowMapping, groups: tuple[str, ...]) -> DeviceRecord:
    return DeviceRecord(
        id=row["id"], registered_at=row["registered_at"], online=bool(row["online"]), groups=groups,
        boot_id=row["boot_id"], bd_seq=row["bd_seq"], state_at=row["state_at"], last_seen=row["last_seen"],
        runtime_version=row["runtime_version"], tier=row["tier"], capabilities=row["capabilities"],
        reported=row["reported"] or {}, reported_generation=row["reported_generation"],
        last_telemetry=row["last_telemetry"],
    )


class _PartWriter:
    """Re-cuts a byte stream into BLOB_PART_BYTES rows of blob_parts (a held part is kept)."""

    def __init__(self, conn: sa.Connection, insert: Any, sha256: str) -> None:
        self._conn, self._insert, self._sha = conn, insert, sha256
        self._buf = bytearray()
        self._idx = 0

    def add(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= schema.BLOB_PART_BYTES:
            self._flush(bytes(self._buf[:schema.BLOB_PART_BYTES]))
            del self._buf[:schema.BLOB_PART_BYTES]

    def close(self) -> None:
        if self._buf or self._idx == 0:  # an empty blob still has its part 0
            self._flush(bytes(self._buf))
            self._buf.clear()

    def _flush(self, data: bytes) -> None:
        self._conn.execute(self._insert(schema.blob_parts).values(sha256=self._sha, idx=self._idx, data=data)
                           .on_conflict_do_nothing())
        self._idx += 1
