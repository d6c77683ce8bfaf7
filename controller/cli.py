"""``fleetctl``: the operator's console. Thin: parse, call the owning module, print.

    fleetctl models inspect FILE [--json]   validate a .tflite with the engine; signature, sha256
    fleetctl keys init --dir DIR [...]      fresh root/deploy/command keys and a signed root.json v1
    fleetctl keys rotate --dir DIR [...]    root N+1 (replace, add or remove keys; new thresholds)
    fleetctl keys show --dir DIR [--json]   roles, thresholds, keys, version and expiry

    fleetctl broker ...                     the embedded MQTT broker (controller/broker.py)
    fleetctl serve ...                      the controller daemon (controller/daemon.py)
    fleetctl models push|ls, devices, deploy, rollout, cmd, top ... (controller/console.py)
    fleetctl demo                           the whole stack on one machine (controller/demo.py)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from controller.keys import KeyDir, KeyDirError, PassphraseError
from edge_runtime import __version__
from edge_runtime.console import emit_json, positive_int, table
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.signed import ROLES


def inspect_file(path: Path) -> dict[str, Any]:
    """What a release of this file would record: digest, size, and the engine's view of it.

    Raises:
        ModelFileError: the engine cannot load the file (not TFLite, truncated, custom op).
    """
    from edge_runtime.engine import inspect_model

    signature = inspect_model(str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": str(path), "sha256": digest.hexdigest(), "size": path.stat().st_size, "signature": signature.to_dict()}


def cmd_models_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.json:
        emit_json(info)
        return 0
    print(f"{info['file']}: {info['size']} bytes, sha256 {info['sha256']}")
    rows = [[kind, t["name"], t["dtype"], str(t["shape"]), str(t.get("quantization", "")) or None]
            for kind in ("inputs", "outputs") for t in info["signature"][kind]]
    table(["", "name", "dtype", "shape", "quantization"], rows)
    return 0


def read_passphrase(args: argparse.Namespace) -> str | None:
    """The passphrase from --passphrase-file (trailing newline dropped) or --passphrase-env.

    Raises:
        PassphraseError: the file cannot be read or the variable is unset.
    """
    if getattr(args, "passphrase_file", None):
        try:
            text = Path(args.passphrase_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PassphraseError(f"cannot read the passphrase file {args.passphrase_file} ({exc}); "
                                  f"give a readable UTF-8 file") from exc
        return text.rstrip("\r\n")
    if getattr(args, "passphrase_env", None):
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise PassphraseError(f"environment variable {args.passphrase_env} is not set; "
                                  f"export it or use --passphrase-file")
        return value
    return None


def role_count(text: str) -> tuple[str, int | None]:
    """argparse type for ROLE[:N] (bad values are usage errors, exit 2)."""
    role, sep, count = text.partition(":")
    if role not in ROLES:
        raise argparse.ArgumentTypeError(f"expected ROLE[:N] with ROLE one of {', '.join(ROLES)}, got {text!r}")
    return role, (positive_int(count) if sep else None)


def role_threshold(text: str) -> tuple[str, int]:
    """argparse type for ROLE:N."""
    role, count = role_count(text)
    if count is None:
        raise argparse.ArgumentTypeError(f"expected ROLE:N (e.g. deploy:2), got {text!r}")
    return role, count


def _keydir_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a key-directory operation, turning a file-system failure into a typed error."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise KeyDirError(f"{exc}; check that the directory exists and is writable by you") from exc


def _print_keys(info: dict[str, Any]) -> None:
    state = "EXPIRED" if info["expired"] else "expires"
    print(f"{info['dir']}: root v{info['version']}, issued {info['issued_at']}, {state} {info['expires']}, "
          f"signed by {info['root_signatures']} root keys")
    rows = []
    for role, spec in info["roles"].items():
        for key in spec["keys"]:
            encrypted = None if key["encrypted"] is None else ("yes" if key["encrypted"] else "no")
            rows.append([role, f"{spec['threshold']} of {len(spec['keyids'])}", key["keyid"][:16],
                         key["file"] or "(not here: offline?)", encrypted])
    table(["role", "threshold", "keyid", "file", "encrypted"], rows)
    if info["retired"]:
        print(f"retired/: {len(info['retired'])} private key(s) no role uses any more")


def cmd_keys_init(args: argparse.Namespace) -> int:
    keydir = KeyDir(args.dir)
    _keydir_call(keydir.init, root_keys=args.root_keys, root_threshold=args.root_threshold,
                 deploy_keys=args.deploy_keys, deploy_threshold=args.deploy_threshold,
                 command_keys=args.command_keys, command_threshold=args.command_threshold,
                 passphrase=read_passphrase(args), expires_days=args.expires_days)
    return _show(keydir, args)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    thresholds = dict(args.threshold or [])
    if args.root_threshold is not None:
        thresholds["root"] = args.root_threshold
    keydir = KeyDir(args.dir)
    _keydir_call(keydir.rotate, replace=dict(args.replace or []), add={role: n or 1 for role, n in args.add or []},
                 remove=args.remove or [], thresholds=thresholds, passphrase=read_passphrase(args),
                 expires_days=args.expires_days)
    return _show(keydir, args)


def cmd_keys_show(args: argparse.Namespace) -> int:
    return _show(KeyDir(args.dir), args)


def _show(keydir: KeyDir, args: argparse.Namespace) -> int:
    info = _keydir_call(keydir.show)
    if args.json:
        emit_json(info)
    else:
        _print_keys(info)
    return 0


def _add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="signing keys and the root of trust").add_subparsers(dest="keys_command",
                                                                                           required=True)

    def passphrase_options(p: argparse.ArgumentParser, what: str) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--passphrase-file", metavar="FILE", help=f"read the passphrase {what} from FILE")
        group.add_argument("--passphrase-env", metavar="VAR", help=f"read the passphrase {what} from $VAR")

    p = keys.add_parser("init", help="create root, deploy and command keys and a signed root.json v1")
    p.add_argument("--dir", required=True, type=Path, help="a new (or empty) directory for the keys")
    for role, n, t in (("root", 3, 2), ("deploy", 1, 1), ("command", 1, 1)):
        p.add_argument(f"--{role}-keys", type=positive_int, default=n, metavar="N", help=f"{role} keys (default {n})")
        p.add_argument(f"--{role}-threshold", type=positive_int, default=t, metavar="N",
                       help=f"{role} signatures needed (default {t})")
    p.add_argument("--expires-days", type=positive_int, default=365, metavar="DAYS")
    passphrase_options(p, "that encrypts the private keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_keys_init)

    p = keys.add_parser("rotate", help="issue root N+1, signed by root N's and N+1's root keys")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--replace", type=role_count, action="append", metavar="ROLE[:N]",
                   help="retire all of ROLE's keys and make N new ones (default: as many as it had)")
    p.add_argument("--add", type=role_count, action="append", metavar="ROLE[:N]", help="N more keys for ROLE (default 1)")
    p.add_argument("--remove", action="append", metavar="KEYID", help="drop a key (keyid or 8+ digit prefix)")
    p.add_argument("--root-threshold", type=positive_int, metavar="N")
    p.add_argument("--threshold", type=role_threshold, action="append", metavar="ROLE:N")
    p.add_argument("--expires-days", type=positive_int, default=365, metavar="DAYS")
    passphrase_options(p, "that opens encrypted keys and encrypts new ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_keys_rotate)

    p = keys.add_parser("show", help="roles, thresholds, keys, version and expiry")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_keys_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetctl", description="Console of the edgefleet controller.")
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="model files and releases").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("inspect", help="validate a .tflite file with the engine; print its signature and digest")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_models_inspect)
    _add_keys_parser(sub)
    # Each part of the controller owns its subcommands (one module, one job).
    import importlib

    for name in _PARTS:
        importlib.import_module(name).add_cli(sub, models)
    return parser


# Modules with ``add_cli(subparsers, models_subparsers)``: the broker, the daemon, the
# console commands and the demo.
_PARTS = ("controller.broker", "controller.daemon", "controller.console", "controller.demo", "controller.ca",
          "controller.provision", "controller.simulate")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except EdgeRuntimeError as exc:
        if getattr(args, "json", False):
            emit_json({"error": exc.to_dict()})
        print(f"fleetctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
