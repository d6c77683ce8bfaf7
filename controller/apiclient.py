"""The console's side of the controller API: MQTT request/response, typed errors, uploads.

``fleetctl`` (``console.py``) talks to the controller only through this module, and to
the broker only through ``edge_runtime.mqtt``. One request is a ``messages.ApiRequest``
published (QoS 1) on ``topics.API_REQUEST`` with ``reply_to = topics.api_reply(client_id)``;
the answer is a ``messages.ApiResponse`` with the same ``request_id`` on that topic.
Parameters are validated with ``apispec.PARAMS[method]`` before anything is sent, so the
console and the server (which validates with the same models) cannot drift.

    with ApiClient("mqtt://127.0.0.1:1883", timeout=10) as api:
        rows = api.call("devices.list", group="lab")
        release = api.upload(path, "vision", "2", signature, health, progress=cb)
        api.subscribe_live([topics.all_devices("telemetry")], handler)

Over mutual TLS (``mqtts://`` with ``ca_file``, ``cert_file``, ``key_file``: an
``operator`` certificate of ``fleetctl ca issue``) the client id defaults to the
certificate's name (CN): Mosquitto makes it the client id whatever the client sends
(``controller/credentials.py``), so the reply topic must be named after it. Two consoles
with one certificate at once displace each other on Mosquitto.

The client subscribes to its reply topic and to the retained ``topics.CTL_STATE`` right
after connecting (and again after a reconnect: sessions are clean), before any request
goes out, so no answer can arrive before someone listens for it. Answers for other
request ids (late answers to a request that timed out, a duplicate) are dropped.

Errors (all ``EdgeRuntimeError``, so ``fleetctl`` prints ``fleetctl: <message>``):

    EdgeRuntimeError
     ├── InvalidParams (also ValueError)  params do not fit ``apispec.PARAMS[method]``;
     │                                   nothing was sent (caller's fault)
     ├── ApiCallError                    the controller answered with an ``ApiError``:
     │                                   ``.type`` (bad_request, not_found, conflict, ...),
     │                                   ``.message``, ``.reason``
     ├── ControllerUnavailable           no answer within the timeout (is ``fleetctl
     │                                   serve`` running? the message says what the
     │                                   retained ctl/state knows); transient
     └── BrokerUnavailable               the broker is unreachable, refused us or an ACL
                                         refused a subscription (check --broker,
                                         --username, --password-file)
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import ValidationError

from controller import apispec
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt import ConnectFailed, Message, MqttClient, MqttConfig, MqttError, SubscribeRefused
from edge_runtime.protocol import messages, topics

log = logging.getLogger(__name__)

__all__ = [
    "ApiClient", "ApiCallError", "BrokerUnavailable", "ControllerUnavailable", "InvalidParams", "certificate_name",
    "DEFAULT_BROKER", "new_client_id",
]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
UPLOAD_ATTEMPTS = 4  # sends of one part before the upload gives up (the server ignores duplicates)

ProgressFn = Callable[[int, int], None]  # (bytes acknowledged, total bytes)
LiveHandler = Callable[[Message], None]


class InvalidParams(EdgeRuntimeError, ValueError):
    """The params do not fit ``apispec.PARAMS[method]`` (or the method is unknown);
    nothing was sent."""

    code = "bad_request"


class ApiCallError(EdgeRuntimeError):
    """The controller answered ``ok: false``: ``type`` is one of ``messages.API_ERRORS``."""

    code = "api_error"

    def __init__(self, method: str, type: str, message: str, reason: Optional[str] = None) -> None:  # noqa: A002
        super().__init__(f"{method}: {message or type}" + (f" ({reason})" if reason else ""))
        self.method = method
        self.type = type
        self.message = message
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "reason": self.reason, "method": self.method}


class ControllerUnavailable(EdgeRuntimeError):
    """No answer within the timeout. ``.controller`` is the retained ``ControllerState``
    when the broker holds one."""

    code = "controller_unavailable"

    def __init__(self, message: str, *, controller: Optional[messages.ControllerState] = None) -> None:
        super().__init__(message)
        self.controller = controller


class BrokerUnavailable(EdgeRuntimeError):
    code = "broker_unavailable"

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "url": self.url}


def new_client_id() -> str:
    """``fleetctl-<16 hex>``: one reply topic per console process."""
    return f"fleetctl-{secrets.token_hex(8)}"


def certificate_name(path: Union[str, "os.PathLike[str]"]) -> str:
    """The CN of the PEM certificate at ``path`` (a client's identity on a mutual-TLS broker).

    Raises:
        ValueError: unreadable, not a PEM certificate, or not exactly one CN.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the client certificate {path}: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"client certificate {path} has {len(names)} common names, expected one")
    return str(names[0].value)


