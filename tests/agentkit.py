"""Run the real device agent (``edge-runtime run --config PATH``) as a subprocess, and
everything around it: a root of trust valid *now*, signed desired states and commands, the
agent's TOML config, a systemd notify socket, and an MQTT observer of the device's topics.

No pytest at module level: ``bench/agent.py`` imports this too.

    keys = Keys()                                          # root valid from now-1d to now+365d
    root = keys.write_root(tmp / "root.json")
    cfg = write_config(tmp / "agent.toml", device_id="dev-1", data_dir=tmp / "data",
                       broker_url=broker.url, trust_root=root, rest_port=free_port())
    with NotifyListener() as notify, Observer(broker.url, "dev-1") as obs, \\
            AgentProcess(cfg, notify=notify) as agent:
        agent.wait_ready(30)
        m = manifest_for(model_files["tiny_v1"], "kws", "1")
        obs.publish_desired(desired_doc("dev-1", 1, {"kws": ("1", m)}))
        obs.wait_for(lambda o: o.last_state and o.last_state.generation == 1, 60, what="generation 1")
        assert agent.terminate() == 0

Signing goes through ``tests.trustkit`` (its deterministic keys: "root1".."root3",
"deploy1", "deploy2", "command1"); every body is validated with its pydantic model before
it is signed, so a bad test body fails loudly here instead of as a device rejection.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Optional, TypeVar, Union

from edge_runtime.agent.config import to_toml
from edge_runtime.mqtt import Message, MqttClient, MqttConfig, MqttError
from edge_runtime.protocol import messages, topics
from tests import trustkit
from tests.helpers import wait_until

__all__ = [
    "AgentProcess", "Keys", "Notification", "NotifyListener", "Observer",
    "command_doc", "desired_doc", "manifest_for", "write_config",
]

UTC = timezone.utc
PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


# -- trust: a root valid now, signed documents ---------------------------------------------


class Keys:
    """A root of trust over trustkit's keys, valid from ``now - 1 day`` to ``now + 365 days``
    (trustkit's fixed-T0 root expires in 2027: a real agent runs on the real clock).
    ``root_json`` is the DSSE envelope signed by "root1" and "root2"."""

    def __init__(self, *, now: Optional[datetime] = None, version: int = 1) -> None:
        self.now = now or _now()
        self.issued_at = self.now - timedelta(days=1)
        self.expires = self.now + timedelta(days=365)
        self.version = version
        self.root_body = trustkit.root_body(version, issued_at=self.issued_at, expires=self.expires)
        self.root_json: bytes = trustkit.sign("root", self.root_body, ["root1", "root2"])

    def write_root(self, path: PathLike) -> Path:
        """Write ``root_json`` to ``path`` (parents created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.root_json)
        return p


def manifest_for(path: PathLike, name: str, version: str, *,
                 health: Union[messages.HealthSpec, Mapping[str, Any], None] = None) -> dict[str, Any]:
    """The manifest dict of the model file at ``path``: sha256, size, and the signature
    ``inspect_model`` reads from it (run isolated, like the installer does).

    Raises:
        pydantic.ValidationError: the result is not a valid ``messages.ModelManifest``.
        edge_runtime.errors.EdgeRuntimeError: the file is not a loadable model.
    """
    from edge_runtime.engine import inspect_model  # the engine is heavy: only when a manifest is made

    data = Path(path).read_bytes()
    signature = messages.ModelSignature.model_validate(inspect_model(str(path)).to_dict())
    body: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "signature": signature.model_dump(mode="json", exclude_none=True),
    }
    if health is not None:
        spec = health if isinstance(health, messages.HealthSpec) else messages.HealthSpec.model_validate(health)
        body["health"] = spec.model_dump(mode="json", exclude_none=True)
    messages.ModelManifest.model_validate(body)
    return body


def _header(kind: str, device_id: str, issued_at: Optional[datetime], expires: Optional[datetime],
            target: Optional[Mapping[str, str]]) -> dict[str, Any]:
    issued = issued_at or (_now() - timedelta(minutes=1))
    return {
        "type": kind,
        "spec_version": "1.0",
        "issued_at": trustkit.iso(issued),
        "expires": trustkit.iso(expires or (issued + timedelta(days=1))),
        "target": dict(target) if target is not None else {"device": device_id},
    }


