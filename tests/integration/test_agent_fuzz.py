"""Issue 4: "at least 1,000 hypothesis-generated malformed payloads on every subscribed topic:
the agent stays up and keeps serving".

One real agent (``edge-runtime run``) per broker, tiny v1 installed by a signed generation-1
desired state, then >= ``N`` generated payloads on each concrete topic it subscribes to
(``topics.device_subscriptions``):

    desired       fleet/v1/dev/{id}/desired          (a few retained; the good document restored after)
    cmd           fleet/v1/dev/{id}/cmd
    ctl_state     fleet/v1/ctl/state
    infer_inbox   fleet/v1/dev/{id}/inbox/infer
    infer         fleet/v1/node/{id}/infer/tiny
    chunk_random  fleet/v1/dev/{id}/inbox/chunk/{random sha}
    chunk_live    fleet/v1/dev/{id}/inbox/chunk/{sha of tiny v2}, while that transfer runs

Strategies are structure-aware: random bytes; random JSON; DSSE-shaped envelopes with random
fields, some correctly signed by trusted keys over bad bodies or under a wrong payload type;
real signed documents with bit flips, truncation, duplication and splices; ``EFC1`` chunk
frames and ``EFT1`` tensor frames with random headers and lengths; empty and ~300 KB payloads.

After every topic: the process is alive, REST predict answers with v1's outputs, the retained
state shows kws active "1" at generation 1, and the trust floors are unchanged. At the end the
agent still accepts a real generation-2 desired state (v2 answers), and the ``rejected`` events
it sent stayed under ``REJECTION_EVENTS_PER_MIN``.

amqtt runs in ``make test``; Mosquitto too under ``EDGEFLEET_SLOW=1``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from controller.artifact_service import ArtifactService, DirectoryLookup
from controller.artifacts import ArtifactServer
from edge_runtime.agent.daemon import REJECTION_EVENTS_PER_MIN
from edge_runtime.mqtt import MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.signed import PAYLOAD_TYPES
from tests import trustkit
from tests.agentkit import AgentProcess, Keys, NotifyListener, Observer, command_doc, desired_doc, manifest_for, write_config
from tests.helpers import free_port, wait_until

DEVICE = "dev-fuzz-1"
N = int(os.environ.get("EDGEFLEET_FUZZ_N", "1000"))
HUGE = 300 * 1024
UTC = timezone.utc
SIGNERS = ("deploy1", "deploy2", "command1", "root1", "root2", "root3")


def _slow_mosquitto(kind: str) -> Any:
    if kind == "mosquitto":
        return pytest.param(kind, marks=pytest.mark.slow)
    return kind


# -- strategies ----------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=25,
)
# JSON the strict parser must refuse: NaN, duplicate keys, overflow, deep nesting, bad UTF-8.
nasty_json = st.sampled_from([
    b"NaN", b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1,"a":2}', b'{"x":1e999}', b"[" * 100_000, b"{" * 50_000,
    b'{"payloadType":"a","payload":"","signatures":[],"payloadType":"b"}', b'"\xff\xfe"', b"\xef\xbb\xbf{}",
    b'{"spec_version":"2.0"}', b'{"spec_version":"1.999999999999999999999"}', b"null", b"[]", b"0", b'""',
])
raw_bytes = st.binary(max_size=2048)
random_json = json_values.map(lambda v: json.dumps(v).encode())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _iso(t: datetime) -> str:
    return trustkit.iso(t)


def mutate(base: bytes, draw: Any) -> bytes:
    """One or a few byte-level mutations of ``base``."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "duplicate", "insert", "replace", "splice", "drop"]))
        n = len(data)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op == "duplicate":
            i = draw(st.integers(0, n))
            j = draw(st.integers(i, n))
            data = data[:j] + data[i:j] + data[j:] if i < j else data + data
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "replace" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i + 4] = draw(st.binary(min_size=1, max_size=4))
        elif op == "splice":
            i = draw(st.integers(0, n))
            data = data[:i] + draw(st.sampled_from([b'"', b"}", b"{", b",", b"\\", b"\x00", b"]", b'":"']))  + data[i:]
        elif op == "drop" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@st.composite
def mutated(draw: Any, bases: list[bytes]) -> bytes:
    """A real document (or frame) from ``bases`` with byte-level mutations."""
    return mutate(draw(st.sampled_from(bases)), draw)


