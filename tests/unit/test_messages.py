"""The wire protocol: topics build and parse back, every message round-trips, and no payload
whatever makes ``decode`` raise anything but a ``ProtocolError`` with its reason."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from edge_runtime.protocol import dsse, messages as m, topics as t
from edge_runtime.protocol.signed import PAYLOAD_TYPES, SPEC_VERSION, KeyEntry, Role, Root, Target

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEV = "pi-0042"
SHA = hashlib.sha256(b"kws-1.2.0").hexdigest()

# -- examples: one or more real instances of every kind ----------------------------------


def _signature() -> m.ModelSignature:
    return m.ModelSignature(
        inputs=[m.SignatureTensor(name="audio", dtype="float32", shape=[1, 4])],
        outputs=[m.SignatureTensor(name="scores", dtype="float32", shape=[1, 2])],
    )


def _manifest(*, npy: bool = False) -> m.ModelManifest:
    health = m.HealthSpec.of(
        {"audio": np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)},
        {"scores": np.array([[0.125, 0.875]], np.float32)},
        atol=1e-3, rtol=1e-2, latency_budget_ms=20.0, npy=npy,
    )
    return m.ModelManifest(name="kws", version="1.2.0", sha256=SHA, size=48_213, signature=_signature(), health=health)


def desired() -> m.DesiredState:
    man = _manifest()
    detector = man.model_copy(update={"name": "detector", "version": "3", "health": None})
    return m.DesiredState(
        issued_at=T0, expires=T0 + timedelta(days=7), target=Target(device=DEV), generation=7,
        models={
            "kws": m.ModelSpec(version="1.2.0", manifest=man),
            "detector": m.ModelSpec(version="3", manifest=detector, route="cloud-1", install=False),
        },
    )


def manifest() -> m.Manifest:
    return m.Manifest(issued_at=T0, expires=T0 + timedelta(days=365), **_manifest(npy=True).model_dump())


def command(name: str = "set-config", args: dict[str, Any] | None = None) -> m.Command:
    return m.Command(
        issued_at=T0, expires=T0 + timedelta(minutes=5), target=Target(device=DEV), seq=41, name=name,
        args={"telemetry_interval_s": 5.0} if args is None else args,
    )


def root() -> Root:
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 4)]
    ids = [dsse.keyid(k.public_key()) for k in keys]
    return Root(
        issued_at=T0, expires=T0 + timedelta(days=365), version=1,
        keys={kid: KeyEntry(public=dsse.raw_public_key(k.public_key()).hex()) for kid, k in zip(ids, keys)},
        roles={"root": Role(keyids=ids[:2], threshold=2), "deploy": Role(keyids=[ids[2]], threshold=1),
               "command": Role(keyids=[ids[2]], threshold=1)},
    )


def birth() -> m.DeviceState:
    return m.DeviceState(
        online=True, boot_id="5f1c0e7a9b2d4c38", bd_seq=12, at=T0, runtime_version="0.1.0",
        capabilities=m.Capabilities(cores=4, memory_bytes=4 * 1024**3, tier="edge", backends=["ai_edge_litert"],
                                    accelerator=None, disk_bytes=29 * 1024**3, arch="aarch64"),
        models={"kws": m.InstalledModel(
            active="1.2.0",
            versions=[m.InstalledVersion(version="1.2.0", sha256=SHA, size=48_213),
                      m.InstalledVersion(version="1.1.0", sha256="0" * 64, size=47_001)],
            install=m.InstallProgress(version="1.3.0", state="downloading", progress=0.4),
        )},
        generation=7, groups=["lab"],
    )


def death() -> m.DeviceState:
    return m.DeviceState(online=False, boot_id="5f1c0e7a9b2d4c38", bd_seq=12)


def reply_ok() -> m.Reply:
    return m.Reply(seq=41, command="ping", ok=True, result={"pong": True}, at=T0)


def reply_rejected() -> m.Reply:
    return m.Reply(seq=None, ok=False, error=m.ErrorInfo(type="rejected", message="expired 2 h ago", reason="expired"))


def event() -> m.Event:
    return m.Event(seq=908, at=T0, step="rolled_back", model="kws", version="1.3.0", generation=8,
                   reason="health_check_failed", detail="output 'scores': 2 of 2 values outside tolerance",
                   figures={"latency_ms": 3.2, "max_abs_error": 0.4, "non_finite": 0})


def telemetry() -> m.Telemetry:
    return m.Telemetry(
        seq=1234, at=T0, boot_id="5f1c0e7a9b2d4c38", interval_s=10.0, uptime_s=3600.5,
        system=m.SystemFigures(cpu_percent=23.5, load_1m=0.8, load_5m=0.6, load_15m=0.5,
                               memory_total_bytes=4 * 1024**3, memory_available_bytes=3 * 1024**3,
                               temperature_c=51.2, disk_free_bytes=20 * 1024**3, rss_bytes=80 * 1024**2),
        models={"kws": m.ModelFigures(version="1.2.0", calls=10_400, errors=3, rate=12.5, p50_ms=1.9, p95_ms=3.4,
                                      p99_ms=5.0, service_ms=1.7, utilisation=0.02),
                "detector": m.ModelFigures(version="3", route="cloud-1", calls=800, fallbacks=2, rate=1.0,
                                           p50_ms=21.0, p95_ms=35.0, p99_ms=60.0)},
        broker_rtt_ms=4.2, peers_rtt_ms={"cloud-1": 18.5}, outbox=m.OutboxFigures(depth=0, dropped=0),
    )


def chunk_request() -> m.ChunkRequest:
    return m.ChunkRequest(request_id="t7-000003", sha256=SHA, offset=3 * 65536, length=65536,
                          reply_to=t.chunk_inbox(DEV, SHA))


def chunk() -> m.ChunkResponse:
    return m.ChunkResponse.answer(chunk_request(), bytes(range(256)) * 256, size=48_213 * 8)


def chunk_error() -> m.ChunkResponse:
    return m.ChunkResponse.failure(chunk_request(), m.ErrorInfo(type="not_found", message="no such artifact",
                                                                reason="artifact_not_found"))


def infer_request() -> m.InferRequest:
    return m.InferRequest(correlation_id="c-81f2", model="detector", deadline_ms=250, reply_to=t.infer_inbox(DEV),
                          names=["image"], tensors=(np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3),))


def infer_response() -> m.InferResponse:
    return m.InferResponse(correlation_id="c-81f2", model="detector", version="3", names=["boxes", "scores"],
                           tensors=(np.zeros((1, 2, 4), np.float32), np.array([[0.9, 0.1]], np.float32)),
                           compute_ms=14.2, queue_ms=0.3)


def infer_busy() -> m.InferResponse:
    return m.InferResponse(correlation_id="c-81f3", model="detector",
                           error=m.ErrorInfo(type="model_unavailable", message="queue full", reason="busy"))


def ctl_state() -> m.ControllerState:
    return m.ControllerState(online=True, at=T0, instance="ctl-a")


def api_request() -> m.ApiRequest:
    return m.ApiRequest(request_id="q-17", method="devices.list", params={"group": "lab"},
                        reply_to=t.api_reply("fleetctl-3f9a"), deadline_ms=5000)


def api_response() -> m.ApiResponse:
    return m.ApiResponse(request_id="q-17", ok=True, result=[{"device": DEV, "online": True}])


def api_error() -> m.ApiResponse:
    return m.ApiResponse(request_id="q-18", ok=False, error=m.ApiError(type="not_found", message="no device pi-9"))


EXAMPLES: dict[str, Callable[[], BaseModel]] = {
    "state/birth": birth, "state/death": death, "desired": desired, "manifest": manifest,
    "command/set-config": command, "command/ping": lambda: command("ping", {}),
    "command/cancel": lambda: command("cancel", {"sha256": SHA}),
    "command/diagnostics": lambda: command("diagnostics", {"log_lines": 50}),
    "command/restart": lambda: command("restart", {"reason": "operator"}),
    "root": root, "reply/ok": reply_ok, "reply/rejected": reply_rejected, "event": event,
    "telemetry": telemetry, "chunk_request": chunk_request, "chunk": chunk, "chunk/error": chunk_error,
    "infer_request": infer_request, "infer_response": infer_response, "infer_response/busy": infer_busy,
    "ctl_state": ctl_state, "api_request": api_request, "api_response": api_response, "api_response/error": api_error,
}


def example(name: str) -> BaseModel:
    """The example called ``name``, or the first one of that kind."""
    return EXAMPLES[name if name in EXAMPLES else next(n for n in EXAMPLES if n.startswith(name + "/"))]()


def test_every_kind_has_an_example() -> None:
    assert {name.split("/")[0] for name in EXAMPLES} == set(m.KINDS)
    assert set(m.LIMITS) == set(m.KINDS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip(name: str) -> None:
    msg = EXAMPLES[name]()
    kind = m.kind_of(msg)
    wire = m.encode(msg)
    back = m.decode(kind, wire)
    assert type(back) is type(msg)
    assert back == msg
    assert m.encode(back) == wire  # stable bytes
    assert len(wire) <= m.LIMITS[kind]
    if kind not in m.BINARY_KINDS:  # compact JSON
        doc = json.loads(wire)
        assert wire == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        assert doc["spec_version"] == SPEC_VERSION


@pytest.mark.parametrize("name", ["desired", "manifest", "command/cancel", "command/set-config", "root"])
def test_signed_bodies_parse_the_way_trust_parses_them(name: str) -> None:
    msg = example(name)
    assert type(msg).model_validate_json(m.encode(msg)) == msg  # trust.py's body_model path


def test_decode_accepts_bytearray_and_memoryview() -> None:
    wire = m.encode(telemetry())
    assert m.decode("telemetry", bytearray(wire)) == telemetry()
    assert m.decode("telemetry", memoryview(wire)) == telemetry()


def test_binary_payloads() -> None:
    wire = m.encode(chunk())
    magic, head_len = struct.unpack_from("<4sI", wire)
    assert magic == b"EFC1" and head_len <= m.MAX_BINARY_HEADER
    assert wire[8 + head_len:] == chunk().data  # raw bytes, no base64
    assert len(wire) - len(chunk().data) < 200  # a short header: chunks cost ~1.003x on the wire
    req = m.decode("infer_request", m.encode(infer_request()))
    assert req.arrays()["image"].tolist() == np.arange(12).reshape(1, 2, 2, 3).tolist()
    assert req.caller == DEV and m.decode("chunk_request", m.encode(chunk_request())).device == DEV
    # The same layout as the fast path's frames: one codec for tensors everywhere.
    assert m.encode(infer_response())[:4] == b"EFT1"


def test_tensor_messages_compare_arrays() -> None:
    a, b = infer_response(), infer_response()
    assert a == b
    c = a.model_copy(update={"tensors": (a.tensors[0], np.array([[0.9, 0.2]], np.float32))})
    assert a != c
    with pytest.raises(TypeError):
        hash(a)


def test_models_mirror_the_engine_and_health_check() -> None:
    from edge_runtime.engine.signature import Signature, TensorSpec

    sig = Signature(
        inputs=(TensorSpec("x", 0, (1, 16), np.dtype("int8"), scale=0.5, zero_point=-3),),
        outputs=(TensorSpec("y", 5, (1, 4), np.dtype("float32")),),
    )
    wire = m.ModelSignature.of(sig)
    assert wire.to_signature() == Signature(
        inputs=(TensorSpec("x", -1, (1, 16), np.dtype("int8"), 0.5, -3),),
        outputs=(TensorSpec("y", -1, (1, 4), np.dtype("float32")),),
    )
    check = _manifest().health.to_health_check()  # type: ignore[union-attr]
    assert check.atol == 1e-3 and check.rtol == 1e-2 and check.latency_budget_ms == 20.0
    np.testing.assert_array_equal(check.inputs["audio"], [[0.0, 0.25, 0.5, 1.0]])  # type: ignore[index]


def test_health_block_runs_on_the_real_interpreter(zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    from edge_runtime.engine import Engine
    from edge_runtime.errors import HealthCheckFailed

    built = zoo["tiny_v1"]
    loaded = Engine(pool_size=1).load("tiny", "1", model_files["tiny_v1"])
    sample = built.sample_inputs()
    want = built.reference(sample)
    for npy in (False, True):
        man = m.ModelManifest(
            name="tiny", version="1", sha256=hashlib.sha256(built.data).hexdigest(), size=len(built.data),
            signature=m.ModelSignature.of(loaded.signature),
            health=m.HealthSpec.of(sample, want, atol=1e-4, rtol=1e-3, npy=npy),
        )
        spec = m.ModelSpec(version="1", manifest=man)
        body = m.DesiredState(issued_at=T0, expires=T0 + timedelta(days=1), target=Target(group="all"),
                              generation=1, models={"tiny": spec})
        got = m.decode("desired", m.encode(body)).models["tiny"].manifest
        assert got.health.to_health_check().run(loaded)["non_finite"] == 0  # type: ignore[union-attr]
    wrong = m.HealthSpec.of(sample, {k: v + 1 for k, v in want.items()})
    with pytest.raises(HealthCheckFailed):
        wrong.to_health_check().run(loaded)


def test_error_info_carries_runtime_errors() -> None:
    from edge_runtime.errors import HealthCheckFailed, InstallError, ModelUnavailable

    info = m.ErrorInfo.of(InstallError("no room", reason="quota_exceeded"))
    assert (info.type, info.reason) == ("install_failed", "quota_exceeded")
    back = info.to_exception()
    assert isinstance(back, InstallError) and back.reason == "quota_exceeded"
    assert isinstance(m.ErrorInfo.of(ModelUnavailable("busy")).to_exception(), ModelUnavailable)
    assert m.ErrorInfo.of(KeyError("x")).type == "internal"
    assert isinstance(m.ErrorInfo.of(HealthCheckFailed("bad")).to_exception(), HealthCheckFailed)


def test_vocabulary_matches_the_rest_of_the_runtime() -> None:
    from edge_runtime.api import framing
    from edge_runtime.store import state as store_state

    assert m.TENSOR_MAGIC == framing.MAGIC and m.MAX_TENSORS == framing.MAX_TENSORS

    assert m.VERSION_PATTERN == store_state._VERSION_RE.pattern
    assert m.ID_PATTERN == store_state._NAME_RE.pattern
    assert set(store_state.INSTALL_STATES) <= set(m.STEPS)
    assert set(m.TRUST_REASONS) <= set(m.REASONS) and set(m.ProtocolError.REASONS) <= set(m.REASONS)
    assert set(m.INSTALL_REASONS) <= set(m.REASONS) and "health_check_failed" in m.REASONS
    assert len(m.TRUST_REASONS) == 9
    assert set(m.SIGNED_KINDS) == set(PAYLOAD_TYPES)


# -- malformed input, table-driven --------------------------------------------------------


def _json(kind: str) -> dict[str, Any]:
    return json.loads(m.encode(example(kind)))


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``obj`` with ``path`` (dot-separated; '-' deletes) replaced."""
    out = json.loads(json.dumps(obj))
    *head, last = path.split(".")
    cur = out
    for key in head:
        cur = cur[int(key)] if isinstance(cur, list) else cur[key]
    if value == "-":
        del cur[last]
    else:
        cur[last] = value
    return out


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _chunk_bytes(header: bytes, data: bytes = b"", magic: bytes = b"EFC1", head_len: int | None = None) -> bytes:
    return struct.pack("<4sI", magic, len(header) if head_len is None else head_len) + header + data


