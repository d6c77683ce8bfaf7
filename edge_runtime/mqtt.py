"""The one MQTT client of edgefleet: a thin, typed, blocking wrapper over paho-mqtt.

The device agent, the controller and the console all talk MQTT through this module
(STYLE.md #5); nothing else imports paho. The shape follows aiomqtt: a frozen config, a
small surface, timeouts that raise, return codes turned into exceptions, pending
operations removed in ``finally``.

    cfg = MqttConfig(url="mqtt://127.0.0.1:1883", client_id="dev-1",
                     will=Will(topic=topics.state("dev-1"), payload=b'{"online":false}'))
    client = MqttClient(cfg, on_connect=birth_and_subscribe, on_disconnect=pause_outbox)
    client.add_handler(topics.desired("dev-1"), handle_desired)   # or: q = client.queue(filter)
    client.connect(timeout=5)          # or client.start(): keep trying in the background
    client.subscribe([(topics.desired("dev-1"), 1)], timeout=5)
    client.publish(topics.state("dev-1"), b"...", qos=1, retain=True, timeout=5)
    client.disconnect()

Threads. paho runs its own network thread (``loop_start``). Every user callback -- the
``on_connect``/``on_disconnect`` hooks and message handlers -- runs on a second thread,
the *dispatcher*, one at a time and in arrival order. So a hook or a handler may call the
blocking ``subscribe``/``publish`` (re-subscribe and re-publish birth after a reconnect).
Calling them from paho's network thread would wait for an acknowledgement that thread
has to read; that raises ``RuntimeError`` rather than hanging.

Acknowledgements. By default paho acknowledges an incoming QoS 1 message once it is
queued for the dispatcher, not after the handler ran: a process killed in between loses
it, so anything that must not be lost is retained (desired state) or re-sent by its
publisher (commands, chunk requests). With ``MqttConfig(manual_ack=True)`` the PUBACK
waits: for a handler registered with ``add_handler(f, h, acks=True)`` until it calls
``client.ack(msg)`` (the controller does after its database commit), for every other
message until its handlers returned. With a persistent session (``clean_start=False``)
the broker re-sends what was never acknowledged after a crash.

Latency. Every socket the client opens gets ``TCP_NODELAY`` (``on_socket_open``, before
the CONNECT, again after each reconnect). Without it Nagle's algorithm holds a PUBLISH
while an earlier small segment, typically the PUBACK of the message just received, is
unacknowledged, and the peer delays that ACK by ~40 ms: a request/reply over QoS 1 (remote
inference) took ~90 ms on loopback instead of ~1 ms. The broker must do the same on its
side: amqtt does (asyncio sets ``TCP_NODELAY`` on every TCP transport); Mosquitto needs
``set_tcp_nodelay true`` in its config, else each reply still waits ~40 ms.

Reconnects. After the first successful connection (``connect``) or from the start
(``start``), a lost session is re-established forever with exponential backoff and full
jitter: wait ``uniform(0, min(reconnect_max_delay, reconnect_min_delay * 2**n))``.
``on_connect`` fires after every successful CONNACK, so the agent re-publishes its birth
and re-subscribes there (the broker may have forgotten the session).

Errors (all ``edge_runtime.errors.EdgeRuntimeError``; return codes never reach callers):

    MqttError                   base; ``.code`` is machine readable
     ├── ConnectFailed          connect() did not get a session: ``.reason`` says why
     │                          (unreachable, refused by the broker, timeout). Retry later.
     ├── NotConnected           no session right now; retry after on_connect (transient)
     │    └── ConnectionLost    the session dropped while we waited for a SUBACK
     ├── MqttTimeout            no acknowledgement within the timeout (transient)
     │    ├── PublishTimeout    no PUBACK (QoS 1/2) / not written (QoS 0). paho keeps a
     │    │                     QoS>=1 message in flight and re-sends it after a
     │    │                     reconnect, so it may still arrive: at-least-once.
     │    └── SubscribeTimeout  no SUBACK
     ├── PublishRefused         MQTT 5 PUBACK with a failure reason (e.g. not authorized)
     └── SubscribeRefused       SUBACK refused a filter (0x80 / an MQTT 5 reason):
                                ``.filter``, ``.reason``. Usually an ACL: fatal for it.

Bad arguments (an invalid topic or filter, QoS outside 0..2, a malformed URL) raise
``ValueError``; using a closed client raises ``RuntimeError``.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.topics import check_filter, matches

__all__ = [
    "MqttConfig", "Will", "Message", "MqttClient",
    "MqttError", "ConnectFailed", "NotConnected", "ConnectionLost", "MqttTimeout",
    "PublishTimeout", "SubscribeTimeout", "PublishRefused", "SubscribeRefused",
]

log = logging.getLogger(__name__)

# The broker URL schemes we speak and their default ports; one table for every config.
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an ``mqtt://`` / ``mqtts://`` URL, the port defaulting by scheme."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 1883), parts.scheme == "mqtts"

Payload = Union[bytes, bytearray, str]


# -- errors ------------------------------------------------------------------------------


class MqttError(EdgeRuntimeError):
    """Base of every MQTT failure."""

    code = "mqtt_error"
    http_status = 503


class ConnectFailed(MqttError):
    """No session: ``reason`` is ``unreachable: ...``, ``refused: ...`` or ``timeout``."""

    code = "mqtt_connect_failed"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotConnected(MqttError):
    code = "mqtt_not_connected"


class ConnectionLost(NotConnected):
    code = "mqtt_connection_lost"


class MqttTimeout(MqttError):
    code = "mqtt_timeout"


class PublishTimeout(MqttTimeout):
    code = "mqtt_publish_timeout"


class SubscribeTimeout(MqttTimeout):
    code = "mqtt_subscribe_timeout"


class PublishRefused(MqttError):
    code = "mqtt_publish_refused"

    def __init__(self, message: str, *, topic: str, reason: str) -> None:
        super().__init__(message)
        self.topic = topic
        self.reason = reason


class SubscribeRefused(MqttError):
    code = "mqtt_subscribe_refused"

    def __init__(self, message: str, *, filter: str, reason: str) -> None:  # noqa: A002
        super().__init__(message)
        self.filter = filter
        self.reason = reason


# -- configuration and values ------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the session ends without a DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if not self.topic or "+" in self.topic or "#" in self.topic:
            raise ValueError(f"will.topic: not a publishable topic: {self.topic!r}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"will.qos: must be 0, 1 or 2, not {self.qos!r}")
        if isinstance(self.payload, str):
            object.__setattr__(self, "payload", self.payload.encode())


@dataclass(frozen=True)
class MqttConfig:
    """Where and how to connect. ``url`` is ``mqtt://host:port`` or ``mqtts://host:port``
    (TLS: ``ca_file`` verifies the broker; ``cert_file`` + ``key_file`` are the client
    certificate). Credentials may also be given in the URL (``mqtt://user:pw@host``).
    ``protocol`` is ``"3.1.1"`` (the floor: amqtt speaks nothing else) or ``"5"``.
    Times are seconds. ``client_id`` empty = a random ``edgefleet-<hex>``.
    """

    url: str
    client_id: str = ""
    username: Optional[str] = None
    password: Optional[str] = None
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    keepalive: int = 30
    clean_start: bool = True
    will: Optional[Will] = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    connect_timeout: float = 10.0
    operation_timeout: float = 10.0  # the default for publish/subscribe waits
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    manual_ack: bool = False  # PUBACK incoming QoS>=1 messages only when handled (see the module docstring)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"url: scheme must be mqtt:// or mqtts://, got {self.url!r}")
        if not parts.hostname:
            raise ValueError(f"url: no host in {self.url!r}")
        try:
            parts.port
        except ValueError as exc:
            raise ValueError(f"url: bad port in {self.url!r}") from exc
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"url: only scheme://[user:pw@]host[:port] is allowed, got {self.url!r}")
        if parts.scheme == "mqtt" and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file/cert_file/key_file: need an mqtts:// url")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file/key_file: give both or neither")
        if self.protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol: must be '3.1.1' or '5', not {self.protocol!r}")
        if self.protocol == "3.1.1" and not self.client_id and not self.clean_start:
            raise ValueError("client_id: a persistent session (clean_start=False) needs a client id")
        if not 0 <= self.keepalive <= 65535:
            raise ValueError(f"keepalive: must be 0..65535, not {self.keepalive!r}")
        for name in ("connect_timeout", "operation_timeout", "reconnect_min_delay", "reconnect_max_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, not {getattr(self, name)!r}")
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay: must be >= reconnect_min_delay")

    @property
    def host(self) -> str:
        return broker_address(self.url)[0]

    @property
    def port(self) -> int:
        return broker_address(self.url)[1]

    @property
    def tls(self) -> bool:
        return broker_address(self.url)[2]

    def credentials(self) -> tuple[Optional[str], Optional[str]]:
        """(username, password): the fields, else the URL's."""
        parts = urlsplit(self.url)
        user = self.username if self.username is not None else (unquote(parts.username) if parts.username else None)
        pw = self.password if self.password is not None else (unquote(parts.password) if parts.password else None)
        return user, pw


@dataclass(frozen=True)
class Message:
    """One received application message; ``mid`` is its packet id (what ``ack`` answers)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int = 0
    session: int = field(default=0, repr=False, compare=False)  # which CONNACK's session delivered it


Handler = Callable[[Message], None]
ConnectHook = Callable[[bool], None]  # session_present
DisconnectHook = Callable[[Optional[str]], None]  # None: we asked for it; else the reason

_STOP = object()


def _now() -> float:
    return time.monotonic()


def _set_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on ``sock`` (a TCP socket, TLS-wrapped or not; see
    "Latency" in the module docstring). A socket that has no such option is left alone."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("cannot set TCP_NODELAY on the MQTT socket: %s", exc)


# -- the client --------------------------------------------------------------------------


class MqttClient:
    """One MQTT session over paho, with automatic reconnect. Thread-safe.

    Raises (constructor): ValueError from a bad ``config``.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        on_connect: Optional[ConnectHook] = None,
        on_disconnect: Optional[DisconnectHook] = None,
    ) -> None:
        self.config = config
        self.client_id = config.client_id or f"edgefleet-{uuid.uuid4().hex[:12]}"
        self._on_connect_hooks: list[ConnectHook] = [on_connect] if on_connect else []
        self._on_disconnect_hooks: list[DisconnectHook] = [on_disconnect] if on_disconnect else []
        self._handlers: tuple[tuple[str, Handler, bool], ...] = ()  # (filter, handler, acks itself)
        self._lock = threading.Lock()
        self._pending_subs: dict[int, Future[list[ReasonCode]]] = {}
        self._refused_pubs: dict[int, str] = {}
        self._abandoned_pubs: set[int] = set()
        self._connected = threading.Event()
        self._connack: Optional[Future[None]] = None  # set while connect() waits for the first CONNACK
        self._attempt = 0
        self._running = False
        self._closed = False
        self._net_thread: Optional[int] = None
        self._dispatch_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._dispatcher: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None  # why the last attempt / session failed
        self.connects = 0  # successful CONNACKs so far
        self._paho = self._build()

    # -- setup -----------------------------------------------------------------------

    def _build(self) -> paho.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else cfg.clean_start,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=cfg.manual_ack,
        )
        paho_log = logging.getLogger(__name__ + ".paho")
        # paho logs expected states (no socket while backing off) as errors: keep them at
        # DEBUG; this module logs what matters (refused, lost) itself.
        c.on_log = lambda _c, _u, _level, buf: paho_log.debug("%s", buf)
        c.connect_timeout = cfg.connect_timeout
        user, pw = cfg.credentials()
        if user is not None:
            c.username_pw_set(user, pw)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        if cfg.will is not None:
            w = cfg.will
            c.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        self._set_backoff(c)
        c.on_socket_open = lambda _c, _u, sock: _set_nodelay(sock)  # before the CONNECT, every (re)connect
        c.on_connect = self._paho_on_connect
        c.on_connect_fail = self._paho_on_connect_fail
        c.on_disconnect = self._paho_on_disconnect
        c.on_publish = self._paho_on_publish
        c.on_subscribe = self._paho_on_subscribe
        c.on_message = self._paho_on_message
        return c

    def _set_backoff(self, c: paho.Client) -> None:
        # paho's own delay doubles without jitter; set min == max == our full-jitter draw
        # before each wait (paho resets its doubling whenever the delay is set).
        cfg = self.config
        ceiling = min(cfg.reconnect_max_delay, cfg.reconnect_min_delay * (2 ** min(self._attempt, 30)))
        delay = max(0.05, random.uniform(0, ceiling))
        c.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Call ``hook(session_present)`` (on the dispatcher) after every successful connect."""
        with self._lock:
            self._on_connect_hooks = [*self._on_connect_hooks, hook]

    def add_disconnect_hook(self, hook: DisconnectHook) -> None:
        """Call ``hook(reason)`` (on the dispatcher) whenever a session ends; ``None`` when
        ``disconnect()`` ended it."""
        with self._lock:
            self._on_disconnect_hooks = [*self._on_disconnect_hooks, hook]

    def add_handler(self, topic_filter: str, handler: Handler, *, acks: bool = False) -> Callable[[], None]:
        """Deliver every received message matching ``topic_filter`` to ``handler`` (on the
        dispatcher thread). Registering does not subscribe. Returns a function that removes
        the handler. A message matching several handlers goes to each. ``acks``: with
        ``manual_ack`` the handler acknowledges each message itself (``ack``), possibly
        later and from another thread; otherwise the dispatcher does once handlers return.

        Raises:
            ValueError: an invalid filter.
        """
        check_filter(topic_filter)
        entry = (topic_filter, handler, acks)
        with self._lock:
            self._handlers = (*self._handlers, entry)

        def remove() -> None:
            with self._lock:
                self._handlers = tuple(h for h in self._handlers if h is not entry)

        return remove

    def queue(self, topic_filter: str) -> "queue.Queue[Message]":
        """A queue that receives every message matching ``topic_filter``.

        Raises:
            ValueError: an invalid filter.
        """
        q: queue.Queue[Message] = queue.Queue()
        self.add_handler(topic_filter, q.put)
        return q

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Whether a session is up, waiting up to ``timeout`` seconds for one."""
        return self._connected.wait(timeout)

    def connect(self, *, timeout: Optional[float] = None) -> None:
        """Open the session and return once the broker accepted it (CONNACK). From then on a
        lost session is re-established in the background.

        Raises:
            ConnectFailed: the broker is unreachable, refused us (``reason`` says why), or
                did not answer within ``timeout`` (default ``config.connect_timeout``).
            RuntimeError: the client is closed or already running.
        """
        timeout = self.config.connect_timeout if timeout is None else timeout
        deadline = _now() + timeout
        self._begin()
        fut: Future[None] = Future()
        with self._lock:
            self._connack = fut
        ok = False
        try:
            c = self._paho
            c.connect_timeout = max(0.01, timeout)
            try:
                self._paho_connect(c, background=False)
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS, bad host
                raise ConnectFailed(f"cannot reach {self._where()}: {exc}", reason=f"unreachable: {exc}") from exc
            c.loop_start()
            try:
                fut.result(max(0.0, deadline - _now()))
            except FutureTimeout:
                raise ConnectFailed(f"no CONNACK from {self._where()} within {timeout}s", reason="timeout") from None
            ok = True
        finally:
            with self._lock:
                self._connack = None
            if not ok:
                self._halt()

    def start(self) -> None:
        """Connect in the background, retrying forever with backoff; returns at once.
        ``on_connect`` hooks and ``wait_connected`` tell when the session is up.

        Raises:
            RuntimeError: the client is closed or already running.
        """
        self._begin()
        self._paho_connect(self._paho, background=True)
        self._paho.loop_start()

    def _paho_connect(self, c: paho.Client, *, background: bool) -> None:
        cfg = self.config
        kw: dict[str, Any] = {}
        if cfg.protocol == "5":
            kw["clean_start"] = cfg.clean_start
        if background:
            c.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive, **kw)
        else:
            c.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, **kw)

    def _begin(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the MQTT client is closed")
            if self._running:
                raise RuntimeError("the MQTT client is already connected or connecting")
            self._running = True
            self._attempt = 0
        self._set_backoff(self._paho)
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(target=self._dispatch, name=f"mqtt-dispatch-{self.client_id}", daemon=True)
            self._dispatcher.start()

    def _halt(self) -> None:
        """Stop the network thread (sending DISCONNECT if a session is up)."""
        with self._lock:
            self._running = False
        self._paho.disconnect()
        self._paho.loop_stop()
        self._connected.clear()
        self._fail_pending_subs(ConnectionLost("the client disconnected"))

    def disconnect(self, *, timeout: float = 10.0) -> None:
        """Send DISCONNECT (so the broker discards the Will; nothing else is published),
        stop the network thread and the dispatcher. Idempotent; the client is closed after.
        ``timeout`` bounds the wait for the dispatcher to finish queued callbacks.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._running
        if running:
            self._halt()
        d = self._dispatcher
        if d is not None and d.is_alive():
            self._dispatch_q.put(_STOP)
            if threading.current_thread() is not d:
                d.join(timeout)

    close = disconnect

    def __enter__(self) -> "MqttClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- operations ------------------------------------------------------------------

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise RuntimeError("the MQTT client is closed")
        if threading.get_ident() == self._net_thread:
            raise RuntimeError(f"{what}() would wait on paho's network thread; call it from a handler or hook instead")
        if not self._connected.is_set():
            raise NotConnected(f"not connected to {self._where()}" + (f" ({self.last_error})" if self.last_error else ""))

    def publish(self, topic: str, payload: Payload = b"", *, qos: int = 0, retain: bool = False,
                timeout: Optional[float] = None, wait: bool = True) -> None:
        """Publish and wait: for QoS 1/2 until the broker acknowledged it, for QoS 0 until
        it was written to the socket. ``wait=False`` returns once paho queued it (a QoS>=1
        message is re-sent by paho until acknowledged, across reconnects): for answers
        whose asker retries anyway, so one slow PUBACK does not hold up the next answer.

        Raises:
            NotConnected: no session now (nothing was queued).
            PublishTimeout: no acknowledgement within ``timeout`` (default
                ``config.operation_timeout``); a QoS>=1 message may still be delivered later.
            PublishRefused: an MQTT 5 broker acknowledged with a failure reason.
            ValueError: an invalid topic (empty, wildcards) or QoS.
            RuntimeError: the client is closed, or called from paho's network thread.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise ValueError(f"invalid topic to publish to: {topic!r}")
        timeout = self.config.operation_timeout if timeout is None else timeout
        self._check_usable("publish")
        info = self._paho.publish(topic, bytes(payload) if isinstance(payload, bytearray) else payload,
                                  qos=qos, retain=retain)
        mid = info.mid
        published = False
        try:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise NotConnected(f"not connected to {self._where()}")
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                raise MqttError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
            if not wait:
                published = True  # nothing waits for the PUBACK: not abandoned either
                return
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:  # paho's "failed/not queued"
                raise MqttError(f"publish to {topic!r} failed: {exc}") from exc
            if not info.is_published():
                raise PublishTimeout(f"no acknowledgement for a QoS {qos} publish to {topic!r} within {timeout}s")
            published = True
            with self._lock:
                reason = self._refused_pubs.pop(mid, None)
            if reason is not None:
                raise PublishRefused(f"broker refused the publish to {topic!r}: {reason}", topic=topic, reason=reason)
        finally:
            with self._lock:
                self._refused_pubs.pop(mid, None)
                if not published and qos > 0:
                    self._abandoned_pubs.add(mid)

    def subscribe(self, filters: list[tuple[str, int]], *, timeout: Optional[float] = None) -> list[int]:
        """Subscribe to ``(filter, qos)`` pairs and wait for the SUBACK; returns the
        granted QoS per filter. The broker forgets subscriptions of a clean session when
        it ends: subscribe again in an ``on_connect`` hook.

        Raises:
            NotConnected: no session now.
            ConnectionLost: the session dropped before the SUBACK.
            SubscribeTimeout: no SUBACK within ``timeout`` (default ``config.operation_timeout``).
            SubscribeRefused: the broker refused a filter (the first one refused is named).
            ValueError: no filters, an invalid filter, or a QoS outside 0..2.
            RuntimeError: the client is closed, or called from paho's network thread.
        """
        if not filters:
            raise ValueError("subscribe needs at least one (filter, qos)")
        pairs = []
        for f, q in filters:
            check_filter(f)
            if q not in (0, 1, 2):
                raise ValueError(f"qos must be 0, 1 or 2, not {q!r} (filter {f!r})")
            pairs.append((f, q))
        timeout = self.config.operation_timeout if timeout is None else timeout
        self._check_usable("subscribe")
        fut: Future[list[ReasonCode]] = Future()
        # paho's subscribe takes no lock its network thread holds while calling
        # on_subscribe, so registering under our lock closes the early-SUBACK race.
        with self._lock:
            rc, mid = self._paho.subscribe(pairs)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
            self._pending_subs[mid] = fut
        try:
            try:
                codes = fut.result(timeout)
            except FutureTimeout:
                raise SubscribeTimeout(f"no SUBACK for {[f for f, _ in pairs]} within {timeout}s") from None
        finally:
            with self._lock:
                self._pending_subs.pop(mid, None)
        granted = []
        for (f, _), code in zip(pairs, codes):
            if code.is_failure:
                raise SubscribeRefused(f"broker refused the subscription to {f!r}: {code}", filter=f, reason=str(code))
            granted.append(int(code.value))
        return granted

    def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` (PUBACK) with a ``manual_ack`` client; a no-op otherwise, for
        QoS 0, and once the session that delivered it has ended (the broker re-sends it
        to a persistent session). Any thread."""
        if not self.config.manual_ack or msg.qos == 0 or not self._connected.is_set():
            return
        if msg.session != self.connects:
            return  # its session ended: that packet id may name another message now
        self._paho.ack(msg.mid, msg.qos)

    def unsubscribe(self, filters: list[str]) -> None:
        """Ask the broker to drop ``filters`` (not waited for).

        Raises:
            NotConnected: no session now.
        """
        self._check_usable("unsubscribe")
        rc, _ = self._paho.unsubscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"unsubscribe failed: {paho.error_string(rc)}")

    # -- paho callbacks (network thread: never block here) ---------------------------

    def _paho_on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                         properties: Optional[Properties]) -> None:
        self._net_thread = threading.get_ident()
        with self._lock:
            fut = self._connack
        if reason.is_failure:
            self.last_error = f"refused: {reason}"
            log.warning("MQTT broker %s refused the connection: %s", self._where(), reason)
            if fut is not None:  # connect() is waiting: fail it, no retrying
                fut.set_exception(ConnectFailed(f"{self._where()} refused the connection: {reason}",
                                                reason=f"refused: {reason}"))
            return
        self._attempt = 0
        self.last_error = None
        self.connects += 1
        self._connected.set()
        if fut is not None and not fut.done():
            fut.set_result(None)
        present = bool(getattr(flags, "session_present", False))
        for hook in self._on_connect_hooks:
            self._dispatch_q.put((hook, present))

    def _paho_on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.last_error = f"unreachable: {self._where()}"
        self._attempt += 1
        self._set_backoff(client)

    def _paho_on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                            properties: Optional[Properties]) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        requested = not self._running
        why = None if requested else f"{reason}"
        if not requested:
            self.last_error = f"lost: {reason}"
            self._attempt += 1
            self._set_backoff(client)
            log.info("MQTT session with %s lost (%s); reconnecting", self._where(), reason)
        self._fail_pending_subs(ConnectionLost(f"the session with {self._where()} ended: {reason}"))
        if was_connected:
            for hook in self._on_disconnect_hooks:
                self._dispatch_q.put((hook, why))

    def _paho_on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                         properties: Optional[Properties]) -> None:
        with self._lock:
            if mid in self._abandoned_pubs:
                self._abandoned_pubs.discard(mid)
            elif reason.is_failure:
                self._refused_pubs[mid] = str(reason)

    def _paho_on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode],
                           properties: Optional[Properties]) -> None:
        with self._lock:
            fut = self._pending_subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(list(codes))

    def _paho_on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        self._dispatch_q.put(Message(topic=topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
                                     mid=msg.mid, session=self.connects))

    def _fail_pending_subs(self, exc: MqttError) -> None:
        with self._lock:
            pending = list(self._pending_subs.values())
            self._pending_subs.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)

    # -- dispatcher thread -----------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            item = self._dispatch_q.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, Message):
                    deferred = False
                    for f, handler, acks in self._handlers:
                        if matches(f, item.topic):
                            deferred = deferred or acks
                            try:
                                handler(item)
                            except Exception:
                                log.exception("MQTT handler for %r failed on %r", f, item.topic)
                    if not deferred:
                        self.ack(item)
                else:
                    hook, arg = item
                    hook(arg)
            except Exception:
                log.exception("MQTT callback failed")