def _header(kind: str, device: str, issued: datetime, expires: datetime) -> dict[str, Any]:
    return {"type": kind, "spec_version": "1.0", "issued_at": _iso(issued), "expires": _iso(expires),
            "target": {"device": device}}


@st.composite
def mutated_body(draw: Any, template: dict[str, Any], safe: dict[str, Any]) -> dict[str, Any]:
    """``template`` with fields deleted, replaced by random JSON or by ``safe`` values (a body
    that a trusted key may sign without it ever being acceptable), and extra keys added."""
    body = dict(template)
    for key in list(body):
        choice = draw(st.sampled_from(["keep"] * 12 + ["delete", "random", "safe", "safe"]))
        if choice == "delete":
            del body[key]
        elif choice == "random":
            body[key] = draw(json_values)
        elif choice == "safe" and key in safe:
            body[key] = draw(safe[key])
    for key, strat in safe.items():  # the fields that could make a signed body acceptable
        if key in body and draw(st.booleans()):
            body[key] = draw(strat)
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(max_size=10))] = draw(json_values)
    return body


def _signed_safe(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """Force the counters of a body a trusted key signs to values that can never be accepted
    (generation <= 1 = current or replayed; seq <= 1, the floor) so no valid document slips in."""
    field = "generation" if kind == "desired" else "seq"
    value = body.get(field)
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        body[field] = 1
    return body


@st.composite
def envelopes(draw: Any, kind: str, template: dict[str, Any], safe: dict[str, Any]) -> bytes:
    """DSSE-shaped JSON: mostly the right payload type signed by the right role over a body
    mutated from ``template`` (so verification gets past the envelope to the body checks);
    also other types, other keys, random bodies, garbage or missing signatures."""
    body_obj = draw(st.one_of(mutated_body(template, safe), mutated_body(template, safe), json_values))
    if isinstance(body_obj, dict):
        body_obj = _signed_safe(body_obj, kind)
    body = json.dumps(body_obj, separators=(",", ":")).encode() if draw(st.integers(0, 7)) else draw(raw_bytes)
    right = PAYLOAD_TYPES[kind]
    ptype = draw(st.one_of(st.just(right), st.just(right), st.just(right),
                           st.sampled_from(sorted(PAYLOAD_TYPES.values())), st.text(max_size=50)))
    how = draw(st.sampled_from(["signed", "signed", "signed", "garbage", "none", "mixed"]))
    if how in ("signed", "mixed"):
        role_key = "deploy1" if kind == "desired" else "command1"
        signers = draw(st.one_of(st.just([role_key]), st.lists(st.sampled_from(SIGNERS), min_size=1, max_size=3)))
        env = json.loads(trustkit.sign(kind, body, signers, payload_type=ptype))
    else:
        env = {"payloadType": ptype, "payload": b64(body), "signatures": []}
    if how in ("garbage", "mixed"):
        env["signatures"] += draw(st.lists(st.fixed_dictionaries({
            "keyid": st.one_of(st.sampled_from([trustkit.kid(n) for n in SIGNERS]), st.text(max_size=70),
                               st.binary(min_size=32, max_size=32).map(lambda b: b.hex())),
            "sig": st.one_of(st.binary(min_size=64, max_size=64).map(b64), st.text(max_size=90), json_values),
        }), min_size=1, max_size=4))
    if draw(st.integers(0, 9)) == 0:  # a wrong shape: a key missing, one extra, a wrong type
        op = draw(st.sampled_from(["del", "extra", "retype"]))
        key = draw(st.sampled_from(["payloadType", "payload", "signatures"]))
        if op == "del":
            env.pop(key, None)
        elif op == "extra":
            env[draw(st.text(max_size=10))] = draw(json_values)
        else:
            env[key] = draw(json_values)
    if draw(st.integers(0, 12)) == 0:
        env["payload"] = draw(st.one_of(st.text(max_size=60), json_values))
    return json.dumps(env).encode()


def huge(kind: str) -> list[bytes]:
    blob = os.urandom(HUGE)
    env = json.dumps({"payloadType": PAYLOAD_TYPES.get(kind, "x"), "payload": b64(blob),
                      "signatures": [{"keyid": trustkit.kid("deploy1"), "sig": b64(os.urandom(64))}]}).encode()
    return [blob, env, b"{" + b'"a":1,' * (HUGE // 6) + b'"z":0}', b"EFC1" + struct.pack("<I", 10) + b"{}" * 5 + blob]


# -- chunk and tensor frames ---------------------------------------------------------------

_CHUNK_PREFIX = struct.Struct("<4sI")
_EFT_PREFIX = struct.Struct("<4sII")


@st.composite
def chunk_frames(draw: Any, sha: str, size: int, chunk: int) -> bytes:
    """``EFC1`` frames aimed at a transfer of ``sha`` (``size`` bytes, chunks of ``chunk``):
    headers with the right or a wrong sha, offsets at and off chunk starts, lengths that match
    the data or not, server sizes around the signed one, error answers; prefixes whose
    header length lies."""
    n = draw(st.integers(0, 4))
    if n == 0:
        data = bytes(draw(st.integers(0, min(size, chunk) + 16)))  # cheap exact-length data
    else:
        data = draw(st.binary(max_size=512))
    header: dict[str, Any] = {
        "request_id": draw(st.one_of(st.from_regex(r"\A[A-Za-z0-9]{1,16}\Z"), st.text(max_size=80))),
        "sha256": draw(st.one_of(st.just(sha), st.just(sha), st.binary(min_size=32, max_size=32).map(lambda b: b.hex()),
                                 st.text(max_size=70), st.just(sha.upper()))),
        "offset": draw(st.one_of(st.integers(0, 3).map(lambda i: i * chunk), st.integers(-5, size + 5),
                                 st.integers(min_value=-(2**64), max_value=2**64))),
        "length": draw(st.one_of(st.just(len(data)), st.integers(-2, 300 * 1024))),
        "spec_version": draw(st.sampled_from(["1.0", "1.9", "2.0", "x", "1.0"])),
    }
    if draw(st.booleans()):
        header["size"] = draw(st.one_of(st.just(size), st.just(size + 1), st.just(size - 1), st.integers(-1, 2**63)))
    if draw(st.integers(0, 4)) == 0:
        header["error"] = draw(st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["artifact_not_found", "internal", "unavailable", "x"]),
                                   "message": st.text(max_size=20)}, optional={"reason": st.text(max_size=20)}),
            json_values))
    if draw(st.integers(0, 6)) == 0:
        header[draw(st.sampled_from(["data", "extra", "sha256", "offset"]))] = draw(json_values)
    head = json.dumps(header).encode() if draw(st.integers(0, 8)) else draw(st.one_of(random_json, raw_bytes))
    magic = draw(st.sampled_from([messages.CHUNK_MAGIC] * 6 + [b"EFC2", b"EFT1", b"\x00\x00\x00\x00"]))
    head_len = len(head) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**32 - 1))
    frame = _CHUNK_PREFIX.pack(magic, head_len) + head + data
    return mutate(frame, draw) if draw(st.integers(0, 5)) == 0 else frame