def _frame(header: Any, tensors: list[bytes], *, count: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else _b(header)
    out = struct.pack("<4sII", b"EFT1", len(head), len(tensors) if count is None else count) + head
    for blob in tensors:
        out += struct.pack("<Q", len(blob)) + blob
    return out


def _npy(arr: np.ndarray) -> bytes:
    from edge_runtime.api import framing

    return framing.npy_header(arr) + arr.tobytes()


def _chunk_header(**changes: Any) -> bytes:
    h = json.loads(m.encode(chunk())[8:8 + struct.unpack_from("<I", m.encode(chunk()), 4)[0]])
    h.update(changes)
    return _b({k: v for k, v in h.items() if v != "-"})


def _infer_header(**changes: Any) -> dict[str, Any]:
    h = json.loads(m.encode(infer_request())[12:12 + struct.unpack_from("<I", m.encode(infer_request()), 4)[0]])
    h.update(changes)
    return h


_X = _npy(np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3))
_PICKLE = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + (
    b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n") + b"\x80\x04N."

# (name, kind, payload, reason)
MALFORMED: list[tuple[str, str, bytes, str]] = [
    # every kind: not a JSON object
    *[(f"{k}/empty", k, b"", "malformed") for k in sorted(m.KINDS)],
    *[(f"{k}/not-json", k, b"\xff\xfe{garbage", "malformed") for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/array", k, b"[1,2]", "malformed") for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/null", k, b"null", "malformed") for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/empty-object", k, b"{}", "malformed") for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/major-2", k, _b(_set(_json(k), "spec_version", "2.0")), "unsupported_version")
      for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/major-0", k, _b(_set(_json(k), "spec_version", "0.9")), "unsupported_version")
      for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/version-not-a-string", k, _b(_set(_json(k), "spec_version", 1)), "malformed")
      for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/version-no-minor", k, _b(_set(_json(k), "spec_version", "1")), "malformed")
      for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    *[(f"{k}/unknown-field", k, _b(_set(_json(k), "surprise", 1)), "malformed")
      for k in sorted(m.KINDS) if k not in m.BINARY_KINDS],
    # strict JSON
    ("json/duplicate-key", "telemetry", b'{"seq":1,"seq":2}', "malformed"),
    ("json/nan", "telemetry", m.encode(telemetry()).replace(b'"rate":12.5', b'"rate":NaN'), "malformed"),
    ("json/infinity", "telemetry", m.encode(telemetry()).replace(b'"rate":12.5', b'"rate":Infinity'), "malformed"),
    ("json/overflow", "telemetry", m.encode(telemetry()).replace(b'"rate":12.5', b'"rate":1e999'), "malformed"),
    ("json/huge-int", "telemetry", m.encode(telemetry()).replace(b'"seq":1234', b'"seq":' + b"9" * 5000), "malformed"),
    ("json/deep", "api_request", b'{"params":{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}}", "malformed"),
    ("json/utf16", "ctl_state", '{"online":true}'.encode("utf-16"), "malformed"),
    ("json/bom", "ctl_state", b'\xef\xbb\xbf{"online":true}', "malformed"),
    ("json/trailing", "ctl_state", b'{"online":true} x', "malformed"),
    ("json/bad-utf8", "ctl_state", b'{"online":true,"instance":"\xc3("}', "malformed"),
    # desired state
    ("desired/naive-time", "desired", _b(_set(_json("desired"), "issued_at", "2026-01-01T00:00:00")), "malformed"),
    ("desired/expires-first", "desired", _b(_set(_json("desired"), "expires", "2025-01-01T00:00:00Z")), "malformed"),
    ("desired/two-targets", "desired", _b(_set(_json("desired"), "target", {"device": DEV, "group": "g"})), "malformed"),
    ("desired/target-newline", "desired", _b(_set(_json("desired"), "target.device", DEV + "\n")), "malformed"),
    ("desired/negative-generation", "desired", _b(_set(_json("desired"), "generation", -1)), "malformed"),
    ("desired/typed-as-command", "desired", _b(_set(_json("desired"), "type", "command")), "malformed"),
    ("desired/name-mismatch", "desired", _b(_set(_json("desired"), "models.kws.manifest.name", "other")), "malformed"),
    ("desired/version-mismatch", "desired", _b(_set(_json("desired"), "models.kws.version", "9")), "malformed"),
    ("desired/local-not-installed", "desired", _b(_set(_json("desired"), "models.kws.install", False)), "malformed"),
    ("desired/bad-model-name", "desired",
     _b({**_json("desired"), "models": {"a/b": _json("desired")["models"]["kws"]}}), "malformed"),
    ("desired/bad-sha", "desired", _b(_set(_json("desired"), "models.kws.manifest.sha256", "AB" * 32)), "malformed"),
    ("desired/zero-size", "desired", _b(_set(_json("desired"), "models.kws.manifest.size", 0)), "malformed"),
    ("desired/bad-route", "desired", _b(_set(_json("desired"), "models.detector.route", "node/../x")), "malformed"),
    ("desired/nested-unknown", "desired", _b(_set(_json("desired"), "models.kws.manifest.extra", 1)), "malformed"),
    ("desired/health-shape", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.shape", [2, 2])), "malformed"),
    ("desired/health-count", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.data", [1.0])), "malformed"),
    ("desired/health-dtype", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.dtype", "int32")), "malformed"),
    ("desired/health-unknown-input", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.other",
             {"dtype": "float32", "shape": [1], "data": [1.0]})), "malformed"),
    ("desired/health-unknown-output", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.expected.other",
             {"dtype": "float32", "shape": [1], "data": [1.0]})), "malformed"),
    ("desired/health-string-value", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.data", ["1", 2.0, 3.0, 4.0])), "malformed"),
    ("desired/health-both-forms", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.npy", "AAAA")), "malformed"),
    ("desired/health-negative-atol", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.atol", -1)), "malformed"),
    ("desired/health-int-overflows-float", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.data", [10**400, 1.0, 2.0, 3.0])), "malformed"),
    ("desired/health-huge-shape", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.health.inputs.audio.shape", [10**9, 10**9])), "malformed"),
    ("desired/signature-dtype", "desired",
     _b(_set(_json("desired"), "models.kws.manifest.signature.inputs.0.dtype", "object")), "malformed"),
    ("desired/higher-minor-unknown-field", "desired",
     _b(_set(_set(_json("desired"), "spec_version", "1.9"), "surprise", 1)), "malformed"),
    # manifest (npy form)
    ("manifest/npy-pickle", "manifest",
     _b(_set(_json("manifest"), "health.inputs.audio.npy", __import__("base64").b64encode(_PICKLE).decode())),
     "malformed"),
    ("manifest/npy-not-base64", "manifest", _b(_set(_json("manifest"), "health.inputs.audio.npy", "!!")), "malformed"),
    ("manifest/npy-truncated", "manifest",
     _b(_set(_json("manifest"), "health.inputs.audio.npy", _json("manifest")["health"]["inputs"]["audio"]["npy"][:-8])),
     "malformed"),
    ("manifest/unsigned-type", "manifest", _b(_set(_json("manifest"), "type", "desired")), "malformed"),
    ("manifest/bad-source", "manifest", _b(_set(_json("manifest"), "sources", ["http://x/y"])), "malformed"),
    # commands
    ("command/unknown-name", "command", _b(_set(_json("command/set-config"), "name", "format-disk")), "malformed"),
    ("command/args-of-another", "command", _b(_set(_json("command/set-config"), "name", "cancel")), "malformed"),
    ("command/empty-set-config", "command", _b(_set(_json("command/set-config"), "args", {})), "malformed"),
    ("command/cancel-both", "command",
     _b(_set(_set(_json("command/cancel"), "args.model", "kws"), "args.sha256", SHA)), "malformed"),
    ("command/args-not-object", "command", _b(_set(_json("command/ping"), "args", [])), "malformed"),
    ("command/interval-too-small", "command",
     _b(_set(_json("command/set-config"), "args.telemetry_interval_s", 0.01)), "malformed"),
    ("command/negative-seq", "command", _b(_set(_json("command/ping"), "seq", -1)), "malformed"),
    ("command/group-and-device", "command",
     _b(_set(_json("command/ping"), "target", {"device": DEV, "group": "lab"})), "malformed"),
    # root
    ("root/threshold-unreachable", "root", _b(_set(_json("root"), "roles.deploy.threshold", 2)), "malformed"),
    ("root/missing-role", "root", _b(_set(_json("root"), "roles.command", "-")), "malformed"),
    # device reports
    ("state/birth-without-capabilities", "state", _b(_set(_json("state/birth"), "capabilities", "-")), "malformed"),
    ("state/bad-tier", "state", _b(_set(_json("state/birth"), "capabilities.tier", "moon")), "malformed"),
    ("state/zero-cores", "state", _b(_set(_json("state/birth"), "capabilities.cores", 0)), "malformed"),
    ("state/bad-install-state", "state",
     _b(_set(_json("state/birth"), "models.kws.install.state", "exploding")), "malformed"),
    ("state/bad-boot-id", "state", _b(_set(_json("state/death"), "boot_id", "a b")), "malformed"),
    ("reply/ok-with-error", "reply", _b(_set(_json("reply/ok"), "error", {"type": "internal"})), "malformed"),
    ("reply/error-without-type", "reply", _b(_set(_json("reply/rejected"), "error.type", "-")), "malformed"),
    ("event/unknown-reason", "event", _b(_set(_json("event"), "reason", "gremlins")), "malformed"),
    ("event/unknown-step", "event", _b(_set(_json("event"), "step", "flying")), "malformed"),
    ("event/rollback-without-reason", "event", _b(_set(_json("event"), "reason", "-")), "malformed"),
    ("event/progress-over-1", "event", _b(_set(_json("event"), "progress", 1.5)), "malformed"),
    ("event/figure-object", "event", _b(_set(_json("event"), "figures.x", {"a": 1})), "malformed"),
    ("telemetry/cpu-over-100", "telemetry", _b(_set(_json("telemetry"), "system.cpu_percent", 101)), "malformed"),
    ("telemetry/negative-calls", "telemetry", _b(_set(_json("telemetry"), "models.kws.calls", -1)), "malformed"),
    ("telemetry/missing-seq", "telemetry", _b(_set(_json("telemetry"), "seq", "-")), "malformed"),
    ("telemetry/naive-time", "telemetry", _b(_set(_json("telemetry"), "at", "2026-01-01T00:00:00")), "malformed"),
    ("telemetry/zero-interval", "telemetry", _b(_set(_json("telemetry"), "interval_s", 0)), "malformed"),
    # artifact transfer: the server publishes wherever reply_to says, so it must be an inbox
    ("chunk_request/reply-to-desired", "chunk_request",
     _b(_set(_json("chunk_request"), "reply_to", t.desired(DEV))), "malformed"),
    ("chunk_request/reply-to-other-sha", "chunk_request",
     _b(_set(_json("chunk_request"), "reply_to", t.chunk_inbox(DEV, "1" * 64))), "malformed"),
    ("chunk_request/reply-to-wildcard", "chunk_request",
     _b(_set(_json("chunk_request"), "reply_to", f"fleet/v1/dev/+/inbox/chunk/{SHA}")), "malformed"),
    ("chunk_request/zero-length", "chunk_request", _b(_set(_json("chunk_request"), "length", 0)), "malformed"),
    ("chunk_request/length-over-max", "chunk_request",
     _b(_set(_json("chunk_request"), "length", m.MAX_CHUNK_BYTES + 1)), "malformed"),
    ("chunk_request/negative-offset", "chunk_request", _b(_set(_json("chunk_request"), "offset", -1)), "malformed"),
    ("chunk/short", "chunk", b"EFC1\x00", "malformed"),
    ("chunk/bad-magic", "chunk", _chunk_bytes(_chunk_header(), bytes(65536), magic=b"EFC2"), "malformed"),
    ("chunk/header-past-end", "chunk", _chunk_bytes(b"{}", head_len=999), "malformed"),
    ("chunk/header-too-big", "chunk", _chunk_bytes(b"{}", head_len=m.MAX_BINARY_HEADER + 1), "too_large"),
    ("chunk/data-short", "chunk", _chunk_bytes(_chunk_header(), bytes(100)), "malformed"),
    ("chunk/data-in-header", "chunk", _chunk_bytes(_chunk_header(data="AAAA", length=0)), "malformed"),
    ("chunk/error-with-bytes", "chunk",
     _chunk_bytes(_chunk_header(error={"type": "internal"}), bytes(65536)), "malformed"),
    ("chunk/past-size", "chunk", _chunk_bytes(_chunk_header(size=10), bytes(65536)), "malformed"),
    ("chunk/header-not-object", "chunk", _chunk_bytes(b"[]"), "malformed"),
    ("chunk/header-major-2", "chunk", _chunk_bytes(_chunk_header(spec_version="2.0"), bytes(65536)),
     "unsupported_version"),
    # remote inference
    ("infer_request/short", "infer_request", b"EFT1", "malformed"),
    ("infer_request/bad-magic", "infer_request", b"EFC1" + _frame(_infer_header(), [_X])[4:], "malformed"),
    ("infer_request/reply-to-cmd", "infer_request", _frame(_infer_header(reply_to=t.cmd(DEV)), [_X]), "malformed"),
    ("infer_request/names-count", "infer_request", _frame(_infer_header(names=["a", "b"]), [_X]), "malformed"),
    ("infer_request/duplicate-names", "infer_request", _frame(_infer_header(names=["a", "a"]), [_X, _X]), "malformed"),
    ("infer_request/pickle", "infer_request", _frame(_infer_header(), [_PICKLE]), "malformed"),
    ("infer_request/string-dtype", "infer_request", _frame(_infer_header(), [_npy(np.array(["x"]))]), "malformed"),
    ("infer_request/truncated-tensor", "infer_request", _frame(_infer_header(), [_X])[:-3], "malformed"),
    ("infer_request/stray-bytes", "infer_request", _frame(_infer_header(), [_X]) + b"!", "malformed"),
    ("infer_request/count-lies", "infer_request", _frame(_infer_header(), [_X], count=2), "malformed"),
    ("infer_request/count-over-max", "infer_request", _frame(_infer_header(), [_X], count=10_000), "malformed"),
    ("infer_request/len-huge", "infer_request", _frame(_infer_header(), [], count=1) + struct.pack("<Q", 2**63),
     "malformed"),
    ("infer_request/tensors-in-header", "infer_request", _frame(_infer_header(tensors=[1]), [_X]), "malformed"),
    ("infer_request/zero-deadline", "infer_request", _frame(_infer_header(deadline_ms=0), [_X]), "malformed"),
    ("infer_request/header-too-big", "infer_request",
     struct.pack("<4sII", b"EFT1", m.MAX_BINARY_HEADER + 1, 0), "too_large"),
    ("infer_request/header-major-2", "infer_request", _frame(_infer_header(spec_version="2.1"), [_X]),
     "unsupported_version"),
    ("infer_response/error-with-tensors", "infer_response",
     _frame({"correlation_id": "c", "model": "m", "error": {"type": "internal"}, "names": ["y"]}, [_X]), "malformed"),
    # controller and console
    ("ctl_state/online-missing", "ctl_state", b'{"spec_version":"1.0"}', "malformed"),
    ("ctl_state/online-string", "ctl_state", b'{"online":"maybe"}', "malformed"),
    ("api_request/bad-method", "api_request", _b(_set(_json("api_request"), "method", "Devices/List")), "malformed"),
    ("api_request/reply-to-device", "api_request",
     _b(_set(_json("api_request"), "reply_to", t.desired(DEV))), "malformed"),
    ("api_response/unknown-error-type", "api_response",
     _b(_set(_json("api_response/error"), "error.type", "kaboom")), "malformed"),
    ("api_response/ok-and-error", "api_response", _b(_set(_json("api_response/error"), "ok", True)), "malformed"),
]


@pytest.mark.parametrize("name,kind,payload,reason", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_is_refused_with_its_reason(name: str, kind: str, payload: bytes, reason: str) -> None:
    with pytest.raises(m.ProtocolError) as info:
        m.decode(kind, payload)
    assert info.value.reason == reason, str(info.value)
    assert info.value.kind == kind
    assert str(info.value).startswith(f"{kind}: ")
    assert len(str(info.value)) < 2000  # one readable line, not pydantic's essay


@pytest.mark.parametrize("kind", sorted(m.KINDS))
def test_oversize_is_refused_before_parsing(kind: str) -> None:
    limit = m.LIMITS[kind]
    with pytest.raises(m.ProtocolError) as info:
        m.decode(kind, b"{" * (limit + 1))
    assert info.value.reason == "too_large"
    wire = m.encode(example(kind))
    with pytest.raises(m.ProtocolError) as info:
        m.decode(kind, wire, max_bytes=len(wire) - 1)
    assert info.value.reason == "too_large"
    m.decode(kind, wire, max_bytes=len(wire))


def test_encode_refuses_what_a_receiver_would_refuse() -> None:
    figures = telemetry().models["kws"]
    big = telemetry().model_copy(update={"models": {f"model-{i:03d}-" + "x" * 56: figures for i in range(256)},
                                         "peers_rtt_ms": {f"node-{i:03d}-" + "x" * 55: 1.5 for i in range(256)}})
    with pytest.raises(m.ProtocolError) as info:
        m.encode(big)
    assert info.value.reason == "too_large"
    names = [f"input-{i:03d}-" + "x" * 200 for i in range(40)]
    wide = m.InferRequest(correlation_id="c", model="m", deadline_ms=1, reply_to=t.infer_inbox(DEV), names=names,
                          tensors=tuple(np.zeros(1, np.float32) for _ in names))
    with pytest.raises(m.ProtocolError) as info:
        m.encode(wide)
    assert info.value.reason == "too_large"
    with pytest.raises(TypeError):
        m.encode(m.Capabilities(cores=1, memory_bytes=1))


def test_decode_refuses_non_bytes_and_unknown_kinds() -> None:
    with pytest.raises(m.ProtocolError) as info:
        m.decode("telemetry", "{}")  # type: ignore[arg-type]
    assert info.value.reason == "malformed"
    with pytest.raises(ValueError, match="unknown message kind"):
        m.decode("gossip", b"{}")


def test_constructors_refuse_bad_values() -> None:
    with pytest.raises(ValidationError):
        m.Telemetry(seq=1, at=T0, interval_s=1, system=telemetry().system, broker_rtt_ms=float("nan"))
    with pytest.raises(ValidationError):
        m.ChunkResponse(request_id="r", sha256=SHA, offset=0, length=5, data=b"1234")
    with pytest.raises(ValueError):
        m.InlineTensor.of(np.array(["a"]))
    with pytest.raises(ValueError):
        m.InlineTensor.of(np.zeros(m.MAX_HEALTH_BYTES, np.uint16))
    with pytest.raises(ValidationError):
        m.Command(issued_at=T0, expires=T0 + timedelta(1), target=Target(device=DEV), seq=1, name="cancel",
                  args=m.PingArgs())
    with pytest.raises(ValidationError):
        m.Reply(ok=True, typo=1)  # unknown fields are refused when we build a message, too


def test_inline_tensor_forms_agree() -> None:
    for arr in (np.arange(6, dtype=np.int16).reshape(2, 3), np.array([True, False]), np.array(2.5, np.float64),
                np.array([[np.nan, 1]], np.float16), np.zeros((0, 3), np.uint8)):
        npy = m.InlineTensor.of(arr, npy=True).to_array()
        assert npy.dtype == arr.dtype and npy.shape == arr.shape
        np.testing.assert_array_equal(npy, arr)
        if not np.isnan(arr.astype(float)).any():
            listed = m.InlineTensor.of(arr).to_array()
            assert listed.dtype == arr.dtype and listed.shape == arr.shape
            np.testing.assert_array_equal(listed, arr)
    # list values that do not survive conversion are refused, not rounded or wrapped
    for dtype, data in (("int8", [200]), ("int32", [1.5]), ("float16", [1e6]), ("bool", [1]), ("float32", [True])):
        with pytest.raises(ValidationError):
            m.InlineTensor(dtype=dtype, shape=[1], data=data)


# -- versions ----------------------------------------------------------------------------


# Where each example has model objects (not free-form maps) to add unknown fields to.
_NESTED: dict[str, list[str]] = {
    "state/birth": ["capabilities", "models.kws", "models.kws.versions.0", "models.kws.install"],
    "reply/rejected": ["error"], "event": [], "telemetry": ["system", "models.kws", "outbox"],
    "chunk_request": [], "ctl_state": [], "api_request": [], "api_response/error": ["error"],
}


@pytest.mark.parametrize("name", sorted(_NESTED))
def test_newer_minor_of_unsigned_message_drops_unknown_fields(name: str) -> None:
    msg = example(name)
    kind = m.kind_of(msg)
    newer = {**json.loads(m.encode(msg)), "spec_version": "1.7", "from_the_future": {"x": [1]}}
    for path in _NESTED[name]:
        newer = _set(newer, f"{path}.from_the_future", [{"y": None}])
    got = m.decode(kind, _b(newer))
    assert got.model_copy(update={"spec_version": SPEC_VERSION}) == msg
    assert got.spec_version == "1.7"
    with pytest.raises(m.ProtocolError) as info:  # at our own minor, an unknown field is a bug
        m.decode(kind, _b({**newer, "spec_version": SPEC_VERSION}))
    assert info.value.reason == "malformed"


def test_newer_minor_of_binary_header_drops_unknown_fields() -> None:
    wire = _frame(_infer_header(spec_version="1.3", priority="high"), [_X])
    assert m.decode("infer_request", wire).model_copy(update={"spec_version": SPEC_VERSION}) == infer_request()
    wire = _chunk_bytes(_chunk_header(spec_version="1.3", compression=None), chunk().data)
    assert m.decode("chunk", wire).data == chunk().data


@pytest.mark.parametrize("name", ["desired", "manifest", "command/ping", "root"])
def test_signed_bodies_never_drop_fields(name: str) -> None:
    msg = example(name)
    kind = m.kind_of(msg)
    newer = {**json.loads(m.encode(msg)), "spec_version": "1.7"}
    assert m.decode(kind, _b(newer)).spec_version == "1.7"  # a newer minor is fine ...
    with pytest.raises(m.ProtocolError) as info:  # ... but not a field we cannot check
        m.decode(kind, _b({**newer, "from_the_future": 1}))
    assert info.value.reason == "malformed"


# -- fuzzing: only ProtocolError ever escapes ---------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=30,
)
_SEEDS: dict[str, list[bytes]] = {}


def _seeds(kind: str) -> list[bytes]:
    if kind not in _SEEDS:
        _SEEDS[kind] = [m.encode(f()) for n, f in EXAMPLES.items() if n.split("/")[0] == kind]
    return _SEEDS[kind]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    if isinstance(obj, dict):
        return {**obj, path[0]: _replace(obj[path[0]], path[1:], value)}
    copy = list(obj)
    copy[path[0]] = _replace(obj[path[0]], path[1:], value)
    return copy


def _split(kind: str, wire: bytes) -> tuple[bytes, bytes, bytes]:
    """(prefix magic, JSON header, rest) of a binary payload."""
    if kind == "chunk":
        n = struct.unpack_from("<I", wire, 4)[0]
        return wire[:4], wire[8:8 + n], wire[8 + n:]
    n, count = struct.unpack_from("<II", wire, 4)
    return wire[:4] + struct.pack("<I", count), wire[12:12 + n], wire[12 + n:]


def _join(kind: str, prefix: bytes, header: bytes, rest: bytes) -> bytes:
    if kind == "chunk":
        return prefix + struct.pack("<I", len(header)) + header + rest
    return prefix[:4] + struct.pack("<I", len(header)) + prefix[4:] + header + rest


@st.composite
def _mutated(draw: st.DrawFn, kind: str) -> bytes:
    wire = draw(st.sampled_from(_seeds(kind)))
    binary = kind in m.BINARY_KINDS
    how = draw(st.sampled_from(["json", "json", "json", "flip", "cut", "insert", "splice"]))
    if how == "json":
        prefix, header, rest = _split(kind, wire) if binary else (b"", wire, b"")
        doc = json.loads(header)
        path = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "version"]))
        if op == "version":
            doc = {**doc, "spec_version": draw(st.sampled_from(["1.1", "1.99", "2.0", "0.1", "1", "", "1.0.0"]))}
        elif op == "delete" and path:
            container = doc
            for p in path[:-1]:
                container = container[p]
            if isinstance(container, dict):
                doc = _replace(doc, path[:-1], {k: v for k, v in container.items() if k != path[-1]})
        elif op == "add":
            doc = {**doc, draw(st.text(max_size=8)): draw(_json_values)}
        else:
            doc = _replace(doc, path, draw(_json_values))
        header = json.dumps(doc).encode()
        return _join(kind, prefix, header, rest) if binary else header
    data = bytearray(wire)
    i = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "flip" and data:
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":
        del data[i:i + draw(st.integers(1, 64))]
    elif how == "insert":
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:
        j = draw(st.integers(0, max(0, len(data) - 1)))
        data[i:j] = draw(st.binary(max_size=32))
    return bytes(data)


def _payloads(kind: str) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=256)
    random_json = _json_values.map(lambda v: json.dumps(v).encode())
    if kind in m.BINARY_KINDS:
        magic = b"EFC1" if kind == "chunk" else b"EFT1"
        random_json = st.tuples(random_json, st.binary(max_size=64)).map(
            lambda p: (magic + struct.pack("<I", len(p[0])) + p[0] + p[1]) if kind == "chunk"
            else (magic + struct.pack("<II", len(p[0]), 1) + p[0] + struct.pack("<Q", len(p[1])) + p[1]))
        raw = st.one_of(raw, st.binary(max_size=256).map(lambda b: magic + b))
    return st.one_of(raw, random_json, _mutated(kind), _mutated(kind))


@pytest.mark.parametrize("kind", sorted(m.KINDS))
def test_fuzz_only_protocol_errors_escape(kind: str) -> None:
    outcomes: dict[str, int] = {}

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payload=_payloads(kind))
    def run(payload: bytes) -> None:
        try:
            got = m.decode(kind, payload)
        except m.ProtocolError as exc:
            assert exc.reason in m.ProtocolError.REASONS and exc.kind == kind
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        else:
            assert type(got) is m.KINDS[kind]
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            m.encode(got)  # whatever we accept, we can send on

        if kind in m.SIGNED_KINDS:
            # trust.py parses signed bodies with model_validate_json: there too only
            # ValueError (pydantic's ValidationError is one) may come out.
            try:
                m.KINDS[kind].model_validate_json(payload)
            except (ValueError, RecursionError):
                pass

    run()
    assert sum(outcomes.values()) >= 1000
    assert outcomes.get("malformed", 0) > 100  # the generator does reach the validators


