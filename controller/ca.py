"""The fleet's X.509 certificate authority: certificates for mutual TLS between devices,
controllers, operators and the broker (``fleetctl ca init|issue|ls``).

Transport identity only: what a device *installs* is trusted through the Ed25519 root of
trust (``controller/keys.py``); this CA decides who may *connect*. Keys are EC P-256
(small and fast on a Pi), signatures ECDSA-SHA256.

Layout of a CA directory (``DIR``, default ``./fleet-ca``)::

    DIR/                 0700
      ca.pem             the CA certificate, 0644 (the commit point of ``init``)
      ca.key             its private key, PKCS8 PEM, 0600 (encrypted if a passphrase)
      issued.jsonl       the ledger: one JSON object a line per certificate issued
                         (name, role, serial as hex, not_before, not_after, hosts, issued_at)
      .lock              held while ``init`` or ``issue`` writes

Certificates:

    CA      CN = common name; BasicConstraints(ca, path_length=0), KeyUsage keyCertSign +
            cRLSign (critical), SubjectKeyIdentifier
    leaf    CN = name (a ``topics.check_id`` id, the same rule as device ids and broker
            user names, since a broker may take the CN as the user name), OU = role;
            BasicConstraints(ca=False), KeyUsage digitalSignature, ExtendedKeyUsage
            clientAuth (device, controller, operator) or serverAuth + clientAuth (broker,
            whose SubjectAlternativeName also holds DNS names and IP addresses from
            ``hosts``); every leaf's SubjectAlternativeName names it as the URI
            ``urn:edgefleet:ROLE:NAME`` (verifiers such as rustls and cryptography's want a
            SAN on client certificates too; brokers take the CN);
            Subject/AuthorityKeyIdentifier; random 128-bit serial; valid from
            ``SKEW`` before now (device clocks drift) and never past the CA's own end.

Every file goes through ``durable.atomic_write_bytes``. ``init`` writes ``ca.key`` and
then ``ca.pem``: a crash between them leaves no usable CA and ``init`` says what to remove.
``issue`` appends to the ledger by rewriting it atomically under the lock.

One name, one role: ``issue`` refuses a name the ledger already holds under another role
(``CANameTaken``), checked under the lock. A broker that takes the certificate's CN as the
user name (Mosquitto's ``use_identity_as_username``) cannot read the OU, so a device
certificate named like a controller would get the controller's rights. Issuing the same
name in the same role again (renewal, re-provisioning) is allowed. The ledger is the only
record of names, so ``issue`` refuses to guess past a ledger it cannot read (``CACorrupt``).

Errors (all ``CAError``, ``code = "ca_error"``; ``reason`` tells them apart)::

    EdgeRuntimeError
     └── CAError                  reason
          ├── CAExists            exists             init over an existing CA: pick another --dir
          ├── CAMissing           missing            no CA here: run ``fleetctl ca init`` first
          ├── CACorrupt           corrupt            a file does not hold what it should: restore it
          ├── CABusy              busy               another init/issue holds the lock: retry
          ├── CANameTaken         name_taken         the name is in the ledger under another role:
                                                     choose another name
          ├── CASpecError         invalid            a bad name, role, host or validity: fix the arguments
          └── CAPassphraseError   passphrase         empty, missing (``passphrase_required``) or
                                                     wrong (``wrong_passphrase``) passphrase
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.console import emit_json, positive_int, table
from edge_runtime.durable import atomic_write_bytes
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.topics import check_id

__all__ = [
    "ROLES", "Issued", "FleetCA", "CAError", "CAExists", "CAMissing", "CACorrupt", "CABusy", "CANameTaken",
    "CASpecError", "CAPassphraseError", "read_ledger", "cli_passphrase", "DEFAULT_DIR", "add_cli",
]

ROLES = ("device", "controller", "operator", "broker")
DEFAULT_DIR = Path("fleet-ca")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
LEDGER = "issued.jsonl"
LOCK_FILE = ".lock"
SKEW = timedelta(minutes=5)  # certificates start this far in the past: device clocks drift
MAX_LEAF_DAYS = 3650
MAX_CA_DAYS = 3 * 3650
ORGANIZATION = "edgefleet"
URN = "urn:edgefleet"  # every leaf's SubjectAlternativeName holds URN:ROLE:NAME (strict verifiers want a SAN)

PathLike = Union[str, "os.PathLike[str]"]


class CAError(EdgeRuntimeError):
    """Anything wrong with the fleet CA; ``reason`` says which kind (module docstring)."""

    code = "ca_error"
    http_status = 400
    reason = "ca_error"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reason": self.reason}


class CAExists(CAError):
    reason = "exists"


class CAMissing(CAError):
    reason = "missing"
    http_status = 404


class CACorrupt(CAError):
    reason = "corrupt"
    http_status = 500


class CABusy(CAError):
    reason = "busy"
    http_status = 409


class CANameTaken(CAError):
    """The name already has certificates in another role (``role`` and ``serial`` say which)."""

    reason = "name_taken"
    http_status = 409

    def __init__(self, message: str, *, name: str, role: str, serial: Optional[str]) -> None:
        super().__init__(message)
        self.name, self.role, self.serial = name, role, serial


class CASpecError(CAError):
    reason = "invalid"


class CAPassphraseError(CAError):
    reason = "passphrase"

    def __init__(self, message: str, *, reason: str = "passphrase") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Issued:
    """A certificate and its fresh private key, as ``FleetCA.issue`` returns them."""

    name: str
    role: str
    key_pem: bytes
    cert_pem: bytes
    serial: int
    not_after: datetime


def _password(passphrase: Optional[str]) -> Optional[bytes]:
    if passphrase is None:
        return None
    if not passphrase:
        raise CAPassphraseError("the passphrase is empty; give a non-empty one, or none to leave the CA key unencrypted")
    return passphrase.encode("utf-8")


def _check_days(days: int, limit: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= limit:
        raise CASpecError(f"validity must be between 1 and {limit} days, got {days!r}")
    return days


def _check_name(name: str, what: str = "certificate name") -> str:
    try:
        return check_id(name, what)
    except ValueError as exc:
        raise CASpecError(f"{exc} (the same rule as device ids: the name may become a broker user name)") from None


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host or any(c in host for c in " /*,"):
            raise CASpecError(f"host {host!r} is not a DNS name or an IP address; give e.g. broker.example.net or 10.0.0.5")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _iso(dt: datetime) -> str:
    return _utc(dt).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CABusy(f"another fleetctl is writing to the CA in {directory}; wait for it, then retry") from None
        yield
    finally:
        os.close(fd)


def read_ledger(directory: PathLike) -> list[dict[str, Any]]:
    """What ``issued.jsonl`` in ``directory`` records, oldest first (empty when nothing was issued).

    Raises:
        CAMissing: ``directory`` holds no CA.
        CACorrupt: a line of the ledger is not a JSON object.
    """
    d = Path(directory)
    if not (d / CA_CERT).exists():
        raise CAMissing(f"{d} holds no {CA_CERT}; run `fleetctl ca init --dir {d}` or point --dir at the CA")
    try:
        data = (d / LEDGER).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CACorrupt(f"cannot read {d / LEDGER} ({exc})") from exc
    return _parse_ledger(data, d / LEDGER)


def _parse_ledger(data: bytes, path: Path) -> list[dict[str, Any]]:
    """The ledger's rows (``data``: the bytes of ``path``).

    Raises:
        CACorrupt: not UTF-8, or a line is not a JSON object.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CACorrupt(f"cannot read {path} ({exc})") from exc
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise CACorrupt(f"{path} line {n} is not a JSON object; fix or remove that line")
        rows.append(row)
    return rows


