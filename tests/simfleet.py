"""Simulated devices: many real MQTT connections speaking the fleet protocol, in one process.

    SimFleet(broker_url, n, ...)   N devices on one asyncio loop (a background thread)
    RawSubscriber(broker_url)      a counting subscriber on the same codec (the baseline)
    python -m tests.simfleet subscribe --broker URL
                                   that subscriber as a process; prints one JSON line of
                                   counts when stdin closes or on SIGTERM/SIGINT

A simulated device is what the controller sees of a real one, minus the interpreter: its
own MQTT 3.1.1 connection with client id = device id, a Last Will that marks it offline
(retained ``DeviceState``), a retained birth (online, capabilities, runtime version, what
it holds), subscriptions to ``topics.device_subscriptions`` (its desired state, commands,
inbox, ...), and Telemetry at QoS 1 with a strictly increasing ``seq`` (system figures plus
cumulative calls/errors and latency percentiles per active model). A desired state is
reconciled the way the agent does: each model whose version differs is fetched through the
real chunk protocol (``ChunkRequest`` to ``topics.artifact_request(sha)``, ``EFC1`` answers
on ``topics.chunk_inbox``; 64 KiB chunks, a window in flight, a retry on timeout), checked
against the manifest's size and sha256, reported as ``downloading -> verifying -> active``
events (or ``rolled_back``/``health_check_failed`` for ``fail_versions``), then a new
retained state with the desired generation and a ``reconciled`` event. Models the desired
state does not name are ``removed``. Each model's ``route`` (local, or the executor node the
desired state names) is taken as given and reported in the state and telemetry, as the agent
does; calls are not forwarded (no inference here).

Signatures: with ``root_json`` every device verifies the desired envelope like the agent
(``trust.TrustedState.verify_desired``: deploy-key threshold, target, generation floor,
expiry; one Ed25519 verification per document). Without it the envelope is only opened and
its payload decoded (``messages.decode("desired", payload)``): no signature check.

Scale: no thread per device. One asyncio loop holds every connection (``asyncio.Protocol``
plus the small MQTT 3.1.1 codec below: CONNECT with will/username/password, CONNACK,
PUBLISH QoS 0/1 both ways, PUBACK both ways, SUBSCRIBE/SUBACK, PINGREQ, DISCONNECT), so
10,000 devices cost 10,000 sockets and a few KB each. The fd limit is raised as far as the
hard limit allows. Every message is built as a ``messages`` model and encoded with
``messages.encode``; everything received is read with ``messages.decode``.

Nothing here needs pytest: the bench and the tests both import it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import random
import resource
import signal
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlparse

from edge_runtime import __version__ as RUNTIME_VERSION
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.dsse import Envelope, EnvelopeError
from edge_runtime.protocol.messages import (
    Capabilities,
    ChunkRequest,
    DesiredState,
    DeviceState,
    Event,
    InstalledModel,
    InstalledVersion,
    ModelFigures,
    ModelManifest,
    SystemFigures,
    Telemetry,
)

UTC = timezone.utc
KiB = 1024
CHUNK_SIZE = 64 * KiB

# -- MQTT 3.1.1 codec ---------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_U16 = struct.Struct("!H")


class MqttError(Exception):
    """A connection refused, lost, or a packet not answered in time."""


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def connect_packet(client_id: str, *, keepalive: int = 60, clean: bool = True,
                   will: Optional[tuple[str, bytes, int, bool]] = None,
                   username: Optional[str] = None, password: Optional[str] = None) -> bytes:
    """CONNECT (protocol level 4). ``will`` is (topic, payload, qos, retain)."""
    flags = 0x02 if clean else 0
    payload = _s(client_id.encode())
    if will is not None:
        topic, body, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _s(topic.encode()) + _s(body)
    if username is not None:
        flags |= 0x80
        payload += _s(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _s(password.encode())
    var = _s(b"MQTT") + bytes([4, flags]) + _U16.pack(keepalive)
    body = var + payload
    return bytes([CONNECT << 4]) + _remaining(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, pid: int = 0, retain: bool = False,
                   dup: bool = False) -> bytes:
    head = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    var = _s(topic.encode()) + (_U16.pack(pid) if qos else b"")
    return bytes([head]) + _remaining(len(var) + len(payload)) + var + payload


def puback_packet(pid: int) -> bytes:
    return b"\x40\x02" + _U16.pack(pid)


def subscribe_packet(pid: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = _U16.pack(pid) + b"".join(_s(f.encode()) + bytes([q]) for f, q in filters)
    return bytes([(SUBSCRIBE << 4) | 0x02]) + _remaining(len(body)) + body


def parse_packets(buf: bytearray) -> tuple[list[tuple[int, int, bytes]], int]:
    """Whole packets at the start of ``buf`` as (type, flags, body), and how many bytes
    they took; an incomplete tail is left for the next read.

    Raises:
        MqttError: a remaining length longer than four bytes.
    """
    out: list[tuple[int, int, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        mult, length, i = 1, 0, pos + 1
        while True:
            if i >= n:
                return out, pos
            byte = buf[i]
            length += (byte & 0x7F) * mult
            i += 1
            if not byte & 0x80:
                break
            mult *= 128
            if mult > 128 ** 3:
                raise MqttError("malformed remaining length")
        end = i + length
        if end > n:
            break
        out.append((buf[pos] >> 4, buf[pos] & 0x0F, bytes(buf[i:end])))
        pos = end
    return out, pos


def parse_publish(flags: int, body: bytes) -> tuple[str, bytes, int, int]:
    """(topic, payload, qos, packet id) of a PUBLISH body."""
    qos = (flags >> 1) & 0x03
    (tlen,) = _U16.unpack_from(body, 0)
    topic = body[2:2 + tlen].decode("utf-8")
    pos = 2 + tlen
    pid = 0
    if qos:
        (pid,) = _U16.unpack_from(body, pos)
        pos += 2
    return topic, body[pos:], qos, pid


class MqttConnection(asyncio.Protocol):
    """One MQTT 3.1.1 client connection on the running loop. ``on_message(topic, payload)``
    gets every PUBLISH received (QoS 1 is acknowledged first); ``on_lost(exc)`` is called
    once when the connection ends for any reason but ``close()``."""

    def __init__(self, on_message: Callable[[str, bytes], None],
                 on_lost: Optional[Callable[[Optional[BaseException]], None]] = None) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: Optional[asyncio.Transport] = None
        self._buf = bytearray()
        self._pending: dict[int, Callable[[], None]] = {}
        self._suback: dict[int, asyncio.Future[bytes]] = {}
        self._connack: Optional[asyncio.Future[int]] = None
        self._pid = 0
        self.last_write = 0.0
        self.closed = False
        self.closing = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            packets, used = parse_packets(buf)
        except MqttError as exc:
            self._fail(exc)
            return
        if used:
            del buf[:used]
        for ptype, flags, body in packets:
            if ptype == PUBLISH:
                topic, payload, qos, pid = parse_publish(flags, body)
                if qos == 1:
                    self._write(puback_packet(pid))
                elif qos == 2:  # never subscribed at QoS 2; answer so the broker moves on
                    self._write(b"\x50\x02" + _U16.pack(pid))
                self.on_message(topic, payload)
            elif ptype == PUBACK:
                (pid,) = _U16.unpack_from(body, 0)
                cb = self._pending.pop(pid, None)
                if cb is not None:
                    cb()
            elif ptype == CONNACK:
                if self._connack is not None and not self._connack.done():
                    self._connack.set_result(body[1])
            elif ptype == SUBACK:
                (pid,) = _U16.unpack_from(body, 0)
                fut = self._suback.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(body[2:])
            elif ptype == PUBREL:
                (pid,) = _U16.unpack_from(body, 0)
                self._write(b"\x70\x02" + _U16.pack(pid))

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        was_closed = self.closed
        self.closed = True
        err = MqttError(f"connection lost: {exc}" if exc else "connection closed by the broker")
        for fut in [self._connack, *self._suback.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        self._suback.clear()
        self._pending.clear()
        if not was_closed and not self.closing and self.on_lost is not None:
            self.on_lost(exc)

    # -- operations ---------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.last_write = time.monotonic()

    def _fail(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._pending and self._pid not in self._suback:
                return self._pid
        raise MqttError("65535 packets in flight")

    async def handshake(self, client_id: str, *, timeout: float, **connect: Any) -> None:
        """Send CONNECT and wait for an accepting CONNACK.

        Raises:
            MqttError: refused (the return code), lost, or no CONNACK within ``timeout``.
        """
        self._connack = asyncio.get_running_loop().create_future()
        self._write(connect_packet(client_id, **connect))
        try:
            rc = await asyncio.wait_for(self._connack, timeout)
        except asyncio.TimeoutError:
            raise MqttError(f"no CONNACK within {timeout}s") from None
        if rc != 0:
            raise MqttError(f"CONNACK return code {rc}")

    async def subscribe(self, filters: list[tuple[str, int]], *, timeout: float) -> bytes:
        """SUBSCRIBE and wait for the SUBACK; returns the granted QoS codes.

        Raises:
            MqttError: a filter refused (0x80), lost, or no SUBACK within ``timeout``.
        """
        pid = self._next_pid()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._suback[pid] = fut
        self._write(subscribe_packet(pid, filters))
        try:
            codes = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise MqttError(f"no SUBACK within {timeout}s") from None
        finally:
            self._suback.pop(pid, None)
        if 0x80 in codes:
            raise MqttError(f"subscription refused: {list(codes)}")
        return codes

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                on_ack: Optional[Callable[[], None]] = None) -> int:
        """Send a PUBLISH; at QoS 1 ``on_ack`` runs when the broker's PUBACK arrives.
        Returns the packet id (0 at QoS 0)."""
        if self.closed:
            raise MqttError("not connected")
        pid = 0
        if qos:
            pid = self._next_pid()
            self._pending[pid] = on_ack or _nothing
        self._write(publish_packet(topic, payload, qos=qos, pid=pid, retain=retain))
        return pid

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the PUBACK.

        Raises:
            MqttError: lost, or no PUBACK within ``timeout``.
        """
        fut = asyncio.get_running_loop().create_future()
        pid = self.publish(topic, payload, qos=1, retain=retain,
                           on_ack=lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(pid, None)
            raise MqttError(f"no PUBACK within {timeout}s for {topic}") from None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def ping(self) -> None:
        self._write(PINGREQ_PACKET)

    def close(self) -> None:
        """DISCONNECT, then close: the broker discards the Will."""
        self.closing = True
        if self.transport is not None and not self.closed:
            self._write(DISCONNECT_PACKET)
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (as a power cut): the broker sends the Will."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


def _nothing() -> None:
    pass


async def open_connection(url: str, client_id: str, on_message: Callable[[str, bytes], None], *,
                          on_lost: Optional[Callable[[Optional[BaseException]], None]] = None,
                          timeout: float = 10.0, **connect: Any) -> MqttConnection:
    """A connected ``MqttConnection`` (TCP, CONNECT, CONNACK accepted).

    Raises:
        MqttError: refused, or no answer within ``timeout``.
        OSError: the TCP connection failed.
    """
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"only mqtt://host:port URLs are supported, got {url!r}")
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: MqttConnection(on_message, on_lost), u.hostname or "127.0.0.1", u.port or 1883),
        timeout)
    try:
        await conn.handshake(client_id, timeout=timeout, **connect)
    except BaseException:
        conn.abort()
        raise
    return conn


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# -- the loop thread ----------------------------------------------------------------------


