"""The serving daemon: store + engine + local API, kept in step with the store.

Start-up order matters for an offline device: start the API at once (models still loading
answer 503, not "connection refused"), then recover any install a crash interrupted and
load every active version. After that a watcher follows the store: when another process
(``edge-runtime install``/``rollback``, later the MQTT agent) changes what is active, the
new version is loaded and warmed in the watcher thread and swapped in; callers never wait.

The decision of what to load or unload is ``plan_sync``, a pure function over plain data.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime import memory
from edge_runtime.api import FastPathServer, RestServer
from edge_runtime.engine import Engine, load_backend
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.installer import Installer
from edge_runtime.store import ModelStore
from edge_runtime.store.state import StoreState

log = logging.getLogger(__name__)
_THREAD_STACK_BYTES = 2 * 1024 * 1024


class ServeConfig(BaseModel):
    """What ``edge-runtime serve`` needs; validated at start so a bad value names its field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path
    rest_host: str = "127.0.0.1"
    rest_port: Optional[int] = Field(default=8501, ge=0, le=65535)  # None: no REST
    socket_path: Optional[Path] = None  # default: DATA_DIR/run/api.sock
    pool_size: int = Field(default=2, ge=1, le=64)
    num_threads: int = Field(default=1, ge=1, le=64)
    backend: Optional[str] = None
    quota_bytes: Optional[int] = Field(default=None, gt=0)
    keep_previous: int = Field(default=1, ge=1, le=16)
    watch_interval_s: float = Field(default=0.5, gt=0, le=60)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)

    @property
    def socket(self) -> Path:
        return self.socket_path or self.data_dir / "run" / "api.sock"


@dataclass(frozen=True)
class SyncStep:
    action: str  # "load" or "unload"
    name: str
    version: str = ""
    sha256: str = ""


def plan_sync(state: StoreState, serving: dict[str, tuple[str, str]]) -> list[SyncStep]:
    """What to load or unload so the engine serves exactly the store's active versions.

    ``serving`` maps model name → (version, sha256) of what the engine has now.
    """
    steps: list[SyncStep] = []
    for name, model in sorted(state.models.items()):
        if model.active is None:
            continue
        record = model.versions.get(model.active)
        if record is None:
            continue
        if serving.get(name) != (model.active, record.sha256):
            steps.append(SyncStep("load", name, model.active, record.sha256))
    wanted = {n for n, m in state.models.items() if m.active is not None}
    steps.extend(SyncStep("unload", name) for name in sorted(set(serving) - wanted))
    return steps


def serving(engine: Engine) -> dict[str, tuple[str, str]]:
    """Model name → (version, sha256) of what ``engine`` serves now. A blob's file name is
    its sha256, so the engine itself says which bytes it serves."""
    return {m.name: (m.version, Path(m.path).name) for m in engine.models()}


class Runtime:
    """Owns the engine, the store and the servers for one data dir."""

    def __init__(self, config: ServeConfig, *, keep_downloads: bool = False) -> None:
        """``keep_downloads``: leave interrupted chunked downloads for the agent to resume
        (``Installer.recover``); without an agent they are cleaned up at start."""
        # One thread per connection (up to a few hundred): small stacks keep that cheap in
        # address space on 32-bit boards. Set before any server thread exists.
        threading.stack_size(_THREAD_STACK_BYTES)
        self.config = config
        self.keep_downloads = keep_downloads
        self.engine = Engine(backend=load_backend(config.backend), pool_size=config.pool_size, num_threads=config.num_threads)
        self.store = ModelStore(config.data_dir, quota_bytes=config.quota_bytes, keep_previous=config.keep_previous)
        self.installer = Installer(self.store, self.engine)
        self.rest: RestServer | None = None
        self.fast: FastPathServer | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._revision = -1
        self._trim_due = False
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Serve first, then recover and load: until a model is loaded its calls get a 503
        saying so, never "connection refused"."""
        for name, model in self.store.read().models.items():
            if model.active:
                self.engine.mark_unavailable(name, f"loading version {model.active}")
        if self.config.rest_port is not None:
            self.rest = RestServer(self.config.rest_host, self.config.rest_port, self.engine, max_body=self.config.max_body_bytes)
            self.rest.start()
        self.fast = FastPathServer(self.config.socket, self.engine, max_frame=self.config.max_body_bytes)
        self.fast.start()
        self.installer.recover(keep_downloads=self.keep_downloads)  # finishes interrupted installs, then loads every active version
        self.sync()
        self._watcher = threading.Thread(target=self._watch, name="store-watch", daemon=True)
        self._watcher.start()

    def endpoints(self) -> dict[str, Any]:
        return {"rest": self.rest.url if self.rest else None, "socket": str(self.config.socket), "models": self.engine.names(),
                "backend": f"{self.engine.backend.name} {self.engine.backend.version}"}

    def sync(self) -> list[SyncStep]:
        """Bring the engine in line with the store once; returns what it decided.

        Loading is the installer's ``load_active``: verified bytes only, falling back to the
        newest usable previous version, else 503 with the reasons.
        """
        state = self.store.read()
        self._revision = state.revision
        steps = plan_sync(state, serving(self.engine))
        for step in steps:
            if step.action == "unload":
                self.engine.unload(step.name)
                log.info("unloaded %s", step.name)
            else:
                self.installer.load_active(step.name, state.models[step.name])
        return steps

    def reload(self) -> None:
        """Re-read the store now (SIGHUP)."""
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.watch_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._trim_due:
                    # One tick after a swap the old version's last calls are done and its
                    # interpreters freed; hand the memory back (here, not on a request thread).
                    self._trim_due = False
                    memory.trim()
                if self.store.revision() != self._revision:
                    self._trim_due = bool(self.sync()) or self._trim_due
            except Exception:  # EMFILE, EIO, a bug: log it and keep following the store
                log.exception("store watch failed; retrying")
                self._stop.wait(min(5.0, 10 * self.config.watch_interval_s))

    def stop(self, timeout: float = 10.0) -> bool:
        """Close both doors first, then answer everything already admitted, then close.

        Returns False if requests were still running after ``timeout``.
        """
        self._stop.set()
        self._wake.set()
        servers = [s for s in (self.fast, self.rest) if s is not None]
        for server in servers:
            server.begin_stop()
        drained = all([server.finish_stop(timeout) for server in servers])
        if self._watcher:
            self._watcher.join(10)
        return drained

    def run_until_signal(self, on_ready: Any = None) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP re-reads the store."""
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        signal.signal(signal.SIGINT, lambda *_: done.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload())
        self.start()
        if on_ready:
            on_ready(self)
        while not done.wait(1.0):
            pass
        self.stop()
