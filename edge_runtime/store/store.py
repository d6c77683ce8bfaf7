"""``ModelStore``: the device's installed models on disk, shared safely between processes.

Owns the data dir (``layout.py``): the state file, the blobs and the lock. Every mutation
holds an exclusive ``flock`` on ``DATA_DIR/lock`` (the daemon and an ``edge-runtime`` CLI
may share one data dir) and replaces ``state.json`` atomically, so a crash leaves either
the old or the new state. The lock is re-entrant within one ``ModelStore`` object, so the
installer can hold it across a whole install while calling the methods here.

What changes and why is decided by the pure functions in ``state.py``; this module only
reads, applies and writes. It knows nothing of interpreters: ``activate`` and ``rollback``
here change which version the state calls active; ``installer.py`` also swaps the engine.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.durable import atomic_write_json, crashpoint, fsync_dir
from edge_runtime.errors import QuotaExceeded, StoreBusy, StoreCorrupt, StoreError, VersionNotFound
from edge_runtime.store.blobs import BlobStore
from edge_runtime.store.layout import BITMAP_SUFFIX, StoreLayout
from edge_runtime.store.state import (
    LastResult,
    ModelState,
    StoreState,
    dump_state,
    parse_state,
    referenced_blobs,
    rollback_target,
    state_problems,
    with_active,
)

DEFAULT_LOCK_TIMEOUT_S = 10.0
_LOCK_POLL_S = 0.02


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed."""

    blobs: tuple[str, ...] = ()
    tmp: tuple[str, ...] = ()
    freed_bytes: int = 0


@dataclass(frozen=True)
class ModelListing:
    """One row of ``edge-runtime models``."""

    name: str
    active: str | None
    previous: tuple[str, ...]
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    installing: dict[str, Any] | None = None
    last_result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "active": self.active,
            "previous": list(self.previous),
            "versions": self.versions,
            "installing": self.installing,
            "last_result": self.last_result,
        }


