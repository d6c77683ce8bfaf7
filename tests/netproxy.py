"""A loopback TCP forwarder that a test can cut: the network between a device and its broker.

    with TcpProxy("127.0.0.1", broker.port) as proxy:
        agent config: broker url = proxy.url            # the device goes through the proxy
        observer connects to broker.url directly        # the test's own view never breaks
        proxy.cut()      # every live connection closed, new ones closed on accept
        proxy.restore()  # connections pass again
        proxy.bytes_up, proxy.bytes_down                # bytes taken to forward, client->target / back

Threads: one accept thread, and two pump threads per connection (one per direction). No
pytest dependency (the benchmark imports it).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from types import TracebackType
from typing import Optional

__all__ = ["TcpProxy"]

_BUF = 64 * 1024


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` until ``cut()``.

    Raises (constructor): OSError if the listening socket cannot be bound.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections closed because the proxy was cut (or the target was down)
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._cut = False
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def live(self) -> int:
        """Connections forwarded right now."""
        with self._lock:
            return len(self._links)

    def cut(self) -> None:
        """Close every live connection and close new ones as soon as they are accepted,
        until ``restore()``: the device sees its broker vanish (a reset, then refusals)."""
        with self._lock:
            self._cut = True
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and close everything. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links, self._links = list(self._links), set()
        for link in links:
            link.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    # -- inside ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.2)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._cut or self._closed:
                self._refuse(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._refuse(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                if self._cut or self._closed:
                    link.close()
                    self.refused += 1
                    continue
                self._links.add(link)
                self.accepted += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(link, src, dst, up), daemon=True,
                                 name=f"tcpproxy-{self.port}-{'up' if up else 'down'}").start()

    def _refuse(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        try:
            # RST rather than FIN: the client sees "connection reset", as on a dead route
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        client.close()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(_BUF)
                if not data:
                    break
                # counted before forwarding, so the count is ordered before anything the
                # bytes cause on the other side (an echo can never outrun its own count)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)
