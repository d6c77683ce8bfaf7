"""``edge-runtime run``: the device agent. Thin glue between the pieces that decide.

Start-up, in this order, so the device serves before anything remote is needed:

 1. the outbox (events and telemetry are queued from the first moment), the trust state
    (provisioned from ``trust_root`` on first start), the accepted desired state;
 2. the serving ``Runtime``: the local API, then recovery of interrupted installs (keeping
    interrupted *downloads* to resume), then every active model;
 3. ``READY=1`` to systemd; resume the interrupted downloads still desired;
 4. MQTT in the background: it connects when it can (full-jitter backoff) and on every
    connect publishes the retained birth, re-subscribes, and the outbox drains.

Then one loop (the main thread) does everything that changes the device, one thing at a
time: apply received roots of trust (``fleet/v1/trust/root/+``: N+1, N+2, ... each persisted,
a ``root_rotated`` event each, then a desired state refused under the old root is checked
again), verify a received desired state (``documents``), plan and run the reconcile
(``executor``), pump transfers, install finished ones, queue telemetry, publish the retained
state when it changed, ping the watchdog. MQTT handlers only hand payloads over and wake
the loop -- except commands, which are verified and run where they arrive (they are quick)
and chunks, which go straight to their transfer.

Remote inference: the local API forwards calls of models routed to another node through
``remote.RemoteCaller`` (replies arrive on ``fleet/v1/dev/{id}/inbox/infer``), and every
runtime is an executor node for others (``serving_node.ServingNode`` on
``fleet/v1/node/{id}/infer/+``). The loop reports the caller's ``fallback`` events; telemetry
carries both sides' counters and the round trip to each executor node (``peers_rtt_ms``).

Stopping (SIGTERM/SIGINT, or the ``restart`` command): ``STOPPING=1``; the API stops taking
calls and finishes the ones it has; transfers checkpoint; the outbox is flushed for a
moment; the retained state says offline; a clean DISCONNECT (so the broker drops the Will,
which says the same). Exit 0 (``restart``: 75, for systemd to start it again). SIGHUP reloads
the config file: the telemetry interval and the transfer settings apply at once; the rest
(device id, broker, data dir, API) needs a restart and says so in the log.

Death: the Last Will is ``DeviceState(online=false)`` with the same ``bd_seq`` as this
process's births. ``bd_seq`` is a persisted counter taken once per process (the Will is fixed
for the connection's life), so a controller can tell a stale Will from the current birth.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import psutil

from edge_runtime import __version__, memory
from edge_runtime.agent import sdnotify
from edge_runtime.agent.commands import RESTART_EXIT_CODE, CommandHooks, RecentLog, run_command
from edge_runtime.agent.config import AgentConfig, ConfigError, load_config
from edge_runtime.agent.documents import MAX_PENDING_ROOTS, DesiredOutcome, DocumentGate
from edge_runtime.agent.executor import Executor
from edge_runtime.agent.reconcile import Noop, Refuse
from edge_runtime.agent.outbox import Item, Outbox
from edge_runtime.agent.eventlimit import EventLimiter
from edge_runtime.agent.remote import RemoteCaller, RemoteSettings, merge_figures
from edge_runtime.agent.reporter import Reporter
from edge_runtime.agent.routes import RouteTable
from edge_runtime.agent.serving_node import ServingNode
from edge_runtime.agent.telemetry import TelemetryCollector
from edge_runtime.agent.transfer import PublishingChunkSource
from edge_runtime.agent.transfers import Transfers, TransferSettings
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt import Message, MqttClient, MqttConfig, MqttError, Will
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import Capabilities, ControllerState, DeviceState, ErrorInfo, Reply, SetConfigArgs
from edge_runtime.protocol.trust_store import NotProvisioned, TrustStore
from edge_runtime.runtime import Runtime

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
FLUSH_ON_STOP_S = 2.0
STOP_BUDGET_S = 10.0
REPLAN_S = 60.0  # re-plan at least this often (a step that failed may pass now)
STEP_WATCHDOG_MAX_S = 600.0  # one loop step (an install) pinged through this long at most; past it, a hang
REJECTION_EVENTS_PER_MIN = 30  # a flood of bad documents must not flood the outbox


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NotProvisionedError(EdgeRuntimeError):
    code = "not_provisioned"


class Agent:
    """One device agent process (``run()`` returns its exit code)."""

    def __init__(self, config: AgentConfig, *, config_path: Optional[Path] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.device_id = config.device_id
        self.boot_id = uuid.uuid4().hex
        self.data_dir = Path(config.data_dir)
        self._stop = threading.Event()
        self._born = threading.Event()  # this connection is subscribed and its birth is out
        self._wake = threading.Event()
        self._exit_code = 0
        self._reload = False
        self._lock = threading.Lock()
        self._pending_desired: Optional[bytes] = None
        self._pending_roots: list[tuple[int, bytes]] = []  # (topic version, envelope), in arrival order
        self._reconcile_due = True
        self._published_revision: Optional[tuple[int, dict[str, str], Optional[int]]] = None
        self._reconciled_generation: Optional[int] = None
        self._controller_online: Optional[bool] = None
        self._broker_rtt_ms: Optional[float] = None
        self._rejections = EventLimiter(REJECTION_EVENTS_PER_MIN)
        self.recent_log = RecentLog()
        self.telemetry_interval = config.telemetry_interval_s
        self.mqtt: Optional[MqttClient] = None

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        logging.getLogger().addHandler(self.recent_log)
        self._install_signals()
        self._open()
        try:
            self._serve()
        finally:
            self._shutdown()
        return self._exit_code

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop()

        def reload(_signum: int, _frame: Any) -> None:
            self._reload = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def stop(self, exit_code: int = 0) -> None:
        self._exit_code = exit_code
        self._stop.set()
        self._wake.set()

    def _open(self) -> None:
        cfg = self.config
        agent_dir = self.data_dir / "agent"
        agent_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(agent_dir / "outbox.sqlite", max_items=cfg.limits.outbox_max_messages,
                             max_bytes=cfg.limits.outbox_max_bytes)
        self.bd_seq = self.outbox.next_seq("bd_seq")
        self.reporter = Reporter(self.outbox, self.device_id)
        self.gate = self._open_trust()
        self.desired = self.gate.load_desired(_utcnow())

        self.runtime = Runtime(cfg.serve_config(), keep_downloads=True)
        self.routes = RouteTable(agent_dir / "routes.json")
        self.transfers = Transfers(PublishingChunkSource(self.device_id, self._publish_request),
                                   self._transfer_settings(cfg))
        self.executor = Executor(self.runtime.installer, self.transfers, self.reporter, self.routes,
                                 generation=lambda: self.desired.generation if self.desired else None,
                                 max_artifact_bytes=cfg.limits.max_artifact_bytes)
        self.remote = RemoteCaller(
            self.device_id, self.runtime.engine, route=self.routes.get, spec=self._desired_spec,
            publish=self._publish_nowait, connected=lambda: self.mqtt is not None and self.mqtt.is_connected,
            settings=RemoteSettings.of(cfg.remote), on_event=self._wake.set)
        # The node runs other nodes' calls through the engine's peer view: they count in the
        # model's calls and service time, not in this device's own demand (demand_rate).
        self.node = ServingNode(self.device_id, self.runtime.engine.for_peers(), self._publish_nowait,
                                workers=cfg.remote.executor_workers, queue_size=cfg.remote.executor_queue,
                                queue_bytes=cfg.remote.executor_queue_bytes)
        self.runtime.start()  # the API answers from here on
        for server in (self.runtime.rest, self.runtime.fast):
            if server is not None:
                server.forward = self.remote
        self.node.start()
        self.collector = TelemetryCollector(self.runtime.engine, data_dir=self.data_dir, device_id=self.device_id,
                                            interval_s=self.telemetry_interval, boot_id=self.boot_id,
                                            extra=lambda: merge_figures(self.remote.figures(), self.node.figures()),
                                            routes=self.routes.all)
        sdnotify.notify(ready=True, status=self._status())
        log.info("serving %s (boot %s)", self.runtime.endpoints(), self.boot_id)
        self.executor.resume_downloads(self.desired)
        self.mqtt = self._open_mqtt()
        self._drainer = threading.Thread(target=self._drain, name="outbox-drain", daemon=True)
        self._drainer.start()

    def _open_trust(self) -> DocumentGate:
        cfg = self.config
        store = TrustStore(self.data_dir)
        store.clean_stale()
        groups = frozenset(cfg.groups)
        if not store.exists():
            if cfg.trust_root is None:
                raise NotProvisionedError(
                    f"no trust state in {self.data_dir}/trust and no trust_root in the config: set trust_root to the "
                    "fleet's root.json (root.json in the controller's key directory, fleetctl keys init/rotate --dir "
                    "DIR) so the device can verify what it is sent")
            store.provision(Path(cfg.trust_root).read_bytes(), device_id=self.device_id, groups=groups)
            log.info("provisioned the trust store from %s", cfg.trust_root)
        try:
            state = store.load(device_id=self.device_id, groups=groups)
        except NotProvisioned as exc:  # pragma: no cover - exists() said otherwise: a race with another process
            raise NotProvisionedError(str(exc)) from exc
        return DocumentGate(self.data_dir, store, state)

    @staticmethod
    def _transfer_settings(cfg: AgentConfig) -> TransferSettings:
        lim = cfg.limits
        return TransferSettings(chunk_size=lim.chunk_size, window=lim.transfer_window,
                                chunk_timeout=lim.chunk_timeout_s, retries=lim.chunk_retries)

    def _open_mqtt(self) -> MqttClient:
        b = self.config.broker
        death = DeviceState(online=False, boot_id=self.boot_id, bd_seq=self.bd_seq)
        mcfg = MqttConfig(
            url=b.url, client_id=self.device_id, username=b.username, password=b.password_value(),
            ca_file=str(b.ca_file) if b.ca_file else None, cert_file=str(b.cert_file) if b.cert_file else None,
            key_file=str(b.key_file) if b.key_file else None, keepalive=b.keepalive_s,
            will=Will(topics.state(self.device_id), messages.encode(death), qos=1, retain=True),
            operation_timeout=PUBLISH_TIMEOUT_S, reconnect_min_delay=b.reconnect_initial_s,
            reconnect_max_delay=b.reconnect_max_s,
        )
        client = MqttClient(mcfg, on_connect=self._on_connect, on_disconnect=self._on_disconnect)
        dev = self.device_id
        client.add_handler(topics.TRUST_ROOTS, self._on_root)
        client.add_handler(topics.desired(dev), self._on_desired)
        client.add_handler(topics.cmd(dev), self._on_command)
        client.add_handler(topics.inbox_filter(dev), self._on_inbox)
        client.add_handler(topics.CTL_STATE, self._on_ctl_state)
        client.add_handler(topics.infer_inbox(dev), lambda msg: self.remote.on_reply(msg.payload))
        client.add_handler(topics.infer_filter(dev), lambda msg: self.node.offer(msg.topic, msg.payload))
        self.mqtt = client  # before start(): the first connect hook may run at once and needs it
        client.start()
        return client

    # -- MQTT side (dispatcher thread) --------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        assert self.mqtt is not None
        log.info("connected to %s", self.config.broker.url)
        try:
            # Listen first, then announce: a controller that commands a device the moment it
            # comes online must not find it deaf (sessions are clean: nothing is subscribed yet).
            self.mqtt.subscribe(topics.device_subscriptions(self.device_id))
            self._publish_state(force=True)
            self._born.set()
        except MqttError as exc:  # the session dropped again; the next connect retries
            log.warning("birth/subscribe after connect failed: %s", exc)
        self.outbox.wake()
        self._wake.set()

    def _on_disconnect(self, reason: Optional[str]) -> None:
        self._born.clear()
        self.remote.connection_lost()  # forwarded calls waiting for answers fall back now
        if reason is not None:
            log.warning("lost the broker: %s", reason)
        self.transfers.suspend()
        self._wake.set()

    def _on_desired(self, msg: Message) -> None:
        if not msg.payload:
            return  # the retained desired state was cleared: keep running what we have
        with self._lock:
            self._pending_desired = msg.payload  # only the newest matters
        self._wake.set()

    def _on_root(self, msg: Message) -> None:
        if not msg.payload:
            return  # a retained root was cleared: the device keeps the root it holds
        try:
            version = topics.parse(msg.topic).version
        except ValueError:
            return
        if version is None:  # pragma: no cover - the handler's filter is the roots'
            return
        with self._lock:
            if len(self._pending_roots) < 4 * MAX_PENDING_ROOTS:  # the loop drains them at its next step
                self._pending_roots.append((version, msg.payload))
        self._wake.set()

    def _on_inbox(self, msg: Message) -> None:
        if self.transfers.on_payload(msg.topic, msg.payload):  # chunks; anything else is dropped there
            self._wake.set()  # a window slot is free: the loop sends the next request now, not at its tick

    def _on_ctl_state(self, msg: Message) -> None:
        try:
            state: ControllerState = messages.decode("ctl_state", msg.payload)
        except messages.ProtocolError:
            return
        if state.online != self._controller_online:
            log.info("the controller is %s", "online" if state.online else "offline")
        self._controller_online = state.online

    def _on_command(self, msg: Message) -> None:
        result = self.gate.offer_command(msg.payload, _utcnow())
        if result.outcome == "current":
            log.info("command seq %s delivered again; not running it twice", result.command.seq if result.command else "?")
            return
        if result.outcome == "rejected":
            assert result.rejection is not None
            self._rejected("command", result.rejection)
            reply = Reply(ok=False, error=ErrorInfo(type="rejected", reason=result.rejection.reason.value,
                                                    message=str(result.rejection)[:2000]), at=_utcnow())
        else:
            assert result.command is not None
            log.info("command %s (seq %d)", result.command.name, result.command.seq)
            reply = run_command(result.command, self._command_hooks())
        try:
            self.outbox.append(topics.reply(self.device_id), messages.encode(reply), qos=1)
        except Exception as exc:
            log.error("could not queue the reply to a command: %s", exc)

    # -- the loop (main thread) ---------------------------------------------------------

    def _serve(self) -> None:
        next_telemetry = time.monotonic() + self.telemetry_interval
        next_replan = time.monotonic() + REPLAN_S
        watchdog = sdnotify.watchdog_interval()
        next_watchdog = time.monotonic()
        # an install step may outlast WatchdogSec on a slow board: pinged while it runs, up to a bound
        busy = sdnotify.BusyWatchdog(watchdog, max_busy_s=STEP_WATCHDOG_MAX_S)
        try:
            self._serve_loop(watchdog, next_watchdog, next_telemetry, next_replan, busy)
        finally:
            busy.close()

    def _serve_loop(self, watchdog: Optional[float], next_watchdog: float, next_telemetry: float,
                    next_replan: float, busy: sdnotify.BusyWatchdog) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if watchdog is not None and now >= next_watchdog:
                sdnotify.notify(watchdog=True)
                next_watchdog = now + watchdog
            if now >= next_replan:
                self._reconcile_due = True
                next_replan = now + REPLAN_S
            if self._reload:
                self._reload = False
                self._reload_config()
            try:
                with busy.busy():
                    self._step()
            except Exception:  # a bug or a disk error: log, keep serving, try again next tick
                log.exception("agent loop step failed")
                self._stop.wait(1.0)
            now = time.monotonic()
            if now >= next_telemetry:
                self._telemetry()
                next_telemetry = now + self.telemetry_interval
            tick = 0.25 if self.transfers.running() else 1.0
            waits = [tick, next_telemetry - now]
            if watchdog is not None:
                waits.append(next_watchdog - now)
            retry = self.transfers.retry_due()
            if retry is not None:
                waits.append(retry + 0.01)
            self._wake.wait(max(0.0, min(waits)))
            self._wake.clear()

    def _step(self) -> None:
        with self._lock:
            roots, self._pending_roots = self._pending_roots, []
            data, self._pending_desired = self._pending_desired, None
        # Roots before the desired state: one signed by keys only a new root names must find
        # that root already trusted.
        for i, (version, root) in enumerate(roots):
            try:
                self._offer_root(version, root, retry_desired=data is None)
            except OSError:  # the trust store could not be written: nothing moved; try again
                with self._lock:
                    self._pending_roots[:0] = roots[i:]
                    if data is not None and self._pending_desired is None:
                        self._pending_desired = data
                raise
        if data is not None:
            self._offer_desired(data)
        self.transfers.pump()
        if self.executor.transfer_finished():
            self._reconcile_due = True
        if self.transfers.retry_due() == 0.0:
            self._reconcile_due = True
        if self._reconcile_due:
            self._reconcile_due = False
            self._reconcile()
        self._publish_state()
        for fb in self.remote.take_events():
            self.reporter.event("fallback", model=fb.model, reason=fb.reason, detail=fb.detail,
                                figures={"executor": fb.executor, "fallbacks": fb.fallbacks,
                                         **({"suppressed": fb.suppressed} if fb.suppressed else {})})
        overdue = self._rejections.overdue(time.monotonic())
        if overdue:  # the flood ended inside its minute: say how much went unreported
            self.reporter.event("rejected", reason=self._rejections.last_reason,
                                detail=f"{overdue} more documents were rejected (events rate-limited)",
                                figures={"suppressed": overdue})

    def _offer_desired(self, data: bytes) -> None:
        self._handle_desired(self.gate.offer_desired(data, _utcnow()))

    def _handle_desired(self, result: DesiredOutcome) -> None:
        if result.outcome == "rejected":
            assert result.rejection is not None
            self._rejected("desired", result.rejection)
        elif result.outcome == "accepted":
            assert result.desired is not None
            log.info("accepted desired generation %d (%d models)", result.desired.generation, len(result.desired.models))
            self.desired = result.desired
            self._reconcile_due = True

    def _offer_root(self, version: int, data: bytes, *, retry_desired: bool = True) -> None:
        result = self.gate.offer_root(data, topic_version=version)
        for rejection in result.rejections:
            self._rejected("root", rejection)
        if result.waiting and not result.rotated and not result.rejections:
            log.info("holding root(s) v%s until v%d arrives", ", v".join(map(str, result.waiting)),
                     self.gate.trusted.root.version + 1)
        previous = result.from_version
        for new in result.rotated:
            log.info("rotated the root of trust: v%d -> v%d", previous, new)
            self.reporter.event("root_rotated", detail=f"root of trust v{previous} -> v{new}",
                                figures={"from_version": previous, "to_version": new})
            previous = new
        if result.rotated and retry_desired:
            # A desired state refused under the old root (keys it did not name, or an expired
            # root) may pass now; the controller also re-publishes, but must not be needed.
            # (When a new desired state is waiting in this step, that one is offered instead.)
            retried = self.gate.retry_refused_desired(_utcnow())
            if retried is not None:
                self._handle_desired(retried)

    def _rejected(self, kind: str, rejection: Any) -> None:
        log.warning("rejected a %s document: %s: %s", kind, rejection.reason.value, rejection)
        ok, carried = self._rejections.allow(time.monotonic(), rejection.reason.value)
        if ok:
            figures: dict[str, Any] = {"kind": kind}
            if carried:
                figures["suppressed"] = carried
            self.reporter.event("rejected", reason=rejection.reason.value, detail=str(rejection), figures=figures)

    def _reconcile(self) -> None:
        plan = self.executor.plan(self.desired)
        if not plan.steps and plan.generation is None:
            return
        if self.executor.run(plan):
            # Whatever is left (a failed step) waits for the next trigger -- a new desired
            # state, a finished transfer, an expired back-off or the periodic re-plan --
            # rather than being retried on every tick.
            plan = self.executor.plan(self.desired)
            memory.trim()
        waiting = [s for s in plan.holds if isinstance(s, Noop)]
        if not plan.actions and not waiting and plan.generation != self._reconciled_generation:
            self._reconciled_generation = plan.generation
            self.reporter.event("reconciled", generation=plan.generation,
                                figures={"models": len(self.desired.models) if self.desired else 0,
                                         "refused": sum(1 for s in plan.holds if isinstance(s, Refuse))})

    def _telemetry(self) -> None:
        depth, dropped = self.outbox.depth, self.outbox.dropped
        try:
            sample = self.collector.collect(0, broker_rtt_ms=self._broker_rtt_ms, outbox_depth=depth,
                                            outbox_dropped=dropped, peers_rtt_ms=self.remote.rtt_ms())
        except Exception:
            log.exception("telemetry collection failed")
            return
        self.reporter.telemetry(lambda seq: sample.model_copy(update={"seq": seq}))

    # -- publishing ---------------------------------------------------------------------

    def _capabilities(self) -> Capabilities:
        try:
            disk = shutil.disk_usage(self.data_dir).total
        except OSError:
            disk = None
        return Capabilities(cores=self.config.core_count(detect_cores), memory_bytes=psutil.virtual_memory().total,
                            tier=self.config.tier, backends=[self.runtime.engine.backend.name],
                            accelerator=self.config.accelerator_label(detect_accelerator),
                            disk_bytes=disk, arch=platform.machine()[:32] or None)

    def _publish_state(self, *, force: bool = False) -> None:
        """Publish the retained state if what it reports changed (or ``force``, a birth)."""
        client = self.mqtt
        if client is None or not client.is_connected or not (force or self._born.is_set()):
            return  # the loop waits for this connection's birth (subscriptions first, then state)
        key = (self.runtime.store.revision(), self.routes.all(), self._reconciled_generation)
        if not force and key == self._published_revision:
            return
        state = DeviceState(
            online=True, boot_id=self.boot_id, bd_seq=self.bd_seq, at=_utcnow(), runtime_version=__version__,
            capabilities=self._capabilities(), models=self.executor.report(),
            generation=self._reconciled_generation, groups=list(self.config.groups),
        )
        try:
            client.publish(topics.state(self.device_id), messages.encode(state), qos=1, retain=True)
        except MqttError as exc:
            log.warning("could not publish the device state: %s", exc)
            return
        self._published_revision = key
        sdnotify.notify(status=self._status())

    def _desired_spec(self, name: str) -> Optional[messages.ModelSpec]:
        desired = self.desired
        return desired.models.get(name) if desired is not None else None

    def _publish_nowait(self, topic: str, payload: bytes) -> None:
        """QoS 1 without waiting for the PUBACK (inference requests and replies: the caller's
        deadline covers a lost one). Raises MqttError when there is no session."""
        if self.mqtt is None:
            raise ConnectionError("no MQTT client yet")
        self.mqtt.publish(topic, payload, qos=1, wait=False)

    def _publish_request(self, topic: str, payload: bytes) -> None:
        if self.mqtt is None:
            raise ConnectionError("no MQTT client yet")
        self.mqtt.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)

    def _publish_item(self, item: Item, timeout: float) -> None:
        assert self.mqtt is not None
        self.mqtt.publish(item.topic, item.payload, qos=item.qos, retain=item.retain, timeout=timeout)

    def _drain(self) -> None:
        """Publish the outbox while connected (a thread of its own, so a slow broker never
        holds the loop)."""
        def publish(item: Item) -> None:
            started = time.perf_counter()
            self._publish_item(item, PUBLISH_TIMEOUT_S)
            if item.qos > 0:
                self._broker_rtt_ms = (time.perf_counter() - started) * 1000.0

        while not self._stop.is_set():
            if self.mqtt is None or not self.mqtt.wait_connected(1.0):
                continue
            try:
                self.outbox.drain(publish, max_per_s=self.config.limits.outbox_drain_per_s, stop=self._stop)
            except (MqttError, EdgeRuntimeError) as exc:
                log.debug("outbox drain paused: %s", exc)
                self._stop.wait(0.2)
            except Exception:
                log.exception("outbox drain failed")
                self._stop.wait(1.0)

    def _status(self) -> str:
        connected = self.mqtt is not None and self.mqtt.is_connected
        models = len(self.runtime.engine.names()) if hasattr(self, "runtime") else 0
        gen = self.desired.generation if getattr(self, "desired", None) else None
        return (f"serving {models} model(s); broker {'connected' if connected else 'disconnected'}; "
                f"desired generation {gen if gen is not None else 'none'}")

    # -- commands -----------------------------------------------------------------------

    def _command_hooks(self) -> CommandHooks:
        return CommandHooks(
            cancel=lambda sha, model: [j.sha256 for j in self.transfers.cancel(sha256=sha, model=model)],
            diagnostics=self._diagnostics,
            set_config=self._set_config,
            restart=lambda reason: self.stop(RESTART_EXIT_CODE),
            recent_log=self.recent_log.tail,
        )

    def _diagnostics(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "boot_id": self.boot_id, "runtime_version": __version__,
            "desired_generation": self.desired.generation if self.desired else None,
            "reconciled_generation": self._reconciled_generation,
            "models": {k: v.model_dump(mode="json") for k, v in self.executor.report().items()},
            "transfers": [{"model": j.name, "version": j.version, "sha256": j.sha256, "bytes": j.transfer.bytes_done,
                           "size": j.size, "state": j.transfer.state.value} for j in self.transfers.jobs()],
            "outbox": {"depth": self.outbox.depth, "dropped": self.outbox.dropped},
            "controller_online": self._controller_online, "telemetry_interval_s": self.telemetry_interval,
        }

    def _set_config(self, args: SetConfigArgs) -> dict[str, Any]:
        applied: dict[str, Any] = {}
        if args.telemetry_interval_s is not None:
            self.telemetry_interval = args.telemetry_interval_s
            self.collector.interval_s = args.telemetry_interval_s
            applied["telemetry_interval_s"] = args.telemetry_interval_s
            self._wake.set()
        if args.log_level is not None:
            logging.getLogger().setLevel(args.log_level.upper())
            applied["log_level"] = args.log_level
        return applied

    def _reload_config(self) -> None:
        if self.config_path is None:
            return
        sdnotify.notify(reloading=True)
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config: %s", exc)
            sdnotify.notify(ready=True)
            return
        old = self.config
        needs_restart = [f for f in ("device_id", "groups", "tier", "data_dir", "trust_root", "broker", "api", "store",
                                     "remote", "accelerator", "cores")
                         if getattr(new, f) != getattr(old, f)]
        if needs_restart:
            log.warning("SIGHUP: %s changed; restart the service to apply", ", ".join(needs_restart))
        self.telemetry_interval = new.telemetry_interval_s
        self.collector.interval_s = new.telemetry_interval_s
        self.transfers.settings = self._transfer_settings(new)
        self.config = old.model_copy(update={"telemetry_interval_s": new.telemetry_interval_s, "limits": new.limits})
        self.runtime.reload()
        log.info("SIGHUP: config reloaded")
        sdnotify.notify(ready=True, status=self._status())

    # -- stopping -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + STOP_BUDGET_S - 1.0
        sdnotify.notify(stopping=True, status="stopping")
        if hasattr(self, "runtime"):
            drained = self.runtime.stop(timeout=max(1.0, deadline - time.monotonic() - FLUSH_ON_STOP_S - 1.0))
            if not drained:
                log.warning("stopped with API calls still running")
        if hasattr(self, "node"):
            self.node.stop(timeout=max(0.5, min(3.0, deadline - time.monotonic() - FLUSH_ON_STOP_S)))
        if hasattr(self, "transfers"):
            self.transfers.close()
        self._stop.set()
        client = self.mqtt
        if client is not None:
            if client.is_connected:
                self._flush(min(FLUSH_ON_STOP_S, max(0.0, deadline - time.monotonic())))
                death = DeviceState(online=False, boot_id=self.boot_id, bd_seq=self.bd_seq, at=_utcnow())
                try:
                    client.publish(topics.state(self.device_id), messages.encode(death), qos=1, retain=True,
                                   timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                except MqttError as exc:
                    log.warning("could not publish the offline state (the Will says it): %s", exc)
            client.disconnect(timeout=2.0)
        if hasattr(self, "_drainer"):
            self._drainer.join(2.0)
        if hasattr(self, "outbox"):
            self.outbox.close()
        logging.getLogger().removeHandler(self.recent_log)

    def _flush(self, seconds: float) -> None:
        """Publish what the outbox holds for up to ``seconds`` (events of the last moments)."""
        if seconds <= 0 or self.mqtt is None:
            return
        stop = threading.Event()
        timer = threading.Timer(seconds, stop.set)
        timer.start()
        try:
            self.outbox.drain(lambda item: self._publish_item(item, max(0.2, seconds)),
                              max_per_s=1000.0, stop=stop, until_empty=True)
        except (MqttError, EdgeRuntimeError) as exc:
            log.info("outbox flush stopped: %s (the rest is sent after the restart)", exc)
        finally:
            timer.cancel()


def detect_cores() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one (so
    ``taskset`` and systemd's ``CPUAffinity=`` count), else every CPU. A CPU quota (cgroup
    ``cpu.max``) is not seen here: the ``cores`` setting says it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def detect_accelerator() -> Optional[str]:
    """A label for the inference accelerator this board has, when one is recognised: a Coral
    Edge TPU (``/dev/apex_0``, PCIe), a Jetson's GPU (``/etc/nv_tegra_release``); else None."""
    if os.path.exists("/dev/apex_0"):
        return "edgetpu"
    if os.path.exists("/etc/nv_tegra_release"):
        return "jetson-gpu"
    return None


def run(config_path: Path) -> int:
    """``edge-runtime run --config PATH``.

    Raises:
        ConfigError: the config is invalid (the message names the field).
        NotProvisionedError: no trust root.
    """
    config = load_config(config_path)
    return Agent(config, config_path=config_path).run()


__all__ = ["Agent", "NotProvisionedError", "run"]
