"""Content-addressed blobs: model files named by the sha256 of their bytes.

Bytes arrive in ``tmp/`` (from a file or a chunk stream), are fsynced, checked against the
expected sha256 and size, and only then renamed into ``blobs/sha256/<hex>`` followed by an
fsync of the directory. A blob is therefore complete and correct the instant it is
visible; a crash mid-write leaves a stale file in ``tmp/`` (``gc`` removes it), never a
torn blob. A stream longer than the expected size is cut off at once (DESIGN.md, Trust).

This module knows nothing of models or versions; ``store.py`` decides which blobs matter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.durable import fsync_dir
from edge_runtime.errors import HashMismatch, QuotaExceeded, StoreCorrupt
from edge_runtime.store.layout import StoreLayout, is_sha256_hex

CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobInfo:
    """Bytes on disk with their measured digest and size."""

    sha256: str
    size: int
    path: Path


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The bytes of a file in ``CHUNK``-sized pieces.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def check_expected(info: BlobInfo, *, expected_sha256: str | None, expected_size: int | None) -> None:
    """Compare measured bytes with what was promised.

    Raises:
        HashMismatch: the size or the digest differs (the message has both values).
    """
    if expected_size is not None and info.size != expected_size:
        raise HashMismatch(f"size mismatch: expected {expected_size} bytes, got {info.size}")
    if expected_sha256 is not None and info.sha256 != expected_sha256.lower():
        raise HashMismatch(f"sha256 mismatch: expected {expected_sha256.lower()}, got {info.sha256}")


class BlobStore:
    """The ``blobs/sha256`` directory and the partial files in ``tmp/``."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    # -- writing ------------------------------------------------------------------------

    def write_part(
        self,
        dest: Path,
        chunks: Iterable[bytes],
        *,
        expected_size: int | None = None,
        quota_free: int | None = None,
    ) -> BlobInfo:
        """Stream ``chunks`` into the new file ``dest`` (under ``tmp/``), fsync it, measure it.

        Stops at the first chunk that takes the file past ``expected_size`` or past
        ``quota_free`` bytes, and removes the file on any failure.

        Raises:
            HashMismatch: more bytes than ``expected_size`` arrived.
            QuotaExceeded: more bytes than ``quota_free`` arrived.
            FileExistsError: ``dest`` already exists.
            OSError: the write failed.
        """
        digest = hashlib.sha256()
        size = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise HashMismatch(
                            f"size mismatch: the stream went past the expected {expected_size} bytes"
                        )
                    if quota_free is not None and size > quota_free:
                        raise QuotaExceeded(
                            f"the stream went past the {quota_free} bytes free under the quota"
                        )
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return BlobInfo(sha256=digest.hexdigest(), size=size, path=dest)

    def promote(self, part: Path, sha256: str) -> Path:
        """Rename a checked ``tmp/`` file into place as blob ``sha256`` and make it durable.

        The caller has verified the bytes; an identical existing blob is simply replaced.

        Raises:
            ValueError: ``sha256`` is not a hex digest.
            OSError: the rename failed.
        """
        target = self.layout.blob(sha256)
        os.replace(part, target)
        fsync_dir(target.parent)
        fsync_dir(part.parent)
        return target

    def ingest_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        part: Path,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        quota_free: int | None = None,
    ) -> BlobInfo:
        """``write_part`` + check + ``promote``: the whole path from a stream to a blob.

        Raises:
            HashMismatch: the bytes are not the ones expected (no blob is created).
            QuotaExceeded: the stream went past ``quota_free``.
            OSError: a write or rename failed.
        """
        info = self.write_part(part, chunks, expected_size=expected_size, quota_free=quota_free)
        try:
            check_expected(info, expected_sha256=expected_sha256, expected_size=expected_size)
        except HashMismatch:
            part.unlink(missing_ok=True)
            raise
        return BlobInfo(sha256=info.sha256, size=info.size, path=self.promote(part, info.sha256))

    def ingest_file(
        self,
        source: str | os.PathLike[str],
        *,
        part: Path,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        quota_free: int | None = None,
    ) -> BlobInfo:
        """``ingest_chunks`` of a file's bytes.

        Raises:
            HashMismatch, QuotaExceeded, OSError: as ``ingest_chunks``.
        """
        return self.ingest_chunks(
            file_chunks(source),
            part=part,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            quota_free=quota_free,
        )

    # -- reading ------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it exists).

        Raises:
            ValueError: ``sha256`` is not a hex digest.
        """
        return self.layout.blob(sha256)

    def has(self, sha256: str) -> bool:
        return is_sha256_hex(sha256) and self.layout.blob(sha256).is_file()

    def verify(self, sha256: str, *, size: int | None = None) -> None:
        """Re-hash blob ``sha256`` and check that it still holds what its name says.

        Raises:
            StoreCorrupt: the blob is missing, or its bytes or size are not the named ones.
        """
        path = self.path(sha256)
        try:
            got, got_size = hash_file(path)
        except FileNotFoundError as exc:
            raise StoreCorrupt(f"blob {sha256} is missing") from exc
        if size is not None and got_size != size:
            raise StoreCorrupt(f"blob {sha256} has {got_size} bytes, expected {size}")
        if got != sha256:
            raise StoreCorrupt(f"blob {sha256} is damaged: its bytes hash to {got}")

    def delete(self, sha256: str) -> bool:
        """Remove blob ``sha256``; False if it was not there.

        Raises:
            ValueError: ``sha256`` is not a hex digest.
        """
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> list[str]:
        """Digests of every blob present, sorted."""
        if not self.layout.blobs.is_dir():
            return []
        return sorted(p.name for p in self.layout.blobs.iterdir() if is_sha256_hex(p.name) and p.is_file())

    def strays(self) -> list[Path]:
        """Entries under ``blobs/`` that are not blobs (nothing we write looks like that)."""
        out: list[Path] = []
        root = self.layout.blobs.parent
        if not root.is_dir():
            return out
        for entry in sorted(root.iterdir()):
            if entry != self.layout.blobs:
                out.append(entry)
        if self.layout.blobs.is_dir():
            out.extend(
                p for p in sorted(self.layout.blobs.iterdir()) if not (is_sha256_hex(p.name) and p.is_file())
            )
        return out

    def tmp_files(self) -> list[Path]:
        if not self.layout.tmp.is_dir():
            return []
        return sorted(self.layout.tmp.iterdir())

    def usage_bytes(self) -> int:
        """Bytes held by blobs and by partial files (both count against the quota)."""
        total = 0
        for directory in (self.layout.blobs, self.layout.tmp):
            if directory.is_dir():
                for p in directory.iterdir():
                    try:
                        total += p.stat().st_size
                    except FileNotFoundError:  # removed while we looked
                        pass
        return total
