"""The executor's side of remote inference (``agent.serving_node``) without a broker: the
bounded queue, and ``ServingNode`` answering requests through a recording ``publish`` with
a real engine: outputs, ``busy`` past the queue's bounds (never growth), ``model_not_found``,
``deadline_exceeded`` for a call that waited too long, ``bad_request``, ``invalid_input``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.agent.serving_node import BoundedQueue, ServingNode, expired, peek_reply_address
from edge_runtime.engine import Engine
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import InferRequest, InferResponse

NODE, CALLER = "node-1", "dev-1"
INBOX = topics.infer_inbox(CALLER)


def test_bounded_queue_refuses_past_either_bound() -> None:
    q: BoundedQueue[str] = BoundedQueue(max_items=2, max_bytes=100)
    assert q.offer("a", 60) and not q.offer("b", 41)  # bytes
    assert q.offer("b", 40) and not q.offer("c", 0)  # items
    assert len(q) == 2 and q.nbytes == 100
    assert q.take(0) == "a" and q.offer("c", 60)
    q.close()
    assert not q.offer("d", 1)
    assert [q.take(0), q.take(0), q.take(0)] == ["b", "c", None]
    with pytest.raises(ValueError):
        BoundedQueue(0, 1)


@pytest.mark.parametrize("received, now, deadline, out", [(0.0, 0.4999, 500, False), (0.0, 0.5, 500, True),
                                                          (10.0, 10.0, 1, False), (10.0, 11.0, 1000, True)])
def test_expired(received: float, now: float, deadline: int, out: bool) -> None:
    assert expired(received, now, deadline) is out


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def node(model_files: dict[str, Path]) -> Any:
    engine = Engine(pool_size=1)
    engine.swap("tiny", "1", model_files["tiny_v1"])
    sent: list[tuple[str, InferResponse]] = []
    clock = Clock()
    n = ServingNode(NODE, engine, lambda topic, payload: sent.append((topic, messages.decode("infer_response", payload))),
                    workers=1, queue_size=2, queue_bytes=1024 * 1024, clock=clock)
    n.sent, n.clock = sent, clock  # type: ignore[attr-defined]
    yield n
    n.stop()


def request(x: np.ndarray, *, cid: str = "c1", model: str = "tiny", deadline_ms: int = 1000) -> InferRequest:
    return InferRequest(correlation_id=cid, model=model, deadline_ms=deadline_ms, reply_to=INBOX, names=["x"],
                        tensors=(x,))


def offer(node: Any, req: InferRequest, model: str = "tiny") -> None:
    node.offer(topics.infer(NODE, model), messages.encode(req))


def test_served_call_answers_outputs_and_counts(node: Any, zoo: dict[str, Any]) -> None:
    x = zoo["tiny_v1"].sample_inputs()["x"]
    offer(node, request(x, cid="abc"))
    node.start()
    node.stop()  # answers what is queued, then the workers end
    ((topic, resp),) = node.sent
    assert topic == INBOX and resp.correlation_id == "abc" and resp.error is None and resp.version == "1"
    assert resp.names == ["y"] and np.allclose(resp.tensors[0], zoo["tiny_v1"].reference({"x": x})["y"], atol=1e-5)
    assert resp.compute_ms is not None and resp.queue_ms == 0.0
    assert node.figures() == {"tiny": {"served_for_peers": 1, "peer_busy": 0, "peer_errors": 0}}
    assert node.engine.stats("tiny").calls == 1  # in the model's own figures too


def test_full_queue_answers_busy_and_never_grows(node: Any, zoo: dict[str, Any]) -> None:
    x = zoo["tiny_v1"].sample_inputs()["x"]
    for i in range(5):  # workers not started: nothing leaves the queue
        offer(node, request(x, cid=f"c{i}"))
    assert len(node.queue) == 2
    busy = [r for _, r in node.sent]
    assert [r.correlation_id for r in busy] == ["c2", "c3", "c4"] and all(r.error.type == "busy" for r in busy)
    assert node.figures()["tiny"]["peer_busy"] == 3


def test_queue_bytes_bound(model_files: dict[str, Path], zoo: dict[str, Any]) -> None:
    engine = Engine(pool_size=1)
    engine.swap("tiny", "1", model_files["tiny_v1"])
    sent: list[InferResponse] = []
    x = zoo["tiny_v1"].sample_inputs()["x"]
    n = ServingNode(NODE, engine, lambda t, p: sent.append(messages.decode("infer_response", p)), workers=1,
                    queue_size=100, queue_bytes=x.nbytes)
    offer(n, request(x, cid="a"))
    offer(n, request(x, cid="b"))
    assert len(n.queue) == 1 and [r.error.type for r in sent] == ["busy"]


def test_call_that_waited_past_its_deadline_is_not_run(node: Any, zoo: dict[str, Any]) -> None:
    offer(node, request(zoo["tiny_v1"].sample_inputs()["x"], deadline_ms=100))
    node.clock.t = 0.2
    node.start()
    node.stop()
    ((_, resp),) = node.sent
    assert resp.error.type == "deadline_exceeded" and resp.queue_ms == pytest.approx(200.0)
    assert node.engine.stats("tiny").calls == 0 and node.figures()["tiny"]["peer_errors"] == 1


def test_unknown_model_and_mismatched_topic(node: Any, zoo: dict[str, Any]) -> None:
    x = zoo["tiny_v1"].sample_inputs()["x"]
    offer(node, request(x, cid="u1", model="other"), model="other")
    offer(node, request(x, cid="u2", model="tiny"), model="other")
    types = {r.correlation_id: r.error.type for _, r in node.sent}
    assert types == {"u1": "model_not_found", "u2": "bad_request"}
    assert node.unknown_model_calls == 1 and len(node.queue) == 0


def test_wrong_tensors_are_invalid_input(node: Any) -> None:
    offer(node, request(np.zeros((2, 3), np.float32)))
    node.start()
    node.stop()
    ((_, resp),) = node.sent
    assert resp.error.type == "invalid_input" and "expected" in resp.error.message


def test_calls_for_another_node_are_ignored(node: Any, zoo: dict[str, Any]) -> None:
    node.offer(topics.infer("node-2", "tiny"), messages.encode(request(zoo["tiny_v1"].sample_inputs()["x"])))
    node.offer("fleet/v1/not/a/topic", b"")
    assert node.sent == [] and len(node.queue) == 0


def _frame(header: dict[str, Any], tail: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sII", b"EFT1", len(head), 0) + head + tail


def test_unreadable_request_with_an_address_gets_bad_request(node: Any) -> None:
    payload = _frame({"correlation_id": "zz", "reply_to": INBOX, "model": "tiny", "deadline_ms": -1})
    node.offer(topics.infer(NODE, "tiny"), payload)
    ((topic, resp),) = node.sent
    assert topic == INBOX and resp.correlation_id == "zz" and resp.error.type == "bad_request"


@pytest.mark.parametrize("payload", [
    b"junk",
    _frame({"correlation_id": "zz", "reply_to": "fleet/v1/dev/x/state"}),  # not an inbox: never published to
    _frame({"correlation_id": "bad id!", "reply_to": INBOX}),
    _frame({"reply_to": INBOX}),
])
def test_unreadable_request_without_a_valid_address_is_dropped(node: Any, payload: bytes) -> None:
    node.offer(topics.infer(NODE, "tiny"), payload)
    assert node.sent == [] and node.dropped == 1


def test_peek_reply_address() -> None:
    assert peek_reply_address(_frame({"correlation_id": "a1", "reply_to": INBOX})) == ("a1", INBOX)
    assert peek_reply_address(b"EFT1") is None
