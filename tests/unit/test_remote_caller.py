"""The caller's side of remote inference (``agent.remote``) without a broker: the pure parts
(deadline, verdict, typed failures, breaker, event limiter) as tables, and ``RemoteCaller``
against an in-memory executor -- a ``publish`` function that answers through ``on_reply``
-- with a real engine for the local copy."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

from edge_runtime.agent.remote import (
    Breaker, EventLimiter, RemoteCaller, RemoteSettings, deadline_ms, failure, merge_figures, verdict,
)
from edge_runtime.agent.serving_node import ServingNode
from edge_runtime.engine import Engine
from edge_runtime.errors import Busy, DeadlineExceeded, ExecutorUnreachable, InputError, ModelUnavailable
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ErrorInfo, InferResponse
from tests.agentkit import manifest_for

ME, NODE = "dev-1", "node-1"


# -- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("requested, expected", [(None, 500), (1, 1), (600_000, 600_000), ("250", 250), (" 7 ", 7)])
def test_deadline_override(requested: Any, expected: int) -> None:
    assert deadline_ms(requested, 500) == expected


@pytest.mark.parametrize("requested", [0, -5, 600_001, True, 1.5, "abc", "", [], {}])
def test_deadline_override_refused(requested: Any) -> None:
    with pytest.raises(InputError, match="deadline_ms"):
        deadline_ms(requested, 500)


def _response(error: Optional[str]) -> InferResponse:
    return InferResponse(correlation_id="c1", model="m",
                         error=ErrorInfo(type=error, message="x") if error else None)


@pytest.mark.parametrize("error, expected", [
    (None, ("ok", "")),
    ("invalid_input", ("raise", "invalid_input")),
    ("busy", ("fallback", "busy")),
    ("deadline_exceeded", ("fallback", "deadline_exceeded")),
    ("model_not_found", ("fallback", "model_not_found")),
    ("bad_request", ("fallback", "internal")),  # not an event reason
    ("something_new", ("fallback", "internal")),
])
def test_verdict(error: Optional[str], expected: tuple[str, str]) -> None:
    assert verdict(_response(error)) == expected


@pytest.mark.parametrize("reason, cls, code", [
    ("busy", Busy, "busy"),
    ("deadline_exceeded", DeadlineExceeded, "deadline_exceeded"),
    ("executor_unreachable", ExecutorUnreachable, "executor_unreachable"),
    ("model_not_found", ModelUnavailable, "model_unavailable"),
    ("internal", ModelUnavailable, "model_unavailable"),
])
def test_failure_is_a_typed_503(reason: str, cls: type, code: str) -> None:
    err = failure(reason, "msg")
    assert type(err) is cls and err.code == code and err.http_status == 503


def test_breaker_opens_after_consecutive_failures_and_closes_on_an_answer() -> None:
    b = Breaker(failures=2, open_s=5.0)
    b.failed(0.0)
    assert not b.is_open(0.0)
    b.failed(1.0)
    assert b.is_open(1.0) and b.is_open(5.9) and not b.is_open(6.0)  # half open after open_s
    b.failed(6.0)  # the probe failed too: open again
    assert b.is_open(6.0)
    b.succeeded()
    assert not b.is_open(6.0) and b.failures == 0


def test_event_limiter_counts_what_it_suppresses() -> None:
    lim = EventLimiter(per_min=2)
    assert lim.allow(0.0, "busy") == (True, 0)
    assert lim.allow(1.0, "busy") == (True, 0)
    assert lim.allow(2.0, "deadline_exceeded") == (False, 0)
    assert lim.allow(3.0, "busy") == (False, 0)
    assert lim.overdue(30.0) == 0  # the minute is not over
    assert lim.allow(61.0, "busy") == (True, 2)  # the next event carries the count
    lim.allow(62.0, "busy")
    lim.allow(63.0, "busy")
    assert lim.overdue(200.0) == 1 and lim.overdue(300.0) == 0


def test_merge_figures() -> None:
    assert merge_figures({"a": {"forwarded": 1}}, {"a": {"served_for_peers": 2}, "b": {"peer_busy": 3}}) == {
        "a": {"forwarded": 1, "served_for_peers": 2}, "b": {"peer_busy": 3}}


# -- the caller against an in-memory executor ----------------------------------------------------


@pytest.fixture
def tiny(model_files: dict[str, Path], zoo: dict[str, Any]) -> dict[str, Any]:
    x = zoo["tiny_v1"].sample_inputs()["x"]
    return {"path": model_files["tiny_v1"], "x": x, "y": zoo["tiny_v1"].reference({"x": x})["y"],
            "spec": messages.ModelSpec.model_validate(
                {"version": "1", "manifest": manifest_for(model_files["tiny_v1"], "tiny", "1"), "route": NODE})}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A caller whose ``publish`` hands requests to ``answer`` (the in-memory executor)."""

    def __init__(self, tiny: dict[str, Any], *, local: bool, settings: RemoteSettings = RemoteSettings(deadline_ms=50),
                 answer: Optional[Callable[[messages.InferRequest], Optional[InferResponse]]] = None) -> None:
        self.engine = Engine(pool_size=1)
        if local:
            self.engine.swap("tiny", "1", tiny["path"])
        self.tiny = tiny
        self.sent: list[tuple[str, messages.InferRequest]] = []
        self.connected = True
        self.answer = answer
        self.publish_error: Optional[Exception] = None
        self.clock = Clock()
        self.woken = 0
        self.caller = RemoteCaller(ME, self.engine, route=lambda n: NODE if n == "tiny" else "local",
                                   spec=lambda n: tiny["spec"] if n == "tiny" else None, publish=self._publish,
                                   connected=lambda: self.connected, settings=settings, on_event=self._woken,
                                   clock=self.clock)

    def _woken(self) -> None:
        self.woken += 1

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        request: messages.InferRequest = messages.decode("infer_request", payload)
        self.sent.append((topic, request))
        reply = self.answer(request) if self.answer else None
        if reply is not None:
            self.caller.on_reply(messages.encode(reply))

    def call(self, **kw: Any) -> tuple[str, dict[str, np.ndarray], str]:
        model = self.caller.resolve("tiny")
        assert model is not None
        return model.predict(model.signature.feeds({"x": self.tiny["x"]}), **kw)


