"""tests.netproxy.TcpProxy against a real echo server: bytes pass both ways and are counted,
cut() drops live connections and refuses new ones, restore() lets them through again."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.helpers import wait_until
from tests.netproxy import TcpProxy


@pytest.fixture
def echo() -> Iterator[int]:
    """A loopback echo server; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def nothing_passes(port: int) -> bool:
    """A new connection through ``port`` is reset or closed before any byte comes back
    (the reset may already hit ``connect`` on loopback)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(b"lost")
            except OSError:
                return True
            return is_dead(s)
    except OSError:
        return True


def is_dead(s: socket.socket) -> bool:
    """The peer closed or reset the connection (a read gives EOF or an error)."""
    try:
        return s.recv(1) == b""
    except OSError:
        return True


def test_bytes_pass_and_are_counted(echo):
    with TcpProxy("127.0.0.1", echo) as proxy:
        assert proxy.url == f"mqtt://127.0.0.1:{proxy.port}"
        payload = bytes(range(256)) * 1000
        assert roundtrip(proxy.port, payload) == payload
        wait_until(lambda: proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload),
                   timeout=5, what="counters to catch up")
        assert proxy.accepted == 1


def test_cut_drops_live_connections_and_refuses_new_ones_until_restored(echo):
    with TcpProxy("127.0.0.1", echo) as proxy:
        live = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        live.sendall(b"hello")
        assert live.recv(5) == b"hello"
        wait_until(lambda: proxy.live == 1 and proxy.bytes_up == 5, timeout=5, what="one live link, counted")

        proxy.cut()
        assert proxy.is_cut and proxy.live == 0
        assert is_dead(live)
        live.close()
        # a new connection is accepted by the kernel, then closed at once: nothing passes
        assert nothing_passes(proxy.port)
        wait_until(lambda: proxy.refused >= 1, timeout=5, what="a refused connection")
        assert proxy.accepted == 1
        up_before = proxy.bytes_up

        proxy.restore()
        assert not proxy.is_cut
        assert roundtrip(proxy.port, b"again") == b"again"
        wait_until(lambda: proxy.bytes_up == up_before + 5, timeout=5, what="counted again")
        assert proxy.accepted == 2


def test_close_is_idempotent_and_frees_the_port(echo):
    proxy = TcpProxy("127.0.0.1", echo)
    port = proxy.port
    proxy.close()
    proxy.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_target_that_is_down_is_a_refusal(echo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound but not listening: connections are refused
        with TcpProxy("127.0.0.1", dead_port) as proxy:
            assert nothing_passes(proxy.port)
            wait_until(lambda: proxy.refused == 1, timeout=5, what="the refusal counted")
