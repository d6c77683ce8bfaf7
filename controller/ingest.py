"""Taking in what devices publish: state, telemetry, events and command replies.

``Ingest.handle(topic, payload)`` decodes one message with ``messages.decode`` (the device
is the one the topic names: broker ACLs let a device publish only under its own id) and
stores it through the store's idempotent writes, so a redelivered or replayed message is
never counted twice — also when several replicas share the subscriptions. It never
raises for a bad payload: it counts the rejection by reason and returns None.
``handle_many`` does the same for a batch in one transaction; when the batch's
transaction fails it stores the messages one by one, so one message the database
refuses costs only itself.

``IngestWriter`` is the thread the daemon feeds: it stores whatever has queued up while
the previous batch was being written (up to ``max_batch``, never waiting to fill one), then
calls ``on_done`` for each message in arrival order -- after the commit, so the daemon
acknowledges a message to the broker (PUBACK) only once it is on disk. When the database
is unreachable it keeps the batch and retries with backoff; acknowledgements wait, and
the broker stops sending once its in-flight window is full: back-pressure, not loss.

Counters (for /metrics and the benchmark): ``received``, ``stored`` and ``duplicates``
per kind, ``rejected`` per reason.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

from controller.store import Report, Store, StoreUnavailable
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ProtocolError

__all__ = ["Ingest", "Ingested", "IngestWriter", "KIND_OF_TOPIC"]

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
        """Decode and store one message. None when it is not a device report or was refused.

        Raises:
            StoreUnavailable (or another store error): nothing was stored; it may be retried.
        """
        return self.handle_many([(topic, payload, self.clock())])[0]

    def handle_many(self, batch: list[tuple[str, bytes, float]]) -> list[Optional[Ingested]]:
        """Decode and store ``(topic, payload, received_at)`` messages, one transaction for
        the lot; the result is in the batch's order (None: refused, counted by reason).

        Raises:
            StoreUnavailable: the database is unreachable; nothing was stored (retry the batch).
        """
        decoded = [self._decode(topic, payload, at) for topic, payload, at in batch]
        todo = [d for d in decoded if d is not None]
        new: list[Optional[bool]]
        try:
            new = list(self.store.ingest_many([report for report, _ in todo]))
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a message the database refused: find it, keep the others
            log.exception("a batch of %d reports failed; storing them one by one", len(todo))
            new = []
            for report, _ in todo:
                try:
                    new.extend(self.store.ingest_many([report]))
                except StoreUnavailable:
                    raise
                except Exception:  # noqa: BLE001
                    log.exception("a %s from %s could not be stored; dropped", report.kind, report.device_id)
                    self._count(self.rejected, "store_error")
                    new.append(None)
        out: list[Optional[Ingested]] = []
        results = iter(zip(todo, new))
        for d in decoded:
            if d is None:
                out.append(None)
                continue
            (report, message), was_new = next(results)
            if was_new is None:
                out.append(None)
                continue
            self._count(self.stored if was_new else self.duplicates, report.kind)
            out.append(Ingested(kind=report.kind, device_id=report.device_id, new=was_new, message=message))
        return out

    def _decode(self, topic: str, payload: bytes, received_at: float) -> Optional[tuple[Report, Any]]:
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
        return Report(kind=kind, device_id=info.device, data=data, received_at=received_at), message

    def _count(self, counter: Counter[str], key: str) -> None:
        with self._lock:
            counter[key] += 1


M = TypeVar("M")
_STOP = object()


class IngestWriter(Generic[M]):
    """See the module docstring. ``put(item, topic, payload)`` from any thread; ``item`` is
    handed back to ``on_done(item, ingested_or_none)`` (the daemon passes the MQTT message,
    to acknowledge it). ``backlog`` is how many wait (for /metrics)."""

    def __init__(self, ingest: Ingest, on_done: Callable[[M, Optional[Ingested]], None], *,
                 max_batch: int = 500, retry_max_s: float = 5.0) -> None:
        self.ingest = ingest
        self.on_done = on_done
        self.max_batch = max_batch
        self.retry_max_s = retry_max_s
        self.batches = 0
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    def put(self, item: M, topic: str, payload: bytes) -> None:
        self._q.put((item, topic, payload, self.ingest.clock()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ctl-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Store what is queued (unless the database is down: then give up after
        ``timeout``; what was not stored was not acknowledged either), then end the thread."""
        if self._thread is None:
            return
        self._q.put(_STOP)
        self._thread.join(timeout)
        self._stopping.set()  # a batch still retrying stops retrying
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            if not self._write(batch):
                return

    def _write(self, batch: list[tuple[M, str, bytes, float]]) -> bool:
        delay = 0.1
        while True:
            try:
                results = self.ingest.handle_many([(topic, payload, at) for _, topic, payload, at in batch])
                break
            except StoreUnavailable as exc:
                log.error("ingest: %s; retrying %d messages in %.1fs", exc, len(batch), delay)
            except Exception:  # noqa: BLE001 - a bug must not end ingest: log, retry slowly
                log.exception("ingest of %d messages failed; retrying in %.1fs", len(batch), delay)
            if self._stopping.wait(delay):
                return False
            delay = min(self.retry_max_s, delay * 2)
        self.batches += 1
        for (item, *_), done in zip(batch, results):
            try:
                self.on_done(item, done)
            except Exception:  # noqa: BLE001
                log.exception("after ingesting a message")
        return True