def _outputs(y: np.ndarray) -> Callable[[messages.InferRequest], InferResponse]:
    def answer(req: messages.InferRequest) -> InferResponse:
        return InferResponse(correlation_id=req.correlation_id, model=req.model, version="1", names=["y"],
                             tensors=(y,), compute_ms=1.0, queue_ms=0.5)
    return answer


def _error(kind: str) -> Callable[[messages.InferRequest], InferResponse]:
    return lambda req: InferResponse(correlation_id=req.correlation_id, model=req.model,
                                     error=ErrorInfo(type=kind, message=f"{kind}!"))


def test_resolve_follows_the_route_and_the_desired_signature(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=False)
    assert rig.caller.resolve("other") is None  # routed locally
    model = rig.caller.resolve("tiny")
    assert model is not None and model.node == NODE and model.version == "1"
    assert [s.name for s in model.signature.inputs] == ["x"]


def test_answered_call_returns_the_node_outputs(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=True, answer=_outputs(tiny["y"] + 1))
    version, out, served_by = rig.call()
    assert served_by == NODE and version == "1" and np.array_equal(out["y"], tiny["y"] + 1)
    topic, req = rig.sent[0]
    assert topic == topics.infer(NODE, "tiny") and req.reply_to == topics.infer_inbox(ME)
    assert req.deadline_ms == 50 and req.names == ["x"] and len(req.correlation_id) == 32
    assert rig.caller.figures()["tiny"] == {"forwarded": 1, "fallbacks": 0, "forward_failures": 0}
    assert rig.engine.stats("tiny").calls == 0  # the local copy did not run
    assert set(rig.caller.rtt_ms()) == {NODE}
    assert rig.caller.pending == 0


def test_per_call_deadline_goes_on_the_wire(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=False, answer=_outputs(tiny["y"]))
    rig.call(deadline_ms=1234)
    assert rig.sent[0][1].deadline_ms == 1234


