"""``edge-runtime`` commands that work on a data dir: run, serve, install, models, rollback, activate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_runtime.console import emit_json, positive_int, table


def _store(args: argparse.Namespace) -> Any:
    from edge_runtime.store import ModelStore

    return ModelStore(args.data_dir, quota_bytes=getattr(args, "quota_bytes", None))


def _installer(args: argparse.Namespace) -> Any:
    from edge_runtime.engine import Engine, load_backend
    from edge_runtime.installer import Installer

    return Installer(_store(args), Engine(backend=load_backend(args.backend), pool_size=1))


def rest_address(value: str) -> tuple[str, int | None]:
    """argparse type for ``--rest``: ``HOST:PORT``, ``:PORT`` or ``off``."""
    if value in ("off", "none", ""):
        return "127.0.0.1", None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8501) or 'off', got {value!r}")
    return host or "127.0.0.1", int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edge_runtime.runtime import Runtime, ServeConfig

    host, port = args.rest
    try:
        config = ServeConfig(data_dir=args.data_dir, rest_host=host, rest_port=port, socket_path=args.socket,
                             pool_size=args.pool_size, num_threads=args.num_threads, backend=args.backend,
                             quota_bytes=args.quota_bytes)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"edge-runtime serve: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    runtime = Runtime(config)

    def ready(rt: Runtime) -> None:
        # One JSON line on stdout: scripts and tests wait for it instead of guessing.
        emit_json({"event": "ready", **rt.endpoints()})
        sys.stdout.flush()

    runtime.run_until_signal(on_ready=ready)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from edge_runtime.health import health_check_from_files

    health = None
    if args.health_sample:
        health = health_check_from_files(args.health_sample, args.health_expected, atol=args.atol,
                                         latency_budget_ms=args.latency_budget_ms)
    result = _installer(args).install_file(args.name, args.version, args.file, expected_sha256=args.sha256, health=health)
    if args.json:
        emit_json(result.to_dict())
    else:
        replaced = f" (replaces {result.replaced})" if result.replaced else ""
        print(f"{args.name} {args.version}: {result.outcome}{replaced}, sha256 {result.sha256[:12]}, {result.size} bytes")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [m.to_dict() for m in store.models()]
    problems = store.fsck() if args.verify else []
    if args.json:
        emit_json({"models": rows, **({"problems": problems} if args.verify else {})})
    else:
        table(["model", "active", "previous", "sha256", "size", "installing", "last install"],
              [_model_row(r) for r in rows])
        if args.verify:
            print("store ok" if not problems else "problems:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


def _model_row(r: dict[str, Any]) -> list[Any]:
    active = (r.get("versions") or {}).get(r.get("active") or "", {})
    last = r.get("last_result") or {}
    installing = r.get("installing") or {}
    return [r["name"], r.get("active"), ",".join(r.get("previous") or []) or None,
            (active.get("sha256") or "")[:12] or None, active.get("size"),
            f"{installing.get('version')} ({installing.get('state')})" if installing else None,
            f"{last.get('version')}: {last.get('outcome')}" + (f" ({last.get('reason')})" if last.get("reason") else "") if last else None]


def cmd_rollback(args: argparse.Namespace) -> int:
    active = _installer(args).rollback(args.name)
    emit_json({"name": args.name, "active": active}) if args.json else print(f"{args.name}: rolled back, active version {active}")
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    replaced = _installer(args).activate_version(args.name, args.version)
    if args.json:
        emit_json({"name": args.name, "active": args.version, "replaced": replaced})
    else:
        print(f"{args.name}: active version {args.version}" + (f" (was {replaced})" if replaced else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_runtime.demo import run_demo

    return run_demo(data_dir=args.data_dir, as_json=args.json)


EX_CONFIG = 78  # sysexits: a configuration error; the unit does not restart on it


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from edge_runtime.agent.config import ConfigError
    from edge_runtime.agent.daemon import NotProvisionedError, run

    logging.getLogger().setLevel(args.log_level.upper())
    try:
        return run(args.config)
    except (ConfigError, NotProvisionedError) as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return EX_CONFIG


def register(command: Any) -> None:
    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, required=True, help="the runtime's state directory")
        p.add_argument("--quota-bytes", type=positive_int, default=None, help="disk quota for model blobs")

    p = command("run", "the device agent: serve models, follow the controller over MQTT, report telemetry")
    p.add_argument("--config", type=Path, required=True, help="the agent's TOML config (see firmware_scripts/)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.set_defaults(fn=cmd_run)

    p = command("serve", "serve the store's models over REST and the fast path (no MQTT)")
    data_dir(p)
    p.add_argument("--rest", type=rest_address, default="127.0.0.1:8501", help="HOST:PORT for REST, or 'off'")
    p.add_argument("--socket", type=Path, default=None, help="fast-path socket (default DATA_DIR/run/api.sock)")
    p.add_argument("--pool-size", type=positive_int, default=2, help="most interpreters per model (grown on demand)")
    p.add_argument("--num-threads", type=positive_int, default=1, help="threads per interpreter")
    p.set_defaults(fn=cmd_serve)

    p = command("install", "install a .tflite file into the store and make it active")
    p.add_argument("file", type=Path)
    data_dir(p)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--sha256", help="refuse the file unless its sha256 is this")
    p.add_argument("--health-sample", type=Path, help=".npy/.npz sample input for the health check")
    p.add_argument("--health-expected", type=Path, help=".npy/.npz expected output for the sample")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--latency-budget-ms", type=float, default=None)
    p.set_defaults(fn=cmd_install)

    p = command("models", "list the store's models")
    data_dir(p)
    p.add_argument("--verify", action="store_true", help="also check every blob's hash")
    p.set_defaults(fn=cmd_models)

    p = command("rollback", "make a model's previous version active again")
    p.add_argument("name")
    data_dir(p)
    p.set_defaults(fn=cmd_rollback)

    p = command("activate", "make an installed version active")
    p.add_argument("name")
    p.add_argument("version")
    data_dir(p)
    p.set_defaults(fn=cmd_activate)

    p = command("demo", "device-side demo: build, install, serve, call, hot-swap, refuse, roll back")
    p.add_argument("--data-dir", type=Path, default=None, help="keep the demo's state here (default: a temp dir)")
    p.set_defaults(fn=cmd_demo)
