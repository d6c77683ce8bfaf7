"""Crash-safe file primitives: every durable write in the runtime goes through here.

The rule (STYLE.md #2): write a temp file in the same directory, fsync it, ``os.replace`` it
over the target, fsync the directory; remove the temp on failure. A reader therefore sees
the old bytes or the new bytes, never a torn file, whatever instant the power goes.

``crashpoint(name)`` marks the instants between durable steps. Crash tests set
``EDGEFLEET_CRASH_AT`` and the process SIGKILLs itself there (Mender's crash tests kill at
named states); in production the variable is unset and the call is one dict lookup.

``EDGEFLEET_CRASH_AT`` forms:
  ``N``        die at the N-th crash point this process reaches (1-based)
  ``NAME``     die at the first crash point called NAME
  ``NAME:K``   die at the K-th time crash point NAME is reached
``EDGEFLEET_CRASH_TRACE=PATH`` appends each crash point's name to PATH (to enumerate them).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

_CRASH_AT = os.environ.get("EDGEFLEET_CRASH_AT", "")
_CRASH_TRACE = os.environ.get("EDGEFLEET_CRASH_TRACE", "")
_counts: dict[str, int] = {}
_total = 0


def crashpoint(name: str) -> None:
    """Die here with SIGKILL if a crash test asked for this point; otherwise do nothing."""
    if not _CRASH_AT and not _CRASH_TRACE:
        return
    global _total
    _total += 1
    _counts[name] = _counts.get(name, 0) + 1
    if _CRASH_TRACE:
        with open(_CRASH_TRACE, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if not _CRASH_AT:
        return
    target, _, nth = _CRASH_AT.partition(":")
    hit = (
        (target.isdigit() and int(target) == _total)
        or (target == name and not nth and _counts[name] == 1)
        or (target == name and nth.isdigit() and _counts[name] == int(nth))
    )
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    Raises:
        OSError: the write failed; ``path`` is unchanged and no temp file is left behind.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        crashpoint("atomic_write.before_rename")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)
    crashpoint("atomic_write.after_rename")


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files that killed ``atomic_write_bytes(path, ...)`` calls left beside
    ``path``; returns their names. Call it at start-up, before this process writes ``path``
    (a temp of a write in flight in another process would be taken too).

    Raises:
        OSError: the directory cannot be listed or a temp cannot be removed.
    """
    target = Path(path)
    prefix = f".{target.name}."
    removed = []
    if target.parent.is_dir():
        for entry in target.parent.iterdir():
            name = entry.name
            if name.startswith(prefix) and name.endswith(".tmp") and len(name) > len(prefix) + len(".tmp"):
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return sorted(removed)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o644) -> None:
    """``atomic_write_bytes`` of ``obj`` as sorted, indented JSON."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    atomic_write_bytes(path, data, mode=mode)
