"""The fast path's frame layout: round trips, and every malformed input is a FrameError."""

from __future__ import annotations

import io
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.api import framing


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def _send_in_thread(sock: socket.socket, data: bytes | list) -> threading.Thread:
    def run() -> None:
        if isinstance(data, list):
            framing.send_buffers(sock, data)
        else:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    "arrays",
    [
        [],
        [np.arange(16, dtype=np.float32).reshape(1, 16)],
        [np.zeros((0, 3), np.int8)],
        [np.array(3.5)],  # 0-d
        [np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32), np.arange(5, dtype=np.int64)],
        [np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))],  # sent as C order
        [np.array([True, False]), np.array([1, 2], dtype=np.uint8), np.array([1.0], dtype=np.float64)],
    ],
    ids=["none", "float32", "empty", "scalar", "image+int64", "fortran-in", "mixed"],
)
def test_round_trip(arrays: list[np.ndarray]) -> None:
    a, b = _pair()
    header = {"op": "predict", "model": "m", "inputs": [f"t{i}" for i in range(len(arrays))]}
    t = _send_in_thread(a, framing.encode(header, arrays))
    got_header, got = framing.recv_frame(b)
    t.join(10)
    assert got_header == header
    assert len(got) == len(arrays)
    for sent, received in zip(arrays, got):
        assert received.dtype == sent.dtype
        assert received.shape == sent.shape
        np.testing.assert_array_equal(received, sent)
    with pytest.raises(framing.PeerClosed):
        framing.recv_frame(b)


def test_several_frames_on_one_connection() -> None:
    a, b = _pair()
    parts = framing.encode({"n": 1}, [np.ones(3)]) + framing.encode({"n": 2}, [np.zeros(2)])
    _send_in_thread(a, parts)
    assert framing.recv_frame(b)[0] == {"n": 1}
    h, t = framing.recv_frame(b)
    assert h == {"n": 2} and t[0].tolist() == [0.0, 0.0]


def _raw_frame(header: bytes, tensors: list[bytes], magic: bytes = framing.MAGIC) -> bytes:
    out = struct.pack("<4sII", magic, len(header), len(tensors)) + header
    for t in tensors:
        out += struct.pack("<Q", len(t)) + t
    return out


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


BAD_FRAMES = {
    "bad magic": _raw_frame(b"{}", [], magic=b"HTTP"),
    "header not json": _raw_frame(b"{nope", []),
    "header not object": _raw_frame(b"[1,2]", []),
    "header not utf8": _raw_frame(b"\xff\xfe", []),
    "header too large": struct.pack("<4sII", framing.MAGIC, framing.MAX_HEADER + 1, 0),
    "too many tensors": struct.pack("<4sII", framing.MAGIC, 2, framing.MAX_TENSORS + 1) + b"{}",
    "tensor not npy": _raw_frame(b"{}", [b"definitely not numpy data"]),
    "pickled object array": _raw_frame(b"{}", [_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)]),
    "short tensor data": _raw_frame(b"{}", [_npy(np.arange(10, dtype=np.int32))[:-4]]),
    "long tensor data": _raw_frame(b"{}", [_npy(np.arange(10, dtype=np.int32)) + b"\0\0\0\0"]),
    "fortran order": _raw_frame(b"{}", [_npy(np.asfortranarray(np.arange(6.0).reshape(2, 3)))]),
    "cut mid header": _raw_frame(b'{"op":"predict"}', [])[:-3],
    "cut mid tensor": _raw_frame(b"{}", [_npy(np.arange(100.0))])[:-50],
    "bad npy version": _raw_frame(b"{}", [b"\x93NUMPY\x09\x00" + b"\x00" * 20]),
}


@pytest.mark.parametrize("data", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_malformed_frames_raise_frame_error(data: bytes) -> None:
    a, b = _pair()
    _send_in_thread(a, data)
    with pytest.raises(framing.FrameError) as info:
        framing.recv_frame(b)
    assert not isinstance(info.value, framing.PeerClosed)


def test_frame_over_limit_is_refused_before_reading_it() -> None:
    a, b = _pair()
    _send_in_thread(a, framing.encode({}, [np.zeros(4096, np.float32)]))
    with pytest.raises(framing.FrameError, match="exceeds"):
        framing.recv_frame(b, max_frame=1024)


def test_object_arrays_cannot_be_encoded() -> None:
    with pytest.raises(framing.FrameError):
        framing.encode({}, [np.array([object()])])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes) -> None:
    a, b = _pair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        try:
            framing.recv_frame(b)
        except framing.FrameError:
            pass
    finally:
        a.close()
        b.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(min_value=0, max_value=399))
def test_mutated_valid_frame_is_decoded_or_refused(noise: bytes, at: int) -> None:
    """A byte-mutated valid frame either decodes to *some* frame or raises FrameError."""
    valid = b"".join(bytes(p) for p in framing.encode({"op": "predict"}, [np.arange(8, dtype=np.float32)]))
    at = at % len(valid)
    mutated = valid[:at] + noise[: len(valid) - at] + valid[at + len(noise):]
    a, b = _pair()
    try:
        a.sendall(mutated)
        a.shutdown(socket.SHUT_WR)
        try:
            header, tensors = framing.recv_frame(b)
            assert isinstance(header, dict)
            assert all(isinstance(t, np.ndarray) for t in tensors)
        except framing.FrameError:
            pass
    finally:
        a.close()
        b.close()
