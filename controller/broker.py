"""The embedded MQTT broker (amqtt) with fleet authentication and ACLs, and ``fleetctl broker``.

This module owns running the broker: the two amqtt plugins that apply
``controller.credentials`` (who may connect, what each may publish, subscribe to and
receive), the amqtt config dict, the asyncio main, and the CLI. The rules themselves
(roles, password hashes, ``acl_allows``, the Mosquitto files) live in
``controller/credentials.py``; see its docstring for the three roles:

    device      username = device id, client id = username; exactly topics.device_acl(id)
    controller  everything under fleet/v1/# (shared subscriptions too)
    console     publishes the API request topic; reads its own reply topic and the
                fleet's state/telemetry/events and ctl/state

A CONNECT is refused (CONNACK 5, not authorised) for an unknown user, a wrong password, a
client id that is not a plain id (``+``, ``#``, ``/``, empty: amqtt would invent
``amqtt/...``), or a device whose client id is not its username.

Mutual TLS (``--tls-ca/--tls-cert/--tls-key``, listener ``--bind-tls``, default
127.0.0.1:8883): the TLS layer requires a client certificate that chains to the fleet CA
(amqtt asks for one but accepts none: ``FleetBroker`` makes it CERT_REQUIRED, TLS 1.2 at
least); no certificate or another CA's, and the handshake fails. The identity is the
certificate, not the CONNECT: username = its CN, role = its OU (``device``,
``controller``, ``operator`` = console; a ``broker`` certificate is no client), and a
username or password in the CONNECT are ignored. The same ACLs follow, so a device whose
client id is not its certificate's CN is refused at CONNECT. When the users file names the
CN with another role, the CONNECT is refused too (one name, one role). (Mosquitto cannot
read the OU nor refuse that client id; see ``controller/credentials.py``.) The plain
listener runs beside the TLS one only when ``--bind`` is given. A refused subscription
gets SUBACK 0x80 (MQTT 3.1.1; amqtt speaks nothing newer); a refused publish is dropped
silently (3.1.1 has no negative PUBACK); a message a client may not receive is not sent.

amqtt 0.12.1 specifics, worked around here:

* Retained messages on subscribe/connect skip the RECEIVE check, and a reconnecting client
  is sent the retained messages of *every* filter any client subscribed to. ``FleetBroker``
  sends a client only retained messages of its own filters that it may receive.
* Routing tests each message against every subscription filter in the broker (a few per
  device): with 1,000 devices it managed a few hundred messages per second. ``FleetBroker``
  finds a topic's filters through an index (``_SubscriptionTable``), same rules.
* Shared subscriptions (``$share/...``) are not implemented: such a filter is stored as is
  and matches nothing. Run one controller replica against amqtt (DESIGN.md: Mosquitto or
  EMQX when one broker is not enough).
* Retained messages and persistent sessions survive a restart through
  ``amqtt.contrib.persistence.SessionDBPlugin`` in ``<data>/broker.sqlite``, which needs
  the ``aiosqlite`` driver; without it the broker runs in memory and says so. amqtt sends
  a QoS 1 PUBACK before it routes the message and stores retained messages from a
  background task: a clean stop waits for the store, a ``kill -9`` right after a PUBACK
  can lose it. The controller re-publishes desired state on (re)connect for this reason.
* amqtt opens its port before it restores retained messages and sessions: a client
  reconnecting at once missed its retained desired state. ``FleetBroker`` opens the port
  once the restore is done (20,000 retained messages add ~0.35 s to a start here).

CLI (``fleetctl broker`` runs the broker; the others are subcommands):

    fleetctl broker [--bind 127.0.0.1:1883] [--users FILE] [--data DIR] [--allow-anonymous]
                    [--tls-ca CA.pem --tls-cert broker.pem --tls-key broker.key [--bind-tls 127.0.0.1:8883]]
    fleetctl broker user add NAME --role device|controller|console --users FILE [--password-file F]
    fleetctl broker user rm NAME --users FILE
    fleetctl broker user ls --users FILE [--json]
    fleetctl broker mosquitto --users FILE --out DIR [--bind 127.0.0.1:1883] [--run-as USER]
                              [--tls-ca CA.pem --tls-cert broker.pem --tls-key broker.key]  (--bind default :8883)

The users file is read at start-up: restart the broker after ``user add``/``rm``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import logging
import signal
import ssl
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from controller.credentials import (
    ROLES, TLS_MIN_VERSION, CredentialsError, TlsFiles, UserDB, UsersFileError, acl_allows, client_id_allowed,
    generate_password, mosquitto_files, to_json,
)
from edge_runtime.console import emit_json, table

log = logging.getLogger("edgefleet.broker")

DEFAULT_BIND = "127.0.0.1:1883"
DEFAULT_TLS_BIND = "127.0.0.1:8883"
DB_FILE = "broker.sqlite"


class BrokerConfigError(CredentialsError):
    """The broker cannot start with these options (say which and what to do)."""

    code = "broker_config_error"


# -- amqtt plugins -----------------------------------------------------------------------
#
# amqtt imports these by dotted path and fills ``Config`` from the ``plugins:`` section.
# The base classes come from amqtt, which is only in the controller extra: import lazily.

try:
    from amqtt.broker import Broker
    from amqtt.contexts import Action
    from amqtt.mqtt.constants import QOS_1, QOS_2
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
    from amqtt.session import Session
except ImportError:  # pragma: no cover - the controller extra is not installed
    Broker = BaseAuthPlugin = BaseTopicPlugin = object  # type: ignore[assignment,misc]
    Action = Session = Any  # type: ignore[assignment,misc]
    QOS_1, QOS_2 = 1, 2


def _load_users(users_file: Optional[str]) -> UserDB:
    # No file is only possible with allow_anonymous (broker_config checks): nobody can log in.
    return UserDB.load(users_file) if users_file else UserDB(Path("/nonexistent-edgefleet-users"))


class _UsersPlugin:
    """What both plugins share: their config and the users file (read once per plugin at start)."""

    @dataclass
    class Config:
        users_file: Optional[str] = None
        allow_anonymous: bool = False

    def __init__(self, context: Any) -> None:
        super().__init__(context)  # type: ignore[call-arg]
        self.users = _load_users(self.config.users_file)  # type: ignore[attr-defined]


# A certificate's OU (controller/ca.py ROLES) -> the broker role it gets; "broker" gets none.
CERT_ROLES = {"device": "device", "controller": "controller", "operator": "console"}
# Where FleetAuthPlugin leaves a TLS client's role for FleetTopicPlugin (amqtt's
# plugin-owned session attributes).
ROLE_ATTRIBUTE = "edgefleet.role"


def certificate_identity(ssl_object: Any) -> tuple[Optional[str], Optional[str], str]:
    """(name, role, why) of a TLS peer: its certificate's CN and the role its OU maps to
    (``CERT_ROLES``), or Nones and what is wrong. The TLS layer already verified the chain."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None, None, "no client certificate"
    fields: dict[str, list[str]] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            fields.setdefault(key, []).append(value)
    names, units = fields.get("commonName", []), fields.get("organizationalUnitName", [])
    if len(names) != 1 or len(units) != 1:
        return None, None, f"certificate subject needs exactly one CN and one OU, got {cert.get('subject')!r}"
    role = CERT_ROLES.get(units[0])
    if role is None:
        return names[0], None, f"certificate role (OU) {units[0]!r} may not connect as a client"
    return names[0], role, ""


