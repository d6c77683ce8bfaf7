"""Remote inference, the executor's side: this runtime as a node that runs other nodes'
calls (every runtime is one; a cloud node is the same ``edge-runtime run`` with
``tier = "cloud"``).

    fleet/v1/node/{me}/infer/{model}  --offer-->  bounded queue  --workers-->  engine
                                                                       |
    caller's inbox (reply_to)  <-------  InferResponse (same correlation id)

``offer`` runs on the MQTT dispatcher and never blocks: it decodes the request and either
admits it to the queue or answers at once with a typed error. Workers (``executor_workers``
threads) run admitted calls on the engine, so they count in the model's ``calls``, service
time and utilisation like local calls, and answer with the outputs, the version that ran,
``compute_ms`` and ``queue_ms``. Errors (``InferResponse.error.type``):

    busy               the queue is full (``executor_queue`` calls or ``executor_queue_bytes``
                       of tensors waiting): backpressure, the queue never grows past its bounds
    model_not_found    this node does not serve the model (``model_unavailable``: loading)
    deadline_exceeded  the call waited in the queue past its ``deadline_ms`` (counted from
                       its arrival here: the caller has given up, so it is not run)
    bad_request        the request does not decode (answered when its header still names a
                       correlation id and an infer inbox; otherwise dropped), or its topic
                       and its model disagree
    invalid_input      the tensors do not match the model's signature
    internal           anything else

Replies are published without waiting for the broker's acknowledgement (a slow PUBACK
must not hold a worker); a reply that cannot be sent is dropped (the caller's deadline
covers it). Per-model counters (``figures()``): ``served_for_peers``, ``peer_busy``,
``peer_errors``, for the models this node serves.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ErrorInfo, InferRequest, InferResponse

log = logging.getLogger(__name__)
T = TypeVar("T")
_FRAME_PREFIX = struct.Struct("<4sII")


class BoundedQueue(Generic[T]):
    """A FIFO bounded by item count and by bytes: ``offer`` refuses (never waits) past
    either bound; ``take`` waits for an item. After ``close`` offers are refused and
    ``take`` returns what is left, then None."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("a bounded queue needs room for at least one item and one byte")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()

    def offer(self, item: T, nbytes: int) -> bool:
        with self._cond:
            if self._closed or len(self._items) >= self.max_items or self._bytes + nbytes > self.max_bytes:
                return False
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify()
            return True

    def take(self, timeout: Optional[float] = None) -> Optional[T]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._cond:
            return self._bytes


@dataclass(frozen=True)
class _Job:
    request: InferRequest
    received: float


@dataclass
class _Counts:
    served_for_peers: int = 0
    peer_busy: int = 0
    peer_errors: int = 0


def expired(received: float, now: float, deadline_ms: int) -> bool:
    """Whether a call that arrived at ``received`` has waited past its deadline at ``now``."""
    return (now - received) * 1000.0 >= deadline_ms


def peek_reply_address(payload: bytes) -> Optional[tuple[str, str]]:
    """(correlation id, reply topic) from the header of a request that did not decode as a
    whole, when both are valid (so a ``bad_request`` answer can go to a real inbox); else None."""
    try:
        if len(payload) < _FRAME_PREFIX.size:
            return None
        magic, head_len, _ = _FRAME_PREFIX.unpack_from(payload)
        if magic != messages.TENSOR_MAGIC or head_len > messages.MAX_BINARY_HEADER:
            return None
        header = json.loads(bytes(payload[_FRAME_PREFIX.size:_FRAME_PREFIX.size + head_len]))
        correlation, reply_to = header.get("correlation_id"), header.get("reply_to")
        if not topics.valid_id(correlation) or not isinstance(reply_to, str):
            return None
        if topics.parse(reply_to).kind != "infer_inbox":
            return None
        return correlation, reply_to
    except (ValueError, TypeError, AttributeError, struct.error):
        return None


