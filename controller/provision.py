"""Device provisioning (``fleetctl provision``): everything one device needs to join the
fleet, as a directory that ``firmware_scripts/provision-apply.sh`` installs on the device.

    fleetctl provision DEVICE_ID --group G [--group G2] --out DIR --broker mqtts://HOST:8883
                       [--ca DIR] [--keys DIR] [--users FILE] [--tier edge|cloud] [--days N]
                       [--register URL [--username U] [--password-file F] [--timeout S]
                                       [--tls-ca CA.pem --tls-cert PEM --tls-key KEY]]
                       [--passphrase-file F | --passphrase-env VAR] [--force] [--json]

The bundle (``DIR``, 0700), each file as it goes to ``/etc/edge-runtime/`` on the device::

    config.toml   the agent's config: device id, groups, tier, data_dir /var/lib/edge-runtime,
                  trust_root and broker TLS files under /etc/edge-runtime/ (0644: no secret)
    device.pem    the device's client certificate from the fleet CA (CN = device id)
    device.key    its private key (0600)
    ca.pem        the fleet CA certificate (the broker's certificate is checked against it)
    root.json     the current signed root of trust from the key directory (``fleetctl keys``)
    broker.pass   with --users: the device's broker password (0600); the device is added to
                  the embedded broker's users file as role device

The config is validated with the agent's own loader (``edge_runtime.agent.config``) before
anything is issued (URL, ids, groups), and again on the finished bundle with each
``/etc/edge-runtime/`` path pointed at the file in the bundle, so a device never gets a
config its agent refuses. The files are written into a temporary directory beside ``DIR``
and moved in with ``config.toml`` last; the users file is updated after the bundle is in
place, the controller registration (``--register``: ``devices.add`` through the console
API, idempotent) last of all. Registration connects like every console command
(``console.connect``): ``--tls-ca/--tls-cert/--tls-key`` (or ``$FLEETCTL_TLS_CA``,
``$FLEETCTL_TLS_CERT``, ``$FLEETCTL_TLS_KEY``) reach a mutual-TLS broker with an operator
certificate from the fleet CA. (``--ca`` is the fleet CA's *directory*, which issues the
device's certificate; ``--tls-ca`` is the CA *file* the console checks the broker with.)

Errors: ``ProvisionError`` (``code = "provision_error"``) for what is wrong with the
request or the output directory; the CA's, the key directory's, the users file's and the
console API's own typed errors pass through unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from controller.ca import DEFAULT_DIR as DEFAULT_CA_DIR
from controller.ca import FleetCA, cli_passphrase
from edge_runtime.agent.config import ConfigError, load_config, to_toml
from edge_runtime.console import emit_json, positive_int
from edge_runtime.durable import atomic_write_bytes, fsync_dir
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.topics import check_id

if TYPE_CHECKING:
    from controller.apiclient import ApiClient

__all__ = ["ProvisionError", "provision", "device_config", "BUNDLE_FILES", "SECRET_FILES", "add_cli"]

DEVICE_ETC = Path("/etc/edge-runtime")
DEVICE_DATA = Path("/var/lib/edge-runtime")
DEVICE_SOCKET = Path("/run/edge-runtime/api.sock")  # systemd/edge-runtime.service: RuntimeDirectory=edge-runtime
DEFAULT_KEYS_DIR = Path("keys")
CONFIG, CERT, KEY, CA, ROOT, PASSWORD = "config.toml", "device.pem", "device.key", "ca.pem", "root.json", "broker.pass"
BUNDLE_FILES = (CERT, KEY, CA, ROOT, PASSWORD, CONFIG)  # the order they are moved in: config.toml last
SECRET_FILES = frozenset({KEY, PASSWORD})
TIERS = ("edge", "cloud")

PathLike = Union[str, "os.PathLike[str]"]


class ProvisionError(EdgeRuntimeError):
    """The request or the output directory cannot be used; nothing was issued or changed
    unless the message says otherwise."""

    code = "provision_error"
    http_status = 400


def device_config(device_id: str, groups: Sequence[str], broker_url: str, *, tier: str = "edge",
                  password: bool = False, etc: Path = DEVICE_ETC) -> dict[str, Any]:
    """The agent config a provisioned device runs with (paths under ``etc`` on the device)."""
    broker: dict[str, Any] = {"url": broker_url}
    if broker_url.startswith("mqtts://"):
        broker.update(ca_file=str(etc / CA), cert_file=str(etc / CERT), key_file=str(etc / KEY))
    if password:
        broker.update(username=device_id, password_file=str(etc / PASSWORD))
    # The unit's RuntimeDirectory: applications in group edgefleet reach the fast path there.
    return {"device_id": device_id, "groups": list(groups), "tier": tier, "data_dir": str(DEVICE_DATA),
            "trust_root": str(etc / ROOT), "broker": broker, "api": {"socket_path": str(DEVICE_SOCKET)}}


def _validate(config: dict[str, Any], files: dict[str, Path]) -> None:
    """Load ``config`` with the agent's loader, each ``/etc/edge-runtime/NAME`` read as
    ``files[NAME]`` (the device's paths do not exist here).

    Raises:
        ProvisionError: the agent would refuse the config; the message names the field.
    """
    def remap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: remap(v) for k, v in value.items()}
        if isinstance(value, str) and Path(value).parent == DEVICE_ETC and Path(value).name in files:
            return str(files[Path(value).name])
        return value

    with tempfile.TemporaryDirectory(prefix="edgefleet-provision-") as scratch:
        path = Path(scratch) / CONFIG
        path.write_text(to_toml(remap(config)), encoding="utf-8")
        try:
            load_config(path, env={})
        except ConfigError as exc:
            problems = "; ".join(str(p) for p in exc.problems) or str(exc)
            raise ProvisionError(f"the device's config would be refused: {problems}") from None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"--out {out} is a file; give a directory for the bundle")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ProvisionError(f"--out {out} is not empty; give a new directory, or --force to replace the bundle in it")


def _root_bytes(keys_dir: Path) -> bytes:
    from controller.keys import KeyDir

    keydir = KeyDir(keys_dir)
    root = keydir.root()  # KeyDirMissing / KeyDirCorrupt with their guidance
    if root.expires <= datetime.now(timezone.utc):
        raise ProvisionError(f"root v{root.version} in {keys_dir} expired at {root.expires:%Y-%m-%d %H:%M}Z: devices "
                             f"would refuse it; run `fleetctl keys rotate --dir {keys_dir}` first")
    return (keys_dir / "root.json").read_bytes()


def provision(device_id: str, *, groups: Sequence[str], out: PathLike, broker_url: str,
              ca_dir: PathLike = DEFAULT_CA_DIR, keys_dir: PathLike = DEFAULT_KEYS_DIR, users: Optional[PathLike] = None,
              tier: str = "edge", valid_days: int = 825, passphrase: Optional[str] = None,
              force: bool = False) -> dict[str, Any]:
    """Issue the device's certificate and write its bundle to ``out`` (see the module docstring).

    Returns what was done: device_id, groups, tier, broker, out, files {name: path}, serial
    (hex), not_after, broker_user (whether a users file entry was made).

    Raises:
        ProvisionError: a bad id, group or tier, a config the agent would refuse, an expired
            root, an output directory that is a file or not empty (without ``force``), a
            device already in the users file (without ``force``), a name the users file
            holds in another role (even with ``force``), or a failed write.
        CAError, KeyDirError, CredentialsError: the CA (``CANameTaken``: the CA's ledger
            holds the name in another role), key directory or users file.
    """
    from controller.credentials import UserDB, generate_password

    for value, what in ((device_id, "device id"), *((g, "group") for g in groups)):
        try:
            check_id(value, what)
        except ValueError as exc:
            raise ProvisionError(str(exc)) from None
    if tier not in TIERS:
        raise ProvisionError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    out = Path(out)
    _check_out(out, force)
    root = _root_bytes(Path(keys_dir))
    ca = FleetCA.open(ca_dir, passphrase=passphrase)
    userdb = UserDB.load(users, missing_ok=True) if users is not None else None
    if userdb is not None and device_id in userdb and userdb.role(device_id) != "device":
        raise ProvisionError(f"{device_id} is a {userdb.role(device_id)} in {users}, not a device; a device of that "
                             f"name would take its broker rights — choose another device id")
    if userdb is not None and device_id in userdb and not force:
        raise ProvisionError(f"{device_id} is already a broker user in {users}; --force gives it a new password "
                             f"(the old bundle's broker.pass stops working)")
    config = device_config(device_id, groups, broker_url, tier=tier, password=userdb is not None)
    # Before anything is issued: every file the config names stands in as the CA certificate.
    _validate(config, {name: ca.ca_file for name in BUNDLE_FILES})

    issued = ca.issue(device_id, "device", valid_days=valid_days)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.provision-", dir=out.parent))
    password: Optional[str] = None
    try:
        ca.write(issued, staging, stem="device")
        atomic_write_bytes(staging / CA, ca.cert_pem, mode=0o644)
        atomic_write_bytes(staging / ROOT, root, mode=0o644)
        if userdb is not None:
            password = generate_password()
            atomic_write_bytes(staging / PASSWORD, (password + "\n").encode(), mode=0o600)
        _validate(config, {p.name: p for p in staging.iterdir()})
        atomic_write_bytes(staging / CONFIG, to_toml(config).encode(), mode=0o644)
        _check_out(out, force)  # again: someone may have written there meanwhile
        out.mkdir(mode=0o700, exist_ok=True)
        for name in BUNDLE_FILES:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
            elif force:
                (out / name).unlink(missing_ok=True)  # a broker.pass from an earlier bundle
        fsync_dir(out)
    except OSError as exc:
        raise ProvisionError(f"cannot write the bundle to {out} ({exc}); certificate {issued.serial:x} was issued "
                             f"but not delivered — fix the directory and run provision again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if userdb is not None and password is not None:
        if device_id in userdb:
            userdb.remove(device_id)
        userdb.add(device_id, "device", password)
        userdb.save()
    return {
        "device_id": device_id, "groups": list(groups), "tier": tier, "broker": broker_url, "out": str(out),
        "files": {name: str(out / name) for name in BUNDLE_FILES if (out / name).exists()},
        "serial": f"{issued.serial:x}", "not_after": issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "broker_user": userdb is not None, "users_file": str(users) if users is not None else None,
    }


class _ConnectOptions(argparse.Namespace):
    """The console's connection options for ``console.connect``; any option provision does
    not offer reads as unset (the console's default)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def register_client(args: argparse.Namespace) -> "ApiClient":
    """The console client ``--register`` will use, built (not connected) from the
    connection options, so that bad ones are refused before anything is issued.

    Raises:
        ProvisionError: the options cannot work (a TLS certificate without its key, TLS
            files with an ``mqtt://`` URL, a missing or unreadable file); nothing was issued.
    """
    from controller.console import connect

    conn = _ConnectOptions(broker=args.register, username=args.username, password_file=args.password_file,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout)
    try:
        return connect(conn)
    except (EdgeRuntimeError, ValueError) as exc:
        raise ProvisionError(f"--register cannot connect with these options: {exc}; nothing was issued") from None


def register(result: dict[str, Any], client: "ApiClient") -> dict[str, Any]:
    """``devices.add`` of the provisioned device and its groups through the console API
    (``client`` from ``register_client``).

    Raises:
        ProvisionError: the controller could not be reached or refused (the bundle stays).
    """
    try:
        with client as api:
            return dict(api.request("devices.add", {"id": result["device_id"], "groups": result["groups"]}))
    except EdgeRuntimeError as exc:
        raise ProvisionError(f"the bundle is in {result['out']} but the device was not registered: {exc}; register it "
                             f"with `{_register_hint(result)}`") from exc


def _register_hint(result: dict[str, Any]) -> str:
    groups = "".join(f" --group {g}" for g in result["groups"])
    return f"fleetctl device add {result['device_id']}{groups}"


# -- fleetctl provision ---------------------------------------------------------------------


def cmd_provision(args: argparse.Namespace) -> int:
    if not args.register and (args.tls_ca or args.tls_cert or args.tls_key):
        raise ProvisionError("--tls-ca, --tls-cert and --tls-key are how --register reaches the controller; give "
                             "--register URL too, or leave them out")
    client = register_client(args) if args.register else None
    result = provision(args.device_id, groups=args.group, out=args.out, broker_url=args.broker, ca_dir=args.ca,
                       keys_dir=args.keys, users=args.users, tier=args.tier, valid_days=args.days,
                       passphrase=cli_passphrase(args), force=args.force)
    result["registered"] = register(result, client) if client is not None else None
    if args.json:
        emit_json(result)
        return 0
    print(f"provisioned {result['device_id']} (groups {', '.join(result['groups'])}; tier {result['tier']}) "
          f"into {result['out']}:")
    for name, path in result["files"].items():
        print(f"  {path}{'  (secret, 0600)' if name in SECRET_FILES else ''}")
    print(f"  certificate serial {result['serial']}, valid until {result['not_after']}")
    if result["broker_user"]:
        print(f"  broker user {result['device_id']} (role device) added to {result['users_file']}; restart or reload "
              f"the broker so it reads the users file")
    if result["registered"] is not None:
        print(f"registered {result['device_id']} in the controller with groups {', '.join(result['groups'])}")
    else:
        print(f"not registered in the controller yet: run `{_register_hint(result)}` (or provision with --register URL)")
    print(f"on the device: copy {result['out']} over, then `sudo sh provision-apply.sh DIR` and "
          f"`sudo systemctl restart edge-runtime`")
    return 0


def add_cli(sub: Any, models: Any) -> None:
    """Register ``fleetctl provision``."""
    from controller.console import positive_seconds

    p = sub.add_parser("provision", help="certificate, config, trust root and broker credentials for one device",
                       description="Write the directory a device applies with firmware_scripts/provision-apply.sh.")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--group", action="append", required=True, metavar="G", help="a group the device is in (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty directory for the bundle")
    p.add_argument("--broker", required=True, metavar="URL", help="the broker the device connects to (mqtts://HOST:8883)")
    p.add_argument("--ca", type=Path, default=DEFAULT_CA_DIR, metavar="DIR", help=f"the fleet CA (default ./{DEFAULT_CA_DIR})")
    p.add_argument("--keys", type=Path, default=DEFAULT_KEYS_DIR, metavar="DIR",
                   help=f"the key directory of `fleetctl keys init` (default ./{DEFAULT_KEYS_DIR})")
    p.add_argument("--users", type=Path, metavar="FILE",
                   help="the embedded broker's users file: add the device with a new password (broker.pass)")
    p.add_argument("--tier", choices=TIERS, default="edge")
    p.add_argument("--days", type=positive_int, default=825, metavar="N", help="certificate validity (default 825)")
    p.add_argument("--force", action="store_true", help="replace the bundle in a non-empty --out and the device's broker user")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passphrase-file", metavar="FILE", help="read the CA key's passphrase from FILE")
    group.add_argument("--passphrase-env", metavar="VAR", help="read the CA key's passphrase from $VAR")
    reg = p.add_argument_group("registration in the controller")
    reg.add_argument("--register", metavar="URL", help="the broker the console reaches the controller through")
    reg.add_argument("--username", metavar="NAME", help="console MQTT user name (default $FLEETCTL_USERNAME)")
    reg.add_argument("--password-file", metavar="FILE", help="console MQTT password file (default $FLEETCTL_PASSWORD_FILE)")
    reg.add_argument("--tls-ca", metavar="FILE",
                     help="CA certificate of an mqtts:// --register broker, e.g. the fleet CA's ca.pem "
                          "(default $FLEETCTL_TLS_CA)")
    reg.add_argument("--tls-cert", metavar="FILE",
                     help="client certificate for mutual TLS, e.g. an operator's (default $FLEETCTL_TLS_CERT)")
    reg.add_argument("--tls-key", metavar="FILE", help="its private key (default $FLEETCTL_TLS_KEY)")
    reg.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="S")
    p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    p.set_defaults(fn=cmd_provision)