# -- topics ------------------------------------------------------------------------------

_ids = st.from_regex(re.compile(t.ID_PATTERN.replace("$", r"\Z")), fullmatch=True)
_shas = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())


def test_topic_builders() -> None:
    assert t.state(DEV) == "fleet/v1/dev/pi-0042/state"
    assert t.desired(DEV) == "fleet/v1/dev/pi-0042/desired"
    assert t.cmd(DEV) == "fleet/v1/dev/pi-0042/cmd"
    assert t.reply(DEV) == "fleet/v1/dev/pi-0042/reply"
    assert t.events(DEV) == "fleet/v1/dev/pi-0042/events"
    assert t.telemetry(DEV) == "fleet/v1/dev/pi-0042/telemetry"
    assert t.chunk_inbox(DEV, SHA) == f"fleet/v1/dev/pi-0042/inbox/chunk/{SHA}"
    assert t.infer_inbox(DEV) == "fleet/v1/dev/pi-0042/inbox/infer"
    assert t.artifact_request(SHA) == f"fleet/v1/artifacts/{SHA}/req"
    assert t.infer("cloud-1", "kws") == "fleet/v1/node/cloud-1/infer/kws"
    assert t.CTL_STATE == "fleet/v1/ctl/state"
    assert t.API_REQUEST == "fleet/v1/ctl/api/req"
    assert t.api_reply("fleetctl-1") == "fleet/v1/ctl/api/reply/fleetctl-1"
    assert t.trust_root(3) == "fleet/v1/trust/root/3"
    assert t.TRUST_ROOTS == "fleet/v1/trust/root/+"
    assert t.parse("fleet/v1/trust/root/12") == t.TopicInfo(kind="trust_root", version=12)
    for bad in (0, -1, True, "2", 2.0, 2**31, None):
        with pytest.raises(ValueError):
            t.trust_root(bad)  # type: ignore[arg-type]
    assert t.all_devices("telemetry") == "fleet/v1/dev/+/telemetry"
    assert t.inbox_filter(DEV) == "fleet/v1/dev/pi-0042/inbox/#"
    assert t.infer_filter("cloud-1") == "fleet/v1/node/cloud-1/infer/+"
    assert t.shared("ctl", t.all_devices("events")) == "$share/ctl/fleet/v1/dev/+/events"


