"""edge_runtime.mqtt turns Nagle's algorithm off on its sockets (TCP_NODELAY), against real
brokers (amqtt and Mosquitto, subprocesses on loopback).

Why: with Nagle on, a PUBLISH written while the PUBACK of the message just received is
still unacknowledged waits for the peer's delayed ACK (~40 ms on Linux), so a QoS 1
request/reply (remote inference) cost ~90 ms on loopback. The tests check the socket
option, not timings: the clients' sockets are found from the outside, as the sockets of
this process connected to the broker's port (Linux ``/proc/self/fd``).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed in this venv")

from tests.brokers import amqtt_broker, broker, mosquitto_broker  # noqa: E402,F401 - fixtures
from tests.helpers import wait_until  # noqa: E402
from tests.integration.test_mqtt import client, clients  # noqa: E402,F401 - the client factory and its fixture

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to find the sockets")


def sockets_to(port: int) -> dict[tuple[str, int], int]:
    """{local address: TCP_NODELAY} of this process's TCP sockets connected to 127.0.0.1:``port``."""
    found: dict[tuple[str, int], int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (ValueError, OSError):
            continue  # the listing's own fd, or one closed meanwhile
        with s:
            if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                continue
            try:
                peer = s.getpeername()
            except OSError:
                continue  # not connected
            if peer == ("127.0.0.1", port):
                found[s.getsockname()] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return found


def test_a_connected_client_has_nagle_off(broker, clients):
    assert sockets_to(broker.port) == {}
    c = client(broker, clients, connect=False, client_id="caller")
    c.connect(timeout=5)
    socks = sockets_to(broker.port)
    assert len(socks) == 1
    assert list(socks.values()) == [1]


def test_a_client_started_in_the_background_has_nagle_off(broker, clients):
    c = client(broker, clients, connect=False, client_id="node")
    c.start()
    assert c.wait_connected(5)
    assert list(sockets_to(broker.port).values()) == [1]


def test_the_socket_of_a_reconnect_has_nagle_off_too(broker, clients):
    c = client(broker, clients, connect=False, client_id="dev-1")
    c.connect(timeout=5)
    (first,) = sockets_to(broker.port)
    broker.restart()
    wait_until(lambda: c.is_connected and first not in sockets_to(broker.port), timeout=10,
               what="a new session on a new socket")
    socks = sockets_to(broker.port)
    assert len(socks) == 1 and first not in socks
    assert list(socks.values()) == [1]