class ModelStore:
    """The persisted model store of one data dir."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        quota_bytes: int | None = None,
        keep_previous: int = 1,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        """Open (and create if needed) the store at ``data_dir``.

        Raises:
            ValueError: ``keep_previous`` < 1 or a negative quota.
            OSError: the directories cannot be created.
        """
        if keep_previous < 1:
            raise ValueError(f"keep_previous must be >= 1 (a rollback needs a version), got {keep_previous}")
        if quota_bytes is not None and quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0, got {quota_bytes}")
        self.layout = StoreLayout.at(data_dir)
        fresh = not (self.layout.blobs.is_dir() and self.layout.tmp.is_dir())
        self.layout.ensure()
        if fresh:  # new directories are durable only once their parents are fsynced
            for directory in (self.layout.blobs.parent, self.layout.root):
                fsync_dir(directory)
        self.blobs = BlobStore(self.layout)
        self.quota_bytes = quota_bytes
        self.keep_previous = keep_previous
        self.lock_timeout = lock_timeout
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    # -- locking ------------------------------------------------------------------------

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store's exclusive lock (re-entrant for this object and thread).

        Raises:
            StoreBusy: another process (or thread) held it for longer than ``timeout``.
        """
        wait = self.lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        if not self._thread_lock.acquire(timeout=max(wait, 0.0)):
            raise StoreBusy(f"store {self.layout.root} is busy in another thread of this process")
        try:
            if self._depth == 0:
                self._fd = self._flock(deadline, wait)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None
        finally:
            self._thread_lock.release()

    def holds_lock(self) -> bool:
        return self._depth > 0

    def _flock(self, deadline: float, wait: float) -> int:
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        raise StoreBusy(
                            f"store {self.layout.root} is locked by another process{holder}; "
                            f"gave up after {wait:g}s"
                        ) from None
                    time.sleep(_LOCK_POLL_S)  # flock has no timed wait; poll up to the deadline
            # Who holds it, for the next waiter's message; not durable, not needed to be.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- state --------------------------------------------------------------------------

    def read(self) -> StoreState:
        """The current state (an empty one if the store is new).

        Raises:
            StoreCorrupt: ``state.json`` cannot be parsed.
        """
        try:
            data = self.layout.state.read_bytes()
        except FileNotFoundError:
            return StoreState()
        return parse_state(data, where=str(self.layout.state))

    def revision(self) -> int:
        """The state's write counter; poll it to notice changes made by another process.

        Raises:
            StoreCorrupt: ``state.json`` cannot be parsed.
        """
        return self.read().revision

    def update(self, change: Callable[[StoreState], StoreState | None]) -> StoreState:
        """Apply ``change`` to a copy of the state and write the result atomically.

        ``change`` may edit the copy in place or return a new state. The revision goes up by
        one. Nothing is written if ``change`` raises or the result breaks an invariant.

        Raises:
            StoreBusy: the lock could not be taken.
            StoreCorrupt: the current state cannot be parsed.
            StoreError: the result is inconsistent (a bug in the caller).
            OSError: the write failed (the old state stays).
        """
        with self.lock():
            current = self.read()
            draft = current.model_copy(deep=True)
            result = change(draft)
            nxt = draft if result is None else result
            nxt.revision = current.revision + 1
            # Round-trip through validation: assignment on a pydantic model is not checked.
            data = dump_state(nxt)
            try:
                checked = StoreState.model_validate(data)
            except ValueError as exc:
                raise StoreError(f"refusing to write an invalid store state: {exc}") from exc
            problems = state_problems(checked)
            if problems:
                raise StoreError("refusing to write an inconsistent store state: " + "; ".join(problems))
            atomic_write_json(self.layout.state, data)
            return checked

    def update_model(self, name: str, change: Callable[[ModelState], ModelState]) -> StoreState:
        """``update`` of one model's record (created empty if new).

        Raises:
            as ``update``, plus whatever ``change`` raises (nothing is written then).
        """

        def apply(state: StoreState) -> None:
            state.models[name] = change(state.models.get(name) or ModelState())

        return self.update(apply)

    def model(self, name: str) -> ModelState:
        """The state of one model.

        Raises:
            VersionNotFound: the store holds no model of that name.
            StoreCorrupt: ``state.json`` cannot be parsed.
        """
        state = self.read()
        if name not in state.models:
            known = ", ".join(sorted(state.models)) or "none"
            raise VersionNotFound(f"no model {name!r} in the store (models: {known})")
        return state.models[name]

    def version_path(self, name: str, version: str) -> Path:
        """The blob file holding ``name`` ``version``.

        Raises:
            VersionNotFound: that version is not installed.
        """
        model = self.model(name)
        record = model.versions.get(version)
        if record is None:
            installed = ", ".join(sorted(model.versions)) or "none"
            raise VersionNotFound(f"model {name} has no version {version} (installed: {installed})")
        return self.blobs.path(record.sha256)

    # -- transitions --------------------------------------------------------------------

    def activate(self, name: str, version: str) -> str | None:
        """Make an installed version the active one (state only); return the one it replaced.

        Raises:
            VersionNotFound: the model or the version is not installed.
            StoreBusy: the lock could not be taken.
        """
        with self.lock():
            before = self.model(name).active
            self.update_model(name, lambda m: with_active(m, version, keep_previous=self.keep_previous))
            return before

    def rollback(self, name: str) -> str:
        """Make the most recent previous version active (state only); return it.

        The version rolled back from becomes the previous one, so a second rollback goes
        forward again and nothing is deleted.

        Raises:
            VersionNotFound: the model is unknown or has no previous version.
            StoreBusy: the lock could not be taken.
        """
        with self.lock():
            target = rollback_target(self.model(name), name=name)
            self.activate(name, target)
            return target

    def remove_model(self, name: str) -> bool:
        """Forget a model: its record goes (versions, result, any install), so ``gc`` frees
        its blobs and tmp files. True if there was one. The engine is the caller's: unload
        the model first, or the watcher of a serving daemon does it at its next sync.

        Raises:
            StoreBusy, OSError: as ``update``.
        """
        with self.lock():
            if name not in self.read().models:
                return False

            def drop(state: StoreState) -> None:
                state.models.pop(name, None)

            self.update(drop)
            crashpoint("store.model_removed")
            return True

    def record_result(self, name: str, result: LastResult) -> StoreState:
        """Remember how an install ended, and drop the model's in-progress record.

        Raises:
            StoreBusy, OSError: as ``update``.
        """

        def apply(m: ModelState) -> ModelState:
            return m.model_copy(update={"last_result": result, "install": None})

        return self.update_model(name, apply)

    # -- space --------------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Bytes left under the quota (None without a quota)."""
        if self.quota_bytes is None:
            return None
        return self.quota_bytes - self.blobs.usage_bytes()

    def check_quota(self, needed: int) -> None:
        """Make sure ``needed`` more bytes fit, collecting garbage first if they do not.

        Raises:
            QuotaExceeded: even after ``gc`` they do not fit; says needed vs free.
            StoreBusy: the lock could not be taken.
        """
        if self.quota_bytes is None:
            return
        free = self.free_bytes()
        if free is not None and needed <= free:
            return
        self.gc()
        free = self.free_bytes() or 0
        if needed > free:
            raise QuotaExceeded(
                f"needs {needed} bytes but only {max(free, 0)} of the {self.quota_bytes}-byte quota are free "
                f"(after removing unreferenced blobs)"
            )

    def gc(self) -> GcReport:
        """Remove blobs nothing references, stale ``tmp/`` files and torn state-write temps.

        Blobs of active and previous versions and of an in-progress install stay, as do the
        ``tmp/`` files of an in-progress install.

        Raises:
            StoreBusy: the lock could not be taken.
            StoreCorrupt: the state cannot be parsed (then nothing is removed).
        """
        with self.lock():
            state = self.read()
            refs = referenced_blobs(state)
            owned: set[str] = set()
            for model in state.models.values():
                if model.install is not None:
                    owned |= self.layout.owned_tmp_names(model.install.token)
            removed_blobs: list[str] = []
            removed_tmp: list[str] = []
            freed = 0
            for digest in self.blobs.list():
                if digest in refs:
                    continue
                freed += _size(self.blobs.path(digest))
                if self.blobs.delete(digest):
                    removed_blobs.append(digest)
                    crashpoint("gc.blob_removed")
            for path in [*self.blobs.tmp_files(), *self.layout.state_temps()]:
                if path.parent == self.layout.tmp and path.name in owned:
                    continue
                freed += _size(path)
                path.unlink(missing_ok=True)
                removed_tmp.append(path.name)
            if removed_blobs:
                fsync_dir(self.layout.blobs)
            if removed_tmp:
                fsync_dir(self.layout.tmp)
                fsync_dir(self.layout.root)
            return GcReport(blobs=tuple(removed_blobs), tmp=tuple(removed_tmp), freed_bytes=freed)

    # -- inspection ---------------------------------------------------------------------

    def fsck(self) -> list[str]:
        """Check the store; return its problems (empty when healthy).

        Checks: the state parses and is consistent; every active and previous version's blob
        exists with the recorded size and sha256; every file under ``blobs/`` holds the bytes
        its name says (nothing half-written); no install was left half-done; no stale temp.

        Raises:
            StoreBusy: the lock could not be taken (someone is changing the store).
        """
        with self.lock():
            try:
                state = self.read()
            except StoreCorrupt as exc:
                return [str(exc)]
            problems = list(state_problems(state))
            checked: dict[str, str | None] = {}

            def verify(digest: str, size: int | None) -> str | None:
                if digest not in checked:
                    try:
                        self.blobs.verify(digest, size=size)
                        checked[digest] = None
                    except StoreCorrupt as exc:
                        checked[digest] = str(exc)
                return checked[digest]

            owned: set[str] = set()
            for name, model in sorted(state.models.items()):
                for version, record in sorted(model.versions.items()):
                    error = verify(record.sha256, record.size)
                    if error:
                        problems.append(f"model {name} version {version}: {error}")
                if model.install is not None:
                    owned |= self.layout.owned_tmp_names(model.install.token)
                    part = self.layout.part(model.install.token)
                    if model.install.state == "downloading" and part.with_name(part.name + BITMAP_SUFFIX).exists():
                        continue  # a chunked download the agent resumes: in progress, not damage
                    problems.append(
                        f"model {name}: install of version {model.install.version} was interrupted in state "
                        f"{model.install.state!r} (start-up recovery finishes it)"
                    )
            for digest in self.blobs.list():
                error = verify(digest, None)
                if error:
                    problems.append(error)
            for stray in self.blobs.strays():
                problems.append(f"{stray}: not a blob (blob files are named by their sha256)")
            for path in self.blobs.tmp_files():
                if path.name not in owned:
                    problems.append(f"{path}: stale partial file (gc removes it)")
            for path in self.layout.state_temps():
                problems.append(f"{path}: torn state write (gc removes it)")
            return problems

    def models(self) -> list[ModelListing]:
        """Every model with its versions, for ``edge-runtime models``.

        Raises:
            StoreCorrupt: ``state.json`` cannot be parsed.
        """
        out: list[ModelListing] = []
        for name, model in sorted(self.read().models.items()):
            versions = {
                v: {"sha256": r.sha256, "size": r.size, "installed_at": r.installed_at.isoformat()}
                for v, r in sorted(model.versions.items())
            }
            installing = None
            if model.install is not None:
                installing = {
                    "version": model.install.version,
                    "state": model.install.state,
                    "attempts": model.install.attempts,
                }
            out.append(
                ModelListing(
                    name=name,
                    active=model.active,
                    previous=tuple(model.previous),
                    versions=versions,
                    installing=installing,
                    last_result=model.last_result.model_dump(mode="json") if model.last_result else None,
                )
            )
        return out

    def referenced(self) -> set[str]:
        """Digests the state still needs.

        Raises:
            StoreCorrupt: ``state.json`` cannot be parsed.
        """
        return referenced_blobs(self.read())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


__all__ = ["GcReport", "ModelListing", "ModelStore"]
