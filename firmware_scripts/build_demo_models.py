#!/usr/bin/env python3
"""Write the demo models and one sample input per model input.

    python firmware_scripts/build_demo_models.py --out DIR [--seed N]

Writes ``tiny_mlp_v1``, ``tiny_mlp_v2`` (same model, different weights),
``multi_io`` and ``vision_net`` as ``NAME.tflite``, each input as
``NAME.INPUT.npy``, and prints one line per file: size, sha256 and path.
The files are deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

try:
    from edge_runtime.modelgen import zoo
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_runtime.modelgen import zoo

DEMO_MODELS: dict[str, Callable[[int], zoo.BuiltModel]] = {
    "tiny_mlp_v1": lambda seed: zoo.tiny_mlp(seed),
    "tiny_mlp_v2": lambda seed: zoo.tiny_mlp(seed, version_bias=0.5),
    "multi_io": lambda seed: zoo.multi_io(seed),
    "vision_net": lambda seed: zoo.vision_net(seed),
}


def build(out: Path, *, seed: int = 0) -> list[Path]:
    """Write every demo model and its sample inputs into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, make in DEMO_MODELS.items():
        model = make(seed)
        written.append(model.save(out / f"{name}.tflite"))
        for input_name, array in model.sample_inputs(seed).items():
            path = out / f"{name}.{input_name}.npy"
            np.save(path, array, allow_pickle=False)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into (created)")
    parser.add_argument("--seed", type=int, default=0, help="weights and sample-input seed (default 0)")
    args = parser.parse_args(argv)
    for path in build(args.out, seed=args.seed):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.stat().st_size:>9}  sha256:{digest[:16]}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