@given(device=_ids, node=_ids, model=_ids, client=_ids, sha=_shas)
@settings(max_examples=300, deadline=None)
def test_topics_parse_back(device: str, node: str, model: str, client: str, sha: str) -> None:
    built = [
        *(t.device_topic(device, k) for k in t.DEVICE_KINDS),
        t.chunk_inbox(device, sha), t.infer_inbox(device),
        t.artifact_request(sha), t.infer(node, model), t.CTL_STATE, t.API_REQUEST, t.api_reply(client),
        t.trust_root(len(sha) + len(device)),
    ]
    assert {t.parse(topic).kind for topic in built} == set(t.TOPICS)
    for topic in built:
        info = t.parse(topic)
        assert t.build(info) == topic
        assert info.kind in t.TOPICS
        assert "+" not in topic and "#" not in topic and "//" not in topic and not topic.endswith("/")
    assert t.parse(t.telemetry(device)).device == device
    assert t.parse(t.infer(node, model)) == t.TopicInfo(kind="infer", node=node, model=model)
    assert t.parse(t.chunk_inbox(device, sha)) == t.TopicInfo(kind="chunk_inbox", device=device, sha256=sha)
    assert t.parse(t.infer_inbox(device)) == t.TopicInfo(kind="infer_inbox", device=device)
    assert t.parse(t.artifact_request(sha)).sha256 == sha
    assert t.parse(t.api_reply(client)).client == client