def test_correlation_ids_differ_and_stray_replies_are_dropped(tiny: dict[str, Any]) -> None:
    def wrong(req: messages.InferRequest) -> InferResponse:
        return InferResponse(correlation_id="not" + req.correlation_id[3:], model=req.model, names=["y"],
                             tensors=(tiny["y"],))

    rig = Rig(tiny, local=True, answer=wrong)
    _, out, served_by = rig.call()  # nobody answers its id: the deadline passes, the local copy answers
    assert served_by == "local" and np.allclose(out["y"], tiny["y"], atol=1e-5)
    rig.call()
    assert rig.sent[0][1].correlation_id != rig.sent[1][1].correlation_id
    assert rig.caller.stray_replies == 2
    rig.caller.on_reply(b"junk")
    assert rig.caller.bad_replies == 1
    assert [e.reason for e in rig.caller.take_events()] == ["deadline_exceeded", "deadline_exceeded"]


@pytest.mark.parametrize("kind", ["busy", "model_not_found", "deadline_exceeded"])
def test_error_answers_fall_back_to_the_local_copy(tiny: dict[str, Any], kind: str) -> None:
    rig = Rig(tiny, local=True, answer=_error(kind))
    _, out, served_by = rig.call()
    assert served_by == "local" and np.allclose(out["y"], tiny["y"], atol=1e-5)
    assert rig.engine.stats("tiny").calls == 1
    (event,) = rig.caller.take_events()
    assert (event.model, event.executor, event.reason, event.fallbacks) == ("tiny", NODE, kind, 1)
    assert rig.woken == 1
    assert rig.caller.figures()["tiny"]["fallbacks"] == 1


@pytest.mark.parametrize("kind, cls", [("busy", Busy), ("deadline_exceeded", DeadlineExceeded),
                                       ("model_not_found", ModelUnavailable)])
def test_error_answers_without_a_local_copy_are_typed_503s(tiny: dict[str, Any], kind: str, cls: type) -> None:
    rig = Rig(tiny, local=False, answer=_error(kind))
    with pytest.raises(cls, match="no local copy"):
        rig.call()
    assert rig.caller.figures()["tiny"]["forward_failures"] == 1
    assert rig.caller.take_events() == []


def test_invalid_input_is_the_callers_fault_not_a_fallback(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=True, answer=_error("invalid_input"))
    with pytest.raises(InputError, match=NODE):
        rig.call()
    assert rig.engine.stats("tiny").calls == 0 and rig.caller.take_events() == []


def test_disconnected_falls_back_at_once_without_publishing(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=True, answer=_outputs(tiny["y"]))
    rig.connected = False
    assert rig.call()[2] == "local"
    assert rig.sent == []
    assert rig.caller.take_events()[0].reason == "executor_unreachable"
    rig2 = Rig(tiny, local=False)
    rig2.connected = False
    with pytest.raises(ExecutorUnreachable):
        rig2.call()


def test_publish_failure_is_unreachable(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=False)
    rig.publish_error = ConnectionError("no session")
    with pytest.raises(ExecutorUnreachable, match="no session"):
        rig.call()
    assert rig.caller.pending == 0


def test_breaker_skips_a_silent_node_while_a_local_copy_exists(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=True, settings=RemoteSettings(deadline_ms=20, breaker_failures=2, breaker_open_s=10))
    for _ in range(2):
        assert rig.call()[2] == "local"  # waited for the deadline each time
    assert len(rig.sent) == 2
    assert rig.call()[2] == "local"
    assert len(rig.sent) == 2  # open: not even tried
    rig.clock.t += 10
    assert rig.call()[2] == "local" and len(rig.sent) == 3  # half open: tried again
    reasons = [e.reason for e in rig.caller.take_events()]
    assert reasons == ["deadline_exceeded", "deadline_exceeded", "executor_unreachable", "deadline_exceeded"]


def test_connection_lost_wakes_waiting_calls(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=False, settings=RemoteSettings(deadline_ms=600_000))
    rig.answer = lambda req: threading.Thread(target=rig.caller.connection_lost).start()  # type: ignore[func-returns-value]
    with pytest.raises(ExecutorUnreachable, match="dropped"):
        rig.call()


