"""Artifact bytes for the chunk server: the store holds every blob (so any replica can
serve any chunk); each replica keeps a local file copy to read ranges from quickly.

``BlobCache(store, directory)`` is an ``artifacts.BlobLookup``: ``cache(sha)`` is the path
of ``<directory>/<sha>``, written from the store (temp file, fsync, rename) the first
time it is asked for, None when the store has no such blob. Files are immutable and named
by their digest, so a stale or concurrent copy cannot be wrong, only late.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

from controller.store import NotFound, Store
from edge_runtime import durable
from edge_runtime.protocol import topics

__all__ = ["BlobCache"]

log = logging.getLogger(__name__)


class BlobCache:
    """See the module docstring."""

    def __init__(self, store: Store, directory: Union[str, "os.PathLike[str]"]) -> None:
        self.store = store
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".blob.*.tmp"):  # a copy a killed process left half-written
            stale.unlink(missing_ok=True)
        self.materialised = 0
        self._lock = threading.Lock()

    def __call__(self, sha256: str) -> Optional[Path]:
        try:
            topics.check_sha256(sha256)
        except ValueError:
            return None
        path = self.directory / sha256
        if path.is_file():
            return path
        with self._lock:
            if path.is_file():
                return path
            fd, name = tempfile.mkstemp(prefix=".blob.", suffix=".tmp", dir=self.directory)
            os.close(fd)
            tmp = Path(name)
            try:
                self.store.write_blob_to(sha256, str(tmp))
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                durable.fsync_dir(self.directory)
            except NotFound:
                tmp.unlink(missing_ok=True)
                return None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.materialised += 1
            log.info("artifact %s... cached at %s", sha256[:12], path)
            return path
