"""Broker users and what each may do: the users file, password hashes, the ACL decision,
and the equivalent Mosquitto files.

This module owns the fleet's broker access rules as plain data and pure functions; the
embedded amqtt broker (``controller/broker.py``) asks ``acl_allows`` and ``UserDB.verify``,
and ``mosquitto_files`` writes the same rules for Mosquitto. Topics come from
``edge_runtime.protocol.topics`` only.

Roles:

    device      username = device id (a ``topics.check_id`` id); on amqtt its MQTT client id
                must equal its username. Publishes and subscribes exactly
                ``topics.device_acl(username)``: its own ``fleet/v1/dev/{id}/`` reports, the
                request topics (artifacts, inference calls and replies), and reads its own
                desired/cmd/inbox, its executor calls and ``fleet/v1/ctl/state``.
    controller  everything under ``fleet/v1/#``, publish and subscribe, shared subscriptions
                (``$share/GROUP/fleet/v1/...``) included.
    console     publishes ``fleet/v1/ctl/api/req``; reads its own
                ``topics.api_reply(client_id)`` and, read-only, every device's state,
                telemetry and events and ``fleet/v1/ctl/state``.

Every username passes ``topics.check_id`` (whatever the role): a name is a topic level for
devices, a ``user`` line in Mosquitto's ACL file and a ``name:hash`` line in its password
file, so no ``:``, space, ``/``, ``+`` or ``#`` may hide in it. A client id holding ``+``,
``#`` or ``/`` (anything but a ``check_id`` id) gets no access at all from ``acl_allows``,
and the amqtt broker refuses it at CONNECT.

The users file (JSON, mode 0600, replaced atomically):

    {"version": 1, "users": {"dev-1": {"role": "device", "hash": "$7$101$<salt>$<hash>"}}}

``hash`` is Mosquitto's own ``$7$`` format (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte
digest, standard base64 with padding; 101 iterations is ``mosquitto_passwd``'s default),
so the same line goes into a Mosquitto ``password_file`` unchanged.

Mutual TLS (``mosquitto_files(..., tls=TlsFiles(...))``): the identity is the client
certificate's CN (issued by the fleet CA, ``controller/ca.py``), not a password. Mosquitto 2
takes it as the username (``use_identity_as_username``) and, with
``use_username_as_clientid``, as the client id too, whatever id the client sent: Mosquitto
cannot refuse a CONNECT whose client id differs from the certificate name (on such a
listener it consults no password file or auth plugin), so the mismatch is made impossible
instead -- the client is the certificate's name, takes over no other session and gets only
that name's rights. Roles still come from the users file (a ``user`` block for each
controller and console; device rights are the ``%u`` patterns), so a name must not be
issued to two roles. A client id is then always the certificate name: a console's reply
topic is ``topics.api_reply(CN)``, and two processes sharing one certificate displace each
other (give each replica and each operator tool its own certificate).

Errors (``edge_runtime.errors.EdgeRuntimeError``):

    CredentialsError        base
     ├── UsersFileError     the users file cannot be read, parsed or written
     ├── BadUser            a name or role that cannot be a broker user
     ├── BadTlsFiles        a CA, certificate or key file for a TLS listener is missing
     ├── UserExists         ``add`` of a name already there (remove it first)
     └── UnknownUser        ``remove`` of a name not there
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from edge_runtime import durable
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import topics

__all__ = [
    "ROLES", "Role", "Action", "UserDB", "User", "hash_password", "check_password", "acl_allows",
    "client_id_allowed", "mosquitto_acl", "mosquitto_files", "generate_password", "TlsFiles", "CredentialsError",
    "UsersFileError", "BadUser", "BadTlsFiles", "UserExists", "UnknownUser",
]

Role = Literal["device", "controller", "console"]
Action = Literal["publish", "subscribe", "receive"]
ROLES: tuple[str, ...] = ("device", "controller", "console")
FILE_VERSION = 1

# mosquitto_passwd 2.x: PBKDF2-SHA512, 12 random salt bytes, 101 iterations by default.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
DIGEST_BYTES = 64

# The controller's whole namespace. topics.py has no builder for "everything under the
# prefix" (no other part subscribes to it), so it is derived from its PREFIX here.
FLEET_ALL = f"{topics.PREFIX}/#"


# -- errors ------------------------------------------------------------------------------


class CredentialsError(EdgeRuntimeError):
    code = "credentials_error"
    http_status = 400


class UsersFileError(CredentialsError):
    code = "users_file_error"
    http_status = 500


class BadUser(CredentialsError):
    code = "bad_user"


class BadTlsFiles(CredentialsError):
    code = "bad_tls_files"


class UserExists(CredentialsError):
    code = "user_exists"
    http_status = 409


class UnknownUser(CredentialsError):
    code = "unknown_user"
    http_status = 404


# -- password hashes ---------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: Optional[bytes] = None) -> str:
    """``$7$<iterations>$<b64 salt>$<b64 digest>``, exactly what ``mosquitto_passwd`` writes.

    Raises:
        BadUser: an empty password or one with a newline (Mosquitto's password file is
            line-based, and MQTT clients read password files as one line).
    """
    if not password or "\n" in password or "\r" in password:
        raise BadUser("a broker password must be non-empty and on one line; give another one")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a ``$7$`` hash.

    Raises:
        ValueError: not a ``$7$`` hash.
    """
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise ValueError("not a $7$ hash")
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000:
        raise ValueError("iterations out of range")
    salt = base64.b64decode(parts[3], validate=True)
    digest = base64.b64decode(parts[4], validate=True)
    if len(digest) != DIGEST_BYTES or not salt:
        raise ValueError("bad salt or digest length")
    return iterations, salt, digest