class FleetAuthPlugin(_UsersPlugin, BaseAuthPlugin):  # type: ignore[misc,valid-type]
    """CONNECT: users from the users file, plain client ids, device client id = username;
    on a TLS listener, the client certificate instead of the username and password."""

    async def authenticate(self, *, session: Session) -> bool:  # type: ignore[override]
        session.attributes.pop(ROLE_ATTRIBUTE, None)
        if session.ssl_object is not None:
            return self._authenticate_certificate(session)
        client_id, username = session.client_id, session.username
        if session.username is None:
            if self.config.allow_anonymous and client_id_allowed(None, None, client_id):
                session.is_anonymous = True
                return True
            log.info("refused %r: no username (anonymous clients are not allowed)", client_id)
            return False
        # PBKDF2 with 101 iterations takes ~0.1 ms: fine on the event loop.
        role = self.users.verify(username, session.password)
        if role is None:
            log.info("refused %r: unknown user or wrong password for %r", client_id, username)
            return False
        if not client_id_allowed(role, username, client_id):
            log.info("refused %r (user %r, role %s): a client id must be 1-64 of [A-Za-z0-9._-] "
                     "and a device's must equal its username", client_id, username, role)
            return False
        return True

    def _authenticate_certificate(self, session: Session) -> bool:
        client_id = session.client_id
        name, role, why = certificate_identity(session.ssl_object)
        session.username, session.password = name, None  # the certificate is the identity
        if role is None:
            log.info("refused %r: %s", client_id, why)
            return False
        listed = self.users.role(name)
        if listed is not None and listed != role:
            log.info("refused %r: certificate %r says role %s, the users file says %s", client_id, name, role, listed)
            return False
        if not client_id_allowed(role, name, client_id):
            log.info("refused %r (certificate %r, role %s): a client id must be 1-64 of [A-Za-z0-9._-] "
                     "and a device's must equal its certificate name", client_id, name, role)
            return False
        session.attributes[ROLE_ATTRIBUTE] = role
        return True