BAD_IDS = ["", "a/b", "+", "#", "a+b", "a#", "$SYS", "x" * 65, "a b", "é", "a\0b", ".hidden", "-x", "_x", None, 5,
           "a\nb", "pi-1\n", "../up"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b) for b in BAD_IDS])
def test_bad_ids_are_refused_at_build_time(bad: Any) -> None:
    builders: list[Callable[[Any], Any]] = [
        t.state, t.desired, t.cmd, t.reply, t.events, t.telemetry, t.infer_inbox, t.inbox_filter, t.infer_filter,
        t.api_reply, t.device_subscriptions, t.device_acl, lambda x: t.infer(x, "m"), lambda x: t.infer("n", x),
        lambda x: t.chunk_inbox(x, SHA), lambda x: t.shared(x, t.API_REQUEST),
    ]
    if bad is not None:  # None is how this one says "not shared"
        builders.append(t.controller_subscriptions)
    for build in builders:
        with pytest.raises(ValueError):
            build(bad)
    with pytest.raises(ValueError):
        t.check_id(bad)


@pytest.mark.parametrize("bad", ["", "AB" * 32, "g" * 64, "a" * 63, SHA + "0", SHA + "\n", None])
def test_bad_sha256_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        t.artifact_request(bad)
    with pytest.raises(ValueError):
        t.chunk_inbox(DEV, bad)


