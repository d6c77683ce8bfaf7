"""``fleetctl``: the operator's console. Thin: parse, call the owning module, print.

    fleetctl models inspect FILE [--json]   validate a .tflite with the engine; signature, sha256

The release, rollout and device commands arrive with the controller daemon.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime.console import emit_json, table
from edge_runtime.errors import EdgeRuntimeError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetctl", description="Console of the edgefleet controller.")
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="model files and releases").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("inspect", help="validate a .tflite file with the engine; print its signature and digest")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_models_inspect)
    return parser


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