def check_password(password: str, encoded: str) -> bool:
    """Whether ``password`` hashes to ``encoded`` (constant-time compare; False on a
    malformed hash rather than an exception: a CONNECT must never crash the broker)."""
    try:
        iterations, salt, digest = _parse_hash(encoded)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8", "surrogatepass"), salt, iterations)
    return hmac.compare_digest(got, digest)


# A hash to check unknown users against, so "no such user" costs as long as "wrong password".
_DUMMY_HASH = hash_password("edgefleet-no-such-user", salt=b"\0" * SALT_BYTES)


# -- the users file ----------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str


def check_name(name: object) -> str:
    """``name`` itself, if it may be a broker username.

    Raises:
        BadUser: not a ``topics.check_id`` id.
    """
    try:
        return topics.check_id(name, "user name")
    except ValueError as exc:
        raise BadUser(f"{exc}; device user names are device ids and every name is a topic level "
                      "and a Mosquitto password-file key") from None


def check_role(role: object) -> str:
    """Raises: BadUser: not one of ``ROLES``."""
    if role not in ROLES:
        raise BadUser(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


class UserDB:
    """The broker's users, loaded from and saved to one JSON file (mode 0600)."""

    def __init__(self, path: str | os.PathLike[str], users: Optional[dict[str, User]] = None) -> None:
        self.path = Path(path)
        self._users: dict[str, User] = dict(users or {})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, missing_ok: bool = False) -> "UserDB":
        """The users in ``path``; an empty database when it does not exist and ``missing_ok``.

        Raises:
            UsersFileError: missing (without ``missing_ok``), unreadable, not our JSON, or
                holding an invalid user.
        """
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return cls(p)
            raise UsersFileError(f"users file {p} does not exist; create it with "
                                 f"'fleetctl broker user add NAME --role ROLE --users {p}'") from None
        except OSError as exc:
            raise UsersFileError(f"cannot read users file {p}: {exc}") from exc
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION or not isinstance(doc.get("users"), dict):
                raise ValueError(f'expected {{"version": {FILE_VERSION}, "users": {{...}}}}')
            users: dict[str, User] = {}
            for name, entry in doc["users"].items():
                check_name(name)
                if not isinstance(entry, dict):
                    raise ValueError(f"user {name!r}: expected an object with role and hash")
                role = check_role(entry.get("role"))
                _parse_hash(str(entry.get("hash")))
                users[name] = User(name, role, entry["hash"])
        except (ValueError, CredentialsError) as exc:
            raise UsersFileError(f"users file {p} is not valid: {exc}; fix it or recreate it "
                                 "with 'fleetctl broker user add'") from exc
        return cls(p, users)

    def save(self) -> None:
        """Write the file atomically (temp + fsync + rename). A new file is readable by its
        owner only; an existing one keeps its group and its group read bit (the broker's
        service user reads it through its group: ``fleetctl broker user add`` run as root
        must not take that away), never anything for others.

        Raises:
            UsersFileError: the write failed (the old file is unchanged).
        """
        doc = {"version": FILE_VERSION,
               "users": {u.name: {"role": u.role, "hash": u.hash} for u in self._users.values()}}
        mode, gid = 0o600, None
        try:
            held = self.path.stat()
            mode, gid = 0o600 | (held.st_mode & 0o040), held.st_gid
        except OSError:
            pass
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            durable.atomic_write_json(self.path, doc, mode=mode)
        except OSError as exc:
            raise UsersFileError(f"cannot write users file {self.path}: {exc}") from exc
        if gid is not None and self.path.stat().st_gid != gid:
            try:
                os.chown(self.path, -1, gid)
            except OSError as exc:
                raise UsersFileError(f"wrote users file {self.path} but could not give it back its group "
                                     f"{gid}: {exc}; run: chgrp {gid} {self.path}") from exc

    def add(self, name: str, role: str, password: str) -> User:
        """Add a user (in memory; ``save`` writes it).

        Raises:
            BadUser: a bad name, role or password.
            UserExists: the name is taken (by any role: names are one namespace, since a
                device's name is its topic level).
        """
        check_name(name)
        check_role(role)
        if name in self._users:
            raise UserExists(f"user {name!r} already exists (role {self._users[name].role}); "
                             f"remove it first with 'fleetctl broker user rm {name}'")
        user = User(name, role, hash_password(password))
        self._users[name] = user
        return user

    def remove(self, name: str) -> None:
        """Raises: UnknownUser: no such user."""
        if self._users.pop(name, None) is None:
            raise UnknownUser(f"no user {name!r} in {self.path}; 'fleetctl broker user ls' lists them")

    def verify(self, name: Optional[str], password: Optional[str]) -> Optional[str]:
        """The role of ``name`` when ``password`` is right, else None. Unknown users cost a
        hash too, so timing does not tell which names exist."""
        user = self._users.get(name or "")
        ok = check_password(password or "", user.hash if user else _DUMMY_HASH)
        return user.role if (user is not None and ok) else None

    def role(self, name: Optional[str]) -> Optional[str]:
        user = self._users.get(name or "")
        return user.role if user else None

    def users(self) -> list[User]:
        return sorted(self._users.values(), key=lambda u: u.name)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)