# Every PUBLISH and every delivery asks acl_allows (10-15 us for a device: its filters are
# rebuilt and parsed each time). It is pure and a fleet asks the same few questions over
# and over: remember the answers, a bounded number of them.
_acl_allows_cached = functools.lru_cache(maxsize=1 << 16)(acl_allows)


class FleetTopicPlugin(_UsersPlugin, BaseTopicPlugin):  # type: ignore[misc,valid-type]
    """PUBLISH, SUBSCRIBE and delivery (RECEIVE) checks: ``credentials.acl_allows``."""

    async def topic_filtering(self, *, session: Optional[Session] = None, topic: Optional[str] = None,
                              action: Optional[Action] = None) -> bool:  # type: ignore[override]
        if session is None or topic is None or action is None:
            return False
        if session.username is None:
            # Only authenticated sessions get here: anonymous ones exist only with
            # --allow-anonymous, a development broker without ACLs.
            return bool(self.config.allow_anonymous)
        role = session.attributes.get(ROLE_ATTRIBUTE) or self.users.role(session.username)
        allowed = _acl_allows_cached(role, session.username, session.client_id, str(action.value), topic)
        if not allowed:
            log.info("denied %s %r to %r (user %r)", action.value, topic, session.client_id, session.username)
        return allowed


class _TrieNode:
    """One level of the wildcard index: children by filter level (``+`` and ``#`` are
    children like any other) and the wildcard filters that end here."""

    __slots__ = ("children", "filters")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.filters: list[str] = []


def _is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def _well_formed(levels: list[str]) -> bool:
    """amqtt's ``_matches`` returns False, for every topic, on a filter with ``+``/``#``
    inside a level or ``#`` before the last level; such a filter is left out of the index
    (``add_subscription`` refuses them anyway, but the table is a plain dict anyone can fill)."""
    last = len(levels) - 1
    return all((level == "#" and i == last) or level == "+" or not _is_wildcard(level)
               for i, level in enumerate(levels))