@st.composite
def tensor_frames(draw: Any, bases: list[bytes]) -> bytes:
    """``EFT1`` frames: real infer requests/responses mutated, or random headers, counts and
    ``.npy`` blobs (real and corrupted)."""
    if draw(st.booleans()):
        return mutate(draw(st.sampled_from(bases)), draw)
    header = draw(st.one_of(random_json, raw_bytes, st.just(json.dumps({
        "correlation_id": "c1", "model": "tiny", "deadline_ms": 1000, "spec_version": "1.0",
        "reply_to": topics.infer_inbox(DEVICE), "names": ["x"]}).encode())))
    tensors = draw(st.lists(st.one_of(
        st.binary(max_size=200),
        st.sampled_from([_npy(np.zeros((1, 16), np.float32)), _npy(np.arange(3, dtype=np.int8))]).map(
            lambda b: mutate(b, draw) if draw(st.booleans()) else b)), max_size=3))
    n = len(tensors) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**32 - 1))
    head_len = len(header) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**32 - 1))
    body = b"".join(struct.pack("<Q", len(t) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))) + t
                    for t in tensors)
    return _EFT_PREFIX.pack(draw(st.sampled_from([b"EFT1", b"EFT1", b"EFC1", b"EFT2"])), head_len, n) + header + body


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def topic_strategy(name: str, *, desired_bases: list[bytes], command_bases: list[bytes], infer_bases: list[bytes],
                   ctl_bases: list[bytes], live_sha: str, live_size: int, chunk: int) -> Any:
    generic = [raw_bytes, random_json, nasty_json]
    now = datetime.now(UTC)
    if name == "desired":
        template = {**_header("desired", DEVICE, now - timedelta(minutes=1), now + timedelta(days=1)),
                    "generation": 1, "models": {}}
        safe = {"generation": st.integers(max_value=1), "target": st.sampled_from(
            [{"device": "other-dev"}, {"group": "g"}, {"device": DEVICE}, {}]),
            "expires": st.just(_iso(now - timedelta(days=1))), "type": st.sampled_from(["command", "root", "x"])}
        specific = [envelopes("desired", template, safe), envelopes("desired", template, safe),
                    mutated(desired_bases)]
    elif name == "cmd":
        template = {**_header("command", DEVICE, now - timedelta(minutes=1), now + timedelta(days=1)),
                    "seq": 1, "name": "ping", "args": {}}
        safe = {"seq": st.integers(max_value=1), "name": st.one_of(st.sampled_from(messages.COMMANDS), st.text(max_size=12)),
                "args": json_values, "target": st.sampled_from([{"device": "other-dev"}, {"device": DEVICE}])}
        specific = [envelopes("command", template, safe), envelopes("command", template, safe),
                    mutated(command_bases)]
    elif name == "ctl_state":
        specific = [st.fixed_dictionaries({"online": st.one_of(st.booleans(), json_values)},
                                          optional={"at": st.one_of(st.text(max_size=30), st.just(_iso(now))),
                                                    "instance": st.text(max_size=70),
                                                    "spec_version": st.sampled_from(["1.0", "1.5", "2.0", "1"])}
                                          ).map(lambda d: json.dumps(d).encode()),
                    mutated(ctl_bases)]
    elif name in ("infer_inbox", "infer"):
        specific = [tensor_frames(infer_bases), tensor_frames(infer_bases)]
    elif name == "chunk_random":
        specific = [chunk_frames(hashlib.sha256(b"nothing").hexdigest(), live_size, chunk),
                    chunk_frames(live_sha, live_size, chunk)]
    elif name == "chunk_live":
        specific = [chunk_frames(live_sha, live_size, chunk), chunk_frames(live_sha, live_size, chunk),
                    chunk_frames(live_sha, live_size, chunk)]
    else:  # pragma: no cover
        raise ValueError(name)
    return st.one_of(*generic, *specific, *specific)


