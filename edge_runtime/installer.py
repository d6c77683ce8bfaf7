"""The installer: drives a model version through the persisted install state machine.

    downloading → verifying → staged → loading → health_check → active | rolled_back

Each state is written to ``state.json`` *before* its action runs (Mender's write-ahead
state data), so a crash at any instant leaves a record naming the first action that may not
have finished; ``recover`` at start-up looks it up in ``store.recovery`` and redoes or undoes
it. The switch itself is one atomic state write (active ← new, previous ← old), and only
after it does the engine start serving the new version; until then the old one serves.

What each step does:
    downloading   copy the bytes into ``tmp/`` (cut off past the expected size or the quota)
    verifying     sha256 and size against the expectation, then ``inspect_model`` (not
                  TFLite, truncated, unknown op → refused, nothing changes), then the bytes
                  become a blob
    staged        verified and stored, not yet loaded
    loading       ``engine.load`` (built and warmed, not serving); bumps ``attempts`` first
    health_check  the install's ``HealthCheck`` (default: zeros in, finite out)
    active        committed; the engine swaps to it; the record is then dropped
    rolled_back   load or check failed (or a crash loop): the old version still serves

Crash points (``durable.crashpoint``) sit between the steps and are named after the state
just made durable: ``install.<state>``, plus ``install.begin``, ``install.downloaded``,
``install.promoted``, ``install.loaded``, ``install.healthy``, ``install.activated``,
``install.done``, ``install.rollback_done``, ``install.abandoned`` (a transfer given up by
``abandon_download``), and ``activate.*`` / ``rollback.*`` for switches.

A chunked transfer (``agent/transfer.py``) fills the part of a ``downloading`` record and
keeps its chunk bitmap beside it. ``recover(keep_downloads=True)`` leaves such a record, its
part and its bitmap alone, so the agent can continue the transfer after a restart
(``pending_downloads``), then finish it with ``install_downloaded`` or end it with
``abandon_download``.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from edge_runtime.durable import crashpoint
from edge_runtime.engine import Engine, inspect_model
from edge_runtime.errors import (
    HashMismatch,
    HealthCheckFailed,
    InstallError,
    ModelFileError,
    ModelNotFound,
    ModelUnavailable,
    QuotaExceeded,
    StoreCorrupt,
    VersionNotFound,
)
from edge_runtime.health import HealthCheck
from edge_runtime.store.blobs import BlobInfo, check_expected, file_chunks, hash_file
from edge_runtime.store.layout import BITMAP_SUFFIX, is_sha256_hex
from edge_runtime.store.recovery import DEFAULT_MAX_ATTEMPTS, Step, plan_recovery
from edge_runtime.store.state import (
    InstallRecord,
    LastResult,
    ModelState,
    VersionRecord,
    rollback_target,
    valid_model_name,
    valid_version,
    with_active,
)
from edge_runtime.store.store import ModelStore

log = logging.getLogger(__name__)

EventCallback = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class InstallResult:
    """A version that is now active (failures raise instead)."""

    name: str
    version: str
    outcome: str  # "active", or "already_active" when nothing needed doing
    sha256: str
    size: int
    replaced: str | None  # the version that was active before
    figures: dict[str, Any] = field(default_factory=dict)  # from the health check
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "outcome": self.outcome,
            "sha256": self.sha256,
            "size": self.size,
            "replaced": self.replaced,
            "figures": self.figures,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class RecoveryAction:
    """One thing ``recover`` (or ``load_all``) did."""

    name: str
    version: str | None
    found: str | None  # the install state found at start-up; None for a plain load
    step: str  # a recovery Step value, or "load"
    # active | rolled_back | interrupted | resumable | finished | loaded | fallback | unavailable
    outcome: str
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "found": self.found,
            "step": self.step,
            "outcome": self.outcome,
            "detail": self.detail,
        }


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Installer:
    """Installs, switches and recovers model versions of one store, served by one engine."""

    def __init__(
        self,
        store: ModelStore,
        engine: Engine,
        *,
        on_event: EventCallback | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """
        ``on_event(name, state, details)`` is called at every step (progress for the agent);
        an exception it raises is logged and ignored. ``max_attempts`` caps how often an
        install that keeps killing the process is retried at start-up.

        Raises:
            ValueError: ``max_attempts`` < 1.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.store = store
        self.engine = engine
        self.on_event = on_event
        self.max_attempts = max_attempts
        self.clock = clock

    # -- installing ---------------------------------------------------------------------

    def install_file(
        self,
        name: str,
        version: str,
        path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        health: HealthCheck | None = None,
    ) -> InstallResult:
        """Install the model file at ``path`` as ``name`` ``version`` and make it active.

        Raises:
            InstallError: refused (``reason``: invalid_request, install_in_progress,
                quota_exceeded, hash_mismatch, invalid_model, version_conflict) — nothing
                changed but the recorded last result — or rolled back (load_failed); the old
                version still serves.
            HealthCheckFailed: the new version failed its check; rolled back, old one serves.
            StoreBusy: another process holds the store lock.
            OSError: ``path`` cannot be read, or the disk failed.
        """
        start = time.perf_counter()
        _check_request(name, version, expected_sha256)
        source_size = os.stat(path).st_size
        with self.store.lock():
            done = self._already_active(name, version, expected_sha256, start)
            if done is not None:
                return done
            part = self.begin_download(
                name,
                version,
                expected_sha256=expected_sha256,
                expected_size=expected_size,
                health=health,
                size_hint=source_size,
            )
            record = self._record(name)
            try:
                info = self.store.blobs.write_part(
                    part,
                    file_chunks(path),
                    expected_size=expected_size,
                    quota_free=self.store.free_bytes(),
                )
            except (HashMismatch, QuotaExceeded) as exc:
                self._refuse(name, version, record, _reason_of(exc), exc)
            crashpoint("install.downloaded")
            return self._verify_and_commit(name, record, info, start)

    def begin_download(
        self,
        name: str,
        version: str,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        health: HealthCheck | None = None,
        size_hint: int | None = None,
    ) -> Path:
        """Start an install: record it as ``downloading`` and return where its bytes go.

        For a transfer that writes the file itself (then calls ``install_downloaded``).
        ``size_hint`` (or ``expected_size``) is checked against the quota up front.

        Raises:
            InstallError: invalid_request, install_in_progress, version_conflict or
                quota_exceeded (nothing written but the last result).
            StoreBusy: another process holds the store lock.
        """
        _check_request(name, version, expected_sha256)
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.lower()
        with self.store.lock():
            crashpoint("install.begin")
            model = self._model(name)
            if model.install is not None:
                raise InstallError(
                    f"{name}: an install of version {model.install.version} is already in progress "
                    f"(state {model.install.state}); start-up recovery finishes interrupted ones",
                    reason="install_in_progress",
                )
            held = model.versions.get(version)
            if held is not None and expected_sha256 is not None and held.sha256 != expected_sha256:
                self._refuse(
                    name,
                    version,
                    None,
                    "version_conflict",
                    InstallError(
                        f"{name} {version} is installed with sha256 {held.sha256}, not {expected_sha256}; "
                        "a version's bytes never change",
                        reason="version_conflict",
                    ),
                )
            needed = expected_size if expected_size is not None else (size_hint or 0)
            if expected_sha256 is not None and self.store.blobs.has(expected_sha256):
                needed = 0  # content-addressed: the bytes are already here
            try:
                self.store.check_quota(needed)
            except QuotaExceeded as exc:
                self._refuse(name, version, None, "quota_exceeded", exc)
            token = secrets.token_hex(8)
            if health is not None:
                # Saved before the record points at it: recovery re-runs this same check.
                health.save(self.store.layout.health(token))
            record = InstallRecord(
                version=version,
                token=token,
                sha256=expected_sha256,
                size=expected_size,
                state="downloading",
                attempts=0,
                started_at=self.clock(),
                health=health is not None,
            )
            self._write_record(name, record)
            crashpoint("install.downloading")
            self._emit(name, "downloading", {"version": version, "size": expected_size})
            return self.store.layout.part(token)

    def install_downloaded(self, name: str, version: str) -> InstallResult:
        """Continue an install whose bytes ``begin_download``'s caller has written.

        Raises:
            InstallError, HealthCheckFailed, StoreBusy: as ``install_file``; also
                ``no_download`` if no download of this version is in progress.
        """
        start = time.perf_counter()
        with self.store.lock():
            record = self._model(name).install
            if record is None or record.version != version or record.state != "downloading":
                found = f"{record.version} in state {record.state}" if record else "none"
                raise InstallError(
                    f"{name}: no download of version {version} is in progress (found: {found})",
                    reason="no_download",
                )
            part = self.store.layout.part(record.token)
            try:
                sha, size = hash_file(part)
            except FileNotFoundError as exc:
                self._refuse(name, version, record, "interrupted", exc)
            return self._verify_and_commit(name, record, BlobInfo(sha256=sha, size=size, path=part), start)

    def install_blob(
        self, name: str, version: str, sha256: str, *, health: HealthCheck | None = None
    ) -> InstallResult:
        """Install a blob already in the store as ``name`` ``version`` (starts at verifying).

        The blob is re-hashed and inspected like fresh bytes. If nothing else references it
        and a crash interrupts the install before ``staged``, start-up GC removes it.

        Raises:
            VersionNotFound: the store holds no blob ``sha256``.
            InstallError, HealthCheckFailed, StoreBusy: as ``install_file``.
        """
        start = time.perf_counter()
        _check_request(name, version, sha256)
        sha256 = sha256.lower()
        with self.store.lock():
            done = self._already_active(name, version, sha256, start)
            if done is not None:
                return done
            if not self.store.blobs.has(sha256):
                raise VersionNotFound(f"the store holds no blob {sha256}")
            self.begin_download(name, version, expected_sha256=sha256, health=health, size_hint=0)
            record = self._record(name)
            try:
                self.store.blobs.verify(sha256)
            except StoreCorrupt as exc:
                self._refuse(name, version, record, "hash_mismatch", exc)
            path = self.store.blobs.path(sha256)
            info = BlobInfo(sha256=sha256, size=path.stat().st_size, path=path)
            return self._verify_and_commit(name, record, info, start)

    # -- switching ----------------------------------------------------------------------

    def activate_version(self, name: str, version: str) -> str | None:
        """Serve an installed version of ``name``; return the version it replaced.

        Loads (and warms) it first; the state switches only once it is loaded, and the
        engine only once the state has switched.

        Raises:
            VersionNotFound: the model or the version is not installed.
            StoreCorrupt: its blob is missing or damaged (nothing changed).
            InstallError: ``load_failed`` (nothing changed).
            StoreBusy: another process holds the store lock.
        """
        return self._switch(name, version, label="activate")

    def rollback(self, name: str) -> str:
        """Serve the previous version of ``name`` again; return it.

        The version rolled back from becomes the previous one (a second rollback undoes the
        first).

        Raises:
            VersionNotFound: no such model, or it has no previous version.
            StoreCorrupt, InstallError, StoreBusy: as ``activate_version``.
        """
        with self.store.lock():
            target = rollback_target(self.store.model(name), name=name)
            self._switch(name, target, label="rollback")
            return target

    def _switch(self, name: str, version: str, *, label: str) -> str | None:
        with self.store.lock():
            crashpoint(f"{label}.begin")
            path = self.store.version_path(name, version)
            record = self.store.model(name).versions[version]
            self.store.blobs.verify(record.sha256, size=record.size)
            try:
                loaded = self.engine.load(name, version, path)
            except Exception as exc:  # the interpreter's failures are not all ours to name
                raise InstallError(f"{name} {version}: cannot load: {exc}", reason="load_failed") from exc
            crashpoint(f"{label}.loaded")
            replaced = self.store.activate(name, version)
            crashpoint(f"{label}.committed")
            self.engine.activate(loaded)
            crashpoint(f"{label}.done")
            self._emit(name, "active", {"version": version, "replaced": replaced, "via": label})
            return replaced

    # -- start-up -----------------------------------------------------------------------

    def recover(self, *, keep_downloads: bool = False) -> list[RecoveryAction]:
        """Finish or undo every install a crash interrupted, then load every active version.

        Runs ``store.recovery.plan_recovery`` for each model's in-progress record; failures
        of a retried install end as recorded rollbacks, not exceptions. With
        ``keep_downloads`` (the agent, which resumes chunked transfers), a ``downloading``
        record with an expected sha256 whose part has a chunk bitmap is kept as it is, with
        its part and bitmap (step ``resume``, outcome ``resumable``); every other
        interrupted download is cleaned up.

        Raises:
            StoreBusy: another process holds the store lock.
            StoreCorrupt: the state file cannot be parsed.
        """
        actions: list[RecoveryAction] = []
        with self.store.lock():
            crashpoint("recover.begin")
            for name, model in sorted(self.store.read().models.items()):
                record = model.install
                resumable = (
                    keep_downloads
                    and record is not None
                    and record.state == "downloading"
                    and record.sha256 is not None
                    and self._bitmap(record).exists()
                )
                plan = plan_recovery(record, max_attempts=self.max_attempts, resumable=resumable)
                if plan.step is Step.NOTHING or record is None:
                    continue
                action = self._recover_one(name, record, plan.step, plan.reason)
                actions.append(action)
                self._emit(name, "recovered", action.to_dict())
            self.store.gc()
            crashpoint("recover.done")
            actions.extend(self.load_all())
        return actions

    def _recover_one(self, name: str, record: InstallRecord, step: Step, reason: str | None) -> RecoveryAction:
        def action(outcome: str, detail: str | None = None) -> RecoveryAction:
            return RecoveryAction(name, record.version, record.state, step.value, outcome, detail)

        if step is Step.RESUME:  # the transfer goes on; nothing to undo
            return action("resumable")
        if step is Step.CLEAN_UP:
            detail = f"interrupted in state {record.state} before the bytes were verified"
            self.store.record_result(name, self._result(record.version, "interrupted", "interrupted", detail))
            crashpoint("recover.cleaned")
            self._remove_tmp(record)
            return action("interrupted", detail)
        if step is Step.RETRY:
            try:
                self._load_and_commit(name, time.perf_counter(), verify_blob=True)
            except InstallError as exc:
                return action("rolled_back", f"{exc.reason}: {exc}")
            return action("active")
        if step is Step.ROLL_BACK:
            detail = f"the process died {record.attempts} times while loading or checking it"
            self._roll_back(name, record, reason or "crash_loop", detail)
            return action("rolled_back", f"{reason}: {detail}")
        self._finish(name)
        return action("finished")

    def pending_downloads(self) -> list[tuple[str, InstallRecord]]:
        """The (model name, install record) of every install in ``downloading``, by name.

        Raises:
            StoreCorrupt: the state file cannot be parsed.
        """
        models = self.store.read().models
        return [
            (name, m.install)
            for name, m in sorted(models.items())
            if m.install is not None and m.install.state == "downloading"
        ]

    def abandon_download(self, name: str, version: str, *, reason: str, detail: str | None = None) -> bool:
        """Give up the download of ``name`` ``version``: record it as refused with ``reason``
        (a token such as ``transfer_timeout``, ``cancelled``, ``hash_mismatch``), drop the
        install record and remove its files (part, chunk bitmap, health check).

        Returns False, changing nothing, unless the model's install record is a
        ``downloading`` one for ``version``.

        Raises:
            StoreBusy: another process holds the store lock.
            StoreCorrupt: the state file cannot be parsed.
        """
        with self.store.lock():
            record = self._model(name).install
            if record is None or record.version != version or record.state != "downloading":
                return False
            self._end_refused(name, version, record, reason, detail or f"download abandoned ({reason})",
                              crash_at="install.abandoned")
            return True

    def load_all(self) -> list[RecoveryAction]:
        """Make the engine serve every model the store has an active version for.

        Each model goes through ``load_active``: verified bytes only, the newest previous
        version that still verifies if the active one is damaged, else unavailable with the
        reasons. Problems are reported in the returned actions, never raised, so one bad
        model does not stop the others from serving.

        Raises:
            StoreCorrupt: the state file cannot be parsed.
        """
        actions: list[RecoveryAction] = []
        for name, model in sorted(self.store.read().models.items()):
            action = self.load_active(name, model)
            if action is not None:
                actions.append(action)
        return actions

    def load_active(self, name: str, model: ModelState | None = None) -> RecoveryAction | None:
        """Serve ``name``'s active version — only if its blob still has the installed bytes.

        If the active version's blob is missing or damaged, or will not load, serve the
        newest previous version that verifies and loads (an offline device keeps working);
        if none does, unload the model and mark it unavailable with the reasons (calls get
        503). The store is never changed here: what to do about damage is the operator's or
        the agent's decision (``fsck`` reports it). Returns None when the engine already
        serves the active version from its blob, or the store has no active version.

        Raises:
            StoreCorrupt: the state file cannot be parsed (only when ``model`` is None).
        """
        if model is None:
            model = self.store.read().models.get(name)
        if model is None or model.active is None or model.active not in model.versions:
            return None
        try:
            current = self.engine.get(name)
        except (ModelNotFound, ModelUnavailable):  # not serving (yet)
            current = None
        active_path = self.store.blobs.path(model.versions[model.active].sha256)
        if current is not None and current.version == model.active and Path(current.path) == active_path:
            return None
        problems: list[str] = []
        candidates = [model.active] + [v for v in model.previous if v in model.versions]
        for version in candidates:
            record = model.versions[version]
            try:
                # Bytes reach this process's interpreter only if they are the ones installed.
                self.store.blobs.verify(record.sha256, size=record.size)
                loaded = self.engine.load(name, version, self.store.blobs.path(record.sha256))
            except Exception as exc:  # a damaged or unloadable version: try the next one
                problems.append(f"version {version}: {exc}")
                log.error("cannot serve %s version %s: %s", name, version, exc)
                continue
            self.engine.activate(loaded)
            if version == model.active:
                return RecoveryAction(name, version, None, "load", "loaded")
            detail = "; ".join(problems)
            log.error("%s: active version %s is unusable; serving previous version %s", name, model.active, version)
            self._emit(name, "fallback", {"version": version, "active": model.active, "detail": detail})
            return RecoveryAction(name, version, None, "load", "fallback", detail)
        detail = "; ".join(problems) + " (reinstall the model)"
        self.engine.unload(name)
        self.engine.mark_unavailable(name, detail)
        self._emit(name, "unavailable", {"active": model.active, "detail": detail})
        return RecoveryAction(name, model.active, None, "load", "unavailable", detail)

    # -- the state machine --------------------------------------------------------------

    def _verify_and_commit(self, name: str, record: InstallRecord, info: BlobInfo, start: float) -> InstallResult:
        version = record.version
        record = record.model_copy(update={"state": "verifying"})
        self._write_record(name, record)
        crashpoint("install.verifying")
        self._emit(name, "verifying", {"version": version})
        try:
            check_expected(info, expected_sha256=record.sha256, expected_size=record.size)
        except HashMismatch as exc:
            self._refuse(name, version, record, "hash_mismatch", exc)
        held = self._model(name).versions.get(version)
        if held is not None and held.sha256 != info.sha256:
            self._refuse(
                name,
                version,
                record,
                "version_conflict",
                InstallError(
                    f"{name} {version} is installed with sha256 {held.sha256}, these bytes are {info.sha256}; "
                    "a version's bytes never change",
                    reason="version_conflict",
                ),
            )
        try:
            signature = inspect_model(str(info.path), backend=self.engine.backend)
        except ModelFileError as exc:
            self._refuse(name, version, record, "invalid_model", exc)
        if info.path != self.store.blobs.path(info.sha256):
            self.store.blobs.promote(info.path, info.sha256)
        crashpoint("install.promoted")
        record = record.model_copy(
            update={"state": "staged", "sha256": info.sha256, "size": info.size, "signature": signature.to_dict()}
        )
        self._write_record(name, record)
        crashpoint("install.staged")
        self._emit(name, "staged", {"version": version, "sha256": info.sha256, "size": info.size})
        return self._load_and_commit(name, start)

    def _load_and_commit(self, name: str, start: float, *, verify_blob: bool = False) -> InstallResult:
        """From staged (or a crash in loading/health_check) to active, or to rolled back."""
        record = self._record(name)
        version = record.version
        assert record.sha256 is not None and record.size is not None  # set when staged
        record = record.model_copy(update={"state": "loading", "attempts": record.attempts + 1, "error": None})
        self._write_record(name, record)
        crashpoint("install.loading")
        self._emit(name, "loading", {"version": version, "attempt": record.attempts})
        try:
            if verify_blob:  # after a crash: trust nothing we did not write durably
                self.store.blobs.verify(record.sha256, size=record.size)
            loaded = self.engine.load(name, version, self.store.blobs.path(record.sha256))
        except Exception as exc:  # any load failure rolls back; the old version serves on
            detail = f"{name} {version}: cannot load: {exc}"
            self._roll_back(name, record, "load_failed", detail)
            raise InstallError(detail, reason="load_failed") from exc
        crashpoint("install.loaded")

        record = record.model_copy(update={"state": "health_check"})
        self._write_record(name, record)
        crashpoint("install.health_check")
        self._emit(name, "health_check", {"version": version})
        try:
            figures = self._health_of(record).run(loaded)
        except HealthCheckFailed as exc:
            self._roll_back(name, record, "health_check_failed", str(exc), figures=exc.figures)
            raise
        crashpoint("install.healthy")

        # The commit: one atomic write makes the new version active and the old one previous.
        replaced = self._model(name).active
        version_record = VersionRecord(
            sha256=record.sha256, size=record.size, installed_at=self.clock(), signature=record.signature
        )
        result = self._result(version, "active", None, None)
        committed = record.model_copy(update={"state": "active"})

        def commit(m: ModelState) -> ModelState:
            m = with_active(m, version, keep_previous=self.store.keep_previous, record=version_record)
            return m.model_copy(update={"install": committed, "last_result": result})

        self.store.update_model(name, commit)
        crashpoint("install.committed")
        self.engine.activate(loaded)
        crashpoint("install.activated")
        self._emit(name, "active", {"version": version, "replaced": replaced, "figures": figures})
        self._finish(name)
        crashpoint("install.done")
        return InstallResult(
            name=name,
            version=version,
            outcome="active",
            sha256=record.sha256,
            size=record.size,
            replaced=replaced,
            figures=figures,
            seconds=time.perf_counter() - start,
        )

    def _roll_back(
        self,
        name: str,
        record: InstallRecord,
        reason: str,
        detail: str,
        *,
        figures: dict[str, Any] | None = None,
    ) -> None:
        """Give up on the install: record it, leave the old version active, clean up."""
        rolled = record.model_copy(update={"state": "rolled_back", "error": f"{reason}: {detail}"})
        result = self._result(record.version, "rolled_back", reason, detail)
        self.store.update_model(name, lambda m: m.model_copy(update={"install": rolled, "last_result": result}))
        crashpoint("install.rolled_back")
        self._emit(name, "rolled_back", {"version": record.version, "reason": reason, "figures": figures or {}})
        self._finish(name)
        crashpoint("install.rollback_done")

    def _finish(self, name: str) -> None:
        """Bookkeeping after a decision: drop the record and its tmp files, collect garbage."""
        record = self._model(name).install
        if record is not None:
            self.store.update_model(name, lambda m: m.model_copy(update={"install": None}))
            self._remove_tmp(record)
        self.store.gc()

    def _refuse(
        self, name: str, version: str, record: InstallRecord | None, reason: str, exc: BaseException
    ) -> NoReturn:
        """End an install that changed nothing: record why, remove its files, raise."""
        self._end_refused(name, version, record, reason, str(exc))
        if isinstance(exc, InstallError):
            raise exc
        raise InstallError(f"{name} {version} refused ({reason}): {exc}", reason=reason) from exc

    def _end_refused(
        self,
        name: str,
        version: str,
        record: InstallRecord | None,
        reason: str,
        detail: str,
        *,
        crash_at: str | None = None,
    ) -> None:
        """Record the refusal (which drops the install record), remove its files, emit."""
        self.store.record_result(name, self._result(version, "refused", reason, detail))
        if crash_at is not None:
            crashpoint(crash_at)
        if record is not None:
            self._remove_tmp(record)
        self._emit(name, "refused", {"version": version, "reason": reason, "detail": detail})

    # -- small helpers ------------------------------------------------------------------

    def _already_active(
        self, name: str, version: str, sha256: str | None, start: float
    ) -> InstallResult | None:
        model = self._model(name)
        record = model.versions.get(version)
        if model.active != version or record is None or sha256 is None or record.sha256 != sha256.lower():
            return None
        if model.install is not None:
            return None
        return InstallResult(
            name=name,
            version=version,
            outcome="already_active",
            sha256=record.sha256,
            size=record.size,
            replaced=None,
            seconds=time.perf_counter() - start,
        )

    def _health_of(self, record: InstallRecord) -> HealthCheck:
        if not record.health:
            return HealthCheck()
        path = self.store.layout.health(record.token)
        try:
            return HealthCheck.load(path)
        except (OSError, ValueError) as exc:
            raise HealthCheckFailed(
                f"{record.version}: the saved health check {path} is unreadable: {exc}",
                figures={"error": str(exc)},
            ) from exc

    def _model(self, name: str) -> ModelState:
        return self.store.read().models.get(name) or ModelState()

    def _record(self, name: str) -> InstallRecord:
        record = self._model(name).install
        if record is None:
            raise StoreCorrupt(f"{name}: the in-progress install record vanished")
        return record

    def _write_record(self, name: str, record: InstallRecord) -> None:
        self.store.update_model(name, lambda m: m.model_copy(update={"install": record}))

    def _remove_tmp(self, record: InstallRecord) -> None:
        """Remove the install's files under tmp/: part, chunk bitmap, health check."""
        for file_name in sorted(self.store.layout.owned_tmp_names(record.token)):
            (self.store.layout.tmp / file_name).unlink(missing_ok=True)

    def _bitmap(self, record: InstallRecord) -> Path:
        """The chunk bitmap a transfer keeps beside the install's part (``agent/transfer.py``)."""
        part = self.store.layout.part(record.token)
        return part.with_name(part.name + BITMAP_SUFFIX)

    def _result(self, version: str, outcome: str, reason: str | None, detail: str | None) -> LastResult:
        return LastResult(version=version, outcome=outcome, reason=reason, detail=detail, at=self.clock())

    def _emit(self, name: str, state: str, details: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, state, details)
        except Exception:  # a broken listener must not break an install
            log.exception("on_event callback failed for %s %s", name, state)


def _check_request(name: str, version: str, sha256: str | None = None) -> None:
    """Refuse arguments no install could succeed with, before anything is written."""
    if not valid_model_name(name):
        raise InstallError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
            reason="invalid_request",
        )
    if not valid_version(version):
        raise InstallError(
            f"invalid version {version!r}: use letters, digits, '.', '_', '+' or '-' (at most 64)",
            reason="invalid_request",
        )
    if sha256 is not None and not is_sha256_hex(sha256.lower()):
        raise InstallError(f"invalid sha256 {sha256!r}: expected 64 hex digits", reason="invalid_request")


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, QuotaExceeded):
        return "quota_exceeded"
    if isinstance(exc, HashMismatch):
        return "hash_mismatch"
    return "invalid_model"


__all__ = ["EventCallback", "InstallResult", "Installer", "RecoveryAction"]