def generate_password() -> str:
    """A random password for a new user (32 URL-safe characters, ~190 bits)."""
    return secrets.token_urlsafe(24)


# -- the ACL decision --------------------------------------------------------------------


def client_id_allowed(role: Optional[str], username: Optional[str], client_id: Optional[str]) -> bool:
    """Whether a client may use ``client_id``: a plain id (no ``+``, ``#``, ``/``, ...), and
    for a device exactly its username (so no device can take over another's session or
    pose as a console whose reply topic is named by its client id)."""
    if not topics.valid_id(client_id):
        return False
    return role != "device" or client_id == username


def _covers(allowed: str, requested: str) -> bool:
    """Whether subscription filter ``allowed`` matches every topic ``requested`` can match."""
    want, got = allowed.split("/"), requested.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or got[i] == "#":
            return False
        if level != "+" and (got[i] == "+" or level != got[i]):
            return False
    return len(want) == len(got)


def _unshare(topic_filter: str) -> tuple[Optional[str], str]:
    """(group, filter) of ``$share/GROUP/filter``; (None, filter) for a plain filter.

    Raises:
        ValueError: a malformed shared filter.
    """
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise ValueError(f"invalid shared filter {topic_filter!r}")
    return topics.check_id(parts[1], "share group"), parts[2]