# -- the agent around the fuzz -------------------------------------------------------------


class GatedServer(ArtifactServer):
    """The real chunk server, except that requests for ``blocked`` artifacts go unanswered
    (counted in ``held``): a transfer that stays in flight for as long as the test wants."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.blocked: set[str] = set()
        self.held: Counter[str] = Counter()

    def handle(self, payload: bytes, *, topic: Optional[str] = None) -> Optional[tuple[str, bytes]]:
        try:
            sha = topics.parse(topic).sha256 if topic else None
        except ValueError:
            sha = None
        if sha in self.blocked:
            self.held[sha] += 1
            return None
        return super().handle(payload, topic=topic)


def rest_predict(port: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/kws:predict", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return np.asarray(json.loads(resp.read())["outputs"], dtype=np.float32)


def floors(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "trust" / "state.json").read_text())["floors"]


@pytest.mark.parametrize("broker_kind", [_slow_mosquitto("amqtt"), _slow_mosquitto("mosquitto")])
def test_malformed_payloads_on_every_subscribed_topic(broker_kind, request, tmp_path, model_files, zoo):
    broker = request.getfixturevalue(f"{broker_kind}_broker")
    started = time.monotonic()
    keys = Keys()
    root = keys.write_root(tmp_path / "root.json")
    data_dir = tmp_path / "data"
    port = free_port()
    chunk = 4096  # several chunks for tiny v2 (~10 KB): offsets at and off chunk starts matter
    cfg = write_config(tmp_path / "agent.toml", device_id=DEVICE, data_dir=data_dir, broker_url=broker.url,
                       trust_root=root, rest_port=port,
                       extra={"limits": {"chunk_size": chunk, "chunk_retries": 100, "outbox_drain_per_s": 2000.0}})
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("tiny_v1", "tiny_v2"):
        data = model_files[name].read_bytes()
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    m1 = manifest_for(model_files["tiny_v1"], "kws", "1")
    m2 = manifest_for(model_files["tiny_v2"], "kws", "2")
    good1 = desired_doc(DEVICE, 1, {"kws": ("1", m1)})
    x = zoo["tiny_v1"].sample_inputs()
    want1 = zoo["tiny_v1"].reference(x)["y"]
    want2 = zoo["tiny_v2"].reference(x)["y"]
    assert not np.allclose(want1, want2, atol=1e-4)

    now = datetime.now(UTC)
    desired_bases = [
        good1,
        desired_doc(DEVICE, 5, {"kws": ("2", m2)}, issued_at=now - timedelta(days=3), expires=now - timedelta(days=2)),
        desired_doc("other-dev", 9, {"kws": ("2", m2)}),
        desired_doc(DEVICE, 9, {"kws": ("2", m2)}, signers=("command1",)),  # the wrong role
        trustkit.sign("desired", json.loads(base64.b64decode(json.loads(good1)["payload"])) | {"generation": 7},
                      ["deploy1"], payload_type=PAYLOAD_TYPES["command"]),  # signed, but typed as a command
        trustkit.root_json(2),  # a validly signed root rotation, on the wrong topic
    ]
    ping1 = command_doc(DEVICE, 1, "ping")
    command_bases = [
        ping1, command_doc(DEVICE, 1, "restart"), command_doc("other-dev", 50, "restart"),
        command_doc(DEVICE, 60, "restart", issued_at=now - timedelta(days=3), expires=now - timedelta(days=2)),
        command_doc(DEVICE, 70, "restart", signers=("deploy1",)), good1,
    ]
    infer_bases = [
        messages.encode(messages.InferRequest(correlation_id="c1", model="tiny", deadline_ms=1000,
                                              reply_to=topics.infer_inbox("caller-1"), names=["x"],
                                              tensors=(x["x"],))),
        messages.encode(messages.InferResponse(correlation_id="c1", model="tiny", names=["y"], tensors=(want1,))),
    ]
    ctl_bases = [messages.encode(messages.ControllerState(online=True, at=now, instance="ctl-1")),
                 messages.encode(messages.ControllerState(online=False))]
    live_sha, live_size = m2["sha256"], m2["size"]

    ctl = MqttClient(MqttConfig(url=broker.url, client_id="fuzz-ctl", keepalive=5,
                                reconnect_min_delay=0.1, reconnect_max_delay=1.0))
    ctl.connect(timeout=10)
    server = GatedServer(DirectoryLookup(blobs))
    service = ArtifactService(ctl, server)
    service.start()
    counts: Counter[str] = Counter()
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fuzz-pub")
    try:
        with NotifyListener() as notify, Observer(broker.url, DEVICE) as obs, AgentProcess(cfg, notify=notify) as agent:
            agent.wait_ready(30)
            obs.publish_desired(good1)
            obs.wait_for(lambda o: o.last_state and o.last_state.generation == 1
                         and o.last_state.models.get("kws") and o.last_state.models["kws"].active == "1",
                         60, what="generation 1 with kws 1 active")
            wait_until(lambda: np.allclose(rest_predict(port, x), want1, atol=1e-5), timeout=30, what="v1 over REST")
            obs.send_command(ping1)  # the seq floor is 1 from here: no mutated ping can run
            obs.wait_for(lambda o: any(r.ok for r in o.replies), 30, what="the ping's reply")
            floors0 = floors(data_dir)
            assert floors0["generation"] == 1 and floors0["seq"] == 1, floors0

            def healthy(after: str) -> None:
                assert agent.alive, f"agent died after {after} (exit {agent.returncode}):\n{agent._tail()}"
                assert np.allclose(rest_predict(port, x), want1, atol=1e-5), f"REST changed after {after}"
                state = obs.last_state
                assert state is not None and state.online and state.generation == 1, f"after {after}: {state}"
                assert state.models["kws"].active == "1", f"after {after}: {state.models}"
                now_floors = floors(data_dir)
                assert {k: now_floors[k] for k in ("root_version", "generation", "seq")} == \
                       {k: floors0[k] for k in ("root_version", "generation", "seq")}, (after, now_floors, floors0)

            def fuzz(name: str, topic: str, *, retained: int = 0) -> None:
                strategy = topic_strategy(name, desired_bases=desired_bases, command_bases=command_bases,
                                          infer_bases=infer_bases, ctl_bases=ctl_bases, live_sha=live_sha,
                                          live_size=live_size, chunk=chunk)

                futures: list[Future[None]] = []

                def publish(payload: bytes, retain: bool = False) -> None:
                    # QoS 1, PUBACK awaited on a worker: generation and publishing overlap.
                    futures.append(pool.submit(ctl.publish, topic, payload, qos=1, retain=retain, timeout=30))
                    counts[name] += 1

                for extra in [b"", *huge(name)]:
                    publish(extra)
                seed = 0
                while counts[name] < N + 5:
                    @settings(max_examples=N + 5 - counts[name], deadline=None, database=None, derandomize=False,
                              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                    @given(strategy)
                    def one(payload: bytes) -> None:
                        publish(payload)

                    one()
                    seed += 1
                    assert seed < 5, f"hypothesis could not generate {N} payloads for {name}"
                for i in range(retained):  # a few retained ones: the agent gets each on the publish
                    junk = bytearray(good1)
                    junk[len(junk) // 2 + i] ^= 0x20
                    publish(bytes(junk) if i % 2 else os.urandom(64), retain=True)
                for f in futures:
                    f.result()  # every publish acknowledged by the broker
                # Everything the dispatcher and the loop had queued is handled before the checks.
                time.sleep(1.0)

            dev = DEVICE
            plan = [
                ("desired", topics.desired(dev), 3),
                ("cmd", topics.cmd(dev), 0),
                ("ctl_state", topics.CTL_STATE, 0),
                ("infer_inbox", topics.infer_inbox(dev), 0),
                ("infer", topics.infer(dev, "tiny"), 0),
                ("chunk_random", topics.chunk_inbox(dev, hashlib.sha256(b"nothing").hexdigest()), 0),
            ]
            for name, topic, retained in plan:
                fuzz(name, topic, retained=retained)
                if name == "desired":
                    obs.publish_desired(good1)  # the good document retained again
                    time.sleep(1.0)
                healthy(name)
            assert obs.last_state is not None

            # A transfer in flight: generation 2 while its chunk requests go unanswered.
            server.blocked.add(live_sha)
            obs.publish_desired(desired_doc(DEVICE, 2, {"kws": ("2", m2)}))
            wait_until(lambda: server.held[live_sha] >= 1, timeout=30, what="the agent asking for v2's chunks")
            fuzz("chunk_live", topics.chunk_inbox(dev, live_sha))
            assert agent.alive, agent._tail()
            assert np.allclose(rest_predict(port, x), want1, atol=1e-5)
            server.blocked.discard(live_sha)
            obs.wait_for(lambda o: o.last_state and o.last_state.generation == 2
                         and o.last_state.models["kws"].active == "2", 120, what="generation 2 with kws 2 active")
            wait_until(lambda: np.allclose(rest_predict(port, x), want2, atol=1e-5), timeout=30, what="v2 over REST")
            assert agent.alive
            assert floors(data_dir)["generation"] == 2

            elapsed = time.monotonic() - started
            rejected = [e for e in obs.events if e.step == "rejected"]
            windows = int(elapsed // 60) + 2
            assert 1 <= len(rejected) <= REJECTION_EVENTS_PER_MIN * windows, (len(rejected), elapsed)
            suppressed = sum(int(e.figures.get("suppressed", 0)) for e in rejected)
            print(f"\n[{broker_kind}] payloads per topic: {dict(counts)}; rejected events {len(rejected)} "
                  f"(suppressed counted {suppressed}); replies {len(obs.replies)}; {elapsed:.1f}s")
            log_text = agent.log_text()
            assert "Traceback" not in log_text and "handler for" not in log_text \
                and "loop step failed" not in log_text, log_text[-5000:]
            assert agent.terminate() == 0
    finally:
        pool.shutdown(wait=True)
        service.stop()
        ctl.disconnect(timeout=5)
    for name in ("desired", "cmd", "ctl_state", "infer_inbox", "infer", "chunk_random", "chunk_live"):
        assert counts[name] >= N, counts
