"""``edge-runtime``: the device command line. Thin: parse, call the owning module, print.

    edge-runtime infer MODEL.tflite --input x.npy [--input NAME=y.npy] [--output out.npz]
    edge-runtime run --config agent.toml                  (the device agent, under systemd)
    edge-runtime serve --data-dir DIR [--rest 127.0.0.1:8501] [--socket PATH]
    edge-runtime install FILE --data-dir DIR --name N --version V [--sha256 H] [--health-sample x.npz]
    edge-runtime models --data-dir DIR [--verify]
    edge-runtime rollback NAME --data-dir DIR
    edge-runtime activate NAME VERSION --data-dir DIR
    edge-runtime bench MODEL.tflite [--iterations N]
    edge-runtime demo

Every command takes ``--json``. Exit codes: 0 ok, 1 a typed runtime error (its message says
what was expected and what to do), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import __version__
from edge_runtime.console import emit_json, positive_int, table
from edge_runtime.errors import EdgeRuntimeError, InputError


def _load_inputs(specs: list[str]) -> dict[str, np.ndarray] | list[np.ndarray]:
    """``--input`` values: ``x.npy`` (positional), ``NAME=x.npy`` (named) or ``x.npz`` (named)."""
    named: dict[str, np.ndarray] = {}
    positional: list[np.ndarray] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise InputError(f"cannot read input {path!r} as .npy/.npz: {exc or 'empty file'}") from exc
        if isinstance(loaded, np.lib.npyio.NpzFile):
            named.update({k: loaded[k] for k in loaded.files})
        elif name:
            named[name] = loaded
        else:
            positional.append(loaded)
    if named and positional:
        raise InputError("mix of named and unnamed --input values; name them all (NAME=file.npy)")
    return named or positional


def cmd_infer(args: argparse.Namespace) -> int:
    from edge_runtime.engine import Engine, inspect_model

    engine = Engine(pool_size=1, num_threads=args.num_threads, backend=_backend(args))
    inspect_model(str(args.model), backend=engine.backend)  # a damaged file must not crash us
    model = engine.load("cli", "file", args.model, warm_up=False)
    feeds = _load_inputs(args.input)
    outputs = model.predict(feeds)
    if args.output:
        np.savez(args.output, **outputs)  # type: ignore[arg-type]
    if args.json:
        emit_json({"model": str(args.model), "backend": engine.backend.name, "output_file": args.output,
                   "outputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape), "values": v.ravel()[:16].tolist()} for k, v in outputs.items()}})
    else:
        table(["output", "dtype", "shape", "first values"],
              [[k, v.dtype.name, str(list(v.shape)), np.array2string(v.ravel()[:6], precision=4)] for k, v in outputs.items()])
        if args.output:
            print(f"wrote {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_runtime.benchmark import interleaved, machine
    from edge_runtime.engine import Engine

    engine = Engine(pool_size=1, num_threads=args.num_threads, backend=_backend(args))
    model = engine.swap("bench", "file", args.model)
    raw = engine.backend.interpreter(args.model, num_threads=args.num_threads)
    feeds = model.signature.zeros()
    in_idx = [s.index for s in model.signature.inputs]
    out_idx = [s.index for s in model.signature.outputs]

    def raw_call() -> None:
        for idx, arr in zip(in_idx, feeds):
            raw.set_tensor(idx, arr)
        raw.invoke()
        for idx in out_idx:
            raw.get_tensor(idx)

    named = {s.name: a for s, a in zip(model.signature.inputs, feeds)}
    result = interleaved({"raw": raw_call, "engine": lambda: engine.predict("bench", named)}, iterations=args.iterations)
    overhead = (result["engine"].p50 - result["raw"].p50) / result["raw"].p50 * 100
    summary = {"model": str(args.model), "machine": machine(), "raw": result["raw"].summary(),
               "engine": result["engine"].summary(), "engine_overhead_p50_pct": round(overhead, 2)}
    if args.json:
        emit_json(summary)
    else:
        table(["path", "p50 ms", "p99 ms", "mean ms"],
              [[k, v.p50, v.p99, v.mean] for k, v in result.items()])
        print(f"engine overhead at p50: {overhead:+.2f}% of the raw interpreter")
    return 0


def _backend(args: argparse.Namespace) -> Any:
    if getattr(args, "backend", None):
        from edge_runtime.engine import load_backend

        return load_backend(args.backend)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Offline TFLite runtime for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.add_argument("--backend", choices=["ai_edge_litert", "tflite_runtime"], help="force an interpreter backend")
        return p

    p = command("infer", "run a .tflite file once, offline, with no daemon")
    p.add_argument("model", type=Path)
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]FILE", help=".npy (repeatable) or .npz")
    p.add_argument("--output", metavar="OUT.npz")
    p.add_argument("--num-threads", type=positive_int, default=1)
    p.set_defaults(fn=cmd_infer)

    p = command("bench", "time the raw interpreter against the engine on one model")
    p.add_argument("model", type=Path)
    p.add_argument("--iterations", type=positive_int, default=200)
    p.add_argument("--num-threads", type=positive_int, default=1)
    p.set_defaults(fn=cmd_bench)

    _add_store_commands(command)
    return parser


def _add_store_commands(command: Any) -> None:
    """Commands over a data dir (store, serving daemon, demo)."""
    from edge_runtime import commands

    commands.register(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except EdgeRuntimeError as exc:
        if getattr(args, "json", False):
            emit_json({"error": exc.to_dict()})
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