def role_filters(role: str, username: str, client_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(publish filters, subscribe filters) of one client.

    Raises:
        ValueError: an unknown role, or a bad username/client id.
    """
    if role == "device":
        acl = topics.device_acl(username)
        return acl.publish, acl.subscribe
    if role == "controller":
        return (FLEET_ALL,), (FLEET_ALL,)
    if role == "console":
        reads = tuple(topics.all_devices(k) for k in ("state", "telemetry", "events"))
        return (topics.API_REQUEST,), (topics.api_reply(client_id), *reads, topics.CTL_STATE)
    raise ValueError(f"unknown role {role!r}")


def acl_allows(role: Optional[str], username: Optional[str], client_id: Optional[str], action: str, topic: str) -> bool:
    """Whether a client may ``publish`` to ``topic``, ``subscribe`` to filter ``topic``, or
    ``receive`` a message published on ``topic``. Pure; never raises (a bad input is a no).

    A subscription is allowed when one of the role's filters covers all it can match
    (``fleet/v1/dev/d1/inbox/chunk/+`` under ``fleet/v1/dev/d1/inbox/#``); only the
    controller may use ``$share/GROUP/`` filters.
    """
    if role is None or username is None or not client_id_allowed(role, username, client_id):
        return False
    assert client_id is not None
    try:
        publish, subscribe = role_filters(role, username, client_id)
        if action == "publish":
            if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
                return False
            return any(topics.matches(f, topic) for f in publish)
        if action == "receive":
            return any(topics.matches(f, topic) for f in subscribe)
        if action == "subscribe":
            group, plain = _unshare(topic)
            if group is not None and role != "controller":
                return False
            topics.check_filter(plain)
            if plain.startswith("$"):
                return False
            return any(_covers(f, plain) for f in subscribe)
    except ValueError:
        return False
    return False


# -- Mosquitto ---------------------------------------------------------------------------

# A valid id that stands for Mosquitto's %u while topics.device_acl builds a device's
# filters; no real id is needed to build them, and no hand-written topic string either.
_USER_MARK = "edgefleet-username-placeholder-5c1e"
_CLIENT_MARK = "edgefleet-clientid-placeholder-5c1e"  # the same for %c


def _pattern(access: str, topic_filter: str) -> str:
    marks = {_USER_MARK: "%u", _CLIENT_MARK: "%c"}
    return f"pattern {access} " + "/".join(marks.get(level, level) for level in topic_filter.split("/"))


def _device_patterns() -> list[str]:
    acl = topics.device_acl(_USER_MARK)
    return [_pattern("write", f) for f in acl.publish] + [_pattern("read", f) for f in acl.subscribe]


def mosquitto_acl(userdb: UserDB, *, tls: bool = False) -> str:
    """The text of a Mosquitto ``acl_file`` equivalent to ``acl_allows`` (with the caveats
    in its comments). ``tls``: the same rules, for a listener whose identity is the client
    certificate's CN (only the comments differ: the lines are the same)."""
    console_reply = topics.api_reply(_CLIENT_MARK)
    if tls:
        who = [
            "# Identity: the client certificate's CN (use_identity_as_username), which is also the",
            "# client id (use_username_as_clientid: the id a client sends is replaced), so %u = %c =",
            "# the certificate name. Devices: the CN is the device id. Roles of other names come",
            "# from the users file: a certificate named like a controller has its rights, so the",
            "# fleet CA must never issue one name to two roles.",
        ]
    else:
        who = ["# Devices: the username is the device id."]
    lines = [
        "# Generated by 'fleetctl broker mosquitto' from the edgefleet users file; do not edit.",
        "#",
        *who,
        "# Mosquitto applies 'pattern' lines to every",
        "# authenticated user (%u = its username, %c = its client id), so a console or controller",
        "# also gets these rights under its own name; names are unique across roles, so none can",
        "# act as an existing device. Mosquitto accepts a client id holding '+' or '#' but skips",
        "# the pattern lines for it (so such a device can do nothing); 'user' blocks still apply.",
        "# Mosquitto warns that patterns without %u/%c exist: they are the request topics.",
        *_device_patterns(),
        "# Consoles read the replies addressed to their client id.",
        _pattern("read", console_reply),
        "",
    ]
    for user in userdb.users():
        if user.role == "device":
            continue  # the patterns above
        lines.append(f"user {user.name}")
        if user.role == "controller":
            lines.append(f"topic readwrite {FLEET_ALL}")
        else:
            publish, subscribe = role_filters("console", user.name, _CLIENT_MARK)
            lines += [f"topic write {f}" for f in publish]
            lines += [f"topic read {f}" for f in subscribe if f != console_reply]  # the %c pattern
        lines.append("")
    return "\n".join(lines)


# What a fleet needs from Mosquitto beyond its defaults. The controller acknowledges a
# report only once it is stored (MQTT 3.1.1: the broker's max_inflight_messages is the
# window, default 20), and a fleet reconnecting at once (10,000 births) or reports sent while
# the controller restarts queue up at the broker for it (default max_queued_messages 1,000,
# beyond which Mosquitto drops QoS 1 messages).
MOSQUITTO_TUNING = (
    "max_inflight_messages 1000",
    "max_queued_messages 200000",
    # Nagle + delayed ACK: a QoS 1 PUBACK then a PUBLISH on one socket stalls ~40 ms per hop;
    # remote inference is request/reply, so every forwarded call paid it twice
    "set_tcp_nodelay true",
)


@dataclass(frozen=True)
class TlsFiles:
    """A mutual-TLS listener: ``ca_file`` is the fleet CA every client certificate must
    chain to (and that clients use to check the broker); ``cert_file``/``key_file`` are the
    broker's own (a ``broker`` certificate of ``fleetctl ca issue``, its SANs naming the
    hosts clients connect to)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def checked(self) -> "TlsFiles":
        """The same files as absolute paths.

        Raises:
            BadTlsFiles: one is missing or not a file.
        """
        out = {}
        for field in ("ca_file", "cert_file", "key_file"):
            path = Path(getattr(self, field)).expanduser().resolve()
            if not path.is_file():
                raise BadTlsFiles(f"{field.replace('_', ' ')} {path} does not exist or is not a file; "
                                  "'fleetctl ca init' and 'fleetctl ca issue NAME --role broker' make them")
            out[field] = path
        return TlsFiles(**out)


# The oldest TLS a fleet listener accepts (Mosquitto's tls_version is the minimum).
TLS_MIN_VERSION = "tlsv1.2"


def mosquitto_tls_listener(tls: TlsFiles, *, port: int = 8883, bind: str = "127.0.0.1") -> list[str]:
    """The ``mosquitto.conf`` lines of a mutual-TLS listener (see the module docstring:
    the certificate CN is the username and the client id; no certificate, no connection).

    Raises:
        BadTlsFiles: a file is missing.
    """
    tls = tls.checked()
    return [
        f"listener {port} {bind}",
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        f"tls_version {TLS_MIN_VERSION}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]


def mosquitto_files(userdb: UserDB, out_dir: str | os.PathLike[str], *, port: int = 1883, bind: str = "127.0.0.1",
                    run_as: Optional[str] = None, tls: Optional[TlsFiles] = None) -> dict[str, Path]:
    """Write ``passwd``, ``acl`` and ``mosquitto.conf`` into ``out_dir``; returns their paths.

    ``mosquitto -c OUT/mosquitto.conf`` then runs a broker with the same users and rules
    (persistence in ``OUT``). ``run_as`` writes a ``user`` line: started as root, Mosquitto
    switches to that account (default ``mosquitto``), which must be able to read the files.

    ``tls``: the one listener on ``bind:port`` (pass 8883) is mutual TLS instead
    (``mosquitto_tls_listener``); no ``passwd`` is written (certificates are the identity),
    and the users file only gives controllers and consoles their roles.

    Raises:
        UsersFileError: a file cannot be written.
        BadTlsFiles: a TLS file is missing.
    """
    out = Path(out_dir).resolve()
    if tls is not None:
        listener = mosquitto_tls_listener(tls, port=port, bind=bind)
        auth = ["allow_anonymous false"]
    else:
        listener = [f"listener {port} {bind}"]
        auth = ["allow_anonymous false", f"password_file {out / 'passwd'}"]
    conf = [
        "# Generated by 'fleetctl broker mosquitto'; run: mosquitto -c " + str(out / "mosquitto.conf"),
        *listener,
        *auth,
        f"acl_file {out / 'acl'}",
        "persistence true",
        f"persistence_location {out}/",
        "log_dest stderr",
        "connection_messages true",
        *MOSQUITTO_TUNING,
    ]
    if run_as:
        conf.append(f"user {run_as}")
    paths = {"passwd": out / "passwd"} if tls is None else {}
    paths.update(acl=out / "acl", conf=out / "mosquitto.conf")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if tls is None:
            passwd = "".join(f"{u.name}:{u.hash}\n" for u in userdb.users())
            durable.atomic_write_bytes(paths["passwd"], passwd.encode(), mode=0o600)
        durable.atomic_write_bytes(paths["acl"], mosquitto_acl(userdb, tls=tls is not None).encode(), mode=0o600)
        durable.atomic_write_bytes(paths["conf"], ("\n".join(conf) + "\n").encode(), mode=0o644)
    except OSError as exc:
        raise UsersFileError(f"cannot write the Mosquitto files into {out}: {exc}") from exc
    return paths


def to_json(userdb: UserDB) -> list[dict[str, Any]]:
    """The users without their hashes (for ``fleetctl broker user ls --json``)."""
    return [{"name": u.name, "role": u.role} for u in userdb.users()]
