"""Test kit for the root of trust: deterministic keys, roots and signed documents, and the
process the trust crash test SIGKILLs.

Signing is done here with ``dsse.sign`` on purpose (not ``controller.keys``): the device's
tests must not depend on the controller, and a second, tiny signer keeps both honest.

    python tests/trustkit.py apply DATA_DIR OPS_DIR NOW

applies every ``OPS_DIR/NN-KIND.json`` in order (``provision`` or a ``trust.KINDS`` kind)
through ``TrustStore``, the way the agent does: verify, then persist. It dies where
``EDGEFLEET_CRASH_AT`` says; with ``EDGEFLEET_CRASH_TRACE`` it writes ``#op NN-KIND`` into the
trace before each op, so a test can tell which op the N-th crash point belongs to. It prints
one JSON line per op: ``{"op": NAME, "outcome": "accepted" | "already_current" | REASON}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.protocol import dsse
from edge_runtime.protocol.signed import PAYLOAD_TYPES
from edge_runtime.protocol.trust import Floors, Rejection, TrustedState
from edge_runtime.protocol.trust_store import TrustStore

UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # every document's default issued_at
NOW = T0 + timedelta(days=1)  # the device's clock in most cases
DEVICE = "dev-1"
GROUPS = frozenset({"cams", "eu"})

ROOT_KEYS = ("root1", "root2", "root3")
DEPLOY_KEYS = ("deploy1", "deploy2")
COMMAND_KEYS = ("command1",)


def key(name: str) -> Ed25519PrivateKey:
    """The same private key for the same name, every run."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edgefleet-test-key:" + name.encode()).digest())


def public_hex(name: str) -> str:
    return dsse.raw_public_key(key(name).public_key()).hex()


def kid(name: str) -> str:
    return dsse.keyid(key(name).public_key())


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def root_body(
    version: int = 1,
    *,
    root: Iterable[str] = ROOT_KEYS,
    root_threshold: int = 2,
    deploy: Iterable[str] = DEPLOY_KEYS,
    deploy_threshold: int = 1,
    command: Iterable[str] = COMMAND_KEYS,
    command_threshold: int = 1,
    issued_at: datetime = T0,
    expires: datetime = T0 + timedelta(days=365),
) -> dict[str, Any]:
    roles = {
        "root": (list(root), root_threshold),
        "deploy": (list(deploy), deploy_threshold),
        "command": (list(command), command_threshold),
    }
    names = sorted({n for keys, _ in roles.values() for n in keys})
    return {
        "type": "root",
        "spec_version": "1.0",
        "version": version,
        "issued_at": iso(issued_at),
        "expires": iso(expires),
        "keys": {kid(n): {"keytype": "ed25519", "public": public_hex(n)} for n in names},
        "roles": {r: {"keyids": [kid(n) for n in keys], "threshold": t} for r, (keys, t) in roles.items()},
    }


def sign(kind: str, body: dict[str, Any] | bytes, signers: Iterable[str], *, payload_type: str | None = None) -> bytes:
    """A DSSE envelope (compact JSON bytes) of ``body`` signed by the named keys, in order."""
    payload = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return dsse.sign(payload_type or PAYLOAD_TYPES[kind], payload, [key(n) for n in signers]).to_json()


def root_json(version: int = 1, signers: Iterable[str] = ("root1", "root2"), **kw: Any) -> bytes:
    return sign("root", root_body(version, **kw), signers)


def doc_body(
    kind: str,
    *,
    target: dict[str, str] | None = None,
    issued_at: datetime = T0,
    expires: datetime = T0 + timedelta(days=30),
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "spec_version": "1.0", "issued_at": iso(issued_at), "expires": iso(expires)}
    if kind in ("desired", "command"):
        body["target"] = target if target is not None else {"device": DEVICE}
    body.update(fields)
    return body


def desired(generation: int = 1, *, signers: Iterable[str] = ("deploy1",), **kw: Any) -> bytes:
    """A typical desired state: the trust header plus a few models (extra fields)."""
    kw.setdefault("models", [{"name": f"m{i}", "version": "3", "manifest": "ab" * 32} for i in range(3)])
    return sign("desired", doc_body("desired", generation=generation, **kw), signers)


def command(seq: int = 1, *, signers: Iterable[str] = ("command1",), **kw: Any) -> bytes:
    kw.setdefault("name", "reboot")
    return sign("command", doc_body("command", seq=seq, **kw), signers)


def manifest(*, signers: Iterable[str] = ("deploy1",), **kw: Any) -> bytes:
    kw.setdefault("name", "kws")
    kw.setdefault("version", "3")
    kw.setdefault("sha256", hashlib.sha256(b"model bytes").hexdigest())
    kw.setdefault("size", len(b"model bytes"))
    return sign("manifest", doc_body("manifest", **kw), signers)


def state(root: bytes | None = None, **floors: Any) -> TrustedState:
    """A trusted state on root v1 (or ``root``), with the given floors raised."""
    s = TrustedState.bootstrap(root if root is not None else root_json(), device_id=DEVICE, groups=GROUPS)
    if floors:
        s = TrustedState(s.root_envelope, s.root, s.floors.model_copy(update=floors), s.device_id, s.groups)
    return s


def edit(data: bytes, fn: Callable[[dict[str, Any]], object]) -> bytes:
    """Re-encode an envelope after ``fn`` changed its JSON object in place."""
    obj = json.loads(data)
    fn(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def floors_of(store_file: Path) -> Floors:
    return Floors.model_validate(json.loads(store_file.read_bytes())["floors"])


# -- the crash worker --------------------------------------------------------------------


def apply_ops(data_dir: str, ops_dir: str, now: datetime) -> None:
    store = TrustStore(data_dir)
    trace = os.environ.get("EDGEFLEET_CRASH_TRACE")
    for path in sorted(Path(ops_dir).glob("*.json")):
        name = path.stem
        kind = name.split("-", 1)[1]
        if trace:
            with open(trace, "a", encoding="utf-8") as f:
                f.write(f"#op {name}\n")
        data = path.read_bytes()
        if kind == "provision" and store.exists():
            outcome = "already_current"  # a restart replaying its ops after a crash
        elif kind == "provision":
            store.provision(data, device_id=DEVICE, groups=GROUPS)
            outcome = "accepted"
        else:
            current = store.load(device_id=DEVICE, groups=GROUPS)
            try:
                verified = current.verify(kind, data, now)
            except Rejection as exc:
                outcome = exc.reason.value
            else:
                store.save(verified.state)
                outcome = verified.outcome.value
        print(json.dumps({"op": name, "outcome": outcome}), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "apply":
        apply_ops(argv[1], argv[2], datetime.fromisoformat(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
