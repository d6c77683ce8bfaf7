"""Health checks: does a freshly loaded model version answer, correctly and fast enough?

The installer runs one on every new version before it is allowed to serve (Mender's
"install → check → commit, else roll back"). A check feeds sample inputs, and fails when
the model errors, returns non-finite numbers, strays from the expected outputs by more than
``atol + rtol * |expected|``, or is slower than the latency budget. Without a configured
check the installer still runs ``HealthCheck()``: zeros in, every output finite.

A check can be saved beside an install in progress (``save``/``load``, ``.npz``) so that
recovery after a crash re-runs exactly the check the install was given.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from edge_runtime.durable import atomic_write_bytes
from edge_runtime.engine import LoadedModel
from edge_runtime.errors import HealthCheckFailed

Sample = Union[Mapping[str, np.ndarray], np.ndarray]

_FILE_FORMAT = 1
_IN = "input::"
_OUT = "expected::"
_SINGLE = "input"
_META = "meta"


@dataclass(frozen=True, eq=False)
class HealthCheck:
    """What a new version must do before it serves.

    ``inputs``: a mapping by input name, or one array for a single-input model; None means
    zeros of the model's signature. ``expected``: outputs by name, compared with
    ``atol``/``rtol``; None checks only that outputs are finite. ``latency_budget_ms``: the
    median of ``runs`` calls must not exceed it.
    """

    inputs: Sample | None = None
    expected: Mapping[str, np.ndarray] | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    latency_budget_ms: float | None = None
    runs: int = 3

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"atol and rtol must be >= 0, got atol={self.atol} rtol={self.rtol}")

    def run(self, loaded: LoadedModel) -> dict[str, Any]:
        """Run the check on a loaded (not yet serving) version; return its figures.

        Figures: ``latency_ms`` (median), ``non_finite`` (count of NaN/inf output values),
        ``max_abs_error`` (None without expected outputs), ``runs``.

        Raises:
            HealthCheckFailed: the model raised, or an output is non-finite, outside the
                tolerance, missing or misshapen, or the latency is over budget;
                ``.figures`` holds the numbers measured so far.
        """
        figures: dict[str, Any] = {"latency_ms": None, "non_finite": 0, "max_abs_error": None, "runs": 0}
        feeds: Any = self.inputs if self.inputs is not None else loaded.signature.zeros()
        times: list[float] = []
        outputs: dict[str, np.ndarray] = {}
        try:
            for _ in range(self.runs):
                start = time.perf_counter()
                outputs = loaded.predict(feeds, coerce=True)
                times.append(time.perf_counter() - start)
        except Exception as exc:  # any failure of the model under test is a failed check
            figures["error"] = f"{type(exc).__name__}: {exc}"
            raise HealthCheckFailed(
                f"{loaded.name} {loaded.version}: the model failed on the health-check sample: {exc}",
                figures=figures,
            ) from exc
        figures["runs"] = len(times)
        figures["latency_ms"] = round(statistics.median(times) * 1e3, 4)
        failures: list[str] = []

        non_finite = sum(int(np.count_nonzero(~np.isfinite(v))) for v in outputs.values() if v.dtype.kind in "fc")
        figures["non_finite"] = non_finite
        if non_finite:
            failures.append(f"{non_finite} output values are NaN or infinite")

        if self.expected is not None:
            max_err = 0.0
            for name, want in sorted(self.expected.items()):
                got = outputs.get(name)
                if got is None:
                    failures.append(f"expected output {name!r}, the model gives {', '.join(sorted(outputs))}")
                    continue
                want_arr = np.asarray(want)
                if got.shape != want_arr.shape:
                    failures.append(f"output {name!r}: shape {list(got.shape)}, expected {list(want_arr.shape)}")
                    continue
                got64 = got.astype(np.float64)
                want64 = want_arr.astype(np.float64)
                diff = np.abs(got64 - want64)
                if diff.size:
                    max_err = max(max_err, float(np.nanmax(np.where(np.isfinite(diff), diff, np.inf))))
                bad = int(np.count_nonzero(~(diff <= self.atol + self.rtol * np.abs(want64))))
                if bad:
                    failures.append(
                        f"output {name!r}: {bad} of {diff.size} values outside atol={self.atol:g} "
                        f"rtol={self.rtol:g} (max abs error {float(np.max(diff)):.6g})"
                    )
            figures["max_abs_error"] = max_err

        if self.latency_budget_ms is not None and figures["latency_ms"] > self.latency_budget_ms:
            failures.append(f"latency {figures['latency_ms']:.3f} ms is over the {self.latency_budget_ms:g} ms budget")

        if failures:
            raise HealthCheckFailed(
                f"{loaded.name} {loaded.version} failed its health check: " + "; ".join(failures),
                figures=figures,
            )
        return figures

    # -- persistence --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The check as ``.npz`` bytes (no pickles)."""
        arrays: dict[str, np.ndarray] = {}
        if isinstance(self.inputs, np.ndarray):
            arrays[_SINGLE] = self.inputs
        elif self.inputs is not None:
            arrays.update({_IN + k: np.asarray(v) for k, v in self.inputs.items()})
        if self.expected is not None:
            arrays.update({_OUT + k: np.asarray(v) for k, v in self.expected.items()})
        meta = {
            "format": _FILE_FORMAT,
            "atol": self.atol,
            "rtol": self.rtol,
            "latency_budget_ms": self.latency_budget_ms,
            "runs": self.runs,
            "has_expected": self.expected is not None,
        }
        arrays[_META] = np.array(json.dumps(meta))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the check atomically to ``path``.

        Raises:
            OSError: the write failed.
        """
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HealthCheck:
        """Read a check written by ``save``.

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not a saved health check.
        """
        with np.load(path, allow_pickle=False) as npz:
            if _META not in npz.files:
                raise ValueError(f"{path}: not a saved health check (no {_META!r} entry)")
            meta = json.loads(str(npz[_META]))
            if meta.get("format") != _FILE_FORMAT:
                raise ValueError(f"{path}: unknown health check format {meta.get('format')!r}")
            inputs: Sample | None
            if _SINGLE in npz.files:
                inputs = npz[_SINGLE]
            else:
                named = {k[len(_IN):]: npz[k] for k in npz.files if k.startswith(_IN)}
                inputs = named or None
            expected = {k[len(_OUT):]: npz[k] for k in npz.files if k.startswith(_OUT)}
        return cls(
            inputs=inputs,
            expected=expected if meta.get("has_expected") else None,
            atol=float(meta["atol"]),
            rtol=float(meta["rtol"]),
            latency_budget_ms=meta.get("latency_budget_ms"),
            runs=int(meta.get("runs", 3)),
        )


def load_sample(path: str | os.PathLike[str], *, name: str | None = None) -> Sample:
    """Tensors from a ``.npy`` (one array; named ``name`` if given) or ``.npz`` (by name).

    Raises:
        ValueError: another file type, or a file numpy cannot read without pickles.
        OSError: the file cannot be read.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        return {name: arr} if name else arr
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    raise ValueError(f"{p}: expected a .npy or .npz file, got {suffix or 'no suffix'}")


def health_check_from_files(
    inputs: str | os.PathLike[str],
    expected: str | os.PathLike[str] | None = None,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    latency_budget_ms: float | None = None,
) -> HealthCheck:
    """A check from sample files (e.g. ``edge-runtime install --sample x.npz --expect y.npz``).

    ``expected`` must be an ``.npz`` keyed by output name.

    Raises:
        ValueError: unreadable or unnamed expected outputs.
        OSError: a file cannot be read.
    """
    want: Mapping[str, np.ndarray] | None = None
    if expected is not None:
        loaded = load_sample(expected)
        if isinstance(loaded, np.ndarray):
            raise ValueError(f"{expected}: expected outputs must be an .npz keyed by output name")
        want = loaded
    return HealthCheck(
        inputs=load_sample(inputs),
        expected=want,
        atol=atol,
        rtol=rtol,
        latency_budget_ms=latency_budget_ms,
    )