class FleetCA:
    """An opened CA: its certificate and private key. ``init`` makes one, ``open`` loads one;
    the passphrase is used at that moment and never stored."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self._cert = cert
        self._key = key

    # ---- making and opening --------------------------------------------------------------

    @classmethod
    def init(cls, directory: PathLike, *, common_name: str = "edgefleet fleet CA", valid_days: int = 3650,
             passphrase: Optional[str] = None) -> "FleetCA":
        """A new CA in ``directory`` (created 0700 if needed).

        Raises:
            CAExists: ``directory`` already holds a CA (or what a crashed init left); nothing changed.
            CASpecError: an empty common name or validity out of range.
            CAPassphraseError: an empty passphrase.
            OSError: the directory cannot be created or written.
        """
        d = Path(directory)
        _check_days(valid_days, MAX_CA_DAYS)
        if not isinstance(common_name, str) or not common_name.strip() or len(common_name) > 64:
            raise CASpecError(f"the CA's common name must be 1-64 characters, got {common_name!r}")
        password = _password(passphrase)
        for name in (CA_CERT, CA_KEY, LEDGER):
            if (d / name).exists():
                raise CAExists(cls._exists_message(d, name))
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(d):
            for name in (CA_CERT, CA_KEY, LEDGER):  # again, now that we hold the lock
                if (d / name).exists():
                    raise CAExists(cls._exists_message(d, name))
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.now(timezone.utc)
            subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(_serial())
                .not_valid_before(now - SKEW)
                .not_valid_after(now + timedelta(days=valid_days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(key, hashes.SHA256())
            )
            encryption = BestAvailableEncryption(password) if password else NoEncryption()
            # The key first, the certificate last: ca.pem present means the CA is whole.
            atomic_write_bytes(d / CA_KEY, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption), mode=0o600)
            atomic_write_bytes(d / CA_CERT, cert.public_bytes(Encoding.PEM), mode=0o644)
        return cls(d, cert, key)

    @staticmethod
    def _exists_message(d: Path, name: str) -> str:
        if name == CA_KEY and not (d / CA_CERT).exists():
            return (f"{d} holds {CA_KEY} but no {CA_CERT}: an earlier init was interrupted; "
                    f"remove {d / CA_KEY} and run init again, or choose another --dir")
        return f"{d} already holds a CA ({name}); nothing was changed — choose another --dir to make a new one"

    @classmethod
    def open(cls, directory: PathLike, *, passphrase: Optional[str] = None) -> "FleetCA":
        """The CA in ``directory``.

        Raises:
            CAMissing: no ``ca.pem`` or ``ca.key`` there.
            CACorrupt: a file is not a PEM certificate / EC key, the certificate is not a CA,
                or the key is not the certificate's.
            CAPassphraseError: the key is encrypted and the passphrase is missing
                (reason ``passphrase_required``), wrong (``wrong_passphrase``) or empty.
        """
        d = Path(directory)
        cert_path, key_path = d / CA_CERT, d / CA_KEY
        try:
            cert_data = cert_path.read_bytes()
            key_data = key_path.read_bytes()
        except FileNotFoundError as exc:
            raise CAMissing(f"{d} holds no {Path(exc.filename).name}; expected a CA directory — run "
                            f"`fleetctl ca init --dir {d}` or point --dir at the right one") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except ValueError as exc:
            raise CACorrupt(f"{cert_path} is not a PEM certificate ({exc}); restore it from backup") from None
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CACorrupt(f"{cert_path} is not a CA certificate; restore the fleet CA's ca.pem from backup")
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_data
        password = _password(passphrase) if encrypted else None
        if encrypted and password is None:
            raise CAPassphraseError(f"{key_path} is encrypted; give its passphrase (--passphrase-file)",
                                    reason="passphrase_required")
        try:
            key = load_pem_private_key(key_data, password)
        except ValueError as exc:
            if encrypted:
                raise CAPassphraseError(f"the passphrase does not decrypt {key_path}; give the one used at "
                                        f"`fleetctl ca init`", reason="wrong_passphrase") from None
            raise CACorrupt(f"{key_path} is not a PEM private key ({exc}); restore it from backup") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CACorrupt(f"{key_path} holds a {type(key).__name__}, expected an EC key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CACorrupt(f"{key_path} is not the key of {cert_path}: one of them was replaced; "
                            f"restore both from the same backup")
        return cls(d, cert, key)

    # ---- reading -------------------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self._cert.public_bytes(Encoding.PEM)

    @property
    def ca_file(self) -> Path:
        return self.directory / CA_CERT

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def info(self) -> dict[str, Any]:
        """The CA's subject, validity and SHA-256 fingerprint, for tables and ``--json``."""
        return {
            "dir": str(self.directory),
            "ca_file": str(self.ca_file),
            "subject": self._cert.subject.rfc4514_string(),
            "not_before": _iso(self._cert.not_valid_before_utc),
            "not_after": _iso(self._cert.not_valid_after_utc),
            "sha256": self._cert.fingerprint(hashes.SHA256()).hex(),
        }

    # ---- issuing -------------------------------------------------------------------------

    def issue(self, name: str, role: str, *, valid_days: int = 825, hosts: Sequence[str] = ()) -> Issued:
        """A new key and a certificate for ``name`` in ``role``, recorded in the ledger.

        The certificate ends ``valid_days`` from now, or when the CA does if that is sooner.

        Raises:
            CASpecError: a bad name, role, validity or host; ``hosts`` for a role other than
                broker, or none for a broker (clients check the broker's name against them).
            CANameTaken: the ledger holds ``name`` under another role (nothing is recorded).
            CACorrupt: the ledger cannot be read, so the names in it cannot be checked.
            CABusy: another process is writing the ledger.
            OSError: the ledger cannot be written (the certificate is then not returned).
        """
        _check_name(name)
        if role not in ROLES:
            raise CASpecError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        _check_days(valid_days, MAX_LEAF_DAYS)
        hosts = list(hosts)
        if role == "broker" and not hosts:
            raise CASpecError("a broker certificate needs the names clients connect to: give --host NAME or "
                              "--host IP (repeatable)")
        if role != "broker" and hosts:
            raise CASpecError(f"--host is for broker certificates only; a {role} certificate names no host")
        san = [x509.UniformResourceIdentifier(f"{URN}:{role}:{name}"), *_san(hosts)]
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        not_after = min(now + timedelta(days=valid_days), self._cert.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if role != "broker" else [
            ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        serial = _serial()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(max(now - SKEW, self._cert.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(name=name, role=role, key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                        cert_pem=cert.public_bytes(Encoding.PEM), serial=serial, not_after=cert.not_valid_after_utc)
        self._record({"name": name, "role": role, "serial": f"{serial:x}", "not_before": _iso(cert.not_valid_before_utc),
                      "not_after": _iso(issued.not_after), "hosts": hosts, "issued_at": _iso(now)})
        return issued

    def _record(self, row: dict[str, Any]) -> None:
        path = self.directory / LEDGER
        with _locked(self.directory):
            try:
                old = path.read_bytes()
            except FileNotFoundError:
                old = b""
            _check_one_role(_parse_ledger(old, path), row["name"], row["role"])
            if old and not old.endswith(b"\n"):
                old += b"\n"
            atomic_write_bytes(path, old + json.dumps(row, sort_keys=True).encode() + b"\n", mode=0o644)

    def write(self, issued: Issued, out_dir: PathLike, *, stem: Optional[str] = None) -> dict[str, Path]:
        """Write ``issued`` as ``OUT/STEM.pem`` (0644) and ``OUT/STEM.key`` (0600); ``stem``
        defaults to the name. ``out_dir`` is created (0755) if needed.

        Raises:
            CASpecError: ``stem`` is not a plain file-name stem.
            OSError: the files cannot be written (each is either old or new, never torn).
        """
        stem = _check_name(stem if stem is not None else issued.name, "file stem")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"cert": out / f"{stem}.pem", "key": out / f"{stem}.key"}
        atomic_write_bytes(paths["key"], issued.key_pem, mode=0o600)
        atomic_write_bytes(paths["cert"], issued.cert_pem, mode=0o644)
        return paths


def _check_one_role(rows: Sequence[dict[str, Any]], name: str, role: str) -> None:
    """Raises CANameTaken when ``rows`` (the ledger) hold ``name`` in a role other than ``role``."""
    other = next((r for r in rows if r.get("name") == name and r.get("role") != role), None)
    if other is None:
        return
    taken, serial = str(other.get("role")), other.get("serial")
    raise CANameTaken(
        f"{name} already has a {taken} certificate (serial {serial}, issued {other.get('issued_at', '?')}); a {role} "
        f"certificate of the same name would get the {taken}'s broker rights, since the broker takes the identity "
        f"from the certificate's name and cannot see its role — choose another name for the {role}",
        name=name, role=taken, serial=None if serial is None else str(serial))


def _serial() -> int:
    """A random positive 128-bit serial (CA/B Forum: at least 64 bits of randomness)."""
    return secrets.randbits(128) or 1


# -- fleetctl ca ----------------------------------------------------------------------------


def cli_passphrase(args: argparse.Namespace) -> Optional[str]:
    """The CA passphrase from ``--passphrase-file`` / ``--passphrase-env`` (None without either)."""
    from controller.cli import read_passphrase
    from controller.keys import PassphraseError

    try:
        return read_passphrase(args)
    except PassphraseError as exc:
        raise CAPassphraseError(str(exc)) from None


def _fs(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a CA operation, turning a file-system failure into a typed error."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise CAError(f"{exc}; check that the directory exists and is writable by you") from exc


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca = _fs(FleetCA.init, args.dir, common_name=args.common_name, valid_days=args.days, passphrase=cli_passphrase(args))
    info = ca.info()
    if args.json:
        emit_json(info)
    else:
        print(f"fleet CA created in {info['dir']}: {info['subject']}, valid until {info['not_after']}")
        print(f"  CA certificate (give it to devices, brokers, consoles): {info['ca_file']}")
        print(f"  sha256 fingerprint {info['sha256']}")
        print(f"  keep {Path(info['dir']) / CA_KEY} secret and backed up; next: fleetctl ca issue NAME --role ROLE "
              f"--dir {info['dir']}")
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    ca = FleetCA.open(args.dir, passphrase=cli_passphrase(args))
    issued = _fs(ca.issue, args.name, args.role, valid_days=args.days, hosts=args.host or ())
    paths = _fs(ca.write, issued, args.out)
    row = {"name": issued.name, "role": issued.role, "serial": f"{issued.serial:x}", "not_after": _iso(issued.not_after),
           "hosts": list(args.host or []), "cert": str(paths["cert"]), "key": str(paths["key"]), "ca_file": str(ca.ca_file)}
    if args.json:
        emit_json(row)
    else:
        print(f"issued a {issued.role} certificate for {issued.name} (serial {row['serial']}, valid until {row['not_after']})")
        print(f"  certificate {paths['cert']}\n  key         {paths['key']} (0600: copy it only to where it is used)")
        print(f"  CA          {ca.ca_file}")
    return 0


def cmd_ca_ls(args: argparse.Namespace) -> int:
    rows = read_ledger(args.dir)
    if args.json:
        emit_json({"issued": rows})
        return 0
    if not rows:
        print(f"no certificates issued from {args.dir} yet")
        return 0
    table(["name", "role", "serial", "not after", "hosts", "issued"],
          [[r.get("name"), r.get("role"), r.get("serial"), r.get("not_after"), ", ".join(r.get("hosts") or []) or None,
            r.get("issued_at")] for r in rows])
    return 0


def add_cli(sub: Any, models: Any) -> None:
    """Register ``fleetctl ca init|issue|ls``."""
    ca = sub.add_parser("ca", help="the fleet CA: certificates for mutual TLS").add_subparsers(
        dest="ca_command", required=True)

    def common(p: argparse.ArgumentParser, passphrase: bool) -> None:
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="DIR", help=f"the CA directory (default ./{DEFAULT_DIR})")
        if passphrase:
            group = p.add_mutually_exclusive_group()
            group.add_argument("--passphrase-file", metavar="FILE", help="read the CA key's passphrase from FILE")
            group.add_argument("--passphrase-env", metavar="VAR", help="read the CA key's passphrase from $VAR")
        p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")

    p = ca.add_parser("init", help="create the CA: key and self-signed certificate")
    common(p, True)
    p.add_argument("--common-name", default="edgefleet fleet CA", metavar="CN")
    p.add_argument("--days", type=positive_int, default=3650, metavar="N", help="validity (default 3650)")
    p.set_defaults(fn=cmd_ca_init)

    p = ca.add_parser("issue", help="a key and certificate for a device, controller, operator or broker")
    p.add_argument("name", help="the certificate's CN: device id, controller instance, operator or broker name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--host", action="append", metavar="H", help="broker only: a DNS name or IP clients connect to (repeatable)")
    p.add_argument("--days", type=positive_int, default=825, metavar="N", help="validity (default 825)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="where NAME.pem and NAME.key go (default .)")
    common(p, True)
    p.set_defaults(fn=cmd_ca_issue)

    p = ca.add_parser("ls", help="the certificates issued (from the ledger)")
    common(p, False)
    p.set_defaults(fn=cmd_ca_ls)
