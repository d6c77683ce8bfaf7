"""sd_notify without libsystemd: real Unix datagram sockets (a path and an abstract @name)
receive exactly the assignments sent; outside systemd it is a no-op; the watchdog interval
is half of WATCHDOG_USEC, and only for this process."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.agent import sdnotify
from edge_runtime.agent.sdnotify import notify, notify_address, watchdog_interval


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)  # a missing datagram fails the test instead of hanging it
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"edgefleet-test-{os.getpid()}-{uuid.uuid4().hex}"
    with _receiver(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def _pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on ``sock`` (sends are synchronous: no waiting)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)


def test_path_socket_receives_exactly_the_datagrams(path_socket: socket.socket) -> None:
    assert notify(ready=True, status="serving 2 models")
    assert notify(watchdog=True)
    assert notify(stopping=True, status="draining\nINJECTED=1")
    assert notify(mainpid=4242)
    assert _pending(path_socket) == [
        b"READY=1\nSTATUS=serving 2 models",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining INJECTED=1",  # a newline cannot smuggle in a field
        b"MAINPID=4242",
    ]


def test_abstract_socket_receives_the_datagram(abstract_socket: socket.socket) -> None:
    assert notify(ready=True)
    assert notify(status="ünïcode ok")
    assert _pending(abstract_socket) == [b"READY=1", "STATUS=ünïcode ok".encode()]


def test_reloading_carries_monotonic_usec(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify(reloading=True, status="reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (datagram,) = _pending(path_socket)
    lines = datagram.decode().split("\n")
    assert lines[:2] == ["RELOADING=1", "STATUS=reloading config"]
    key, value = lines[2].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    assert notify(reloading=True, monotonic_usec=7)
    assert _pending(path_socket) == [b"RELOADING=1\nMONOTONIC_USEC=7"]


def test_false_fields_are_left_out(path_socket: socket.socket) -> None:
    assert notify(ready=False) is False  # nothing to say
    assert notify(ready=False, status="x")
    assert _pending(path_socket) == [b"STATUS=x"]


def test_unset_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(ready=True) is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify(ready=True) is False


def test_addresses() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abc"}) == b"\0abc"
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "relative/path"}) is None
    assert notify_address({"NOTIFY_SOCKET": "@"}) is None


def test_failures_never_raise_and_log_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sdnotify, "_warned", False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.agent.sdnotify"):
        assert notify(ready=True) is False
        assert notify(watchdog=True) is False
        assert notify(**{"bad-key": 1}) is False  # a bad field name is not the caller's crash either
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "@self"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "@other"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    pids = {"@self": str(os.getpid()), "@other": str(os.getpid() + 1)}
    env = {k: pids.get(v, v) for k, v in env.items()}
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.25


def _drain_for(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram arriving within ``seconds``, read as it comes: a Unix datagram queue
    holds few (net.unix.max_dgram_qlen), and a sender blocks while it is full."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(65536))
        except socket.timeout:
            break
    sock.settimeout(5)
    return out


def test_busy_watchdog_pings_through_a_long_step_and_stops_at_its_bound(path_socket: socket.socket) -> None:
    """Inside busy() the thread keeps systemd's watchdog fed; outside it sends nothing; a
    step stuck past max_busy_s is left for the watchdog to catch."""
    dog = sdnotify.BusyWatchdog(0.02, max_busy_s=0.3)
    try:
        assert _drain_for(path_socket, 0.1) == []  # idle: the main loop pings for itself, not the thread
        with dog.busy():
            during = _drain_for(path_socket, 0.3 + 0.05)  # the bound, plus a ping already under way
            after = _drain_for(path_socket, 0.15)  # stuck past the bound: nothing more
        assert len(during) >= 5 and set(during) == {b"WATCHDOG=1"}
        assert after == []
    finally:
        dog.close()


def test_busy_watchdog_without_a_watchdog_is_a_no_op(path_socket: socket.socket) -> None:
    dog = sdnotify.BusyWatchdog(None)
    with dog.busy():
        pass
    dog.close()
    assert dog.pings == 0 and _pending(path_socket) == []
