"""``fleetctl serve``: the controller daemon — thin glue between MQTT, the store and the parts.

    fleetctl serve --broker URL --db URL --keys DIR [--data DIR] [--shared [GROUP]]
                   [--metrics-port N] [--instance ID] [--username U --password-file F]
                   [--tls-ca CA.pem --tls-cert ctl.pem --tls-key ctl.key]   (mqtts:// brokers)

Over mutual TLS (``mqtts://`` and a ``controller`` certificate of ``fleetctl ca issue``)
the broker takes the certificate's name as the identity. Mosquitto (``use_username_as_clientid``)
also makes it the client id, so the persistent session is the certificate's, not
``ctl-INSTANCE``: give each replica its own certificate.

What runs where:

    MQTT dispatcher thread   device reports -> the ingest queue; chunk requests ->
                             ``ArtifactService``
    ingest thread            ``IngestWriter``: the queued reports, a batch per transaction
                             (idempotent store writes); each acknowledged to the broker
                             (PUBACK) only after its commit
    api pool (4 threads)     console requests -> ``ApiServer`` -> reply (``cmd`` waits for a
                             device's reply, which comes through the dispatcher)
    ticker thread            rollouts (``RolloutDriver.tick``) and migrations
                             (``MigrationDriver.tick``) every ``--tick`` seconds and at
                             once when a device report may move one; with
                             ``--rebalance-every D`` the placement planner over the fleet
                             snapshot every D, a migration started per move; desired documents
                             re-signed before they expire; raw telemetry expired; the key
                             directory's ``root.json`` watched for a rotation
    connect hook             subscribe, retained ``ctl/state`` online; then (on the ticker)
                             every root of trust >= v2 and every desired state re-published
                             (brokers forget retained messages)

Key rotation (``fleetctl keys rotate --dir KEYS`` while this runs): within a tick the ticker
sees ``root.json`` change (a ``stat`` per tick; parsed only when it changed), loads the new
deploy and command keys (``DesiredPublisher.reload``, ``CommandSender.reload``), publishes
every root version >= 2 retained on ``fleet/v1/trust/root/{version}`` -- *first*, each
acknowledged by the broker -- and then every desired state, re-signed with the new deploy
keys. Devices receive the root before the documents that need it; one that refuses a
document anyway (it had not rotated yet) re-verifies it itself after rotating. If the new
keys cannot be loaded (an offline key, a passphrase that does not open them) nothing is
announced, the old keys stay in use, and the log says so every 30 s until it is fixed.

Acknowledged means stored. Device reports are PUBACKed after the commit that stored them
(``MqttConfig.manual_ack``). With a stable ``--instance`` and no ``--shared`` the session
is persistent (client id ``ctl-INSTANCE``, clean session off): what arrives while the
controller is down or was delivered but not yet committed when it died is sent again by
the broker when it returns. Shared subscriptions stay clean sessions: a broker would
otherwise keep handing a dead replica its share of the messages.

``ctl/state`` is retained with a Last Will of ``online: false`` (Sparkplug primary host
STATE); a clean stop publishes it too. With ``--shared`` the device topics, chunk requests
and console requests are subscribed through ``$share/GROUP/`` so replicas split them; the
store's idempotent writes and compare-and-set rollouts make the split safe. Device state
is never shared: every replica keeps the whole online picture.

Exit codes: 0 clean stop (SIGTERM/SIGINT), 1 a fatal error at start (bad keys, database
unreachable: the message says what to fix), 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from controller.api import ApiServer
from controller.artifact_service import ArtifactService
from controller.artifacts import ArtifactServer
from controller.blobs import BlobCache
from controller.commands import CommandSender
from controller.console import duration
from controller.desired import DesiredPublisher
from controller.ingest import Ingest, Ingested, IngestWriter
from controller.fleet_snapshot import DEFAULT_SLO_MS, Rebalancer
from controller.keys import KeyDir, KeyDirError
from controller.migrations import MigrationDriver
from controller.roots import RootWatcher
from controller.rollouts import RolloutDriver
from controller.store import Store
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt import Message, MqttClient, MqttConfig, Will
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ControllerState

__all__ = ["Controller", "ServeConfig", "add_cli"]

log = logging.getLogger("controller")

DEFAULT_SHARE_GROUP = "edgefleet-ctl"


@dataclass(frozen=True)
class ServeConfig:
    broker: str
    db: str
    keys: Path
    data: Path
    instance: str
    share_group: Optional[str] = None
    metrics_port: Optional[int] = None
    metrics_addr: str = "127.0.0.1"
    username: Optional[str] = None
    password: Optional[str] = None
    passphrase: Optional[str] = None
    tick_s: float = 1.0
    desired_valid_for: timedelta = timedelta(days=7)
    retention_s: float = 7 * 86400
    api_threads: int = 4
    persistent_session: bool = False  # see the module docstring: needs a stable instance, no share group
    ca_file: Optional[str] = None  # mqtts://: the fleet CA (checks the broker) ...
    cert_file: Optional[str] = None  # ... and this controller's certificate and key
    key_file: Optional[str] = None
    rebalance_every_s: Optional[float] = None  # None: plan only when asked (fleetctl plan)
    slo_ms: float = DEFAULT_SLO_MS  # the p95 target of a model without its own
    slo_by_model: tuple[tuple[str, float], ...] = ()


class Controller:
    """One controller replica. ``start()`` connects in the background and returns;
    ``stop()`` publishes offline STATE and shuts everything down."""

    def __init__(self, cfg: ServeConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.instance = cfg.instance
        cfg.data.mkdir(parents=True, exist_ok=True)
        self.keydir = KeyDir(cfg.keys)
        self.keydir.signing_keys("deploy", passphrase=cfg.passphrase)  # fail at start, not at the first deploy
        self.keydir.signing_keys("command", passphrase=cfg.passphrase)
        self.store = Store.open(cfg.db)
        self.client = MqttClient(MqttConfig(
            url=cfg.broker, client_id=f"ctl-{cfg.instance}", username=cfg.username, password=cfg.password,
            ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file,
            will=Will(topic=topics.CTL_STATE, payload=self._ctl_state(False), qos=1, retain=True),
            keepalive=15, reconnect_max_delay=10.0, manual_ack=True,
            clean_start=not (cfg.persistent_session and cfg.share_group is None),
        ))
        self.ingest = Ingest(self.store, clock=clock)
        self.writer: IngestWriter[Message] = IngestWriter(self.ingest, self._after_ingest)
        self.desired = DesiredPublisher(self.store, self.keydir, self._publish_retained, clock=clock,
                                        valid_for=cfg.desired_valid_for, passphrase=cfg.passphrase)
        self.commands = CommandSender(self.store, self.keydir, self._publish, clock=clock, passphrase=cfg.passphrase)
        self.driver = RolloutDriver(self.store, self.desired.publish_many, clock=clock)
        self.migrations = MigrationDriver(self.store, self.desired.publish_many, clock=clock)
        self.rebalancer = Rebalancer(self.store, self.migrations, clock, slo_ms=cfg.slo_ms,
                                     slo_by_model=dict(cfg.slo_by_model))
        self.api = ApiServer(self.store, driver=self.driver, desired=self.desired, commands=self.commands,
                             keydir=self.keydir, clock=clock, instance=cfg.instance, passphrase=cfg.passphrase,
                             migrations=self.migrations, rebalancer=self.rebalancer)
        self.blobs = BlobCache(self.store, cfg.data / "artifacts")
        self.artifacts = ArtifactService(self.client, ArtifactServer(self.blobs), share_group=cfg.share_group)
        self._pool = ThreadPoolExecutor(max_workers=cfg.api_threads, thread_name_prefix="ctl-api")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._stop_metrics: Optional[Callable[[], None]] = None
        self._republish_pending = threading.Event()
        self.roots = RootWatcher(self.keydir)
        self._keys_version = self.roots.poll()  # the root whose keys sign (loaded just above)
        self._root_retry_at = 0.0
        self.roots_published = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve: handlers, metrics, ticker, then connect (in the background, forever).

        Raises:
            OSError: the metrics port cannot be bound.
        """
        subs = topics.controller_subscriptions(self.cfg.share_group)
        for topic_filter, _qos in subs:
            if topic_filter.endswith(topics.API_REQUEST):
                self.client.add_handler(topic_filter, self._on_api)
            elif "artifacts" not in topic_filter:
                self.client.add_handler(topic_filter, self._on_report, acks=True)
        self._subs = [(f, q) for f, q in subs if "artifacts" not in f]  # the artifact service subscribes its own
        self.client.add_connect_hook(self._on_connect)
        self.artifacts.start()
        if self.cfg.metrics_port is not None:
            from controller.metrics import serve_metrics

            self._stop_metrics = serve_metrics(self, self.cfg.metrics_port, addr=self.cfg.metrics_addr)
        self._ticker = threading.Thread(target=self._tick_loop, name="ctl-ticker", daemon=True)
        self._ticker.start()
        self.writer.start()
        self.client.start()

    def connected(self) -> bool:
        return self.client.is_connected

    def stop(self) -> None:
        """Offline STATE, disconnect, stop threads, close the store. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        if self.client.is_connected:
            try:
                self.client.publish(topics.CTL_STATE, self._ctl_state(False), qos=1, retain=True, timeout=5)
            except Exception as exc:  # noqa: BLE001 - the Will covers us
                log.warning("offline STATE not published: %s", exc)
        self.artifacts.stop()
        self.writer.stop()  # stores (and acknowledges) what was delivered before the disconnect
        self.client.disconnect()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ticker is not None:
            self._ticker.join(10)
        if self._stop_metrics is not None:
            self._stop_metrics()
        self.store.close()

    # -- MQTT -----------------------------------------------------------------------------

    def _ctl_state(self, online: bool) -> bytes:
        return messages.encode(ControllerState(online=online, at=datetime.now(timezone.utc), instance=self.instance))

    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True)

    def _on_connect(self, _session_present: bool) -> None:
        try:
            self.client.subscribe(self._subs)
            self.client.publish(topics.CTL_STATE, self._ctl_state(True), qos=1, retain=True)
        except Exception as exc:  # noqa: BLE001 - the client reconnects and calls us again
            log.error("after connecting: subscribe / STATE failed: %s", exc)
            return
        log.info("connected to %s as ctl-%s%s", self.cfg.broker, self.instance,
                 f" (shared group {self.cfg.share_group})" if self.cfg.share_group else "")
        self._republish_pending.set()  # the ticker does it: it may be thousands of documents
        self._wake.set()

    def _on_report(self, msg: Message) -> None:
        self.writer.put(msg, msg.topic, msg.payload)

    def _after_ingest(self, msg: Message, done: Optional[Ingested]) -> None:
        """On the ingest thread, after the commit: acknowledge, then what a new report moves."""
        self.client.ack(msg)
        if done is None or not done.new:
            return
        if done.kind == "reply":
            self.commands.on_reply()
        elif done.kind == "event":
            self._wake.set()
        elif done.kind == "state":
            self._wake.set()
            state: messages.DeviceState = done.message
            if state.online:
                record = self.store.get_desired(done.device_id)
                if record is not None and (state.generation or 0) < record.generation:
                    self._pool.submit(self.desired.publish, done.device_id)

    def _on_api(self, msg: Message) -> None:
        if self._stopping.is_set():
            return
        self._pool.submit(self._answer, msg.payload)

    def _answer(self, payload: bytes) -> None:
        answer = self.api.handle(payload)
        if answer is None:
            return
        topic, body = answer
        try:
            self.client.publish(topic, body, qos=1)
        except Exception as exc:  # noqa: BLE001 - the console times out and says so
            log.warning("console answer to %s not published: %s", topic, exc)

    # -- the ticker -------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        last_refresh = 0.0
        last_expire = 0.0
        last_rebalance = self.clock()  # the first round one period after start: telemetry first
        while not self._stopping.is_set():
            self._wake.wait(self.cfg.tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._watch_root()
                if self._republish_pending.is_set() and self.client.is_connected:
                    self._republish_pending.clear()
                    self._republish()
                self.driver.tick()
                self.migrations.tick()
                now = self.clock()
                every = self.cfg.rebalance_every_s
                if every is not None and now - last_rebalance >= every:
                    last_rebalance = now
                    try:
                        self.rebalancer.tick()
                    except Exception:  # noqa: BLE001 - a bad snapshot must not stop rollouts
                        log.exception("rebalance failed")
                if now - last_refresh >= 60:
                    last_refresh = now
                    self.desired.refresh_expiring()
                if now - last_expire >= 3600:
                    last_expire = now
                    self.store.expire_telemetry(before=now - self.cfg.retention_s)
            except Exception:  # noqa: BLE001 - keep ticking; the next tick retries
                log.exception("controller tick failed")


    def _watch_root(self) -> None:
        """A new ``root.json`` (``fleetctl keys rotate``): new keys, then roots and documents out."""
        if time.monotonic() < self._root_retry_at:
            return
        version = self.roots.poll()
        if version is None or version == self._keys_version:
            return
        try:
            resign = self.desired.reload()
            self.commands.reload()
        except KeyDirError as exc:
            self.roots.forget()
            self._root_retry_at = time.monotonic() + 30.0
            log.error("root.json is now v%d but its signing keys cannot be loaded (%s); root v%d is not sent to "
                      "devices and documents stay signed with the v%s keys until this is fixed", version, exc,
                      version, self._keys_version)
            return
        if self._keys_version is not None and version < self._keys_version:
            log.warning("root.json went back from v%d to v%d (a restored key directory?): devices that hold v%d "
                        "refuse documents signed only by keys it no longer names", self._keys_version, version,
                        self._keys_version)
        log.info("root of trust v%s -> v%d: signing keys reloaded%s; publishing the roots, then every desired "
                 "state", self._keys_version, version, " (new deploy keys: every desired state is re-signed)"
                 if resign else "")
        self._keys_version = version
        self._republish_pending.set()  # below, on this tick when connected, else after the connect

    def _republish(self) -> None:
        """Every root >= v2, then every desired state (re-signed where its keys left the role).

        The roots go first and each waits for the broker's PUBACK, so a device gets a root
        before the documents signed by the keys it introduces."""
        version = self.roots.version or self._keys_version or 1
        try:
            for v, data in self.roots.envelopes(version):
                self._publish_retained(topics.trust_root(v), data)
                self.roots_published += 1
        except Exception as exc:  # noqa: BLE001 - MQTT: the next connect (or tick) does it all again
            log.warning("roots of trust not published (%s); documents held back until they are", exc)
            self._republish_pending.set()
            return
        n = self.desired.republish_all()
        if version >= 2:
            log.info("re-published roots of trust v2..v%d and %d desired documents", version, n)
        else:
            log.info("re-published %d desired documents", n)


# -- the command line ------------------------------------------------------------------------


def _read_secret(path: Optional[str], what: str) -> Optional[str]:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise EdgeRuntimeError(f"cannot read the {what} file {path}: {exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    instance = args.instance or f"{socket.gethostname().split('.')[0][:40]}-{uuid.uuid4().hex[:6]}"
    topics.check_id(instance, "instance")
    share = None
    if args.shared is not None:
        share = args.shared or DEFAULT_SHARE_GROUP
    passphrase = _read_secret(args.passphrase_file, "passphrase")
    if passphrase is None and args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
    cfg = ServeConfig(
        broker=args.broker, db=args.db, keys=args.keys, data=args.data, instance=instance, share_group=share,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, username=args.username,
        password=_read_secret(args.password_file, "password"), passphrase=passphrase, tick_s=args.tick,
        desired_valid_for=timedelta(seconds=args.desired_validity), retention_s=args.retention,
        persistent_session=args.instance is not None,
        ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
        rebalance_every_s=args.rebalance_every, slo_ms=args.slo_ms, slo_by_model=tuple(args.slo or ()),
    )
    try:  # the TLS options against the URL (mqtts://, certificate and key together), before anything starts
        MqttConfig(url=cfg.broker, ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file)
    except ValueError as exc:
        raise EdgeRuntimeError(f"--broker/--tls-*: {exc}") from None
    controller = Controller(cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.start()
    log.info("fleetctl serve %s: db %s, keys %s, data %s%s", instance, _redact(args.db), args.keys, args.data,
             f", metrics on {args.metrics_addr}:{args.metrics_port}" if args.metrics_port else "")
    stop.wait()
    log.info("stopping")
    controller.stop()
    return 0


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def add_cli(sub: Any, models: Any) -> None:
    p = sub.add_parser("serve", help="run the controller daemon")
    p.add_argument("--broker", default=os.environ.get("FLEETCTL_BROKER", "mqtt://127.0.0.1:1883"), metavar="URL")
    p.add_argument("--db", default=None, metavar="URL",
                   help="sqlite:///PATH (default: sqlite:///DATA/controller.db) or postgresql+psycopg://...")
    p.add_argument("--keys", required=True, type=Path, metavar="DIR", help="the key directory of `fleetctl keys init`")
    p.add_argument("--data", type=Path, default=Path("controller-data"), metavar="DIR",
                   help="local files: the artifact cache and the default SQLite database")
    p.add_argument("--shared", nargs="?", const="", default=None, metavar="GROUP",
                   help=f"split device topics with other replicas via $share/GROUP/ (default {DEFAULT_SHARE_GROUP})")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N", help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR")
    p.add_argument("--instance", default=None, metavar="ID", help="this replica's id (default: host name + random); a stable id also makes the broker keep "
                        "its session: reports sent while it is down are delivered when it returns")
    p.add_argument("--username", default=os.environ.get("FLEETCTL_USERNAME"), metavar="USER")
    p.add_argument("--password-file", default=os.environ.get("FLEETCTL_PASSWORD_FILE"), metavar="FILE")
    p.add_argument("--tls-ca", default=os.environ.get("FLEETCTL_TLS_CA"), metavar="CA.pem",
                   help="mqtts://: the fleet CA that signed the broker's certificate")
    p.add_argument("--tls-cert", default=os.environ.get("FLEETCTL_TLS_CERT"), metavar="PEM",
                   help="mqtts://: this controller's client certificate (fleetctl ca issue NAME --role controller)")
    p.add_argument("--tls-key", default=os.environ.get("FLEETCTL_TLS_KEY"), metavar="KEY", help="its private key")
    p.add_argument("--passphrase-file", default=None, metavar="FILE", help="opens encrypted signing keys")
    p.add_argument("--passphrase-env", default=None, metavar="VAR")
    p.add_argument("--tick", type=duration, default=1.0, metavar="S", help="rollout tick (default 1s)")
    p.add_argument("--desired-validity", type=duration, default=7 * 86400.0, metavar="D",
                   help="how long a signed desired state is valid (default 7d; re-signed at half)")
    p.add_argument("--retention", type=duration, default=7 * 86400.0, metavar="D",
                   help="raw telemetry and events kept this long (default 7d; hourly rollups stay)")
    p.add_argument("--rebalance-every", type=_positive_duration, default=None, metavar="D",
                   help="run the placement planner every D (e.g. 60s) and migrate per its moves "
                        "(default: only on fleetctl plan --apply)")
    p.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS, metavar="MS",
                   help=f"p95 latency target of a model without its own --slo (default {DEFAULT_SLO_MS:g})")
    p.add_argument("--slo", type=_model_slo, action="append", metavar="MODEL=MS",
                   help="a model's own p95 latency target (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(fn=_serve_entry)


def _positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return value


def _model_slo(text: str) -> tuple[str, float]:
    model, sep, ms = text.partition("=")
    try:
        value = float(ms)
    except ValueError:
        value = -1.0
    if not sep or not topics.valid_id(model) or not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected MODEL=MS with MS > 0 (e.g. kws=50), got {text!r}")
    return model, value


def _serve_entry(args: argparse.Namespace) -> int:
    if args.db is None:
        args.data.mkdir(parents=True, exist_ok=True)
        args.db = f"sqlite:///{(args.data / 'controller.db').resolve()}"
    return cmd_serve(args)

