"""The controller's key directory: Ed25519 keys for the roles root, deploy and command, and
the signed ``root.json`` that tells devices which keys count and how many are needed.

Layout of a key directory (``DIR``)::

    DIR/                          0700
      root.json                   the current root: a DSSE envelope of a ``signed.Root``
      root.1.json, root.2.json    every root ever issued, byte-identical to what root.json
                                  was; a device N versions behind needs each one in turn
      keys/                       0700
        ROLE-KEYID16.key          private key, PKCS8 PEM, 0600 (encrypted if a passphrase)
        ROLE-KEYID16.pub          public key, SubjectPublicKeyInfo PEM, 0644
      retired/                    0700; keys that left every role, same names, kept so an
                                  old signature can still be explained (never used to sign)
      .lock                       held while a rotation runs

``KEYID16`` is the first 16 hex digits of the keyid (sha256 of the raw public key); the
full keyid is checked against the key itself whenever a file is loaded. ``root.json`` is the
one source of truth for which keys belong to which role: key files it does not name are not
trusted, and the next rotation moves them to ``retired/``.

Crash safety: every file goes through ``durable.atomic_write_bytes``. The order is new key
files, then ``root.N.json``, then ``root.json`` (the commit point), then retiring old keys;
a crash anywhere leaves the old root or the new root in force, never a half of each. Key
files a crashed rotation left behind are unreferenced and get retired by the next rotation.

Signing a root: ``init`` signs v1 with all its root keys; ``rotate`` signs N+1 with every
available private key of root N's root role *and* of N+1's (each key once), and refuses to
write unless both thresholds are met — checked by verifying the envelope it is about to
write, as a device would. Missing root key files (kept offline) are skipped, not errors,
as long as the threshold is still met.

Errors, typed by what the operator does next::

    EdgeRuntimeError
     └── KeyDirError              anything wrong with a key directory
          ├── KeyDirExists        init over a directory holding files: pick a new --dir
          ├── KeyDirMissing       no root.json: run ``fleetctl keys init`` first
          ├── KeyDirCorrupt       a file does not hold what it should: restore from backup
          ├── KeyDirBusy          another rotation holds the lock: wait, then retry
          ├── KeySpecError        impossible keys/thresholds/roles asked for: fix the arguments
          ├── NotEnoughKeys       fewer private keys at hand than a threshold: bring offline keys
          └── PassphraseError     the passphrase cannot be used (empty, unreadable source)
               ├── PassphraseRequired   a key is encrypted and no passphrase was given
               └── WrongPassphrase      the passphrase does not decrypt the key
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from pydantic import ValidationError

from controller.signing import iso_z, sign_body, utc_now
from edge_runtime.durable import atomic_write_bytes, fsync_dir
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import dsse
from edge_runtime.protocol.signed import PAYLOAD_TYPES, ROLES, KeyEntry, Role, Root

ROOT_FILE = "root.json"
KEYS_DIR = "keys"
RETIRED_DIR = "retired"
LOCK_FILE = ".lock"
SHORT = 16  # keyid digits in file names and tables: 64 bits, unambiguous in one directory
# Whole-number bounds that keep a typo (root_keys=300) from producing something absurd.
MAX_KEYS_PER_ROLE = 16
MAX_EXPIRES_DAYS = 3650

Passphrase = Optional[Union[str, bytes]]


class KeyDirError(EdgeRuntimeError):
    """Base of every key-directory error."""

    code = "key_dir_error"
    http_status = 400


class KeyDirExists(KeyDirError):
    code = "key_dir_exists"


class KeyDirMissing(KeyDirError):
    code = "key_dir_missing"
    http_status = 404


class KeyDirCorrupt(KeyDirError):
    code = "key_dir_corrupt"
    http_status = 500


class KeyDirBusy(KeyDirError):
    code = "key_dir_busy"
    http_status = 409


class KeySpecError(KeyDirError):
    code = "invalid_key_spec"


class NotEnoughKeys(KeyDirError):
    code = "not_enough_keys"


class PassphraseError(KeyDirError):
    code = "passphrase_error"


class PassphraseRequired(PassphraseError):
    code = "passphrase_required"


class WrongPassphrase(PassphraseError):
    code = "wrong_passphrase"


def _passphrase_bytes(passphrase: Passphrase) -> Optional[bytes]:
    if passphrase is None:
        return None
    raw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not raw:
        raise PassphraseError("the passphrase is empty; give a non-empty one, or none to leave keys unencrypted")
    return raw


def short(kid: str) -> str:
    """The keyid as shown in file names and tables."""
    return kid[:SHORT]


def count_valid(envelope: dsse.Envelope, keyids: Iterable[str], keys: Mapping[str, KeyEntry]) -> int:
    """How many distinct keys among ``keyids`` validly signed ``envelope`` (a device's count)."""
    wanted = set(keyids)
    good: set[str] = set()
    for sig in envelope.signatures:
        if sig.keyid in wanted and sig.keyid not in good and sig.keyid in keys:
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys[sig.keyid].public))
            if dsse.verify_one(envelope, sig, public):
                good.add(sig.keyid)
    return len(good)


