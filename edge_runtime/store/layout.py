"""Every file the model store persists under the device data dir, and the paths to them.

This is the one place that names them (STYLE.md #6); nothing else builds a path inside the
data dir by hand.

    DATA_DIR/state.json                     the store state (see ``state.py``), replaced atomically
    DATA_DIR/.state.json.<random>.tmp       a state write in flight; a SIGKILL between write and
                                            rename leaves one behind, ``gc`` removes it
    DATA_DIR/lock                           ``flock``-ed exclusively by whoever mutates the store;
                                            holds the holder's pid, for the ``StoreBusy`` message
    DATA_DIR/blobs/sha256/<hex>             one model file, named by the sha256 of its bytes; a
                                            file appears here only by rename, complete and checked
    DATA_DIR/tmp/<token>.part               the bytes of an install in progress (never a blob)
    DATA_DIR/tmp/<token>.health.npz         the health check of that install, kept so that
                                            recovery after a crash re-runs the same check
    DATA_DIR/tmp/*                          anything else there is stale and ``gc`` removes it
    DATA_DIR/trust/state.json               the trusted root envelope + floors (root version,
                                            generation, seq, highest time seen); owned and
                                            written atomically by ``protocol/trust_store.py``
    DATA_DIR/run/api.sock                   the fast-path socket (0660), owned by ``api/fastpath.py``
    DATA_DIR/outbox.db (+ -wal, -shm)       telemetry/event outbox and the persisted seq counters:
                                            SQLite WAL, synchronous=FULL, user_version 1; owned by
                                            ``agent/outbox.py``
    DATA_DIR/outbox.db.corrupt-<UTC>[-wal|-shm]  a corrupt outbox set aside at start-up (kept for
                                            inspection; nothing removes it yet)
    DATA_DIR/tmp/<token>.part.bitmap        the chunk bitmap of a transfer in progress, owned by
                                            ``agent/transfer.py``; gc spares it while the install
                                            record that owns the token exists

Format history of ``state.json`` (``STATE_FORMAT``):
    1  first format: per model active, previous, version records, last install result and at
       most one in-progress install record; a ``revision`` counter bumped on every write.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

STATE_FORMAT = 1
FORMAT_HISTORY: dict[int, str] = {
    1: "active/previous/versions/last_result/install per model; revision counter",
}

STATE_FILE = "state.json"
LOCK_FILE = "lock"
BLOBS_DIR = "blobs"
BLOB_ALGO = "sha256"
TMP_DIR = "tmp"
PART_SUFFIX = ".part"
HEALTH_SUFFIX = ".health.npz"
# A resumable transfer's chunk bitmap sits beside its part: <token>.part.bitmap.
BITMAP_SUFFIX = ".bitmap"

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
# What durable.atomic_write_bytes leaves behind if killed before its rename.
_STATE_TEMP_RE = re.compile(r"^\.state\.json\..+\.tmp$")


def is_sha256_hex(text: str) -> bool:
    """True for a lowercase 64-digit hex sha256, the only name a blob file may have."""
    return bool(_HEX_RE.match(text))


@dataclass(frozen=True)
class StoreLayout:
    """The paths of one data dir. Pure: building one touches no file."""

    root: Path

    @classmethod
    def at(cls, data_dir: str | os.PathLike[str]) -> StoreLayout:
        return cls(root=Path(data_dir))

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def blobs(self) -> Path:
        """The directory holding the blobs (``blobs/sha256``)."""
        return self.root / BLOBS_DIR / BLOB_ALGO

    @property
    def tmp(self) -> Path:
        return self.root / TMP_DIR

    def blob(self, sha256: str) -> Path:
        """Path of the blob with this digest.

        Raises:
            ValueError: ``sha256`` is not 64 lowercase hex digits (it would escape the dir).
        """
        if not is_sha256_hex(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.blobs / sha256

    def part(self, token: str) -> Path:
        """Where the bytes of the install with this token are written."""
        return self.tmp / f"{token}{PART_SUFFIX}"

    def health(self, token: str) -> Path:
        """Where the health check of the install with this token is kept."""
        return self.tmp / f"{token}{HEALTH_SUFFIX}"

    def owned_tmp_names(self, token: str) -> frozenset[str]:
        """Names under ``tmp/`` that belong to the install with this token."""
        return frozenset({f"{token}{PART_SUFFIX}", f"{token}{PART_SUFFIX}{BITMAP_SUFFIX}", f"{token}{HEALTH_SUFFIX}"})

    def state_temps(self) -> list[Path]:
        """Temp files of state writes that never reached their rename."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STATE_TEMP_RE.match(p.name))

    def ensure(self) -> None:
        """Create the directories (idempotent)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
