"""Taking in what devices publish: state, telemetry, events and command replies.

``Ingest.handle(topic, payload)`` decodes one message with ``messages.decode`` (the device
is the one the topic names: broker ACLs let a device publish only under its own id) and
stores it through the store's idempotent writes, so a redelivered or replayed message is
never counted twice — also when several replicas share the subscriptions. It never
raises for a bad payload: it counts the rejection by reason and returns None.

Counters (for /metrics and the benchmark): ``received``, ``stored`` and ``duplicates``
per kind, ``rejected`` per reason.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from controller.store import Store
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ProtocolError

__all__ = ["Ingest", "Ingested", "KIND_OF_TOPIC"]

log = logging.getLogger(__name__)

# topic kind -> message kind
KIND_OF_TOPIC = {"state": "state", "telemetry": "telemetry", "events": "event", "reply": "reply"}


@dataclass(frozen=True)
class Ingested:
    """One message taken in: what it was, from whom, and whether it was new."""

    kind: str
    device_id: str
    new: bool
    message: Any  # the decoded pydantic model


class Ingest:
    """See the module docstring. Thread-safe (the store is; counters take a lock)."""

    def __init__(self, store: Store, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self.received: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, topic: str, payload: bytes) -> Optional[Ingested]:
        """Decode and store one message. None when it is not a device report or was refused."""
        try:
            info = topics.parse(topic)
        except ValueError:
            self._count(self.rejected, "bad_topic")
            return None
        kind = KIND_OF_TOPIC.get(info.kind)
        if kind is None or info.device is None:
            self._count(self.rejected, "not_a_report")
            return None
        self._count(self.received, kind)
        try:
            message = messages.decode(kind, payload)
        except ProtocolError as exc:
            self._count(self.rejected, exc.reason)
            log.info("refused a %s from %s: %s", kind, info.device, exc)
            return None
        data = message.model_dump(mode="json", exclude_none=True)
        now = self.clock()
        device = info.device
        if kind == "state":
            new = self.store.apply_state(device, data, now=now)
        elif kind == "telemetry":
            new = self.store.add_telemetry(device, data, now=now)
        elif kind == "event":
            new = self.store.add_event(device, data, now=now)
        else:
            new = self.store.record_reply(device, data, now=now)
        self._count(self.stored if new else self.duplicates, kind)
        return Ingested(kind=kind, device_id=device, new=new, message=message)

    def _count(self, counter: Counter[str], key: str) -> None:
        with self._lock:
            counter[key] += 1