def desired_doc(
    device_id: str,
    generation: int,
    models: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    expires: Optional[datetime] = None,
    issued_at: Optional[datetime] = None,
    target: Optional[Mapping[str, str]] = None,
    route: str = messages.LOCAL,
    signers: Iterable[str] = ("deploy1",),
) -> bytes:
    """A signed desired state (DSSE envelope bytes) for ``device_id`` (or ``target``):
    ``models`` maps a name to ``(version, manifest dict)``. ``issued_at`` defaults to a
    minute ago, ``expires`` to a day after ``issued_at``.

    Raises:
        pydantic.ValidationError: the body is not a valid ``messages.DesiredState``.
    """
    body = _header("desired", device_id, issued_at, expires, target)
    body["generation"] = generation
    body["models"] = {
        name: {"version": version, "manifest": dict(manifest), "route": route, "install": True}
        for name, (version, manifest) in models.items()
    }
    messages.DesiredState.model_validate(body)
    return trustkit.sign("desired", body, signers)


def command_doc(
    device_id: str,
    seq: int,
    name: str,
    args: Optional[Mapping[str, Any]] = None,
    *,
    expires: Optional[datetime] = None,
    issued_at: Optional[datetime] = None,
    target: Optional[Mapping[str, str]] = None,
    signers: Iterable[str] = ("command1",),
) -> bytes:
    """A signed one-shot command (DSSE envelope bytes), ``name`` one of ``messages.COMMANDS``.

    Raises:
        pydantic.ValidationError: the body is not a valid ``messages.Command``.
    """
    body = _header("command", device_id, issued_at, expires, target)
    body["seq"] = seq
    body["name"] = name
    body["args"] = dict(args or {})
    messages.Command.model_validate(body)
    return trustkit.sign("command", body, signers)


# -- the agent's config ---------------------------------------------------------------------


def write_config(
    path: PathLike,
    *,
    device_id: str,
    data_dir: PathLike,
    broker_url: str,
    trust_root: Optional[PathLike],
    rest_port: int,
    telemetry_interval_s: float = 10,
    socket_path: Optional[PathLike] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write an agent TOML for tests (``edge_runtime.agent.config.load_config`` reads it):
    short reconnect delays (0.2 .. 2 s), keepalive 5 s, chunk timeout 2 s. ``extra`` is
    merged in, one level deep for sections (``{"limits": {"chunk_size": 4096}}``).
    ``socket_path`` is the API's Unix socket (default ``DATA_DIR/run/api.sock``; keep the
    whole path under 108 bytes). Returns ``path``.
    """
    data: dict[str, Any] = {
        "device_id": device_id,
        "data_dir": str(Path(data_dir).absolute()),
        "telemetry_interval_s": telemetry_interval_s,
        "broker": {"url": broker_url, "keepalive_s": 5, "reconnect_initial_s": 0.2, "reconnect_max_s": 2.0},
        "api": {"rest_port": rest_port},
        "limits": {"chunk_timeout_s": 2.0},
    }
    if trust_root is not None:
        data["trust_root"] = str(Path(trust_root).absolute())
    if socket_path is not None:
        data["api"]["socket_path"] = str(Path(socket_path).absolute())
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_toml(data), encoding="utf-8")
    return p


# -- systemd notify -------------------------------------------------------------------------


def serve_artifacts(stack: Any, broker_url: str, files: Iterable[PathLike], blob_dir: Path, *,
                    client_id: str) -> tuple[MqttClient, Any]:
    """The controller's side of model transfers for a test: ``files`` stored content-addressed
    in ``blob_dir`` and served over MQTT by a real ``ArtifactService`` on a controller client
    (connected; both stopped by ``stack``, a ``contextlib.ExitStack``). Returns both."""
    from controller.artifact_service import ArtifactService, DirectoryLookup
    from controller.artifacts import ArtifactServer

    blob_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        data = Path(path).read_bytes()
        (blob_dir / hashlib.sha256(data).hexdigest()).write_bytes(data)
    ctl = MqttClient(MqttConfig(url=broker_url, client_id=client_id, keepalive=5,
                                reconnect_min_delay=0.1, reconnect_max_delay=1.0))
    ctl.connect(timeout=10)
    stack.callback(ctl.disconnect, timeout=5)
    service = ArtifactService(ctl, ArtifactServer(DirectoryLookup(blob_dir)))
    service.start()
    stack.callback(service.stop)
    return ctl, service


class Notification(NamedTuple):
    """One datagram received on the notify socket, at ``at`` (``time.monotonic()``)."""

    at: float
    text: str

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.split("\n") if line)


class NotifyListener:
    """A ``$NOTIFY_SOCKET`` in a fresh temp dir that records every datagram with its
    arrival time. ``env()`` is what the agent's environment needs."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="ef-notify-")  # short: AF_UNIX paths stop at 108 bytes
        self.path = os.path.join(self._dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._got: list[Notification] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def messages(self) -> list[Notification]:
        with self._lock:
            return list(self._got)

    def find(self, assignment: str, *, after: float = float("-inf")) -> Optional[Notification]:
        """The first datagram after ``after`` holding ``assignment`` (``"READY=1"``) as one
        of its lines, or only the key (``"STATUS"``) for any value."""
        for n in self.messages():
            if n.at <= after:
                continue
            lines = n.text.split("\n")
            if assignment in lines or ("=" not in assignment and assignment in n.fields):
                return n
        return None

    def wait_for(self, assignment: str, timeout: float = 30.0, *, after: float = float("-inf"),
                 alive: Optional[Callable[[], bool]] = None) -> Notification:
        """Wait for ``find(assignment, after=after)``; ``alive`` (if given) stops the wait
        early when it turns False (the process died).

        Raises:
            AssertionError: not received within ``timeout`` (or ``alive`` turned False).
        """
        def check() -> Union[Notification, object, None]:
            found = self.find(assignment, after=after)
            if found is None and alive is not None and not alive():
                return self.find(assignment, after=after) or _GONE  # it may have sent it just before exiting
            return found

        result = wait_until(check, timeout=timeout, what=f"{assignment!r} on the notify socket")
        if result is _GONE:
            raise AssertionError(f"the process exited before sending {assignment!r}; got "
                                 f"{[n.text for n in self.messages()]}")
        return result  # type: ignore[return-value]

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.2)
                if not ready:
                    continue
                data = self._sock.recv(65536)
            except (OSError, ValueError):
                return  # closed
            with self._lock:
                self._got.append(Notification(time.monotonic(), data.decode("utf-8", "replace")))


