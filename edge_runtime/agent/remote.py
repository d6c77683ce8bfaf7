"""Remote inference, the caller's side: a call to a model routed to another node goes to
that executor over MQTT, and falls back to the local copy when the executor does not answer.

    local API (REST, fast path)     RemoteCaller                          broker
    forward.resolve(name)       ->  RemoteModel, when the route is a node
    RemoteModel.predict(feeds)  ->  InferRequest (correlation id, deadline) -> fleet/v1/node/{node}/infer/{model}
                                    wait on fleet/v1/dev/{me}/inbox/infer for that id, up to the deadline
                                <-  outputs, served by the node
                                    or: the local copy answers (a fallback: counted, reported as an event)
                                    or: no local copy -> a typed 503 (busy, deadline_exceeded,
                                        executor_unreachable, model_unavailable)

When to fall back (``reason`` of the ``fallback`` event):

    not connected to the broker                 executor_unreachable   at once, no waiting
    publishing the request failed               executor_unreachable   at once
    the node missed ``breaker_failures`` calls  executor_unreachable   at once for ``breaker_open_s``
      in a row (and a local copy exists)                               (then the node is tried again)
    the broker connection dropped mid-call      executor_unreachable   at once
    no answer within the deadline               deadline_exceeded
    the node answered ``busy`` (queue full),    busy / that error type
      ``deadline_exceeded``, ``model_not_found``...
    ``max_pending`` calls already waiting       busy                   at once
    the node answered ``invalid_input``         -- no fallback: the caller's tensors are wrong (400)

Round trips: every answered call gives one sample of the network round trip to its node
through the broker (the wait, minus the executor's reported queue and compute time);
``rtt_ms()`` is what telemetry reports as ``peers_rtt_ms``.

Threads: ``call`` runs on API request threads and blocks on a per-call event; ``on_reply``
and ``connection_lost`` run on the MQTT dispatcher and never block. Pending calls are keyed
by an unguessable correlation id and removed in ``finally``; a reply nobody waits for (late,
foreign, or for another model) is dropped and counted. Events are not written here: they
queue in memory (rate-limited per model) and the agent's loop takes them (``take_events``).
Nothing here touches paho or the disk: ``publish`` and ``connected`` are injected.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from pydantic import ValidationError

from edge_runtime.engine.signature import Signature
from edge_runtime.errors import (
    Busy,
    DeadlineExceeded,
    EdgeRuntimeError,
    ExecutorUnreachable,
    InputError,
    ModelNotFound,
    ModelUnavailable,
)
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import LOCAL, REASONS, InferRequest, InferResponse, ModelSpec
from edge_runtime.agent.eventlimit import EventLimiter

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 600_000  # InferRequest.deadline_ms's bound


# -- pure parts ----------------------------------------------------------------------------


def deadline_ms(requested: Any, default: int) -> int:
    """The deadline of one call: ``requested`` (a per-call override) or ``default``.

    Raises:
        InputError: ``requested`` is not an integer from 1 to 600000 (a bool is not one).
    """
    if requested is None:
        return default
    if isinstance(requested, str) and requested.strip().isdigit():
        requested = int(requested.strip())
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= MAX_DEADLINE_MS:
        raise InputError(f"deadline_ms must be an integer from 1 to {MAX_DEADLINE_MS}, got {requested!r}")
    return requested


def verdict(response: InferResponse) -> tuple[str, str]:
    """What an executor's answer means for the call: ``("ok", "")``, ``("raise",
    "invalid_input")`` (the caller's fault: no fallback), or ``("fallback", reason)`` with
    the error type as an event reason (``internal`` when it is not one)."""
    if response.error is None:
        return "ok", ""
    kind = response.error.type
    if kind == "invalid_input":
        return "raise", kind
    return "fallback", kind if kind in REASONS else "internal"


def failure(reason: str, message: str) -> EdgeRuntimeError:
    """The typed 503 for a routed call that failed with no local copy to answer it."""
    if reason == "busy":
        return Busy(message)
    if reason == "deadline_exceeded":
        return DeadlineExceeded(message)
    if reason == "executor_unreachable":
        return ExecutorUnreachable(message)
    return ModelUnavailable(message)


class Breaker:
    """Per executor node: after ``failures`` unanswered calls in a row, calls that have a
    local copy skip the node for ``open_s`` seconds; then it is tried again (any answer,
    even ``busy``, closes it). Not thread-safe: the caller holds its lock."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.threshold = failures
        self.open_s = open_s
        self.failures = 0
        self.open_until = float("-inf")

    def is_open(self, now: float) -> bool:
        return self.failures >= self.threshold and now < self.open_until

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = now + self.open_s

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = float("-inf")


@dataclass(frozen=True)
class RemoteSettings:
    deadline_ms: int = 500
    max_pending: int = 256
    breaker_failures: int = 3
    breaker_open_s: float = 5.0
    fallback_events_per_min: int = 6

    @classmethod
    def of(cls, config: Any) -> RemoteSettings:
        """From ``config.RemoteConfig`` (same field names)."""
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FallbackEvent:
    """A ``fallback`` event for the agent to report."""

    model: str
    executor: str
    reason: str
    detail: str
    suppressed: int = 0  # fallbacks of this model not reported since the previous event
    fallbacks: int = 0  # this model's fallbacks so far (cumulative since start)


@dataclass
class _Counts:
    forwarded: int = 0
    fallbacks: int = 0
    forward_failures: int = 0


@dataclass
class _Pending:
    model: str
    event: threading.Event = field(default_factory=threading.Event)
    response: Optional[InferResponse] = None
    lost: bool = False


@dataclass
class _Rtt:
    total: float = 0.0
    n: int = 0
    last: Optional[float] = None


# -- what the API sees ---------------------------------------------------------------------


class RemoteModel:
    """A model whose calls go to executor ``node``: what the local API needs of it (name,
    version and signature from the signed desired state) and ``predict``."""

    def __init__(self, caller: RemoteCaller, name: str, version: str, signature: Signature, node: str) -> None:
        self._caller = caller
        self.name = name
        self.version = version
        self.signature = signature
        self.node = node

    def predict(self, feeds: list[np.ndarray], *, deadline_ms: Any = None) -> tuple[str, dict[str, np.ndarray], str]:
        """(version, outputs by name, who answered: the node id or ``local``).

        ``feeds`` are checked, ordered inputs (``signature.feeds``).

        Raises:
            InputError: a bad ``deadline_ms``, or the executor refused the tensors.
            Busy, DeadlineExceeded, ExecutorUnreachable, ModelUnavailable: the executor did
                not answer and there is no local copy.
        """
        return self._caller.call(self, feeds, deadline_ms)


# -- the caller ----------------------------------------------------------------------------


class RemoteCaller:
    """Forwards calls of routed models for one device; thread-safe."""

    def __init__(
        self,
        device_id: str,
        engine: Any,
        *,
        route: Callable[[str], str],
        spec: Callable[[str], Optional[ModelSpec]],
        publish: Callable[[str, bytes], None],
        connected: Callable[[], bool],
        settings: RemoteSettings = RemoteSettings(),
        clock: Callable[[], float] = time.monotonic,
        on_event: Optional[Callable[[], None]] = None,
    ) -> None:
        """``route(name)``: where calls to ``name`` go (``local`` or a node id). ``spec(name)``:
        the model's signed desired spec (its version and signature). ``publish(topic, payload)``
        sends without waiting for an acknowledgement and raises when it cannot; ``connected()``
        says whether the broker session is up. ``on_event`` is called (no lock held) when a
        fallback event is ready for ``take_events``."""
        self.device_id = topics.check_id(device_id, "device id")
        self.engine = engine
        self.settings = settings
        self.inbox = topics.infer_inbox(device_id)
        self._route = route
        self._spec = spec
        self._publish = publish
        self._connected = connected
        self._clock = clock
        self._on_event = on_event
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._breakers: dict[str, Breaker] = {}
        self._counts: dict[str, _Counts] = {}
        self._limiters: dict[str, EventLimiter] = {}
        self._last_executor: dict[str, str] = {}
        self._events: list[FallbackEvent] = []
        self._rtt: dict[str, _Rtt] = {}
        self._signatures: dict[tuple[str, str], Signature] = {}
        self.stray_replies = 0  # replies nobody waited for (late, foreign, mismatched)
        self.bad_replies = 0  # replies that did not decode

    # -- the API's hook ------------------------------------------------------------------

    def resolve(self, name: str) -> Optional[RemoteModel]:
        """The remote model for ``name`` when its route is another node, else None (serve
        it locally)."""
        node = self._route(name)
        if node == LOCAL or node == self.device_id:
            return None
        spec = self._spec(name)
        if spec is not None:
            key = (name, spec.manifest.sha256)
            signature = self._signatures.get(key)
            if signature is None:
                signature = spec.manifest.signature.to_signature()
                self._signatures = {k: v for k, v in self._signatures.items() if k[0] != name}
                self._signatures[key] = signature
            return RemoteModel(self, name, spec.version, signature, node)
        local = self._local(name)  # routed, but no desired spec (a restart before the document loaded)
        if local is None:
            return None
        return RemoteModel(self, name, local.version, local.signature, node)

    def call(self, target: RemoteModel, feeds: list[np.ndarray], requested_deadline: Any = None,
             ) -> tuple[str, dict[str, np.ndarray], str]:
        """See ``RemoteModel.predict``."""
        deadline = deadline_ms(requested_deadline, self.settings.deadline_ms)
        name, node = target.name, target.node
        local = self._local(name)
        with self._lock:
            breaker = self._breaker(node)
            skip = local is not None and breaker.is_open(self._clock())
        if not self._connected():
            reason, detail = "executor_unreachable", "not connected to the broker"
        elif skip:
            reason, detail = "executor_unreachable", (
                f"{node} left its last {breaker.failures} calls unanswered; trying it again within "
                f"{self.settings.breaker_open_s:g}s")
        else:
            reason, detail, answer = self._forward(target, feeds, deadline)
            if answer is not None:
                return answer
        if local is not None:
            version, outputs = local.version, self.engine.predict_on(local, feeds)
            self._fell_back(name, node, reason, detail)
            return version, outputs, LOCAL
        with self._lock:
            self._count(name).forward_failures += 1
        raise failure(reason, f"model {name!r} is routed to {node}, which did not answer it ({reason}: {detail}), "
                              "and there is no local copy to fall back to")

    # -- MQTT side (dispatcher thread) ---------------------------------------------------

    def on_reply(self, payload: bytes) -> None:
        """A message on this device's infer inbox: wake the call it answers, if any."""
        try:
            response: InferResponse = messages.decode("infer_response", payload)
        except messages.ProtocolError as exc:
            with self._lock:
                self.bad_replies += 1
            log.debug("dropped an undecodable inference reply: %s", exc)
            return
        with self._lock:
            pending = self._pending.get(response.correlation_id)
            if pending is None or pending.model != response.model:
                self.stray_replies += 1
                return
            pending.response = response
        pending.event.set()

    def connection_lost(self) -> None:
        """The broker session dropped: every waiting call falls back (or fails) now."""
        with self._lock:
            waiting = list(self._pending.values())
            for p in waiting:
                p.lost = True
        for p in waiting:
            p.event.set()

    # -- for the agent ---------------------------------------------------------------------

    def take_events(self) -> list[FallbackEvent]:
        """The fallback events ready to report (and summaries of rate-limited ones whose
        minute is over); each is returned once."""
        now = self._clock()
        with self._lock:
            events, self._events = self._events, []
            for name, limiter in self._limiters.items():
                carried = limiter.overdue(now)
                if carried:
                    events.append(FallbackEvent(
                        name, self._last_executor.get(name, ""), limiter.last_reason,
                        f"{carried} more calls fell back to the local copy (events rate-limited)",
                        suppressed=carried, fallbacks=self._count(name).fallbacks))
        return events

    def figures(self) -> dict[str, dict[str, int]]:
        """Per model, cumulative: ``forwarded``, ``fallbacks``, ``forward_failures``."""
        with self._lock:
            return {name: {"forwarded": c.forwarded, "fallbacks": c.fallbacks, "forward_failures": c.forward_failures}
                    for name, c in self._counts.items()}

    def rtt_ms(self) -> dict[str, float]:
        """Per executor node: the mean network round trip of the calls answered since the
        previous ``rtt_ms()``, or the last one measured when there were none."""
        with self._lock:
            out: dict[str, float] = {}
            for node, r in self._rtt.items():
                if r.n:
                    r.last = r.total / r.n
                    r.total, r.n = 0.0, 0
                if r.last is not None:
                    out[node] = r.last
            return out

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- inside ------------------------------------------------------------------------

    def _local(self, name: str) -> Any:
        try:
            return self.engine.get(name)
        except (ModelNotFound, ModelUnavailable):
            return None

    def _breaker(self, node: str) -> Breaker:
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers[node] = Breaker(self.settings.breaker_failures, self.settings.breaker_open_s)
        return breaker

    def _count(self, name: str) -> _Counts:
        counts = self._counts.get(name)
        if counts is None:
            counts = self._counts[name] = _Counts()
        return counts

    def _forward(self, target: RemoteModel, feeds: list[np.ndarray], deadline: int,
                 ) -> tuple[str, str, Optional[tuple[str, dict[str, np.ndarray], str]]]:
        """One exchange with the executor: (reason, detail, None) when it did not answer
        with outputs, else ("", "", the answer).

        Raises:
            InputError: the executor refused the tensors.
        """
        started = self._clock()
        name, node = target.name, target.node
        correlation = secrets.token_hex(16)
        try:
            request = InferRequest(correlation_id=correlation, model=name, deadline_ms=deadline, reply_to=self.inbox,
                                   names=[s.name for s in target.signature.inputs], tensors=tuple(feeds))
            payload = messages.encode(request)
            topic = topics.infer(node, name)
        except messages.ProtocolError as exc:
            return exc.reason if exc.reason in REASONS else "internal", f"cannot send the call: {exc}", None
        except (ValidationError, ValueError) as exc:
            return "internal", f"cannot send the call: {exc}", None
        pending = _Pending(model=name)
        with self._lock:
            if len(self._pending) >= self.settings.max_pending:
                return "busy", f"{self.settings.max_pending} calls already wait for executors (remote.max_pending)", None
            self._pending[correlation] = pending
        try:
            sent = self._clock()
            try:
                self._publish(topic, payload)
            except Exception as exc:  # NotConnected, a closed client: the node cannot be reached now
                return "executor_unreachable", f"could not send to {node}: {exc}", None
            answered = pending.event.wait(max(0.0, deadline / 1000.0 - (self._clock() - started)))
            if pending.lost:
                return "executor_unreachable", "the broker connection dropped while waiting", None
            response = pending.response
            if not answered or response is None:
                with self._lock:
                    self._breaker(node).failed(self._clock())
                return "deadline_exceeded", f"{node} did not answer within {deadline} ms", None
            waited_ms = (self._clock() - sent) * 1000.0
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        with self._lock:
            self._breaker(node).succeeded()
            rtt = self._rtt.setdefault(node, _Rtt())
            rtt.total += max(0.0, waited_ms - (response.queue_ms or 0.0) - (response.compute_ms or 0.0))
            rtt.n += 1
        kind, reason = verdict(response)
        if kind == "raise":
            raise InputError(f"executor {node}: {response.error.message}")  # type: ignore[union-attr]
        if kind == "fallback":
            return reason, f"{node} answered {response.error.type}: {response.error.message}", None  # type: ignore[union-attr]
        names = response.names or [s.name for s in target.signature.outputs]
        if len(names) != len(response.tensors):
            return "internal", f"{node} answered {len(response.tensors)} tensors for {len(names)} names", None
        with self._lock:
            self._count(name).forwarded += 1
        return "", "", (response.version or target.version, dict(zip(names, response.tensors)), node)

    def _fell_back(self, name: str, node: str, reason: str, detail: str) -> None:
        now = self._clock()
        with self._lock:
            counts = self._count(name)
            counts.fallbacks += 1
            self._last_executor[name] = node
            limiter = self._limiters.get(name)
            if limiter is None:
                limiter = self._limiters[name] = EventLimiter(self.settings.fallback_events_per_min)
            ok, carried = limiter.allow(now, reason)
            if ok:
                self._events.append(FallbackEvent(name, node, reason, detail, suppressed=carried,
                                                  fallbacks=counts.fallbacks))
        if ok and self._on_event is not None:
            self._on_event()


def merge_figures(*sources: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per-model figure dicts from several layers (caller, executor node) as one."""
    out: dict[str, dict[str, int]] = {}
    for source in sources:
        for name, figures in source.items():
            out.setdefault(name, {}).update(figures)
    return out


__all__ = [
    "Breaker", "EventLimiter", "FallbackEvent", "RemoteCaller", "RemoteModel", "RemoteSettings",
    "deadline_ms", "failure", "merge_figures", "verdict",
]
