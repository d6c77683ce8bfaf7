"""Giving freed memory back to the OS after a model version is dropped.

glibc keeps freed heap pages for reuse; after a swap frees one version's interpreters
(~18 MB each for a 2 MB vision model) the daemon's RSS would stay high indefinitely, which
matters on a 1-2 GB board. ``trim`` asks glibc to return them (measured: 50-90 MB back
after 20 swaps of the vision model). Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim() -> bool:
    """Return free heap memory to the OS; True if glibc released anything."""
    fn = _malloc_trim()
    if fn is None:
        return False
    try:
        return bool(fn(0))  # type: ignore[operator]
    except Exception:  # never let housekeeping hurt serving
        log.debug("malloc_trim failed", exc_info=True)
        return False