class _LoopThread:
    """An asyncio loop in a daemon thread; ``call(coro)`` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Any, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# -- simulated devices --------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Held:
    """One model a simulated device holds: the active version and what else is on disk."""

    active: Optional[str]
    versions: dict[str, InstalledVersion] = field(default_factory=dict)
    route: str = messages.LOCAL
    calls: int = 0
    errors: int = 0


@dataclass
class DeviceStats:
    seq_first: Optional[int] = None
    seq_last: Optional[int] = None  # the last telemetry seq sent
    sent: int = 0
    acked: int = 0
    events: int = 0
    desired_received: int = 0
    desired_rejected: int = 0
    installs: int = 0
    rollbacks: int = 0
    transfer_failures: int = 0
    bytes_fetched: int = 0
    chunk_retries: int = 0
    reconciled_generation: Optional[int] = None
    active_at: dict[str, float] = field(default_factory=dict)  # "name@version" -> time.time() it went active


class SimDevice:
    """One simulated device: its connection, what it holds, its counters. Lives on the
    fleet's loop; the fleet drives it."""

    def __init__(self, fleet: SimFleet, device_id: str, index: int) -> None:
        self.fleet = fleet
        self.id = device_id
        self.index = index
        self.conn: Optional[MqttConnection] = None
        self.boot_id = uuid.uuid4().hex[:16]
        self.bd_seq = 0
        self.seq = 1  # the next telemetry seq
        self.event_seq = 1
        self.booted = time.monotonic()
        self.models: dict[str, Held] = {}
        for name, version in fleet.initial_models.items():
            fake = InstalledVersion(version=version, sha256=hashlib.sha256(f"{name}@{version}".encode()).hexdigest(),
                                    size=1)
            self.models[name] = Held(active=version, versions={version: fake})
        self.generation: Optional[int] = None  # the desired generation reconciled
        self.stats = DeviceStats()
        self.trust = fleet._trust_for(device_id)
        self.online = False
        self._desired: Optional[DesiredState] = None
        self._reconcile_task: Optional[asyncio.Task[None]] = None
        self._telemetry_task: Optional[asyncio.Task[None]] = None
        self._chunk_waiters: dict[str, Callable[[messages.ChunkResponse], None]] = {}
        self.lost = False

    # -- messages out -------------------------------------------------------------------

    def state_message(self, online: bool) -> DeviceState:
        if not online:
            return DeviceState(online=False, boot_id=self.boot_id, bd_seq=self.bd_seq, at=_now())
        return DeviceState(
            online=True, boot_id=self.boot_id, bd_seq=self.bd_seq, at=_now(), runtime_version=RUNTIME_VERSION,
            capabilities=Capabilities(cores=4, memory_bytes=4 * 2**30, tier="edge", backends=["sim"],
                                      disk_bytes=32 * 2**30, arch="aarch64"),
            models={name: InstalledModel(active=h.active, versions=list(h.versions.values()), route=h.route)
                    for name, h in self.models.items()},
            generation=self.generation,
        )

    def telemetry_message(self) -> Telemetry:
        f = self.fleet
        rnd = f.random
        interval = 1.0 / f.telemetry_hz if f.telemetry_hz > 0 else 60.0
        figures: dict[str, ModelFigures] = {}
        for name, held in self.models.items():
            if held.active is None:
                continue
            report = dict(f.model_reports(self.id, name, held.active)) if f.model_reports else {}
            rate = float(report.get("rate", 5.0))
            calls = max(0, int(round(rate * interval * rnd.uniform(0.8, 1.2))))
            errors = sum(1 for _ in range(calls) if rnd.random() < float(report.get("error_rate", 0.002)))
            held.calls += calls
            held.errors += errors
            p95 = float(report.get("p95_ms", 12.0)) * rnd.uniform(0.9, 1.1)
            figures[name] = ModelFigures(
                version=held.active, route=held.route, calls=held.calls, errors=held.errors, rate=round(calls / interval, 3),
                p50_ms=round(p95 * 0.55, 3), p95_ms=round(p95, 3), p99_ms=round(p95 * 1.4, 3),
                service_ms=round(p95 * 0.5, 3), utilisation=round(min(1.0, rate * p95 * 0.5 / 1000), 4))
        return Telemetry(
            seq=self.seq, at=_now(), boot_id=self.boot_id, interval_s=interval,
            uptime_s=round(time.monotonic() - self.booted, 3),
            system=SystemFigures(cpu_percent=round(rnd.uniform(5, 40), 1), load_1m=round(rnd.uniform(0.1, 2), 2),
                                 memory_total_bytes=4 * 2**30,
                                 memory_available_bytes=int(rnd.uniform(1.5, 3) * 2**30),
                                 temperature_c=round(rnd.uniform(40, 65), 1), disk_free_bytes=20 * 2**30,
                                 rss_bytes=int(rnd.uniform(55, 70) * 2**20)),
            models=figures,
        )

    def publish_telemetry(self) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        seq = self.seq
        payload = messages.encode(self.telemetry_message())
        st = self.stats

        def acked() -> None:
            st.acked += 1
            self.fleet._acked += 1

        try:
            conn.publish(topics.telemetry(self.id), payload, qos=1, on_ack=acked)
        except MqttError:
            return
        self.seq = seq + 1
        if st.seq_first is None:
            st.seq_first = seq
        st.seq_last = seq
        st.sent += 1
        self.fleet._sent += 1

    async def event(self, step: str, **kw: Any) -> None:
        ev = Event(seq=self.event_seq, at=_now(), step=step, **kw)
        self.event_seq += 1
        self.stats.events += 1
        if self.conn is not None and not self.conn.closed:
            try:
                await self.conn.publish_acked(topics.events(self.id), messages.encode(ev), timeout=self.fleet.timeout)
            except MqttError:
                pass

    async def publish_state(self) -> None:
        assert self.conn is not None
        await self.conn.publish_acked(topics.state(self.id), messages.encode(self.state_message(True)), retain=True,
                                      timeout=self.fleet.timeout)

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (Will = offline state), subscribe, publish the retained birth.

        Raises:
            MqttError, OSError: any step failed or timed out.
        """
        f = self.fleet
        self.bd_seq += 1
        will = (topics.state(self.id), messages.encode(self.state_message(False)), 1, True)
        user, password = f.credentials_for(self.id) if f.credentials_for else (None, None)
        self.conn = await open_connection(f.url, self.id, self._on_message, on_lost=self._on_lost, timeout=f.timeout,
                                          keepalive=f.keepalive, will=will, username=user, password=password)
        if f.subscribe:
            await self.conn.subscribe(topics.device_subscriptions(self.id), timeout=f.timeout)
        await self.publish_state()
        self.online = True
        self.lost = False

    def _on_lost(self, exc: Optional[BaseException]) -> None:
        self.online = False
        self.lost = True
        self.fleet._disconnects += 1

    async def close(self, *, graceful: bool = True) -> None:
        conn, self.conn = self.conn, None
        self.online = False
        for task in (self._telemetry_task, self._reconcile_task):
            if task is not None and not task.done():
                task.cancel()
        if conn is None or conn.closed:
            return
        if graceful:
            try:  # the agent's clean shutdown: an offline state first, then DISCONNECT (no Will)
                await conn.publish_acked(topics.state(self.id), messages.encode(self.state_message(False)),
                                         retain=True, timeout=min(5.0, self.fleet.timeout))
            except MqttError:
                pass
            conn.close()
        else:
            conn.abort()

    # -- messages in --------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            info = topics.parse(topic)
        except ValueError:
            return
        if info.kind == "chunk_inbox":
            try:
                resp = messages.decode("chunk", payload)
            except messages.ProtocolError:
                return
            waiter = self._chunk_waiters.get(resp.request_id)
            if waiter is not None:
                waiter(resp)
        elif info.kind == "desired" and info.device == self.id and payload:
            self._on_desired(payload)

    def _on_desired(self, payload: bytes) -> None:
        self.stats.desired_received += 1
        self.fleet._desired_received += 1
        try:
            if self.trust is not None:
                verified = self.trust.verify_desired(payload, _now(), body_model=DesiredState)
                if not verified.accepted:  # the generation held: benign
                    return
                self.trust = verified.state
                desired = verified.body
            else:
                desired = messages.decode("desired", Envelope.from_json(payload).payload)
                if desired.target.device is not None and desired.target.device != self.id:
                    raise ValueError(f"addressed to {desired.target.device}")
                if self._desired is not None and desired.generation <= self._desired.generation:
                    return
        except Exception as exc:  # Rejection, ProtocolError, EnvelopeError, ValueError: refused, nothing changes
            self.stats.desired_rejected += 1
            reason = getattr(getattr(exc, "reason", None), "value", getattr(exc, "reason", None))
            if not isinstance(reason, str) or reason not in messages.REASONS:
                reason = "malformed"
            asyncio.ensure_future(self.event("rejected", reason=reason, detail=str(exc)[:500]))
            return
        self._desired = desired
        if self._reconcile_task is None or self._reconcile_task.done():
            self._reconcile_task = asyncio.ensure_future(self._reconcile_loop())

    # -- reconcile ----------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        done: Optional[int] = None
        while self._desired is not None and self._desired.generation != done:
            desired = self._desired
            try:
                await self._reconcile(desired)
            except (MqttError, asyncio.CancelledError):
                return
            done = desired.generation

    async def _reconcile(self, desired: DesiredState) -> None:
        gen = desired.generation
        refused = 0
        for name in [n for n in self.models if n not in desired.models]:
            del self.models[name]
            await self.event("removed", model=name, generation=gen)
        for name, spec in desired.models.items():
            held = self.models.get(name)
            if held is not None and held.active == spec.version:
                held.route = spec.route
                continue
            if not spec.install:
                self.models.setdefault(name, Held(active=None)).route = spec.route
                continue
            if not await self._install(name, spec.manifest, gen):
                refused += 1
            elif name in self.models:
                self.models[name].route = spec.route
            if self._desired is not None and self._desired.generation != gen:
                return  # a newer document arrived: reconcile that one instead
        self.generation = gen
        self.stats.reconciled_generation = gen
        await self.publish_state()
        await self.event("reconciled", generation=gen, figures={"models": len(desired.models), "refused": refused})

    async def _install(self, name: str, manifest: ModelManifest, gen: int) -> bool:
        version = manifest.version
        st = self.stats
        await self.event("downloading", model=name, version=version, generation=gen, progress=0.0,
                         figures={"size": manifest.size})
        try:
            figures = await self._fetch(manifest)
        except MqttError as exc:
            st.transfer_failures += 1
            reason = str(exc).split(":", 1)[0]
            reason = reason if reason in messages.TRANSFER_REASONS else "transfer_failed"
            await self.event("refused", model=name, version=version, generation=gen, reason=reason,
                             detail=str(exc)[:500])
            return False
        await self.event("downloading", model=name, version=version, generation=gen, progress=1.0, figures=figures)
        await self.event("verifying", model=name, version=version, generation=gen)
        if version in self.fleet.fail_versions:
            st.rollbacks += 1
            await self.event("rolled_back", model=name, version=version, generation=gen,
                             reason="health_check_failed", detail="simulated: outputs outside tolerance")
            return False
        held = self.models.setdefault(name, Held(active=None))
        held.versions[version] = InstalledVersion(version=version, sha256=manifest.sha256, size=manifest.size)
        previous = held.active
        held.active = version
        for old in [v for v in held.versions if v not in (version, previous)]:
            del held.versions[old]  # active + previous, like the store
        st.installs += 1
        st.active_at[f"{name}@{version}"] = time.time()
        self.fleet._installs += 1
        await self.event("active", model=name, version=version, generation=gen)
        return True

    async def _fetch(self, manifest: ModelManifest) -> dict[str, Any]:
        """Fetch the artifact in chunks through the broker; check size and sha256.

        Raises:
            MqttError: ``transfer_timeout: ...`` (a chunk unanswered 1 + retries times),
                ``artifact_not_found: ...``, ``transfer_failed: ...`` (hash or size mismatch).
        """
        f = self.fleet
        sha, size = manifest.sha256, manifest.size
        reply_to = topics.chunk_inbox(self.id, sha)
        req_topic = topics.artifact_request(sha)
        offsets = list(range(0, size, f.chunk_size))
        next_i = 0
        received: dict[int, bytes] = {}
        hasher = hashlib.sha256()
        hashed_to = 0
        arrivals: asyncio.Queue[messages.ChunkResponse] = asyncio.Queue()
        in_flight: dict[str, tuple[int, float, int]] = {}  # request id -> (offset, deadline, tries)
        requested = retried = duplicates = 0

        def send(offset: int, tries: int) -> None:
            nonlocal requested
            rid = uuid.uuid4().hex[:20]
            req = ChunkRequest(request_id=rid, sha256=sha, offset=offset, length=min(f.chunk_size, size - offset),
                               reply_to=reply_to)
            in_flight[rid] = (offset, time.monotonic() + f.chunk_timeout, tries)
            self._chunk_waiters[rid] = arrivals.put_nowait
            requested += 1
            assert self.conn is not None
            self.conn.publish(req_topic, messages.encode(req), qos=1)

        try:
            while hashed_to < size:
                while next_i < len(offsets) and len(in_flight) < f.window:
                    send(offsets[next_i], 0)
                    next_i += 1
                now = time.monotonic()
                wait = min((d for _, d, _ in in_flight.values()), default=now + f.chunk_timeout) - now
                try:
                    resp = await asyncio.wait_for(arrivals.get(), max(0.0, wait))
                except asyncio.TimeoutError:
                    now = time.monotonic()
                    for rid, (offset, deadline, tries) in list(in_flight.items()):
                        if deadline <= now:
                            del in_flight[rid]
                            self._chunk_waiters.pop(rid, None)
                            if tries >= f.chunk_retries:
                                raise MqttError(f"transfer_timeout: chunk at {offset} unanswered {tries + 1} times")
                            retried += 1
                            self.stats.chunk_retries += 1
                            send(offset, tries + 1)
                    continue
                entry = in_flight.pop(resp.request_id, None)
                self._chunk_waiters.pop(resp.request_id, None)
                if entry is None:
                    duplicates += 1
                    continue
                if resp.error is not None:
                    kind = "artifact_not_found" if "artifact_not_found" in (resp.error.type, resp.error.reason) \
                        else "transfer_failed"
                    raise MqttError(f"{kind}: {resp.error.message}")
                offset = entry[0]
                want = min(f.chunk_size, size - offset)
                if resp.offset != offset or resp.length != want:
                    raise MqttError(f"transfer_failed: asked [{offset}, +{want}), got [{resp.offset}, +{resp.length})")
                if offset in received or offset < hashed_to:
                    duplicates += 1
                    continue
                received[offset] = resp.data
                self.stats.bytes_fetched += len(resp.data)
                f._bytes_fetched += len(resp.data)
                while hashed_to in received:
                    chunk = received.pop(hashed_to)
                    hasher.update(chunk)
                    hashed_to += len(chunk)
        finally:
            for rid in in_flight:
                self._chunk_waiters.pop(rid, None)
        if hashed_to != size or hasher.hexdigest() != sha:
            raise MqttError(f"transfer_failed: got {hashed_to} bytes with sha256 {hasher.hexdigest()[:12]}..., "
                            f"the manifest says {size} bytes, {sha[:12]}...")
        return {"bytes": size, "size": size, "requested": requested, "retried": retried, "duplicates": duplicates,
                "chunks_total": len(offsets)}

    # -- telemetry ----------------------------------------------------------------------

    async def telemetry_loop(self, phase: float) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.fleet.telemetry_hz
        at = loop.time() + phase
        while self.fleet._telemetry_on:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.fleet._telemetry_on:
                return
            self.publish_telemetry()
            at += period
            if at < loop.time() - period:  # fell more than a period behind: no burst to catch up
                at = loop.time()


class SimFleet:
    """N simulated devices (``{prefix}-{i:05d}``) on one broker, in this process.

    Args:
        broker_url: ``mqtt://host:port``.
        n: how many devices.
        prefix: device id prefix.
        telemetry_hz: telemetry rate per device (0: none until ``start_telemetry``).
        credentials_for: ``device_id -> (username, password)`` or None (anonymous).
        model_reports: ``(device_id, model, version) -> {"rate", "error_rate", "p95_ms"}``
            overrides of the figures a device reports for a model version, or None
            (5 calls/s, 0.2 % errors, p95 about 12 ms).
        initial_models: ``{name: version}`` every device holds at birth (with a made-up sha256).
        fail_versions: versions whose install ends ``rolled_back`` (``health_check_failed``).
        root_json: a ``root.json`` envelope: verify desired documents against its deploy
            keys (None: decode the payload without checking signatures).
        connect_concurrency: connection attempts in flight during ``start``.
        subscribe: False makes telemetry-only devices with no subscriptions at all (not a
            real device: a diagnostic that separates a broker's per-filter routing cost
            from its per-message cost; such devices never see a desired state).

    ``start()`` connects everything (raises if any device could not connect after retries,
    unless ``allow_failures``), ``start_telemetry()``/``stop_telemetry()``, ``wait_acked()``,
    ``abort(device_id)`` (drop without DISCONNECT: the Will fires), ``close()``.
    ``stats()`` is a plain dict; ``devices`` maps id to ``SimDevice``.
    """

    def __init__(self, broker_url: str, n: int, *, prefix: str = "sim", telemetry_hz: float = 1.0,
                 credentials_for: Optional[Callable[[str], tuple[Optional[str], Optional[str]]]] = None,
                 model_reports: Optional[Callable[[str, str, str], Mapping[str, float]]] = None,
                 initial_models: Optional[Mapping[str, str]] = None,
                 fail_versions: Iterable[str] = (), root_json: Optional[bytes] = None,
                 keepalive: int = 60, timeout: float = 30.0, connect_concurrency: int = 200,
                 chunk_size: int = CHUNK_SIZE, window: int = 4, chunk_timeout: float = 5.0, chunk_retries: int = 5,
                 subscribe: bool = True, seed: int = 0) -> None:
        self.url = broker_url
        self.n = n
        self.prefix = topics.check_id(prefix, "prefix")
        self.telemetry_hz = telemetry_hz
        self.credentials_for = credentials_for
        self.model_reports = model_reports
        self.initial_models = dict(initial_models if initial_models is not None else {"sim-model": "1"})
        self.fail_versions = frozenset(fail_versions)
        self.keepalive = keepalive
        self.timeout = timeout
        self.connect_concurrency = connect_concurrency
        self.chunk_size = chunk_size
        self.window = window
        self.chunk_timeout = chunk_timeout
        self.chunk_retries = chunk_retries
        self.subscribe = subscribe
        self.random = random.Random(seed)
        self._base_trust = None
        if root_json is not None:
            from edge_runtime.protocol.trust import TrustedState

            self._base_trust = TrustedState.bootstrap(root_json, device_id=f"{self.prefix}-00000")
        self.fd_limit = raise_fd_limit()
        if n + 64 > self.fd_limit:
            raise ValueError(f"{n} connections need more file descriptors than the limit {self.fd_limit}")
        self.ids = [f"{self.prefix}-{i:05d}" for i in range(n)]
        self.devices: dict[str, SimDevice] = {}
        self._thread: Optional[_LoopThread] = None
        self._telemetry_on = False
        self._ping_task: Optional[asyncio.Task[None]] = None
        self._sent = self._acked = self._installs = self._bytes_fetched = 0
        self._desired_received = self._disconnects = self._connect_failures = self._connect_retries = 0
        self.connect_seconds: Optional[float] = None
        self.telemetry_started: Optional[float] = None
        self.telemetry_stopped: Optional[float] = None

    def _trust_for(self, device_id: str) -> Any:
        if self._base_trust is None:
            return None
        return dataclasses.replace(self._base_trust, device_id=device_id)

    # -- sync API -----------------------------------------------------------------------

    def start(self, *, allow_failures: bool = False, telemetry: bool = True) -> SimFleet:
        """Connect every device (births published and acknowledged), then start telemetry.

        Raises:
            MqttError: devices failed to connect (after 3 attempts each), unless ``allow_failures``.
        """
        self._thread = _LoopThread(f"simfleet-{self.prefix}")
        t0 = time.monotonic()
        self._thread.call(self._connect_all())
        self.connect_seconds = time.monotonic() - t0
        if self._connect_failures and not allow_failures:
            failed = self._connect_failures
            self.close()
            raise MqttError(f"{failed} of {self.n} simulated devices could not connect to {self.url}")
        if telemetry and self.telemetry_hz > 0:
            self.start_telemetry()
        return self

    def start_telemetry(self, hz: Optional[float] = None) -> None:
        """Every device publishes telemetry at ``hz`` (default: ``telemetry_hz``), phases
        spread evenly over one period so the load is flat."""
        if hz is not None:
            self.telemetry_hz = hz
        assert self._thread is not None and self.telemetry_hz > 0

        async def go() -> None:
            self._telemetry_on = True
            period = 1.0 / self.telemetry_hz
            for i, dev in enumerate(self.devices.values()):
                if dev.online:
                    dev._telemetry_task = asyncio.ensure_future(dev.telemetry_loop(period * i / max(1, self.n)))

        self.telemetry_started = time.monotonic()
        self._thread.call(go())

    def stop_telemetry(self) -> None:
        """No telemetry after this returns (what was sent may still await its PUBACK)."""
        if self._thread is None:
            return

        async def halt() -> None:
            self._telemetry_on = False
            tasks = [d._telemetry_task for d in self.devices.values() if d._telemetry_task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._thread.call(halt())
        self.telemetry_stopped = time.monotonic()

    def wait_acked(self, timeout: float = 30.0) -> bool:
        """Wait until every telemetry sent on a live connection is acknowledged; True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.stats.acked == d.stats.sent or d.lost for d in list(self.devices.values())):
                return True
            time.sleep(0.05)
        return False

    def abort(self, device_id: str) -> None:
        """Drop one device's TCP connection without DISCONNECT: its Will (offline) fires."""
        assert self._thread is not None
        self._thread.call(self.devices[device_id].close(graceful=False))

    def run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        """Run a coroutine on the fleet's loop (for tests that poke a device)."""
        assert self._thread is not None
        return self._thread.call(coro, timeout)

    def close(self, *, graceful: bool = True) -> None:
        """Stop telemetry, say goodbye (offline state + DISCONNECT, or abort), stop the loop."""
        if self._thread is None:
            return
        try:
            self.stop_telemetry()

            async def bye() -> None:
                if self._ping_task is not None:
                    self._ping_task.cancel()
                sem = asyncio.Semaphore(self.connect_concurrency)

                async def one(d: SimDevice) -> None:
                    async with sem:
                        await d.close(graceful=graceful)

                await asyncio.gather(*(one(d) for d in list(self.devices.values())), return_exceptions=True)

            try:
                self._thread.call(bye(), timeout=max(30.0, self.n / 100))
            except Exception:  # a broker too slow to answer: drop the rest (their Wills fire)
                async def drop() -> None:
                    for d in list(self.devices.values()):
                        if d.conn is not None:
                            d.conn.abort()

                self._thread.call(drop(), timeout=10)
        finally:
            self._thread.stop()
            self._thread = None

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- figures ------------------------------------------------------------------------

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def acked(self) -> int:
        return self._acked

    def active_count(self, model: str, version: str) -> int:
        """Devices whose ``model`` is active at ``version``."""
        return sum(1 for d in list(self.devices.values())
                   if (h := d.models.get(model)) is not None and h.active == version)

    def stats(self) -> dict[str, Any]:
        devs = list(self.devices.values())
        return {
            "devices": self.n,
            "connected": sum(1 for d in devs if d.online),
            "connect_failures": self._connect_failures,
            "connect_retries": self._connect_retries,
            "connect_seconds": round(self.connect_seconds, 3) if self.connect_seconds is not None else None,
            "disconnects": self._disconnects,
            "published": self._sent,
            "acked": self._acked,
            "unacked": self._sent - self._acked,
            "desired_received": self._desired_received,
            "desired_rejected": sum(d.stats.desired_rejected for d in devs),
            "installs": self._installs,
            "rollbacks": sum(d.stats.rollbacks for d in devs),
            "transfer_failures": sum(d.stats.transfer_failures for d in devs),
            "chunk_retries": sum(d.stats.chunk_retries for d in devs),
            "bytes_fetched": self._bytes_fetched,
            "events": sum(d.stats.events for d in devs),
        }

    def seq_ranges(self) -> dict[str, tuple[Optional[int], Optional[int], int, int]]:
        """Per device: (first seq sent, last seq sent, sent, acknowledged)."""
        return {d.id: (d.stats.seq_first, d.stats.seq_last, d.stats.sent, d.stats.acked)
                for d in list(self.devices.values())}

    # -- on the loop --------------------------------------------------------------------

    async def _connect_all(self) -> None:
        sem = asyncio.Semaphore(self.connect_concurrency)

        async def one(i: int, device_id: str) -> None:
            dev = SimDevice(self, device_id, i)
            self.devices[device_id] = dev
            async with sem:
                for attempt in range(3):
                    try:
                        await dev.connect()
                        return
                    except (MqttError, OSError, asyncio.TimeoutError):
                        if dev.conn is not None:
                            dev.conn.abort()
                            dev.conn = None
                        if attempt < 2:
                            self._connect_retries += 1
                            await asyncio.sleep(0.5 * (attempt + 1) * (1 + self.random.random()))
                self._connect_failures += 1

        await asyncio.gather(*(one(i, d) for i, d in enumerate(self.ids)))
        self._ping_task = asyncio.ensure_future(self._pinger())

    async def _pinger(self) -> None:
        """PINGREQ on connections idle for half the keepalive (telemetry usually keeps them busy)."""
        while True:
            await asyncio.sleep(self.keepalive / 4)
            idle = time.monotonic() - self.keepalive / 2
            for d in list(self.devices.values()):
                c = d.conn
                if c is not None and not c.closed and c.last_write < idle:
                    c.ping()


