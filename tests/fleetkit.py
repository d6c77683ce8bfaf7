"""The controller side of end-to-end tests: a key directory, ``fleetctl serve`` as a real
subprocess, and a fleet of real device agents trusting that key directory's root.

    keys = make_keys(tmp / "keys")                       # fleetctl keys init (fast: no passphrase)
    with ControllerProcess(broker.url, tmp / "ctl", keys) as ctl, \\
            DeviceFleet(broker.url, tmp / "devs", keys, ["d1", "d2", "d3"]) as fleet:
        ctl.wait_online()
        fleet.wait_ready()
        with ApiClient(broker.url) as api:
            api.call("deploy", model="kws", version="1", to="all")

No pytest at module level (the benchmark may import it).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union

from edge_runtime.mqtt import MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from tests.agentkit import AgentProcess, NotifyListener, write_config
from tests.brokers import free_port
from tests.helpers import wait_until

__all__ = ["ControllerProcess", "DeviceFleet", "ctl_state", "make_keys", "push_model", "scrape"]

PathLike = Union[str, "os.PathLike[str]"]


def make_keys(directory: PathLike) -> Path:
    """A fresh key directory (root 2-of-3, deploy, command; no passphrase) and its root.json."""
    from controller.keys import KeyDir

    d = Path(directory)
    KeyDir(d).init(root_keys=3, root_threshold=2, deploy_keys=1, deploy_threshold=1, command_keys=1,
                   command_threshold=1, passphrase=None, expires_days=365)
    return d


def push_model(api: Any, path: PathLike, name: str, version: str) -> dict[str, Any]:
    """What ``fleetctl models push FILE`` does, through ``api`` (an ``ApiClient``): the
    engine reads the signature here, the controller checks it again and signs the release."""
    from controller.cli import inspect_file

    signature = inspect_file(Path(path))["signature"]
    return api.upload(path, name, version, signature)


def ctl_state(broker_url: str, timeout: float = 5.0, *, settle: float = 1.0) -> Optional[messages.ControllerState]:
    """The retained controller STATE on the broker right now (None if none came within
    ``settle`` seconds of the SUBACK: a retained message follows the SUBACK at once)."""
    client = MqttClient(MqttConfig(url=broker_url))
    q = client.queue(topics.CTL_STATE)
    client.connect(timeout=timeout)
    try:
        client.subscribe([(topics.CTL_STATE, 1)], timeout=timeout)
        try:
            msg = q.get(timeout=settle)
        except queue.Empty:
            return None
        return messages.decode("ctl_state", msg.payload) if msg.payload else None
    finally:
        client.disconnect()


class ControllerProcess:
    """``python -m controller.cli serve`` in its own session, logging to ``data/serve.log``."""

    def __init__(self, broker_url: str, data_dir: PathLike, keys_dir: PathLike, *, db_url: Optional[str] = None,
                 instance: str = "ctl-a", extra: tuple[str, ...] = (), env_extra: Optional[dict[str, str]] = None,
                 tick: str = "0.2") -> None:
        self.broker_url = broker_url
        self.data = Path(data_dir)
        self.data.mkdir(parents=True, exist_ok=True)
        self.keys = Path(keys_dir)
        self.db_url = db_url or f"sqlite:///{(self.data / 'controller.db').resolve()}"
        self.instance = instance
        self.argv = [
            sys.executable, "-m", "controller.cli", "serve", "--broker", broker_url, "--db", self.db_url,
            "--keys", str(self.keys), "--data", str(self.data), "--instance", instance, "--tick", tick,
            "--metrics-port", "0", *extra,  # any free port, read back from the log: no race with other tests
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        self.log_path = self.data / "serve.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def start(self) -> "ControllerProcess":
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                                         start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes()[self._offset:].decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def metrics_port(self) -> int:
        """The port this run's /metrics listens on (from its log line; waits for it)."""
        def bound() -> Optional[int]:
            if not self.alive:
                raise AssertionError(f"fleetctl serve exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            found = re.search(r"serving /metrics on http://[^\s/]+:(\d+)/metrics", self.log_text())
            return int(found.group(1)) if found else None

        return int(wait_until(bound, timeout=30, interval=0.1, what=f"controller {self.instance} serving /metrics"))

    def wait_online(self, timeout: float = 30.0) -> None:
        """Until this replica's retained STATE says online (it has connected and subscribed)."""
        def online() -> bool:
            if not self.alive:
                raise AssertionError(f"fleetctl serve exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            state = ctl_state(self.broker_url)
            return bool(state and state.online and state.instance == self.instance)

        wait_until(online, timeout=timeout, interval=0.2, what=f"controller {self.instance} online")

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is flushed, the broker publishes the Will."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def __enter__(self) -> "ControllerProcess":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
            self.proc.wait(10)  # type: ignore[union-attr]


class DeviceFleet:
    """Real agents, one per id, each with its own data dir, REST port and config trusting
    ``keys_dir/root.json``. ``start(id)``/``stop(id)`` take one device off and on line."""

    def __init__(self, broker_url: str, base: PathLike, keys_dir: PathLike, ids: list[str], *,
                 telemetry_interval_s: float = 1.0, extra: Optional[dict[str, Any]] = None,
                 start: bool = True) -> None:
        self.broker_url = broker_url
        self.base = Path(base)
        self.ids = list(ids)
        self.notify = NotifyListener()
        self.rest_ports = {d: free_port() for d in ids}
        self.configs = {
            d: write_config(self.base / d / "agent.toml", device_id=d, data_dir=self.base / d / "data",
                            broker_url=broker_url, trust_root=Path(keys_dir) / "root.json",
                            rest_port=self.rest_ports[d], telemetry_interval_s=telemetry_interval_s,
                            socket_path=Path("/tmp") / f"ef-{os.getpid()}-{d}.sock", extra=extra)
            for d in ids
        }
        self.agents: dict[str, AgentProcess] = {}
        if start:
            for d in ids:
                self.start(d)

    def start(self, device_id: str) -> AgentProcess:
        agent = AgentProcess(self.configs[device_id], notify=self.notify)
        self.agents[device_id] = agent
        return agent

    def stop(self, device_id: str) -> int:
        return self.agents[device_id].terminate()

    def wait_ready(self, timeout: float = 60.0) -> None:
        for agent in self.agents.values():
            agent.wait_ready(timeout)

    def rest_url(self, device_id: str) -> str:
        return f"http://127.0.0.1:{self.rest_ports[device_id]}"

    def close(self) -> None:
        for agent in self.agents.values():
            agent.__exit__(None, None, None)
        self.notify.close()

    def __enter__(self) -> "DeviceFleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scrape(port: int) -> dict[str, float]:
    """A controller's /metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                         if line and not line.startswith("#"))}
