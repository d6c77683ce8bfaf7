"""Binary frames of the fast path: a JSON header, then tensors as `.npy`.

    frame   := prefix header tensor*
    prefix  := b"EFT1" u32 header_len u32 n_tensors          (little endian)
    header  := UTF-8 JSON object, at most MAX_HEADER bytes
    tensor  := u64 npy_len, then one `.npy` file (format 1.0/2.0, no pickles)

Tensors go out with one ``sendmsg`` straight from the arrays' memory and come in with
``recv_into`` a buffer the returned array then wraps, so a 600 KB image costs two copies in
the kernel and none in Python. Both ends share this module; nothing else knows the layout.
"""

from __future__ import annotations

import array
import ast
import io
import json
import math
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.api.inflight import ByteBudget

MAGIC = b"EFT1"
_PREFIX = struct.Struct("<4sII")
_LEN = struct.Struct("<Q")
MAX_HEADER = 64 * 1024
MAX_TENSORS = 64
MAX_FDS = 4
# numpy's own limit for a trusted header; ours come from any local process.
MAX_NPY_HEADER = 10_000
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
_NPY_MAGIC = b"\x93NUMPY"
_header_cache: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
_HEADER_CACHE_MAX = 256


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the connection should be closed."""


class PeerClosed(FrameError):
    """The peer closed the connection between frames (a clean end)."""


def npy_header(arr: np.ndarray) -> bytes:
    """The `.npy` header for a C-contiguous, non-object array."""
    if arr.dtype.hasobject:
        raise FrameError("object arrays cannot be framed")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    )
    return buf.getvalue()


def encode(header: dict[str, Any], tensors: Sequence[np.ndarray] = ()) -> list[bytes | memoryview]:
    """The buffers of one frame, ready for ``send_buffers`` (no tensor data is copied)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise FrameError(f"header is {len(head)} bytes, at most {MAX_HEADER}")
    if len(tensors) > MAX_TENSORS:
        raise FrameError(f"{len(tensors)} tensors in one frame, at most {MAX_TENSORS}")
    parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, len(head), len(tensors)) + head]
    for arr in tensors:
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # ascontiguousarray would turn a 0-d array into 1-d
        npy = npy_header(arr)
        parts.append(_LEN.pack(len(npy) + arr.nbytes) + npy)
        if arr.nbytes:
            parts.append(memoryview(arr).cast("B"))
    return parts


def send_buffers(sock: socket.socket, parts: list[bytes | memoryview], fds: Sequence[int] = ()) -> None:
    """``sendall`` for a list of buffers: one system call when the kernel takes it all.

    ``fds`` ride along with the first bytes (SCM_RIGHTS), so they arrive with the frame.
    """
    views = [memoryview(p) for p in parts if len(p)]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while views:
        sent = sock.sendmsg(views, ancillary)
        ancillary = []
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def send_frame(sock: socket.socket, header: dict[str, Any], tensors: Sequence[np.ndarray] = (), *, fds: Sequence[int] = ()) -> None:
    send_buffers(sock, encode(header, tensors), fds)


