"""Latency measurement shared by ``edge-runtime bench`` and the ``bench/`` scripts.

Machines here are shared and noisy, so comparisons are made *within one run*: the
candidates are called in interleaved order (A B C, A B C, ...) so that a burst of noise
lands on all of them alike, and results are reported as ratios to the raw interpreter.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    samples_ms: np.ndarray

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    @property
    def mean(self) -> float:
        return float(self.samples_ms.mean())

    def summary(self) -> dict[str, float]:
        return {"p50_ms": round(self.p50, 4), "p99_ms": round(self.p99, 4), "mean_ms": round(self.mean, 4), "n": int(self.samples_ms.size)}


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    iterations: int,
    warmup: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Latency]:
    """Time every candidate ``iterations`` times, interleaved; returns latency per name."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples = {name: np.empty(iterations) for name in names}
    clock = time.perf_counter
    for i in range(iterations):
        for name in names:
            fn = candidates[name]
            t0 = clock()
            fn()
            samples[name][i] = (clock() - t0) * 1e3
        if progress and (i + 1) % max(1, iterations // 10) == 0:
            progress(i + 1, iterations)
    return {name: Latency(s) for name, s in samples.items()}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        from edge_runtime.engine import load_backend

        backend = load_backend()
        info["backend"] = f"{backend.name} {backend.version}"
    except Exception as exc:  # the machine block must never stop a report
        info["backend"] = f"unavailable: {exc}"
    return info


def target(value: float, limit: float, op: str) -> dict[str, Any]:
    """One entry of a bench report's ``targets`` (DESIGN.md: value, limit, op, met)."""
    met = value <= limit if op == "<=" else value >= limit
    return {"value": round(value, 4), "limit": limit, "op": op, "met": bool(met)}


def report(name: str, metrics: dict[str, Any], targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"bench": name, "machine": machine(), "metrics": metrics, "targets": targets}