class _SubscriptionTable(dict):  # type: ignore[type-arg]
    """amqtt's subscription table (filter -> [(session, qos), ...]), indexed for routing.

    Snapshots: amqtt 0.12.1 loops over this table across ``await``s (on every CONNECT,
    and when a session's subscriptions are removed) while other clients subscribe: a
    connect then dies of "dictionary changed size during iteration". Iterating a snapshot
    instead keeps every lookup and update on the one live table. Routing does not iterate
    (``route``), so the copy is paid per CONNECT, not per message.

    Index: amqtt routes a message by matching it against every filter in the table, i.e.
    thousands per message with a thousand devices holding a few filters each. Here the
    wildcard-free filters are a set (one lookup) and the wildcard ones a trie walked by the
    topic's levels. The index follows the table's *keys*: it is updated wherever a key is
    added or removed (amqtt itself only does ``t[f] = []``, ``del t[f]`` and ``clear()``;
    the other mutators re-index). The lists of subscribers are read live at routing time,
    so amqtt appending to or popping from them needs no hook. Each key gets a sequence
    number on insertion so that ``route`` returns filters in the table's order, the order
    amqtt's walk sends in.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reindex()

    # -- the index ---------------------------------------------------------------------

    def _reindex(self) -> None:
        self._exact: set[str] = set()
        self._root = _TrieNode()
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        for topic_filter in super().keys():
            self._index(topic_filter)

    def _index(self, topic_filter: str) -> None:
        self._seq[topic_filter] = self._next_seq
        self._next_seq += 1
        if not _is_wildcard(topic_filter):
            self._exact.add(topic_filter)
            return
        levels = topic_filter.split("/")
        if not _well_formed(levels):
            return
        node = self._root
        for level in levels:
            node = node.children.setdefault(level, _TrieNode())
        node.filters.append(topic_filter)

    def _unindex(self, topic_filter: str) -> None:
        del self._seq[topic_filter]
        if not _is_wildcard(topic_filter):
            self._exact.discard(topic_filter)
            return
        levels = topic_filter.split("/")
        if not _well_formed(levels):
            return
        path = [self._root]
        for level in levels:
            path.append(path[-1].children[level])
        path[-1].filters.remove(topic_filter)
        # Prune the branch back to the last node still in use.
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.filters or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def route(self, topic: str) -> list[tuple[str, list[tuple[Any, int]]]]:
        """(filter, [(session, qos), ...]) for every filter amqtt's ``_matches`` says
        ``topic`` matches, in table order; the lists are copies (callers ``await``)."""
        found = [topic] if topic in self._exact else []
        if self._root.children:
            levels = topic.split("/")
            end = len(levels)
            # [MQTT-4.7.2-1] (amqtt: a filter starting with + or #): no wildcard at the first
            # level matches a topic starting with $.
            dollar = topic.startswith("$")
            stack = [(self._root, 0)]
            while stack:
                node, i = stack.pop()
                children = node.children
                first_level_of_dollar = dollar and i == 0
                multi = children.get("#")
                if multi is not None and not first_level_of_dollar:
                    found.extend(multi.filters)  # "a/#" matches "a" and everything under it
                if i == end:
                    found.extend(node.filters)
                    continue
                single = children.get("+")
                if single is not None and not first_level_of_dollar:
                    stack.append((single, i + 1))
                level = levels[i]
                if level != "+" and level != "#":  # those children were just taken as wildcards
                    literal = children.get(level)
                    if literal is not None:
                        stack.append((literal, i + 1))
        if len(found) > 1:
            found.sort(key=self._seq.__getitem__)
        get = super().get
        return [(f, list(get(f, ()))) for f in found]

    # -- mutators: keep the index in step with the keys --------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self._index(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._unindex(key)

    def clear(self) -> None:
        super().clear()
        self._reindex()

    def pop(self, *args: Any) -> Any:
        try:
            return super().pop(*args)
        finally:
            self._reindex()

    def popitem(self) -> Any:
        try:
            return super().popitem()
        finally:
            self._reindex()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return super().__getitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._reindex()

    def __ior__(self, other: Any) -> Any:
        self.update(other)
        return self

    def __repr__(self) -> str:
        # amqtt logs repr(table) at debug level after every SUBSCRIBE, building the string
        # even with debug off: the whole table (thousands of sessions) per SUBSCRIBE made a
        # fleet's connect quadratic. A summary is what that line prints now.
        return f"<subscriptions: {len(self)} filters, {sum(map(len, self.values()))} subscribers>"

    # -- snapshots for amqtt's loops ---------------------------------------------------

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def items(self) -> Any:  # type: ignore[override]
        return list(super().items())


class FleetBroker(Broker):  # type: ignore[misc,valid-type]
    """amqtt's Broker, sending retained messages only where they belong.

    amqtt 0.12.1 publishes retained messages to a subscriber without the RECEIVE check,
    and on every CONNECT walks *all* subscription filters in the broker (anyone's) and
    sends the connecting client every retained message matching any of them: a device
    would get every device's retained desired state once the controller subscribed to
    ``fleet/v1/#``. Here a client gets a retained message only for a filter it holds
    itself and only if the topic plugins let it receive that topic.

    Its subscription table iterates snapshots and routes a message through an index
    (``_SubscriptionTable``): amqtt matched every message against every filter, which
    capped it at a few hundred messages per second with a thousand devices connected.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SubscriptionTable(self._subscriptions)
        self._listen_now = False

    async def start(self) -> None:
        """amqtt's start, listening only once the persisted state is back.

        amqtt 0.12.1 opens its listeners first and restores retained messages and sessions
        after (``POST_START``). A device reconnecting to a restarted broker in between
        subscribed to its desired-state topic before the retained message was restored,
        and never got it (seen in CI); a persistent client in that window made the restore
        itself fail ("shouldn't have any sessions yet"). Here the restore runs first.

        Raises:
            OSError: an address cannot be bound (the broker is started: shut it down).
        """
        await super().start()  # _start_listeners below is a no-op during this
        self._listen_now = True
        await self._start_listeners()

    async def _start_listeners(self) -> None:
        if self._listen_now:
            await super()._start_listeners()

    async def shutdown(self) -> None:
        """A clean stop first lets plugin events still running finish: amqtt 0.12.1 fires
        them as tasks nobody awaits, and the persistence plugin stores a retained message
        in one -- a stop right after a retained PUBLISH could drop it (seen under load)."""
        pending = [t for t in getattr(self.plugins_manager, "_fired_events", ()) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        await super().shutdown()

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        """amqtt's context (the listener's CA, certificate and key) with a client
        certificate required: amqtt asks for one (CERT_OPTIONAL) and lets in who has none."""
        context = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: Any,
                                         remote_port: Any) -> Any:
        """amqtt's, plus this connection's TLS object on the session. amqtt 0.12.1 hands a
        client that resumes a persistent session (clean session off) the stored ``Session``
        with the TLS object of the connection that made it, so the authentication read
        another connection's certificate: a device resuming its own session after a
        reconnect was refused, and a client naming a session whose owner was still
        connected was accepted as the owner (dev-1's certificate resumed dev-2's session).
        Still amqtt's: a refused client that names a connected persistent session closes
        the owner's connection before it is refused (as on the password listener)."""
        handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        session.ssl_object = writer.get_ssl_info()
        return handler, session

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """One queued message to its subscribers: amqtt 0.12.1's rules, with the matching
        filters looked up in the index instead of tested one by one, and no debug text
        built unless debug logging is on (amqtt formats the whole message, payload
        included, for every message and for every filter that did not match)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("Processing broadcast message: %s", broadcast)
        for _filter, subscriptions in self._subscriptions.route(topic):
            for target_session, sub_qos in subscriptions:
                # amqtt: a message from a client has no "qos" (only a forced one does), so it
                # goes out at the subscription's QoS.
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    self.logger.info("%s not allowed to receive messages from TOPIC %s.",
                                     target_session.client_id, topic)
                    continue
                if target_session.transitions.state != "connected":
                    # MQTT 3.1.1 §3.1.2.4: an offline persistent session keeps its QoS 1/2 messages;
                    # amqtt makes no such promise to anonymous clients. Others miss it.
                    if (not target_session.clean_session and qos in (QOS_1, QOS_2)
                            and not target_session.is_anonymous):
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """amqtt's rule (every topic plugin must say yes; none enabled allows all), with
        the plugins awaited in turn: amqtt wraps each call in a task and gathers them,
        a task or more per message per subscriber on the routing path."""
        manager = self.plugins_manager
        if not manager.is_topic_filtering_enabled():
            return True
        for plugin in manager._topic_plugins:
            check = getattr(plugin, "topic_filtering", None)
            if check is not None and not await check(session=session, topic=topic, action=action):
                return False
        return True

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        if _is_wildcard(topic_filter):
            candidates = list(self._retained_messages.items())
        else:  # it matches its own topic only: no need to walk every retained message
            retained = self._retained_messages.get(topic_filter)
            candidates = [(topic_filter, retained)] if retained is not None else []
        tasks = []
        for topic, retained in candidates:
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)


# -- config and main ---------------------------------------------------------------------


def parse_bind(bind: str, option: str = "--bind") -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``.

    Raises:
        BrokerConfigError: not HOST:PORT with a port 1..65535.
    """
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BrokerConfigError(f"{option} {bind!r}: expected HOST:PORT, e.g. {DEFAULT_BIND}")
    return host.strip("[]"), int(port)


def persistence_available() -> bool:
    """Whether amqtt's SQLite persistence can run (it needs the ``aiosqlite`` driver)."""
    return importlib.util.find_spec("aiosqlite") is not None


def broker_config(bind: Optional[str], users_file: Optional[Path], data_dir: Optional[Path],
                  allow_anonymous: bool, *, tls: Optional[TlsFiles] = None, bind_tls: str = DEFAULT_TLS_BIND) -> dict[str, Any]:
    """amqtt's config dict: a TCP listener on ``bind`` (None: none, only with ``tls``), with
    ``tls`` a mutual-TLS one on ``bind_tls``, the fleet plugins and, with a ``data_dir`` and
    aiosqlite, retained messages and sessions in ``data_dir/broker.sqlite``.

    Raises:
        BrokerConfigError: neither users nor anonymous access nor TLS, no listener, or a
            bad ``bind``/``bind_tls``.
        UsersFileError: the users file cannot be read.
        BadTlsFiles: a TLS file is missing.
    """
    # amqtt needs a listener named "default" (the others inherit its unset fields; without
    # a bind of its own it would listen on 0.0.0.0:1883): the plain one, else the TLS one.
    listeners: dict[str, Any] = {}
    if bind is not None:
        parse_bind(bind)
        listeners["default"] = {"type": "tcp", "bind": bind}
    if tls is not None:
        parse_bind(bind_tls, "--bind-tls")
        files = tls.checked()
        listeners["tls" if listeners else "default"] = {
            "type": "tcp", "bind": bind_tls, "ssl": True, "cafile": str(files.ca_file),
            "certfile": str(files.cert_file), "keyfile": str(files.key_file)}
    if not listeners:
        raise BrokerConfigError("no listener: give --bind HOST:PORT or the TLS files (--tls-ca/--tls-cert/--tls-key)")
    if users_file is None and not allow_anonymous and bind is not None:
        raise BrokerConfigError(
            "no users: give --users FILE (create one with 'fleetctl broker user add NAME --role ROLE "
            "--users FILE') or, for a development broker without ACLs, --allow-anonymous")
    if users_file is not None:
        UserDB.load(users_file)  # fail here, with our message, rather than inside amqtt
    opts = {"users_file": str(users_file) if users_file else None, "allow_anonymous": allow_anonymous}
    plugins: dict[str, Any] = {
        f"{__name__}.FleetAuthPlugin": dict(opts),
        f"{__name__}.FleetTopicPlugin": dict(opts),
    }
    if data_dir is not None and persistence_available():
        plugins["amqtt.contrib.persistence.SessionDBPlugin"] = {
            "connection": f"sqlite+aiosqlite:///{Path(data_dir).resolve() / DB_FILE}",
            # Its default wipes the database on a clean stop: we want the opposite.
            "clear_on_shutdown": False,
        }
    return {"listeners": listeners, "plugins": plugins}


async def run_broker(bind: Optional[str] = DEFAULT_BIND, *, users_file: Optional[Path] = None,
                     data_dir: Optional[Path] = None, allow_anonymous: bool = False,
                     stop: Optional[asyncio.Event] = None, tls: Optional[TlsFiles] = None,
                     bind_tls: str = DEFAULT_TLS_BIND) -> None:
    """Run the broker until SIGTERM/SIGINT (or ``stop`` is set), then shut it down cleanly.

    Raises:
        BrokerConfigError, UsersFileError: see ``broker_config``.
        OSError: the address cannot be bound.
    """
    if data_dir is not None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    config = broker_config(bind, users_file, data_dir, allow_anonymous, tls=tls, bind_tls=bind_tls)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = FleetBroker(config)
    try:
        await broker.start()
        persisted = "amqtt.contrib.persistence.SessionDBPlugin" in config["plugins"]
        if data_dir is not None and not persisted:
            log.warning("aiosqlite is not installed: retained messages and sessions are kept in memory only")
        users = len(UserDB.load(users_file)) if users_file else 0
        urls = ([f"mqtt://{bind}"] if bind is not None else []) + ([f"mqtts://{bind_tls} (client certificates)"] if tls else [])
        print(f"fleetctl broker: listening on {' and '.join(urls)} ({users} users"
              f"{', anonymous allowed' if allow_anonymous else ''}"
              f"{', persisted in ' + str(Path(data_dir) / DB_FILE) if persisted else ', in memory'})",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if broker.transitions.state == "started":
            await broker.shutdown()


# -- CLI ---------------------------------------------------------------------------------


def _tls_files(args: argparse.Namespace) -> Optional[TlsFiles]:
    """The --tls-ca/--tls-cert/--tls-key files, or None when none is given.

    Raises:
        BrokerConfigError: some but not all of them.
    """
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise BrokerConfigError("TLS needs all of --tls-ca (the fleet CA), --tls-cert and --tls-key (the broker's "
                                "certificate and key: 'fleetctl ca issue NAME --role broker --host HOST')")
    return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)


def cmd_broker(args: argparse.Namespace) -> int:
    try:
        tls = _tls_files(args)
        if args.bind is None and tls is None:
            args.bind = DEFAULT_BIND
        broker_config(args.bind, args.users, args.data, args.allow_anonymous, tls=tls,
                      bind_tls=args.bind_tls)  # usage errors: exit 2
    except BrokerConfigError as exc:
        print(f"fleetctl broker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_broker(args.bind, users_file=args.users, data_dir=args.data,
                               allow_anonymous=args.allow_anonymous, tls=tls, bind_tls=args.bind_tls))
    except OSError as exc:
        where = " and ".join(b for b in (args.bind, tls and args.bind_tls) if b)
        print(f"fleetctl broker: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_password(path: Optional[Path]) -> tuple[str, bool]:
    """(password, generated): the first line of ``path``, or a fresh random one.

    Raises:
        UsersFileError: the file cannot be read.
    """
    if path is None:
        return generate_password(), True
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n"), False
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read the password file {path}: {exc}; give a readable UTF-8 file") from exc


def cmd_user_add(args: argparse.Namespace) -> int:
    db = UserDB.load(args.users, missing_ok=True)
    password, generated = _read_password(args.password_file)
    user = db.add(args.name, args.role, password)
    db.save()
    if args.json:
        emit_json({"name": user.name, "role": user.role, **({"password": password} if generated else {})})
    elif generated:
        # Shown once: only the hash is stored.
        print(f"added {user.role} {user.name}; its password (shown once, store it now):\n{password}")
    else:
        print(f"added {user.role} {user.name}")
    return 0


def cmd_user_rm(args: argparse.Namespace) -> int:
    db = UserDB.load(args.users)
    db.remove(args.name)
    db.save()
    if args.json:
        emit_json({"removed": args.name})
    else:
        print(f"removed {args.name}")
    return 0


def cmd_user_ls(args: argparse.Namespace) -> int:
    db = UserDB.load(args.users)
    if args.json:
        emit_json({"users": to_json(db)})
    else:
        table(["name", "role"], [[u["name"], u["role"]] for u in to_json(db)])
    return 0


def cmd_mosquitto(args: argparse.Namespace) -> int:
    tls = _tls_files(args)
    host, port = parse_bind(args.bind or (DEFAULT_TLS_BIND if tls else DEFAULT_BIND))
    paths = mosquitto_files(UserDB.load(args.users), args.out, port=port, bind=host, run_as=args.run_as, tls=tls)
    if args.json:
        emit_json({k: str(v) for k, v in paths.items()})
    else:
        print(f"wrote {', '.join(str(v) for v in paths.values())}; run: mosquitto -c {paths['conf']}")
    return 0


def _add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", type=Path, metavar="CA.pem",
                   help="mutual TLS: client certificates must chain to this CA (the fleet CA's ca.pem)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="mutual TLS: the broker's certificate")
    p.add_argument("--tls-key", type=Path, metavar="KEY", help="mutual TLS: the broker's private key")


def add_cli(sub: Any, models: Any) -> None:
    """Register ``fleetctl broker`` (runs the broker) and its ``user``/``mosquitto`` subcommands."""
    p = sub.add_parser("broker", help="run the embedded MQTT broker; manage its users; write a Mosquitto config",
                       description="Without a subcommand: run the embedded amqtt broker with fleet ACLs.")
    p.add_argument("--bind", default=None, metavar="HOST:PORT",
                   help=f"plain listener (default {DEFAULT_BIND}; with TLS files: none unless given)")
    p.add_argument("--users", type=Path, metavar="FILE", help="the users file ('fleetctl broker user add' makes it)")
    _add_tls_options(p)
    p.add_argument("--bind-tls", default=DEFAULT_TLS_BIND, metavar="HOST:PORT",
                   help=f"the mutual-TLS listener, with the TLS files (default {DEFAULT_TLS_BIND})")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help=f"keep retained messages and sessions in DIR/{DB_FILE} (needs aiosqlite)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="accept clients without a username, with no ACL (development only)")
    p.add_argument("-v", "--verbose", action="store_true", help="log refused connections and denied topics")
    p.set_defaults(fn=cmd_broker)
    actions = p.add_subparsers(dest="broker_command", required=False, metavar="{user,mosquitto}")

    user = actions.add_parser("user", help="add, remove or list broker users").add_subparsers(
        dest="user_command", required=True)
    q = user.add_parser("add", help="add a user (prints a generated password once unless --password-file)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=ROLES)
    q.add_argument("--users", type=Path, required=True, metavar="FILE")
    q.add_argument("--password-file", type=Path, metavar="F", help="read the password from F (first line)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_user_add)
    q = user.add_parser("rm", help="remove a user")
    q.add_argument("name")
    q.add_argument("--users", type=Path, required=True, metavar="FILE")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_user_rm)
    q = user.add_parser("ls", help="list users and roles")
    q.add_argument("--users", type=Path, required=True, metavar="FILE")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_user_ls)

    q = actions.add_parser("mosquitto", help="write passwd, acl and mosquitto.conf for the same users and rules")
    q.add_argument("--users", type=Path, required=True, metavar="FILE")
    q.add_argument("--out", type=Path, required=True, metavar="DIR")
    q.add_argument("--bind", default=None, metavar="HOST:PORT",
                   help=f"the listener (default {DEFAULT_BIND}, with the TLS files {DEFAULT_TLS_BIND})")
    q.add_argument("--run-as", metavar="USER", help="the account Mosquitto switches to when started as root")
    _add_tls_options(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_mosquitto)


__all__ = ["FleetAuthPlugin", "FleetTopicPlugin", "FleetBroker", "broker_config", "run_broker", "add_cli",
           "BrokerConfigError", "parse_bind", "persistence_available"]