def test_pending_calls_are_bounded(tiny: dict[str, Any]) -> None:
    release = threading.Event()
    rig = Rig(tiny, local=False, settings=RemoteSettings(deadline_ms=600_000, max_pending=1))
    first_sent = threading.Event()

    def hold(req: messages.InferRequest) -> None:
        first_sent.set()
        threading.Thread(target=lambda: (release.wait(), rig.caller.on_reply(messages.encode(
            _outputs(tiny["y"])(req))))).start()
        return None

    rig.answer = hold  # type: ignore[assignment]
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(rig.call()))
    t.start()
    assert first_sent.wait(30)
    with pytest.raises(Busy, match="max_pending"):
        rig.call()
    release.set()
    t.join(30)
    assert results and results[0][2] == NODE


def test_fallback_events_are_rate_limited_with_the_count_carried(tiny: dict[str, Any]) -> None:
    rig = Rig(tiny, local=True, settings=RemoteSettings(deadline_ms=50, fallback_events_per_min=2),
              answer=_error("busy"))
    for _ in range(5):
        rig.call()
    events = rig.caller.take_events()
    assert [e.suppressed for e in events] == [0, 0]
    assert rig.caller.figures()["tiny"]["fallbacks"] == 5
    assert rig.caller.take_events() == []  # the minute is not over
    rig.clock.t += 61
    (summary,) = rig.caller.take_events()
    assert summary.suppressed == 3 and summary.reason == "busy" and summary.fallbacks == 5


def test_caller_and_node_in_memory_end_to_end(tiny: dict[str, Any]) -> None:
    """The real executor side answers the real caller (both ends of the wire in memory)."""
    node_engine = Engine(pool_size=1)
    node_engine.swap("tiny", "1", tiny["path"])
    holder: dict[str, Any] = {}
    node = ServingNode(NODE, node_engine, lambda topic, payload: holder["rig"].caller.on_reply(payload),
                       workers=1, queue_size=4)
    node.start()
    try:
        rig = Rig(tiny, local=False, settings=RemoteSettings(deadline_ms=30_000))
        holder["rig"] = rig
        rig.answer = lambda req: node.offer(topics.infer(NODE, req.model), messages.encode(req))  # type: ignore[assignment]
        version, out, served_by = rig.call()
        assert served_by == NODE and version == "1" and np.allclose(out["y"], tiny["y"], atol=1e-5)
        assert node.figures()["tiny"]["served_for_peers"] == 1 and node_engine.stats("tiny").calls == 1
    finally:
        node.stop()


def test_telemetry_merges_remote_figures_routes_and_round_trips(tiny: dict[str, Any], tmp_path: Path) -> None:
    from edge_runtime.agent.telemetry import TelemetryCollector

    engine = Engine(pool_size=1)
    engine.swap("tiny", "1", tiny["path"])
    extra = {"tiny": {"forwarded": 3, "fallbacks": 1, "served_for_peers": 2, "unknown_field": 9},
             "solo": {"forwarded": 4, "forward_failures": 1}, "bad name!": {"forwarded": 1}}
    collector = TelemetryCollector(engine, data_dir=tmp_path, device_id=ME, extra=lambda: extra,
                                   routes=lambda: {"tiny": NODE, "solo": NODE})
    sample = collector.collect(1, peers_rtt_ms={NODE: 2.5, "bad id!": 1.0, "node-2": float("nan")})
    tiny_fig, solo = sample.models["tiny"], sample.models["solo"]
    assert (tiny_fig.route, tiny_fig.forwarded, tiny_fig.fallbacks, tiny_fig.served_for_peers) == (NODE, 3, 1, 2)
    assert tiny_fig.version == "1"
    assert (solo.route, solo.forwarded, solo.forward_failures, solo.calls, solo.version) == (NODE, 4, 1, 0, None)
    assert set(sample.models) == {"tiny", "solo"}
    assert sample.peers_rtt_ms == {NODE: 2.5}
    messages.decode("telemetry", messages.encode(sample))  # what goes on the wire decodes
