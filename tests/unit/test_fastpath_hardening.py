"""A hostile local client against the fast path: the daemon's memory, descriptors, threads
and socket stay bounded, and it keeps serving everyone else."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from edge_runtime.api import FastPathClient, FastPathServer, framing
from edge_runtime.engine import Engine
from edge_runtime.errors import ModelUnavailable
from tests.helpers import wait_until


@pytest.fixture
def engine(model_files: dict[str, Path]) -> Engine:
    e = Engine(pool_size=1)
    e.swap("tiny", "1", model_files["tiny_v1"])
    return e


@pytest.fixture
def server(engine: Engine, tmp_path: Path) -> Iterator[FastPathServer]:
    s = FastPathServer(tmp_path / "api.sock", engine, max_frame=4 << 20, max_connections=8, idle_timeout=60.0,
                       frame_timeout=30.0, recv_budget_bytes=8 << 20, shm_budget_bytes=8 << 20)
    s.start()
    yield s
    s.stop(timeout=5)


def _connect(server: FastPathServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(server.path))
    return s


def _still_serves(server: FastPathServer) -> None:
    with FastPathClient(str(server.path)) as c:
        assert c.predict("tiny", np.zeros((1, 16), np.float32))["y"].shape == (1, 4)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_announced_sizes_are_claimed_from_a_budget_before_allocation(server: FastPathServer) -> None:
    rss_before = psutil.Process().memory_info().rss
    socks = []
    for _ in range(6):  # each announces a 3.9 MB tensor and sends nothing more
        s = _connect(server)
        head = b'{"op":"ping"}'
        s.sendall(struct.pack("<4sII", framing.MAGIC, len(head), 1) + head + struct.pack("<Q", (4 << 20) - 100_000))
        socks.append(s)
    # At most two such claims fit the 8 MB budget; the rest are told the server is busy.
    busy = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            busy += b"server busy" in s.recv(4096)
        except TimeoutError:
            pass
    assert busy >= 4
    assert server.recv_budget.used <= server.recv_budget.limit
    assert psutil.Process().memory_info().rss - rss_before < 64 << 20
    for s in socks:
        s.close()
    wait_until(lambda: server.recv_budget.used == 0, what="claims to be released when the clients go")
    _still_serves(server)


def _npy(descr: str, shape: tuple[int, ...], pad: int = 0, major: int = 1) -> bytes:
    d = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode() + b" " * pad
    d += b" " * (15 - (len(d) + 10) % 16) + b"\n"
    if major == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(d)) + d


JUNK_TENSORS = {
    "short v2 header": b"\x93NUMPY\x02\x00\x00\x00",
    "itemsize 0": _npy("|S0", (4,)),
    "shape overflows int64": _npy("<f4", (2**63,)),
    "huge header": _npy("<f4", (1,), pad=60_000, major=2) + b"\0" * 4,
    "header past the end": b"\x93NUMPY\x01\x00" + struct.pack("<H", 500) + b"{}",
}


@pytest.mark.parametrize("blob", list(JUNK_TENSORS.values()), ids=list(JUNK_TENSORS))
def test_junk_tensors_sent_with_descriptors_leak_nothing(server: FastPathServer, blob: bytes) -> None:
    before = _open_fds()
    s = _connect(server)
    head = b'{"op":"ping"}'
    fd = os.memfd_create("junk")
    msg = struct.pack("<4sII", framing.MAGIC, len(head), 1) + head + struct.pack("<Q", len(blob)) + blob
    s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, fd, fd]))])
    os.close(fd)
    assert b"bad_frame" in s.recv(4096)
    s.close()
    wait_until(lambda: _open_fds() <= before, what="the server to close every received descriptor")
    assert len(framing._header_cache) < 256 and all(len(k) <= framing.MAX_NPY_HEADER for k in framing._header_cache)
    _still_serves(server)


def test_connections_are_capped(server: FastPathServer) -> None:
    held = [_connect(server) for _ in range(server.max_connections)]
    for s in held:  # make sure each is accepted and tracked
        framing.send_frame(s, {"op": "ping"})
        assert framing.recv_frame(s)[0]["ok"]
    extra = _connect(server)
    assert framing.recv_frame(extra)[0]["error"]["type"] == "too_many_connections"
    # A client queues rather than fails: it gets in as soon as a slot frees.
    result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: result.update(FastPathClient(str(server.path), timeout=20).predict("tiny", np.zeros((1, 16), np.float32))))
    waiter.start()
    held.pop().close()
    waiter.join(20)
    assert result["y"].shape == (1, 4)
    for s in held:
        s.close()
    wait_until(lambda: len(server.connections) == 0, what="closed connections to be forgotten")
    _still_serves(server)


def test_idle_and_half_sent_connections_are_closed(engine: Engine, tmp_path: Path) -> None:
    server = FastPathServer(tmp_path / "short.sock", engine, idle_timeout=1.0, frame_timeout=0.5)
    server.start()
    try:
        _check_timeouts(server)
    finally:
        server.stop(5)


def _check_timeouts(server: FastPathServer) -> None:
    idle = _connect(server)
    slow = _connect(server)
    slow.sendall(struct.pack("<4sII", framing.MAGIC, 100, 0))  # the header never comes
    assert idle.recv(10) == b""  # closed after idle_timeout
    received = b""
    while chunk := slow.recv(4096):  # closed after frame_timeout; raises TimeoutError if never
        received += chunk
    assert received == b"" or b"bad_frame" in received
    wait_until(lambda: len(server.connections) == 0, what="timed-out connections to be dropped")


def test_shared_memory_is_capped_per_region_and_in_total(server: FastPathServer) -> None:
    fds = []
    socks = []
    for i in range(3):  # 3 x 4 MB regions against an 8 MB budget
        fd = os.memfd_create(f"r{i}", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        fds.append(fd)
        s = _connect(server)
        socks.append(s)
        framing.send_frame(s, {"op": "attach_shm", "size": 4 << 20}, fds=[fd])
    replies = [framing.recv_frame(s)[0] for s in socks]
    assert [r["ok"] for r in replies].count(True) == 2
    assert [r.get("error", {}).get("type") for r in replies if not r["ok"]] == ["model_unavailable"]
    framing.send_frame(socks[0], {"op": "attach_shm", "size": (4 << 20) + 1}, fds=[fds[0]])
    assert "between 1 and" in framing.recv_frame(socks[0])[0]["error"]["message"]  # over max_frame
    for s in socks:
        s.close()
    for fd in fds:
        os.close(fd)
    wait_until(lambda: server.shm_budget.used == 0, what="mapped regions to be released")


def test_a_live_runtime_socket_is_never_taken_over(server: FastPathServer, engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="already serving"):
        FastPathServer(server.path, engine)
    _still_serves(server)
    plain = tmp_path / "not-a-socket"
    plain.write_text("precious")
    with pytest.raises(ModelUnavailable, match="not a socket"):
        FastPathServer(plain, engine)
    assert plain.read_text() == "precious"


def test_a_stale_socket_is_replaced(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    s = FastPathServer(path, engine)
    s.start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
        with FastPathClient(str(path)) as c:
            c.ping()
    finally:
        s.stop()


def test_requests_after_begin_stop_are_told_not_dropped(server: FastPathServer) -> None:
    s = _connect(server)
    framing.send_frame(s, {"op": "ping"})
    assert framing.recv_frame(s)[0]["ok"]
    server.begin_stop()
    framing.send_frame(s, {"op": "ping"})
    reply = framing.recv_frame(s)[0]
    assert reply["error"]["type"] == "shutting_down"
    assert server.finish_stop(5)
    assert not server.path.exists()
    json.dumps(reply)
