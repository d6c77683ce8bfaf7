"""Reconnect delays: exponential backoff with "full jitter", capped.

Attempt ``n`` (0 for the first retry) waits a uniformly random time in
``[0, min(maximum, initial * 2**n)]`` — the "full jitter" of the AWS Architecture Blog's
*Exponential Backoff And Jitter*: a fleet that lost its broker at the same instant spreads
its reconnects over the whole window instead of arriving in waves. ``reset()`` after a
successful connection starts over.

Pure: no clock, no sleeping; the caller waits. The random source is injectable
(``random.Random(seed)`` makes the sequence reproducible)::

    backoff = Backoff(1.0, 60.0)
    while not connected():
        wait(backoff.next_delay())
    backoff.reset()
"""

from __future__ import annotations

import random as _random
from typing import Optional, Protocol

__all__ = ["Backoff"]


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


class Backoff:
    """Delays for successive retries; see the module docstring."""

    def __init__(self, initial: float, maximum: float, *, rng: Optional[_Uniform] = None) -> None:
        """
        Raises:
            ValueError: ``initial`` not positive, or ``maximum`` below ``initial``.
        """
        if not initial > 0:
            raise ValueError(f"initial delay must be positive, got {initial!r}")
        if not maximum >= initial:
            raise ValueError(f"maximum delay {maximum!r} is below the initial delay {initial!r}")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self._rng: _Uniform = rng if rng is not None else _random.Random()
        self.attempts = 0

    def ceiling(self, attempt: Optional[int] = None) -> float:
        """The upper bound of the delay for ``attempt`` (default: the next one):
        ``min(maximum, initial * 2**attempt)``."""
        n = self.attempts if attempt is None else attempt
        if n >= 1024:  # 2.0**1024 overflows; the cap was reached long before
            return self.maximum
        return min(self.maximum, self.initial * 2.0**n)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt, in ``[0, ceiling()]``."""
        top = self.ceiling()
        self.attempts += 1
        return min(top, max(0.0, self._rng.uniform(0.0, top)))

    def reset(self) -> None:
        """Start over from ``initial`` (call after a successful connection)."""
        self.attempts = 0