_GONE = object()  # wait_for's "the process exited" (wait_until swallows exceptions from the predicate)


# -- the agent process ----------------------------------------------------------------------


def agent_command(config_path: PathLike) -> list[str]:
    """``edge-runtime run --config PATH`` with this interpreter."""
    return [sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(config_path)]


class AgentProcess:
    """The real agent as a subprocess in its own session (its children die with it), its
    stdout and stderr appended to ``log_path`` (default: ``agent.log`` beside the config).
    Started by the constructor; ``argv`` replaces the command (tests of this kit).

    Inherited ``EDGE_RUNTIME_*`` variables are dropped (they would override the config);
    ``env_extra`` may set some.
    """

    def __init__(
        self,
        config_path: PathLike,
        *,
        notify: NotifyListener,
        env_extra: Optional[Mapping[str, str]] = None,
        log_path: Optional[PathLike] = None,
        argv: Optional[list[str]] = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.notify = notify
        self.log_path = Path(log_path) if log_path is not None else self.config_path.parent / "agent.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_")}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        env.update(notify.env())
        env["PYTHONUNBUFFERED"] = "1"
        env.update(env_extra or {})
        self.argv = argv or agent_command(self.config_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll()

    def log_text(self, *, all_runs: bool = False) -> str:
        """What this run wrote (``all_runs``: the whole log file, earlier runs too)."""
        try:
            with open(self.log_path, "rb") as f:
                if not all_runs:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> Notification:
        """Wait for ``READY=1`` sent by this run.

        Raises:
            AssertionError: not within ``timeout``, or the process exited first (the
                message carries the tail of its log).
        """
        try:
            return self.notify.wait_for("READY=1", timeout, after=self.started_at, alive=lambda: self.alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (exit code {self.returncode}); agent log:\n{self._tail()}") from None

    def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code once the process ended by itself.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout``.
        """
        code = self.proc.wait(timeout)
        self._reap_group()
        return code

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` for the exit, SIGKILL the whole session if it did
        not go; returns the exit code (negative: killed by that signal)."""
        if self.alive:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg()
                self.proc.wait(10)
        self._reap_group()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the whole session (a power cut for the agent); returns the exit code."""
        self._killpg()
        self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        try:
            self.terminate(timeout=10)
        finally:
            if self.alive:
                self.kill()
            self._reap_group()

    def _killpg(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap_group(self) -> None:
        """Kill children the agent left behind in its session (pool workers, sandboxes)."""
        self._killpg()

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


# -- the observer -------------------------------------------------------------------------


_KINDS = {"state": "state", "events": "event", "telemetry": "telemetry", "reply": "reply"}


class Observer:
    """An MQTT client straight to the broker, subscribed at QoS 1 (again after every
    reconnect) to one device's state, events, telemetry and reply topics. Decoded messages
    are appended to ``states`` (the retained one included), ``events``, ``telemetry`` and
    ``replies``; anything that does not decode goes to ``undecodable`` as (topic, payload,
    error). Connected and subscribed when the constructor returns.

    Raises (constructor): MqttError (``ConnectFailed``...) if the broker is not reachable.
    """

    def __init__(self, broker_url: str, device_id: str, *, client_id: Optional[str] = None,
                 timeout: float = 10.0) -> None:
        self.device_id = topics.check_id(device_id, "device id")
        self.states: list[messages.DeviceState] = []
        self.events: list[messages.Event] = []
        self.telemetry: list[messages.Telemetry] = []
        self.replies: list[messages.Reply] = []
        self.undecodable: list[tuple[str, bytes, str]] = []
        self._lists: dict[str, list[Any]] = {
            "state": self.states, "events": self.events, "telemetry": self.telemetry, "reply": self.replies,
        }
        self._subscribed = threading.Event()
        self.client = MqttClient(
            MqttConfig(url=broker_url, client_id=client_id or f"observer-{device_id}-{os.getpid()}",
                       keepalive=5, reconnect_min_delay=0.1, reconnect_max_delay=1.0),
            on_connect=self._on_connect,
        )
        for kind in _KINDS:
            self.client.add_handler(topics.device_topic(self.device_id, kind), self._on_message)  # type: ignore[arg-type]
        self.client.connect(timeout=timeout)
        if not self._subscribed.wait(timeout):
            self.client.disconnect()
            raise AssertionError(f"observer of {device_id} not subscribed within {timeout}s: {self.client.last_error}")

    # -- reading ------------------------------------------------------------------------

    @property
    def last_state(self) -> Optional[messages.DeviceState]:
        return self.states[-1] if self.states else None

    def wait_for(self, predicate: Callable[[Observer], T], timeout: float = 30.0, *, what: str = "condition") -> T:
        """Poll ``predicate(self)`` until it is truthy; returns its value.

        Raises:
            AssertionError: not within ``timeout``; the message shows what was seen.
        """
        try:
            return wait_until(lambda: predicate(self), timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.summary()}") from None

    def summary(self, n: int = 8) -> str:
        """The last few of everything seen, for assertion messages."""
        def short(items: list[Any]) -> str:
            return "\n    ".join(m.model_dump_json(exclude_none=True)[:400] for m in items[-n:]) or "(none)"

        return (f"observer of {self.device_id}: {len(self.states)} states, {len(self.events)} events, "
                f"{len(self.telemetry)} telemetry, {len(self.replies)} replies, {len(self.undecodable)} undecodable\n"
                f"  last states:\n    {short(self.states[-2:])}\n  last events:\n    {short(self.events)}\n"
                f"  last replies:\n    {short(self.replies)}")

    # -- writing ------------------------------------------------------------------------

    def publish_desired(self, doc: bytes, *, timeout: float = 10.0) -> None:
        """Publish a signed desired state, retained, at QoS 1."""
        self.client.publish(topics.desired(self.device_id), doc, qos=1, retain=True, timeout=timeout)

    def clear_desired(self, *, timeout: float = 10.0) -> None:
        """Remove the retained desired state (an empty retained message)."""
        self.client.publish(topics.desired(self.device_id), b"", qos=1, retain=True, timeout=timeout)

    def send_command(self, doc: bytes, *, timeout: float = 10.0) -> None:
        """Publish a signed command at QoS 1 (never retained)."""
        self.client.publish(topics.cmd(self.device_id), doc, qos=1, timeout=timeout)

    def close(self) -> None:
        self.client.disconnect(timeout=5)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside -------------------------------------------------------------------------

    def _on_connect(self, _session_present: bool) -> None:
        try:
            self.client.subscribe([(topics.device_topic(self.device_id, k), 1) for k in _KINDS])  # type: ignore[arg-type]
        except (MqttError, RuntimeError):
            return  # the next reconnect tries again
        self._subscribed.set()

    def _on_message(self, msg: Message) -> None:
        kind = topics.parse(msg.topic).kind
        if kind == "state" and not msg.payload:
            return  # a cleared retained state
        try:
            decoded = messages.decode(_KINDS[kind], msg.payload)
        except messages.ProtocolError as exc:
            self.undecodable.append((msg.topic, msg.payload, str(exc)))
            return
        self._lists[kind].append(decoded)