# -- the baseline: a plain counting subscriber ---------------------------------------------


class RawSubscriber:
    """One MQTT connection subscribed to ``topic_filter`` (default: every device's telemetry)
    that counts what arrives: per device, the set of telemetry seqs and the duplicates
    (``decode=False``: counts messages only, no parsing). Its own loop thread."""

    def __init__(self, broker_url: str, topic_filter: str = topics.all_devices("telemetry"), *,
                 client_id: Optional[str] = None, decode: bool = True, keep: bool = False,
                 credentials: tuple[Optional[str], Optional[str]] = (None, None)) -> None:
        self.url = broker_url
        self.filter = topic_filter
        self.client_id = client_id or f"rawsub-{uuid.uuid4().hex[:8]}"
        self.decode = decode
        self.keep = keep  # keep (topic, payload) of every message in ``messages``
        self.credentials = credentials
        self.count = 0
        self.malformed = 0
        self.duplicates = 0
        self.seqs: dict[str, set[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.first_at: Optional[float] = None
        self.last_at: Optional[float] = None
        self._thread: Optional[_LoopThread] = None
        self._conn: Optional[MqttConnection] = None

    def on_message(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.count += 1
        if self.keep:
            self.messages.append((topic, payload))
        if not self.decode:
            return
        try:
            info = topics.parse(topic)
            if info.kind != "telemetry":
                return
            seq = messages.decode("telemetry", payload).seq
        except (ValueError, messages.ProtocolError):
            self.malformed += 1
            return
        got = self.seqs.setdefault(info.device or "", set())
        if seq in got:
            self.duplicates += 1
        else:
            got.add(seq)

    @property
    def unique(self) -> int:
        return sum(len(s) for s in self.seqs.values())

    def start(self, timeout: float = 15.0) -> RawSubscriber:
        """Connect and subscribe (returns once the SUBACK arrived).

        Raises:
            MqttError, OSError: could not connect or subscribe.
        """
        self._thread = _LoopThread("rawsub")

        async def go() -> None:
            user, password = self.credentials
            self._conn = await open_connection(self.url, self.client_id, self.on_message, timeout=timeout,
                                               username=user, password=password)
            await self._conn.subscribe([(self.filter, 1)], timeout=timeout)

        try:
            self._thread.call(go())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._thread is None:
            return

        async def bye() -> None:
            if self._conn is not None:
                self._conn.close()

        try:
            self._thread.call(bye(), timeout=10)
        finally:
            self._thread.stop()
            self._thread = None

    def summary(self) -> dict[str, Any]:
        return {"received": self.count, "unique": self.unique, "duplicates": self.duplicates,
                "malformed": self.malformed, "devices": len(self.seqs),
                "first_at": self.first_at, "last_at": self.last_at}

    def __enter__(self) -> RawSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _subscribe_main(args: argparse.Namespace) -> int:
    """The counting subscriber as a process: runs until stdin closes or SIGTERM/SIGINT,
    then prints one JSON line (``RawSubscriber.summary``, times as Unix seconds)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sub = RawSubscriber(args.broker, args.filter, decode=not args.no_decode)
    sub.start()
    offset = time.time() - time.monotonic()
    print(json.dumps({"ready": True}), flush=True)

    def watch_stdin() -> None:
        try:
            sys.stdin.read()
        finally:
            stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()
    out = sub.summary()
    sub.close()
    for k in ("first_at", "last_at"):
        if out[k] is not None:
            out[k] = out[k] + offset
    print(json.dumps(out), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.simfleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subscribe", help="count telemetry on a broker until stdin closes or SIGTERM")
    p.add_argument("--broker", required=True)
    p.add_argument("--filter", default=topics.all_devices("telemetry"))
    p.add_argument("--no-decode", action="store_true", help="count messages only, do not parse them")
    args = ap.parse_args(argv)
    return _subscribe_main(args)


if __name__ == "__main__":
    sys.exit(main())