def _recv_exact(sock: socket.socket, n: int, *, first: bool = False, fds: list[int] | None = None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if fds is not None:
            k, anc, flags, _ = sock.recvmsg_into([view[got:]], socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            if flags & socket.MSG_CTRUNC:
                raise FrameError(f"more than {MAX_FDS} file descriptors sent with one frame")
        else:
            k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if first and got == 0:
                raise PeerClosed("connection closed")
            raise FrameError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k
    return buf


def recv_frame(
    sock: socket.socket,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    fds: list[int] | None = None,
    budget: ByteBudget | None = None,
    claimed: list[int] | None = None,
    frame_timeout: float | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read one frame.

    With ``fds``, file descriptors sent with it are appended there (the caller owns and
    must close them, whatever happens next). With ``budget``, each tensor's size is claimed
    from it *before* its buffer is allocated (a peer may announce 200 MB and send 50
    bytes), and the claims are appended to ``claimed`` for the caller to release once the
    request is answered. ``frame_timeout`` bounds the rest of a frame once it has begun.

    Raises:
        PeerClosed: the peer closed cleanly before a new frame.
        FrameError: anything malformed, over ``max_frame`` bytes, or over the budget.
    """
    magic, head_len, count = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size, first=True, fds=fds))
    if frame_timeout is not None:
        sock.settimeout(frame_timeout)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
    if head_len > MAX_HEADER:
        raise FrameError(f"header of {head_len} bytes exceeds {MAX_HEADER}")
    if count > MAX_TENSORS:
        raise FrameError(f"{count} tensors exceed the limit of {MAX_TENSORS}")
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("header must be a JSON object")
    total = _PREFIX.size + head_len
    tensors = []
    for _ in range(count):
        (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
        total += _LEN.size + size
        if total > max_frame:
            raise FrameError(f"frame exceeds {max_frame} bytes")
        if budget is not None:
            if not budget.try_acquire(size):
                raise FrameError(f"server busy: {size} more bytes in flight would exceed {budget.limit}; retry later")
            if claimed is not None:
                claimed.append(size)
        tensors.append(decode_npy(_recv_exact(sock, size)))
    return header, tensors


def decode_npy(buf: bytearray) -> np.ndarray:
    """An array over ``buf`` (no copy) from one `.npy` blob; refuses pickles and short data.

    Raises:
        FrameError: for anything that is not a well-formed, pickle-free `.npy` blob.
    """
    try:
        return _decode_npy(buf)
    except FrameError:
        raise
    except Exception as exc:  # struct/numpy raise many types on junk; all mean "bad tensor"
        raise FrameError(f"bad .npy tensor: {type(exc).__name__}: {exc}") from exc


def _decode_npy(buf: bytearray) -> np.ndarray:
    if len(buf) < 10 or bytes(buf[:6]) != _NPY_MAGIC:
        raise FrameError("tensor is not a .npy blob")
    major = buf[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", buf, 8)
        start = 10
    elif major in (2, 3) and len(buf) >= 12:
        (hlen,) = struct.unpack_from("<I", buf, 8)
        start = 12
    else:
        raise FrameError(f"unsupported or short .npy header (format version {major})")
    if hlen > MAX_NPY_HEADER:
        raise FrameError(f".npy header of {hlen} bytes exceeds {MAX_NPY_HEADER}")
    if start + hlen > len(buf):
        raise FrameError(".npy header runs past the tensor")
    raw = bytes(buf[start : start + hlen])
    parsed = _header_cache.get(raw)
    if parsed is None:
        parsed = _parse_npy_header(raw)
        if len(_header_cache) < _HEADER_CACHE_MAX:
            _header_cache[raw] = parsed
    dtype, shape, nbytes = parsed
    offset = start + hlen
    if len(buf) - offset != nbytes:
        raise FrameError(f".npy data is {len(buf) - offset} bytes, its header says {nbytes}")
    return np.frombuffer(buf, dtype=dtype, offset=offset).reshape(shape)


def _parse_npy_header(raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    if b"\\" in raw:  # never in a real header (a descr, a bool, a tuple of ints); refuse escapes
        raise FrameError("bad .npy header: unexpected backslash")
    try:
        d = ast.literal_eval(raw.decode("latin1"))
        dtype = np.dtype(np.lib.format.descr_to_dtype(d["descr"]))
        shape = tuple(int(x) for x in d["shape"])
        fortran = bool(d["fortran_order"])
    except Exception as exc:  # literal_eval raises many types on junk
        raise FrameError(f"bad .npy header: {exc}") from exc
    if dtype.hasobject:
        raise FrameError("object (pickled) arrays are refused")
    if dtype.itemsize == 0:
        raise FrameError(f"dtype {dtype} has no size")
    if fortran:
        raise FrameError("Fortran-ordered arrays are refused; send C order")
    if any(x < 0 for x in shape):
        raise FrameError(f"negative dimension in shape {shape}")
    return dtype, shape, math.prod(shape) * dtype.itemsize  # Python ints: no overflow