def validate_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as the JSON the server will validate again (defaults filled in).

    Raises:
        InvalidParams: unknown method, or params that do not fit its model.
    """
    model = apispec.PARAMS.get(method)
    if model is None:
        raise InvalidParams(f"unknown API method {method!r}; expected one of {', '.join(apispec.PARAMS)}")
    try:
        return model.model_validate(params).model_dump(mode="json")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise InvalidParams(f"{method}: {problems}") from None


class ApiClient:
    """A console session with the controller over MQTT; a context manager.

    Raises (``connect``/``__enter__``): BrokerUnavailable.
    Raises (constructor): ValueError: a bad ``client_id`` or ``timeout``.
    """

    def __init__(self, url: str = DEFAULT_BROKER, *, username: Optional[str] = None, password: Optional[str] = None,
                 client_id: Optional[str] = None, timeout: float = 10, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None) -> None:
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self.url = url
        self.username = username
        self.password = password
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        if client_id is None and cert_file:
            client_id = certificate_name(cert_file)
        self.client_id = topics.check_id(client_id or new_client_id(), "client id")
        self.timeout = float(timeout)
        self.reply_topic = topics.api_reply(self.client_id)
        self.controller: Optional[messages.ControllerState] = None  # the retained ctl/state, once seen
        self._lock = threading.Lock()
        self._pending: dict[str, Future[messages.ApiResponse]] = {}
        self._live: list[tuple[str, int]] = []  # filters of subscribe_live, re-subscribed after a reconnect
        self._mqtt: Optional[MqttClient] = None
        self._subscribed = threading.Event()
        self._sub_error: Optional[BaseException] = None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "ApiClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect, subscribe to the reply topic and ctl/state, and return when both are
        acknowledged.

        Raises:
            BrokerUnavailable: bad URL, unreachable, refused, or the subscriptions refused.
        """
        hint = "check --broker, --username and --password-file"
        try:
            cfg = MqttConfig(url=self.url, client_id=self.client_id, username=self.username, password=self.password,
                             ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                             connect_timeout=self.timeout, operation_timeout=self.timeout)
        except ValueError as exc:
            raise BrokerUnavailable(f"invalid broker URL {self.url!r} ({exc}); {hint}", url=self.url) from None
        client = MqttClient(cfg, on_connect=self._on_connect)
        client.add_handler(self.reply_topic, self._on_reply)
        client.add_handler(topics.CTL_STATE, self._on_ctl_state)
        self._mqtt = client  # before connect(): the on_connect hook uses it
        try:
            client.connect(timeout=self.timeout)
        except ConnectFailed as exc:
            self._mqtt = None
            client.disconnect()
            raise BrokerUnavailable(f"cannot connect to the MQTT broker at {self.url}: {exc.reason}; {hint}",
                                    url=self.url) from None
        if not self._subscribed.wait(self.timeout + 1):
            self.close()
            raise BrokerUnavailable(f"the MQTT broker at {self.url} did not acknowledge our subscriptions within "
                                    f"{self.timeout}s; {hint}", url=self.url)
        if self._sub_error is not None:
            err = self._sub_error
            self.close()
            raise BrokerUnavailable(f"the MQTT broker at {self.url} refused a subscription ({err}): does this user "
                                    f"may read {self.reply_topic} and {topics.CTL_STATE}? {hint}", url=self.url)

    def close(self) -> None:
        client, self._mqtt = self._mqtt, None
        if client is not None:
            client.disconnect()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            fut.cancel()

    def _on_connect(self, session_present: bool) -> None:
        """(dispatcher thread) Every (re)connect: subscribe again, the session is clean."""
        client = self._mqtt
        if client is None:  # closed meanwhile
            return
        filters = [(self.reply_topic, 1), (topics.CTL_STATE, 1)]
        with self._lock:
            filters += self._live
        try:
            client.subscribe(filters, timeout=self.timeout)
        except (SubscribeRefused, MqttError) as exc:
            self._sub_error = exc
            log.warning("subscribing after connect failed: %s", exc)
        self._subscribed.set()

    def _client(self) -> MqttClient:
        if self._mqtt is None:
            raise RuntimeError("ApiClient is not connected: use it as a context manager or call connect()")
        return self._mqtt

    # -- dispatcher thread -----------------------------------------------------------

    def _on_reply(self, msg: Message) -> None:
        try:
            resp = messages.decode("api_response", msg.payload)
        except messages.ProtocolError as exc:
            log.warning("dropped an unreadable API response: %s", exc)
            return
        with self._lock:
            fut = self._pending.pop(resp.request_id, None)
        if fut is None:
            log.debug("dropped an API response for request %s nobody waits for", resp.request_id)
            return
        if not fut.done():
            fut.set_result(resp)

    def _on_ctl_state(self, msg: Message) -> None:
        if not msg.payload:  # a cleared retained message
            self.controller = None
            return
        try:
            self.controller = messages.decode("ctl_state", msg.payload)
        except messages.ProtocolError as exc:
            log.warning("unreadable controller state on %s: %s", topics.CTL_STATE, exc)

    # -- requests --------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> Any:
        """Call ``method`` with ``params`` and return its ``result``.

        Raises:
            InvalidParams: the params do not fit ``apispec.PARAMS[method]`` (nothing sent).
            ApiCallError: the controller answered with an error.
            ControllerUnavailable: no answer within the client's timeout.
            BrokerUnavailable: the request could not be published.
        """
        return self.request(method, params)

    def request(self, method: str, params: dict[str, Any], *, timeout: Optional[float] = None) -> Any:
        """``call`` with the params as a dict and an optional timeout of its own (seconds).

        Raises: as ``call``.
        """
        body = validate_params(method, params)
        timeout = self.timeout if timeout is None else float(timeout)
        client = self._client()
        request_id = secrets.token_hex(12)
        req = messages.ApiRequest(request_id=request_id, method=method, params=body, reply_to=self.reply_topic,
                                  deadline_ms=max(1, min(600_000, int(timeout * 1000))))
        payload = messages.encode(req)
        fut: Future[messages.ApiResponse] = Future()
        with self._lock:
            self._pending[request_id] = fut
        deadline = time.monotonic() + timeout
        try:
            try:
                client.publish(topics.API_REQUEST, payload, qos=1, timeout=timeout)
            except MqttError as exc:
                raise BrokerUnavailable(f"could not send {method} through the broker at {self.url}: {exc}",
                                        url=self.url) from None
            try:
                resp = fut.result(max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise self._no_answer(method, timeout) from None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if not resp.ok:
            err = resp.error
            raise ApiCallError(method, err.type, err.message, err.reason)
        return resp.result

    def _no_answer(self, method: str, timeout: float) -> ControllerUnavailable:
        ctl = self.controller
        base = f"no answer from the controller to {method} within {timeout:g}s"
        if ctl is not None and not ctl.online:
            since = f" since {ctl.at.isoformat()}" if ctl.at is not None else ""
            who = f" ({ctl.instance})" if ctl.instance else ""
            return ControllerUnavailable(f"{base}: the controller{who} is offline{since} "
                                         f"(retained {topics.CTL_STATE}); start `fleetctl serve`", controller=ctl)
        return ControllerUnavailable(f"{base}: is `fleetctl serve` running and connected to {self.url}?",
                                     controller=ctl)

    # -- live data straight from the broker ------------------------------------------

    def subscribe_live(self, filters: list[str], handler: LiveHandler, *, qos: int = 0) -> None:
        """Deliver every message on ``filters`` to ``handler(message)`` (on the MQTT
        dispatcher thread, one at a time), e.g. ``[topics.all_devices("telemetry")]``.

        Raises:
            BrokerUnavailable: the broker refused a filter, or did not acknowledge.
            ValueError: an invalid filter.
        """
        client = self._client()
        pairs = [(topics.check_filter(f), qos) for f in filters]
        for f, _ in pairs:
            client.add_handler(f, handler)
        with self._lock:
            self._live += pairs
        try:
            client.subscribe(pairs, timeout=self.timeout)
        except MqttError as exc:
            raise BrokerUnavailable(f"cannot subscribe to {', '.join(filters)} at {self.url}: {exc}; "
                                    f"check --username (the broker's ACL)", url=self.url) from None

    # -- uploads ---------------------------------------------------------------------

    def upload(self, path: Union[str, os.PathLike[str]], name: str, version: str, signature: dict[str, Any],
               health: Optional[dict[str, Any]] = None, *, progress: Optional[ProgressFn] = None,
               part_timeout: Optional[float] = None) -> dict[str, Any]:
        """Upload a model file as release ``name@version``; returns the ReleaseRow.

        ``models.upload_begin`` (size, sha256), then ``models.upload_part`` for each part
        of ``apispec.UPLOAD_PART_BYTES`` (or less, if the server asks), base64 and
        addressed by offset -- a part without an answer within ``part_timeout`` (default:
        the client's timeout) is sent again, up to ``UPLOAD_ATTEMPTS`` times (the server
        treats a duplicate as a no-op) -- then ``models.upload_commit``.
        ``progress(done, total)`` is called after each acknowledged part.

        Raises:
            OSError: the file cannot be read.
            InvalidParams, ApiCallError, ControllerUnavailable, BrokerUnavailable: as ``call``.
        """
        path = Path(path)
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        begun = self.call("models.upload_begin", name=name, version=version, size=size, sha256=digest.hexdigest())
        upload_id = begun["upload_id"]
        part_bytes = int(begun.get("part_bytes") or apispec.UPLOAD_PART_BYTES)
        part_bytes = max(1, min(part_bytes, apispec.UPLOAD_PART_BYTES))
        if progress:
            progress(0, size)
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                data = f.read(part_bytes)
                if not data:
                    raise OSError(f"{path} shrank while it was uploaded (at {offset} of {size} bytes)")
                params = {"upload_id": upload_id, "offset": offset, "data": base64.b64encode(data).decode("ascii")}
                for attempt in range(1, UPLOAD_ATTEMPTS + 1):
                    try:
                        self.request("models.upload_part", params, timeout=part_timeout)
                        break
                    except ControllerUnavailable:
                        if attempt == UPLOAD_ATTEMPTS:
                            raise
                        log.info("no answer for part at %d of upload %s; sending it again", offset, upload_id)
                offset += len(data)
                if progress:
                    progress(offset, size)
        return self.call("models.upload_commit", upload_id=upload_id, signature=signature, health=health)