class ServingNode:
    """Serves other nodes' calls to the models this runtime's engine serves."""

    def __init__(
        self,
        node_id: str,
        engine: Any,
        publish: Callable[[str, bytes], None],
        *,
        workers: int = 2,
        queue_size: int = 32,
        queue_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``publish(topic, payload)`` sends without waiting for an acknowledgement and
        raises when it cannot."""
        self.node_id = topics.check_id(node_id, "node id")
        self.engine = engine
        self._publish = publish
        self._clock = clock
        self.queue: BoundedQueue[_Job] = BoundedQueue(queue_size, queue_bytes)
        self.n_workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts: dict[str, _Counts] = {}
        self.unknown_model_calls = 0  # calls for models this node does not serve
        self.dropped = 0  # requests that could not even be answered (no readable reply address)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.n_workers):
            t = threading.Thread(target=self._work, name=f"infer-node-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Admit nothing more; the workers answer what is queued, then end."""
        self.queue.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- MQTT side (dispatcher thread) ---------------------------------------------------

    def offer(self, topic: str, payload: bytes) -> None:
        """One message on ``fleet/v1/node/{me}/infer/+``: admit it or answer it now."""
        try:
            info = topics.parse(topic)
        except ValueError:
            return
        if info.kind != "infer" or info.node != self.node_id or info.model is None:
            return
        try:
            request: InferRequest = messages.decode("infer_request", payload)
        except messages.ProtocolError as exc:
            address = peek_reply_address(payload)
            if address is None:
                with self._lock:
                    self.dropped += 1
                log.debug("dropped an unreadable inference request on %s: %s", topic, exc)
                return
            self._error(address[1], address[0], info.model, "bad_request", str(exc))
            return
        if request.model != info.model:
            self._error(request.reply_to, request.correlation_id, info.model, "bad_request",
                        f"the topic names model {info.model!r}, the request {request.model!r}")
            return
        try:
            self.engine.get(request.model)
        except EdgeRuntimeError as exc:
            with self._lock:
                self.unknown_model_calls += 1
            self._reply(request, error=ErrorInfo.of(exc))
            return
        nbytes = sum(int(t.nbytes) for t in request.tensors)
        if not self.queue.offer(_Job(request, self._clock()), nbytes):
            with self._lock:
                self._count(request.model).peer_busy += 1
            self._reply(request, error=ErrorInfo(
                type="busy", message=f"executor {self.node_id} has {len(self.queue)} calls queued "
                                     f"({self.queue.max_items} at most); retry later or run it elsewhere"))

    # -- figures -------------------------------------------------------------------------

    def figures(self) -> dict[str, dict[str, int]]:
        """Per served model, cumulative: ``served_for_peers``, ``peer_busy``, ``peer_errors``."""
        with self._lock:
            return {name: {"served_for_peers": c.served_for_peers, "peer_busy": c.peer_busy,
                           "peer_errors": c.peer_errors} for name, c in self._counts.items()}

    # -- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.queue.take()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # a bug must not take a worker down
                log.exception("remote inference call for %s failed", job.request.model)

    def _run(self, job: _Job) -> None:
        request = job.request
        started = self._clock()
        queue_ms = (started - job.received) * 1000.0
        if expired(job.received, started, request.deadline_ms):
            with self._lock:
                self._count(request.model).peer_errors += 1
            self._reply(request, error=ErrorInfo(
                type="deadline_exceeded",
                message=f"waited {queue_ms:.0f} ms in {self.node_id}'s queue, past the {request.deadline_ms} ms deadline"),
                queue_ms=queue_ms)
            return
        try:
            model = self.engine.get(request.model)
            feeds: Any = dict(zip(request.names, request.tensors)) if request.names is not None else list(request.tensors)
            t0 = time.perf_counter()
            outputs = self.engine.predict_on(model, feeds)
            compute_ms = (time.perf_counter() - t0) * 1000.0
        except Exception as exc:
            if not isinstance(exc, EdgeRuntimeError):
                log.exception("remote inference call for %s failed", request.model)
            with self._lock:
                self._count(request.model).peer_errors += 1
            self._reply(request, error=ErrorInfo.of(exc), queue_ms=queue_ms)
            return
        with self._lock:
            self._count(request.model).served_for_peers += 1
        self._reply(request, version=model.version, names=list(outputs), tensors=tuple(outputs.values()),
                    compute_ms=compute_ms, queue_ms=queue_ms)

    # -- answering -----------------------------------------------------------------------

    def _count(self, name: str) -> _Counts:
        counts = self._counts.get(name)
        if counts is None:
            counts = self._counts[name] = _Counts()
        return counts

    def _error(self, reply_to: str, correlation: str, model: str, kind: str, message: str) -> None:
        try:
            response = InferResponse(correlation_id=correlation, model=model,
                                     error=ErrorInfo(type=kind, message=message[:2000]))
        except ValueError:
            return
        self._send(reply_to, response)

    def _reply(self, request: InferRequest, **fields: Any) -> None:
        try:
            response = InferResponse(correlation_id=request.correlation_id, model=request.model, **fields)
        except ValueError as exc:  # outputs the wire cannot carry (a dtype): say so
            response = InferResponse(correlation_id=request.correlation_id, model=request.model,
                                     error=ErrorInfo(type="internal", message=f"cannot send the outputs: {exc}"[:2000]))
        self._send(request.reply_to, response)

    def _send(self, reply_to: str, response: InferResponse) -> None:
        try:
            payload = messages.encode(response)
        except messages.ProtocolError as exc:  # outputs past the size limit
            payload = messages.encode(InferResponse(
                correlation_id=response.correlation_id, model=response.model,
                error=ErrorInfo(type="internal", message=f"cannot send the outputs: {exc}"[:2000])))
        try:
            self._publish(reply_to, payload)
        except Exception as exc:  # not connected: the caller's deadline covers it
            log.debug("could not answer %s on %s: %s", response.correlation_id, reply_to, exc)


__all__ = ["BoundedQueue", "ServingNode", "expired", "peek_reply_address"]