def _check_count(role: str, n: int, threshold: int) -> None:
    if not 1 <= n <= MAX_KEYS_PER_ROLE:
        raise KeySpecError(f"role {role} needs between 1 and {MAX_KEYS_PER_ROLE} keys, got {n}")
    if not 1 <= threshold <= n:
        raise KeySpecError(f"role {role}: threshold {threshold} must be between 1 and its {n} keys; "
                           f"lower the threshold or add keys")


def _check_expires(days: int) -> None:
    if not 1 <= days <= MAX_EXPIRES_DAYS:
        raise KeySpecError(f"expires_days must be between 1 and {MAX_EXPIRES_DAYS}, got {days}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise KeySpecError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


class KeyDir:
    """One key directory on disk (see the module docstring for its layout).

    Reading methods never change anything; ``init`` and ``rotate`` are the only writers.
    Passphrases are per call and never stored.
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = Path(path)

    # ---- reading -------------------------------------------------------------------------

    @property
    def keys_dir(self) -> Path:
        return self.path / KEYS_DIR

    @property
    def retired_dir(self) -> Path:
        return self.path / RETIRED_DIR

    def history_file(self, version: int) -> Path:
        return self.path / f"root.{version}.json"

    def envelope(self) -> dsse.Envelope:
        """The current ``root.json`` envelope.

        Raises:
            KeyDirMissing: no ``root.json`` (not initialised, or the wrong directory).
            KeyDirCorrupt: ``root.json`` is not a DSSE envelope of the root payload type.
        """
        try:
            data = (self.path / ROOT_FILE).read_bytes()
        except FileNotFoundError:
            raise KeyDirMissing(f"{self.path} holds no {ROOT_FILE}; expected an initialised key directory — "
                                f"run `fleetctl keys init --dir {self.path}` or point --dir at the right one") from None
        try:
            envelope = dsse.Envelope.from_json(data)
        except dsse.EnvelopeError as exc:
            raise KeyDirCorrupt(f"{self.path / ROOT_FILE} is not a DSSE envelope ({exc}); restore it from "
                                f"the newest root.N.json") from exc
        if envelope.payload_type != PAYLOAD_TYPES["root"]:
            raise KeyDirCorrupt(f"{self.path / ROOT_FILE} has payloadType {envelope.payload_type!r}, "
                                f"expected {PAYLOAD_TYPES['root']!r}; restore it from the newest root.N.json")
        return envelope

    def root(self) -> Root:
        """The current root's payload, validated.

        Raises:
            KeyDirMissing, KeyDirCorrupt: as ``envelope``; or the payload is not a valid Root.
        """
        envelope = self.envelope()
        try:
            return Root.model_validate_json(envelope.payload)
        except ValidationError as exc:
            raise KeyDirCorrupt(f"{self.path / ROOT_FILE} does not hold a valid root: {exc}") from exc

    def key_file(self, kid: str, *, private: bool = True) -> Optional[Path]:
        """The private (or public) key file of ``kid`` in ``keys/``, or None (offline, retired)."""
        suffix = ".key" if private else ".pub"
        matches = sorted(self.keys_dir.glob(f"*-{short(kid)}{suffix}"))
        return matches[0] if matches else None

    def private_key(self, kid: str, *, passphrase: Passphrase = None) -> Ed25519PrivateKey:
        """Load ``kid``'s private key.

        An unencrypted key loads whatever passphrase is given: a directory may mix both
        after a rotation added encrypted keys to unencrypted ones.

        Raises:
            KeyDirMissing: no private key file for ``kid`` here.
            PassphraseRequired, WrongPassphrase, PassphraseError: the key is encrypted and the
                passphrase is absent, wrong or empty.
            KeyDirCorrupt: the file is not an Ed25519 PKCS8 key, or not the key ``kid`` names.
        """
        path = self.key_file(kid)
        if path is None:
            raise KeyDirMissing(f"no private key file for key {short(kid)} in {self.keys_dir}; "
                                f"if it is kept offline, copy it back before signing")
        data = path.read_bytes()
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        password = _passphrase_bytes(passphrase) if encrypted else None
        if encrypted and password is None:
            raise PassphraseRequired(f"{path} is encrypted; give its passphrase "
                                     f"(--passphrase-file or --passphrase-env)")
        try:
            key = load_pem_private_key(data, password)
        except ValueError as exc:
            if encrypted:
                raise WrongPassphrase(f"the passphrase does not decrypt {path}; give the one used "
                                      f"when the key was made") from None
            raise KeyDirCorrupt(f"{path} is not a PEM private key ({exc}); restore it from backup") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyDirCorrupt(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
        if dsse.keyid(key.public_key()) != kid:
            raise KeyDirCorrupt(f"{path} holds key {short(dsse.keyid(key.public_key()))}, not {short(kid)}; "
                                f"a key file was renamed or replaced — restore it from backup")
        return key

    def available_keys(self, keyids: Iterable[str], *, passphrase: Passphrase = None) -> dict[str, Ed25519PrivateKey]:
        """The private keys among ``keyids`` whose files are here (offline ones are skipped).

        Raises:
            PassphraseRequired, WrongPassphrase, PassphraseError, KeyDirCorrupt: as ``private_key``.
        """
        out: dict[str, Ed25519PrivateKey] = {}
        for kid in keyids:
            if kid not in out and self.key_file(kid) is not None:
                out[kid] = self.private_key(kid, passphrase=passphrase)
        return out

    def signing_keys(self, role: str, *, passphrase: Passphrase = None) -> list[Ed25519PrivateKey]:
        """A threshold of ``role``'s private keys, in the root's keyid order.

        Only as many as the threshold are loaded: more signatures prove nothing more, and
        each decryption costs time.

        Raises:
            KeySpecError: ``role`` is not a role.
            NotEnoughKeys: fewer than the threshold of the role's key files are here.
            KeyDirMissing, KeyDirCorrupt, PassphraseRequired, WrongPassphrase, PassphraseError.
        """
        _check_role(role)
        spec = self.root().roles[role]
        keys: list[Ed25519PrivateKey] = []
        for kid in spec.keyids:
            if len(keys) == spec.threshold:
                break
            if self.key_file(kid) is not None:
                keys.append(self.private_key(kid, passphrase=passphrase))
        if len(keys) < spec.threshold:
            raise NotEnoughKeys(f"role {role} needs {spec.threshold} keys to sign but only {len(keys)} of its "
                                f"{len(spec.keyids)} private key files are in {self.keys_dir}; copy the offline ones back")
        return keys

    def show(self) -> dict[str, Any]:
        """What the directory holds: version, dates, each role's threshold and keys, history.

        Raises:
            KeyDirMissing, KeyDirCorrupt: ``root.json`` is absent or invalid.
        """
        envelope = self.envelope()
        root = self.root()
        roles: dict[str, Any] = {}
        for name in ROLES:
            spec = root.roles[name]
            entries = []
            for kid in spec.keyids:
                private = self.key_file(kid)
                public = self.key_file(kid, private=False)
                entries.append({
                    "keyid": kid,
                    "file": str(private.relative_to(self.path)) if private else None,
                    "public_file": str(public.relative_to(self.path)) if public else None,
                    "encrypted": (b"ENCRYPTED" in private.read_bytes().split(b"\n", 1)[0]) if private else None,
                })
            roles[name] = {"threshold": spec.threshold, "keyids": list(spec.keyids), "keys": entries}
        history = sorted(int(p.name.split(".")[1]) for p in self.path.glob("root.*.json")
                         if p.name.split(".")[1].isdigit())
        retired = sorted(p.name for p in self.retired_dir.glob("*.key")) if self.retired_dir.is_dir() else []
        return {
            "dir": str(self.path),
            "version": root.version,
            "issued_at": iso_z(root.issued_at),
            "expires": iso_z(root.expires),
            "expired": root.expires <= utc_now(),
            "root_signatures": count_valid(envelope, root.roles["root"].keyids, root.keys),
            "roles": roles,
            "history": history,
            "retired": retired,
        }

    # ---- writing -------------------------------------------------------------------------

    def init(self, *, root_keys: int = 3, root_threshold: int = 2, deploy_keys: int = 1, deploy_threshold: int = 1,
             command_keys: int = 1, command_threshold: int = 1, passphrase: Passphrase = None,
             expires_days: int = 365, now: Optional[datetime] = None) -> dsse.Envelope:
        """Create the directory: fresh keys for every role and ``root.json`` v1 signed by all
        root keys. Returns the root envelope.

        Raises:
            KeySpecError: a count or threshold out of range.
            PassphraseError: an empty passphrase.
            KeyDirExists: ``path`` exists and is not an empty directory (nothing is touched).
            OSError: the directory or a file could not be written.
        """
        spec = {"root": (root_keys, root_threshold), "deploy": (deploy_keys, deploy_threshold),
                "command": (command_keys, command_threshold)}
        for role, (n, threshold) in spec.items():
            _check_count(role, n, threshold)
        _check_expires(expires_days)
        password = _passphrase_bytes(passphrase)
        self._claim()
        generated = {role: [Ed25519PrivateKey.generate() for _ in range(n)] for role, (n, _t) in spec.items()}
        for role, keys in generated.items():
            for key in keys:
                self._write_key(role, key, password)
        members = {role: [dsse.keyid(k.public_key()) for k in keys] for role, keys in generated.items()}
        publics = {dsse.keyid(k.public_key()): k.public_key() for keys in generated.values() for k in keys}
        root = _root_body(1, members, {r: t for r, (_n, t) in spec.items()}, publics, now, expires_days)
        envelope = sign_body(root, "root", generated["root"])
        self._check_signed(envelope, root, None)
        self._commit(envelope, 1)
        return envelope

    def rotate(self, *, replace: Optional[Mapping[str, Optional[int]]] = None, add: Optional[Mapping[str, int]] = None,
               remove: Iterable[str] = (), thresholds: Optional[Mapping[str, int]] = None,
               passphrase: Passphrase = None, expires_days: int = 365,
               now: Optional[datetime] = None) -> dsse.Envelope:
        """Issue root N+1 and return its envelope.

        ``replace={"deploy": 1}``: retire every current deploy key and make 1 new one (None:
        as many as the role had). ``add={"root": 1}``: one more root key. ``remove``: keyids
        (or unique prefixes of at least 8 digits) dropped from every role. ``thresholds``:
        new thresholds by role; otherwise each role keeps its own. With no changes at all
        the root is simply re-signed with a later expiry. New keys are encrypted with
        ``passphrase`` when given, which must also open any encrypted root key.

        Raises:
            KeyDirMissing, KeyDirCorrupt: no valid current root.
            KeyDirBusy: another rotation is running.
            KeySpecError: unknown role, unknown or ambiguous keyid, a role left without keys
                or with a threshold it cannot reach.
            NotEnoughKeys: fewer available private keys than root N's or N+1's root threshold.
            PassphraseRequired, WrongPassphrase, PassphraseError: a root key cannot be opened.
            OSError: a file could not be written (the old root stays in force).
        """
        replace = dict(replace or {})
        add = dict(add or {})
        thresholds = dict(thresholds or {})
        for role in [*replace, *add, *thresholds]:
            _check_role(role)
        for role, n in [*replace.items(), *add.items()]:
            if n is not None and not 1 <= n <= MAX_KEYS_PER_ROLE:
                raise KeySpecError(f"role {role}: the number of new keys must be between 1 and {MAX_KEYS_PER_ROLE}, got {n}")
        _check_expires(expires_days)
        password = _passphrase_bytes(passphrase)
        with self._locked():
            old = self.root()
            self._retire_unreferenced(set(old.keys))  # finish a rotation that crashed after its commit
            members = {role: list(old.roles[role].keyids) for role in ROLES}
            for kid in (self._resolve(old, text) for text in remove):
                for role in ROLES:
                    if kid in members[role]:
                        members[role].remove(kid)
            generated: dict[str, list[Ed25519PrivateKey]] = {role: [] for role in ROLES}
            for role, n in replace.items():
                count = len(old.roles[role].keyids) if n is None else n
                members[role] = []
                generated[role] += [Ed25519PrivateKey.generate() for _ in range(count)]
            for role, n in add.items():
                generated[role] += [Ed25519PrivateKey.generate() for _ in range(n)]
            for role in ROLES:
                members[role] += [dsse.keyid(k.public_key()) for k in generated[role]]
            new_thresholds = {role: thresholds.get(role, old.roles[role].threshold) for role in ROLES}
            for role in ROLES:
                _check_count(role, len(members[role]), new_thresholds[role])

            publics = {kid: Ed25519PublicKey.from_public_bytes(bytes.fromhex(old.keys[kid].public))
                       for role in ROLES for kid in members[role] if kid in old.keys}
            publics.update({dsse.keyid(k.public_key()): k.public_key() for ks in generated.values() for k in ks})
            root = _root_body(old.version + 1, members, new_thresholds, publics, now, expires_days)

            # Both sets sign: a device trusting N needs N's threshold, and N+1 must prove its
            # own keys are live before anyone depends on them.
            signers = self.available_keys(old.roles["root"].keyids, passphrase=password)
            _need(signers, old.roles["root"], f"root v{old.version}")
            kept = [kid for kid in members["root"] if kid in old.keys and kid not in signers]
            signers.update(self.available_keys(kept, passphrase=password))
            signers.update({dsse.keyid(k.public_key()): k for k in generated["root"]})
            _need(signers, root.roles["root"], f"root v{root.version}")
            envelope = sign_body(root, "root", list(signers.values()))
            self._check_signed(envelope, root, old)

            for role in ROLES:
                for key in generated[role]:
                    self._write_key(role, key, password)
            self._commit(envelope, root.version)
            self._retire_unreferenced(set(root.keys))
        return envelope

    # ---- internals -----------------------------------------------------------------------

    def _claim(self) -> None:
        """Create (or adopt an empty) directory for ``init``, refusing anything else."""
        if self.path.exists():
            if not self.path.is_dir():
                raise KeyDirExists(f"{self.path} is a file; expected a new or empty directory for the keys — "
                                   f"choose another --dir")
            if any(self.path.iterdir()):
                if not (self.path / ROOT_FILE).exists():
                    raise KeyDirExists(f"{self.path} holds files but no {ROOT_FILE} (an interrupted init?); "
                                       f"`keys init` never overwrites — choose a new --dir, or remove this one")
                raise KeyDirExists(f"{self.path} already holds a key directory; `keys init` never overwrites keys — "
                                   f"choose a new --dir, or use `fleetctl keys rotate --dir {self.path}` to change them")
        else:
            self.path.mkdir(parents=True, mode=0o700)
        try:
            # mkdir is atomic, so of two concurrent inits on one empty directory only one wins.
            self.keys_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise KeyDirExists(f"{self.path} is being initialised by another process; choose another --dir") from None
        fsync_dir(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not (self.path / ROOT_FILE).exists():
            self.envelope()  # raises the KeyDirMissing with its guidance
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KeyDirBusy(f"another process is rotating the keys in {self.path}; wait for it, then retry") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write_key(self, role: str, key: Ed25519PrivateKey, password: Optional[bytes]) -> None:
        kid = dsse.keyid(key.public_key())
        encryption = BestAvailableEncryption(password) if password else NoEncryption()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
        public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(self.keys_dir / f"{role}-{short(kid)}.pub", public, mode=0o644)
        atomic_write_bytes(self.keys_dir / f"{role}-{short(kid)}.key", pem, mode=0o600)

    def _commit(self, envelope: dsse.Envelope, version: int) -> None:
        data = envelope.to_json()
        # History first: once root.json says N, root.N.json must already exist for devices
        # that need the chain.
        atomic_write_bytes(self.history_file(version), data)
        atomic_write_bytes(self.path / ROOT_FILE, data)

    def _retire_unreferenced(self, trusted: set[str]) -> None:
        """Move key files no root role names into ``retired/`` (never delete a private key)."""
        shorts = {short(kid) for kid in trusted}
        stale = [p for p in self.keys_dir.glob("*-*.*") if p.suffix in (".key", ".pub")
                 and p.stem.rsplit("-", 1)[-1] not in shorts]
        if not stale:
            return
        self.retired_dir.mkdir(mode=0o700, exist_ok=True)
        for path in stale:
            os.replace(path, self.retired_dir / path.name)
        fsync_dir(self.retired_dir)
        fsync_dir(self.keys_dir)

    def _resolve(self, root: Root, text: str) -> str:
        text = text.lower()
        if len(text) < 8:
            raise KeySpecError(f"key {text!r} is too short to name a key; give at least 8 hex digits of its keyid")
        hits = [kid for kid in root.keys if kid.startswith(text)]
        if len(hits) != 1:
            what = "matches no key" if not hits else f"matches {len(hits)} keys"
            raise KeySpecError(f"key {text!r} {what} of root v{root.version}; see `fleetctl keys show --dir {self.path}`")
        return hits[0]

    def _check_signed(self, envelope: dsse.Envelope, new: Root, old: Optional[Root]) -> None:
        """Verify what is about to be written as a device would; a failure is a bug here."""
        for root in (old, new):
            if root is None:
                continue
            spec = root.roles["root"]
            if count_valid(envelope, spec.keyids, root.keys) < spec.threshold:
                raise NotEnoughKeys(f"root v{new.version} would not carry a threshold of root v{root.version}'s "
                                    f"signatures; nothing was written")


def _need(signers: Mapping[str, Ed25519PrivateKey], role: Role, label: str) -> None:
    have = sum(1 for kid in role.keyids if kid in signers)
    if have < role.threshold:
        raise NotEnoughKeys(f"{label} needs {role.threshold} root keys to sign but only {have} of its "
                            f"{len(role.keyids)} private key files are here; copy the offline ones back and retry")


def _root_body(version: int, members: Mapping[str, list[str]], thresholds: Mapping[str, int],
               publics: Mapping[str, Any], now: Optional[datetime], expires_days: int) -> Root:
    issued = (now if now is not None else utc_now())
    iso_z(issued)  # refuses a naive ``now``
    used = {kid for kids in members.values() for kid in kids}
    keys = {kid: KeyEntry(public=dsse.raw_public_key(publics[kid]).hex()) for kid in sorted(used)}
    roles = {role: Role(keyids=list(members[role]), threshold=thresholds[role]) for role in ROLES}
    return Root(version=version, issued_at=issued, expires=issued + timedelta(days=expires_days), keys=keys, roles=roles)