@pytest.mark.parametrize("topic", [
    "", "fleet/v1", "fleet/v2/dev/a/state", "fleet/v1/dev/a", "fleet/v1/dev/a/state/x", "fleet/v1/dev/a/status",
    "fleet/v1/dev//state", "fleet/v1/dev/+/state", "fleet/v1/dev/a b/state", "fleet/v1/dev/a/inbox",
    "fleet/v1/dev/a/inbox/chunk", f"fleet/v1/dev/a/inbox/chunk/{SHA}/x", "fleet/v1/dev/a/inbox/chunk/notasha",
    "fleet/v1/dev/a/inbox/mail", f"fleet/v1/dev/a/inbox/infer/{SHA}", "fleet/v1/artifacts/abc/req", f"fleet/v1/artifacts/{SHA}/get",
    "fleet/v1/node/a/infer", "fleet/v1/node/a/infer/m/x", "fleet/v1/node/a/run/m", "fleet/v1/ctl",
    "fleet/v1/ctl/state/x", "fleet/v1/ctl/api", "fleet/v1/ctl/api/reply", "fleet/v1/ctl/api/reply/#",
    "$share/g/fleet/v1/ctl/state", "/fleet/v1/ctl/state", "other/v1/ctl/state",
    "fleet/v1/trust/root", "fleet/v1/trust/root/0", "fleet/v1/trust/root/02", "fleet/v1/trust/root/-1",
    "fleet/v1/trust/root/x", "fleet/v1/trust/root/2/x", "fleet/v1/trust/root/+", "fleet/v1/trust/root/99999999999",
    "fleet/v1/trust/root/2147483648", "fleet/v1/trust/deploy/2",
])
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(ValueError):
        t.parse(topic)


