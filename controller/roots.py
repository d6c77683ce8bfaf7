"""Carry the key directory's roots of trust to devices: ``fleet/v1/trust/root/{version}``.

``fleetctl keys rotate`` writes root N+1 (``root.N+1.json``, then ``root.json``: the commit
point). ``RootWatcher`` notices it from the controller's ticker -- a ``stat`` of
``root.json`` per tick, parsed only when its size, mtime or inode changed -- and
``envelopes`` gives every version >= 2, exactly the bytes of ``root.N.json``, for the
controller to publish retained (v1 is what devices are provisioned with). A device holding
root K walks K+1, K+2, ... itself (``trust.update_root``), so every version stays
published: a device offline for three rotations needs all three.

Nothing here verifies the chain: ``keys.KeyDir.rotate`` already checked each root as a
device would before writing it, and a device refuses anything that does not verify.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from controller.keys import ROOT_FILE, KeyDir, KeyDirError
from edge_runtime.protocol import dsse, messages

__all__ = ["RootWatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seen:
    stat: tuple[int, int, int]  # (st_ino, st_size, st_mtime_ns) of root.json
    version: int


class RootWatcher:
    """Tells when ``root.json`` moved to another version. Not thread-safe: one ticker calls it."""

    def __init__(self, keydir: KeyDir) -> None:
        self.keydir = keydir
        self._seen: Optional[_Seen] = None

    @property
    def version(self) -> Optional[int]:
        """The version last seen (None before the first ``poll``)."""
        return self._seen.version if self._seen is not None else None

    def poll(self) -> Optional[int]:
        """The version of ``root.json`` if it differs from the one last seen (the first call
        always reports it), else None. A file that cannot be read or parsed is logged and
        reported as no change (the next poll looks again).
        """
        path = self.keydir.path / ROOT_FILE
        try:
            st = os.stat(path)
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc)
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._seen is not None and self._seen.stat == key:
            return None
        try:
            version = self.keydir.root().version
        except KeyDirError as exc:
            log.error("%s cannot be read: %s", path, exc)
            return None
        previous = self._seen
        self._seen = _Seen(key, version)
        if previous is not None and previous.version == version:
            return None  # touched or re-written, same root
        return version

    def forget(self) -> None:
        """Report the current version again at the next ``poll`` (after a failure to act on it)."""
        self._seen = None

    def envelopes(self, up_to: int) -> list[tuple[int, bytes]]:
        """(version, bytes of ``root.N.json``) for N = 2 .. ``up_to``, oldest first. A
        missing or unreadable history file is logged and skipped (devices behind it wait
        at the gap; restore it from a backup of the key directory)."""
        out: list[tuple[int, bytes]] = []
        for version in range(2, up_to + 1):
            path = self.keydir.history_file(version)
            try:
                data = path.read_bytes()
                envelope = dsse.Envelope.from_json(data, max_bytes=messages.LIMITS["root"])
                claimed = messages.decode("root", envelope.payload).version
            except (OSError, dsse.EnvelopeError, messages.ProtocolError) as exc:
                log.error("root v%d cannot be published: %s: %s (devices holding v%d stop there)",
                          version, path, exc, version - 1)
                continue
            if claimed != version:
                log.error("%s holds root v%d, not v%d; not published", path, claimed, version)
                continue
            out.append((version, data))
        return out
