"""What the device tells the controller: events and telemetry, numbered and queued durably.

Every event and telemetry sample goes through the on-disk ``Outbox`` with a persisted
``seq`` (one stream each), so it survives a broker outage and a restart and is delivered in
order; the outbox's drainer publishes it. Building the message happens inside the outbox's
``append_seq`` so a seq is consumed only by a message that was queued (no gaps but drops).

Reporting never stops the agent: a full disk or a figure the wire cannot carry is logged
and that one message is lost, not the reconcile that produced it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Optional

from edge_runtime.agent.outbox import Outbox
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import REASONS, Event, Telemetry

log = logging.getLogger(__name__)

EVENT_STREAM = "event"
TELEMETRY_STREAM = "telemetry"
_MAX_FIGURES = 32


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def clean_figures(figures: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``figures`` as an ``Event`` can carry them: at most 32, short keys, finite numbers,
    short strings (anything else is written as text)."""
    out: dict[str, Any] = {}
    for key, value in list((figures or {}).items())[:_MAX_FIGURES]:
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        if isinstance(value, str):
            value = value[:200]
        out[str(key)[:64]] = value
    return out


class Reporter:
    """Queues ``Event`` and ``Telemetry`` messages of one device in its outbox."""

    def __init__(self, outbox: Outbox, device_id: str, *, wall: Callable[[], datetime] = _utcnow) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self._wall = wall
        self._events_topic = topics.events(device_id)
        self._telemetry_topic = topics.telemetry(device_id)
        self.lost = 0  # messages that could not be queued

    def event(
        self,
        step: str,
        *,
        model: Optional[str] = None,
        version: Optional[str] = None,
        generation: Optional[int] = None,
        progress: Optional[float] = None,
        reason: Optional[str] = None,
        detail: Optional[str] = None,
        figures: Optional[Mapping[str, Any]] = None,
    ) -> Optional[int]:
        """Queue one event; returns its seq, or None if it could not be queued (logged)."""
        if reason is not None and reason not in REASONS:
            detail = f"{reason}: {detail}" if detail else reason
            reason = "internal"
        fields: dict[str, Any] = {
            "step": step, "model": model, "version": version, "generation": generation,
            "progress": None if progress is None else min(1.0, max(0.0, progress)),
            "reason": reason, "detail": None if detail is None else str(detail)[:2000],
            "figures": clean_figures(figures),
        }
        log.info("event %s %s %s%s%s", step, model or "-", version or "-",
                 f" ({reason})" if reason else "", f": {detail}" if detail else "")

        def build(seq: int) -> bytes:
            return messages.encode(Event(seq=seq, at=self._wall(), **fields))

        return self._queue(self._events_topic, EVENT_STREAM, build)

    def telemetry(self, build: Callable[[int], Telemetry]) -> Optional[int]:
        """Queue the sample ``build(seq)`` returns; its seq, or None if it was lost (logged)."""
        return self._queue(self._telemetry_topic, TELEMETRY_STREAM, lambda seq: messages.encode(build(seq)))

    def _queue(self, topic: str, stream: str, build: Callable[[int], bytes]) -> Optional[int]:
        try:
            _, seq = self.outbox.append_seq(topic, stream, build, qos=1)
        except Exception as exc:  # OutboxError (disk full, I/O), or a message the wire refuses
            self.lost += 1
            log.error("could not queue a %s message: %s: %s", stream, type(exc).__name__, exc)
            return None
        return seq


__all__ = ["EVENT_STREAM", "Reporter", "TELEMETRY_STREAM", "clean_figures"]