def test_topic_helpers_refuse_unknown_kinds() -> None:
    for call in (lambda: t.device_topic(DEV, "inbox"), lambda: t.all_devices("desired/x"),
                 lambda: t.build(t.TopicInfo("x")), lambda: t.build(t.TopicInfo("chunk_inbox", device=DEV)),
                 lambda: t.shared("g", "a/#/b"), lambda: t.shared("g", "$share/h/a")):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("flt,topic,hit", [
    ("fleet/v1/dev/+/telemetry", "fleet/v1/dev/a/telemetry", True),
    ("fleet/v1/dev/+/telemetry", "fleet/v1/dev/a/events", False),
    ("fleet/v1/dev/a/inbox/#", "fleet/v1/dev/a/inbox/chunk/" + SHA, True),
    ("fleet/v1/dev/a/inbox/#", "fleet/v1/dev/a/inbox", True),
    ("fleet/v1/dev/a/inbox/#", "fleet/v1/dev/b/inbox/infer", False),
    ("$share/ctl/fleet/v1/dev/+/events", "fleet/v1/dev/a/events", True),
    ("#", "$SYS/broker/uptime", False),
    ("+/v1/ctl/state", "fleet/v1/ctl/state", True),
    ("fleet/v1/node/+/infer/+", "fleet/v1/node/n/infer/m/x", False),
])
def test_filter_matching(flt: str, topic: str, hit: bool) -> None:
    assert t.matches(flt, topic) is hit


