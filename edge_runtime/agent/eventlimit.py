"""A per-minute budget for events a flood could produce (refused documents, inference
fallbacks): the events over budget are counted, never dropped silently."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EventLimiter"]


@dataclass
class EventLimiter:
    """At most ``per_min`` events a minute; the rest are counted, and the count rides on the
    next event that goes out (or on a summary once the minute is over: ``overdue``)."""

    per_min: int
    window_start: float = float("-inf")
    sent: int = 0
    suppressed: int = 0
    last_reason: str = ""  # the reason of the newest suppressed event

    def allow(self, now: float, reason: str) -> tuple[bool, int]:
        if now - self.window_start >= 60.0:
            self.window_start, self.sent = now, 0
        if self.sent >= self.per_min:
            self.suppressed += 1
            self.last_reason = reason
            return False, 0
        self.sent += 1
        carried, self.suppressed = self.suppressed, 0
        return True, carried

    def overdue(self, now: float) -> int:
        """The count still unreported once its window has passed (then reset), else 0."""
        if self.suppressed and now - self.window_start >= 60.0:
            carried, self.suppressed = self.suppressed, 0
            self.window_start, self.sent = now, 1
            return carried
        return 0
