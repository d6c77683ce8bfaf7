"""Real MQTT brokers for tests, as subprocesses on free loopback ports.

    AmqttBroker      amqtt (the embedded default), run as ``fleetctl broker --allow-anonymous``
    MosquittoBroker  ``mosquitto -c CONF`` (Debian's package; skipped when the binary is missing)

Both have ``start()`` (returns once the port answers a real MQTT CONNECT with a CONNACK),
``stop()`` (graceful), ``kill()`` (SIGKILL: the broker is gone, as after a crash),
``pause()``/``resume()`` (SIGSTOP/SIGCONT: the port is open, nothing answers), and
``restart()`` (same port; a broker forgets retained messages and sessions unless it
persists them, and these do not). ``url`` is ``mqtt://127.0.0.1:PORT``.

The helpers do not need pytest. The fixtures at the bottom (``broker``, parametrised over
both, and ``amqtt_broker``, ``mosquitto_broker``) are exported with, in a conftest:

    pytest_plugins = ["tests.brokers"]
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from controller.credentials import MOSQUITTO_TUNING
from tests.helpers import free_port

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

# A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 10, client id "probe") and the
# CONNACK a broker answers with when it accepts it.
_CONNECT = bytes([0x10, 0x11, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x0A, 0x00, 0x05]) + b"probe"
_DISCONNECT = bytes([0xE0, 0x00])




def mosquitto_binary() -> Optional[str]:
    for p in MOSQUITTO_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("mosquitto")


def mqtt_ping(host: str, port: int, timeout: float = 1.0, *, ssl_context: Optional[ssl.SSLContext] = None) -> Optional[int]:
    """The CONNACK return code ``host:port`` answers an anonymous MQTT CONNECT with
    (0 = accepted, 5 = not authorised, ...), or None when nothing answers like a broker.
    ``ssl_context``: over TLS (a mutual-TLS listener needs it to hold a client certificate)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with (ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context is not None else raw) as s:
                s.settimeout(timeout)
                s.sendall(_CONNECT)
                data = b""
                while len(data) < 4:
                    chunk = s.recv(4 - len(data))
                    if not chunk:
                        return None
                    data += chunk
                if data[0] != 0x20:
                    return None
                try:
                    s.sendall(_DISCONNECT)
                except OSError:
                    pass
                return data[3]
    except OSError:
        return None


class BrokerError(RuntimeError):
    pass


class _Broker:
    """A broker subprocess; subclasses say how to configure and launch it."""

    name = "broker"

    def __init__(self, *, port: Optional[int] = None, workdir: Optional[Path] = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log_path = self.workdir / f"{self.name}.log"
        self.starts = 0
        self.ping_ssl_context: Optional[ssl.SSLContext] = None  # set for a TLS-only broker: start() probes over TLS

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def write_config(self) -> None:
        """Write the broker's config file, if it has one."""

    def start(self, timeout: float = 15.0) -> "_Broker":
        """Launch and wait until the broker answers a real CONNECT with a CONNACK (any
        return code: a broker that refuses anonymous clients is up too).

        Raises:
            BrokerError: it exited, or did not answer within ``timeout``.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError(f"{self.name} is already running")
        with socket.socket() as s:
            # Something else on the port would answer the probe below in this broker's place.
            if s.connect_ex((self.host, self.port)) == 0:
                raise BrokerError(f"port {self.port} is already taken: {self.name} cannot start on it")
        self.write_config()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"{self.name} exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            if mqtt_ping(self.host, self.port, timeout=0.5, ssl_context=self.ping_ssl_context) is not None:
                return self
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"{self.name} did not accept a CONNECT on {self.port} within {timeout}s:\n{self.log_tail()}")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) != 0:
                    return
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGINT for amqtt, SIGTERM for mosquitto), SIGKILL at the deadline."""
        if self.proc is None:
            return
        self.resume()
        self._signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._wait_port_closed(timeout)

    stop_signal = signal.SIGTERM

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word (sessions end, Wills are not sent by it)."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        self._wait_port_closed(5)

    def pause(self) -> None:
        """SIGSTOP: the port stays open and the kernel accepts, but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 15.0) -> "_Broker":
        """Stop (if running) and start again on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the process and remove the work dir (if we made it)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "_Broker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class AmqttBroker(_Broker):
    """The embedded broker as users run it (``fleetctl broker``: amqtt 0.12, MQTT 3.1.1
    only, with our fixes), anonymous, no ACLs, nothing persisted."""

    name = "amqtt"
    stop_signal = signal.SIGINT

    def command(self) -> list[str]:
        return [sys.executable, "-m", "controller.cli", "broker", "--bind", f"{self.host}:{self.port}",
                "--allow-anonymous"]


class MosquittoBroker(_Broker):
    """Mosquitto 2 with one loopback listener, no persistence, log to stderr; anonymous
    clients allowed unless ``anonymous=False``.

    ``extra_lines`` are appended to the config (e.g. ``password_file``/``acl_file``).
    """

    name = "mosquitto"

    def __init__(self, *, binary: Optional[str] = None, anonymous: bool = True, extra_lines: tuple[str, ...] = (),
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.anonymous = anonymous
        found = binary or mosquitto_binary()
        if not found:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = found
        self.extra_lines = extra_lines
        self.config_path = self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            "persistence false",
            # As root, mosquitto drops to user "mosquitto", which cannot read files in a
            # private temp dir (password/ACL files); stay who we are (no effect if not root).
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            *MOSQUITTO_TUNING,  # what `fleetctl broker mosquitto` ships
            *self.extra_lines,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]


BROKERS = {"amqtt": AmqttBroker, "mosquitto": MosquittoBroker}


def make_broker(kind: str, **kw: Any) -> _Broker:
    """A (not yet started) broker of ``kind`` ("amqtt" or "mosquitto").

    Raises:
        BrokerError: mosquitto is not installed.
        KeyError: an unknown kind.
    """
    return BROKERS[kind](**kw)


# -- pytest fixtures (import-safe without pytest installed) ------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def _started(kind: str, tmp_path: Path) -> Iterator[_Broker]:
        if kind == "mosquitto" and mosquitto_binary() is None:
            pytest.skip("mosquitto binary not found (.ci/run installs Debian's mosquitto package)")
        b = make_broker(kind, workdir=tmp_path / kind)
        b.workdir.mkdir(parents=True, exist_ok=True)
        try:
            b.start()
            yield b
        finally:
            b.close()

    @pytest.fixture(params=["amqtt", "mosquitto"])
    def broker(request: Any, tmp_path: Path) -> Iterator[_Broker]:
        """A fresh, running broker per test: once amqtt, once Mosquitto."""
        yield from _started(request.param, tmp_path)

    @pytest.fixture
    def amqtt_broker(tmp_path: Path) -> Iterator[_Broker]:
        yield from _started("amqtt", tmp_path)

    @pytest.fixture
    def mosquitto_broker(tmp_path: Path) -> Iterator[_Broker]:
        yield from _started("mosquitto", tmp_path)