def test_topic_table() -> None:
    assert set(t.TOPICS) == {"state", "desired", "cmd", "reply", "events", "telemetry", "chunk_inbox",
                             "infer_inbox", "artifact_req", "infer", "ctl_state", "api_req", "api_reply",
                             "trust_root"}
    assert {k for k, s in t.TOPICS.items() if s.retained} == {"state", "desired", "ctl_state", "trust_root"}
    assert {k for k, s in t.TOPICS.items() if s.signed} == {"desired", "cmd", "trust_root"}
    for spec in t.TOPICS.values():
        assert spec.qos in (0, 1, 2)
        assert spec.payload in m.KINDS
        assert spec.binary == (spec.payload in m.BINARY_KINDS)
        assert spec.signed == (spec.payload in m.SIGNED_KINDS)


def test_subscriptions_and_acl_cover_exactly_what_a_device_owns() -> None:
    acl = t.device_acl(DEV)
    subs = [f for f, _ in t.device_subscriptions(DEV)]
    assert subs == list(acl.subscribe)

    def can(filters: tuple[str, ...] | list[str], topic: str) -> bool:
        return any(t.matches(f, topic) for f in filters)

    for topic in (t.desired(DEV), t.cmd(DEV), t.chunk_inbox(DEV, SHA), t.infer_inbox(DEV), t.CTL_STATE,
                  t.infer(DEV, "kws"), t.trust_root(2), t.trust_root(17)):
        assert can(subs, topic), topic
    for topic in (t.desired("pi-7"), t.cmd("pi-7"), t.chunk_inbox("pi-7", SHA), t.telemetry("pi-7"),
                  t.infer("pi-7", "kws"), t.api_reply("x")):
        assert not can(subs, topic), topic
    for topic in (t.state(DEV), t.reply(DEV), t.events(DEV), t.telemetry(DEV), t.artifact_request(SHA),
                  t.infer("cloud-1", "kws"), t.infer_inbox("pi-7")):
        assert can(acl.publish, topic), topic
    for topic in (t.desired(DEV), t.cmd(DEV), t.state("pi-7"), t.telemetry("pi-7"), t.chunk_inbox("pi-7", SHA),
                  t.chunk_inbox(DEV, SHA), t.CTL_STATE, t.API_REQUEST, t.api_reply("x"), t.trust_root(2)):
        assert not can(acl.publish, topic), topic
    ctl = [f for f, _ in t.controller_subscriptions("ctl")]
    assert t.all_devices("state") in ctl  # every replica sees every birth and death
    assert all(f.startswith("$share/ctl/") for f in ctl if f != t.all_devices("state"))
    for topic in (t.telemetry(DEV), t.events(DEV), t.reply(DEV), t.state(DEV), t.artifact_request(SHA),
                  t.API_REQUEST):
        assert can(ctl, topic) and can([f for f, _ in t.controller_subscriptions()], topic), topic


# -- docs --------------------------------------------------------------------------------

_DOC_EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", re.S)


def test_protocol_doc_examples_decode() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    found = _DOC_EXAMPLE.findall(doc)
    kinds = {k for k, _ in found}
    assert set(m.KINDS) | {"envelope"} <= kinds
    for kind, text in found:
        if kind == "envelope":
            env = dsse.Envelope.from_json(text.encode())
            m.decode({v: k for k, v in PAYLOAD_TYPES.items()}[env.payload_type], env.payload)
            continue
        header = json.loads(text)
        compact = json.dumps(header, separators=(",", ":")).encode()
        if kind == "chunk":
            payload = _chunk_bytes(compact, bytes(header.get("length", 0)))
        elif kind in m.BINARY_KINDS:
            names = header.get("names") or []
            payload = _frame(compact, [_npy(np.zeros(1, np.float32)) for _ in names])
        else:
            payload = compact
        m.decode(kind, payload)
    for spec in t.TOPICS.values():
        assert f"`{spec.pattern}`" in doc, spec.pattern
    for kind, limit in m.LIMITS.items():
        assert f"| `{kind}` |" in doc and f"{limit:,}" in doc, kind
