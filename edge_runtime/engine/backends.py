"""Which TFLite interpreter package runs the models, and turning its errors into ours.

Order: ``ai_edge_litert`` (LiteRT, maintained, NumPy 2), then ``tflite_runtime`` (Raspberry
Pi OS images, NumPy < 2). ``EDGEFLEET_BACKEND`` (or the ``preferred`` argument) forces one.
Nothing else in the runtime imports either package.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import BackendUnavailable, ModelFileError

BACKENDS: tuple[str, ...] = ("ai_edge_litert", "tflite_runtime")
_TFLITE_IDENTIFIER = b"TFL3"
_HEADER_LEN = 8  # uoffset root table + 4-byte file identifier


@dataclass(frozen=True)
class Backend:
    """One importable interpreter package."""

    name: str
    version: str
    interpreter_cls: Any

    def interpreter(self, path: str | os.PathLike[str], *, num_threads: int = 1) -> Any:
        """An allocated interpreter for the model at ``path``.

        The file is memory-mapped by the interpreter, so a pool of N interpreters shares one
        copy of the weights in RAM.

        Raises:
            ModelFileError: the file is missing, not TFLite, truncated or needs an op this
                build does not have.
        """
        check_header(path)
        try:
            interp = self.interpreter_cls(model_path=str(path), num_threads=num_threads)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise classify_load_error(path, exc) from exc
        return interp


def check_header(path: str | os.PathLike[str]) -> None:
    """Reject files that are plainly not TFLite before the interpreter sees them."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_LEN)
    except FileNotFoundError as exc:
        raise ModelFileError(f"model file not found: {path}", reason="not_found") from exc
    if len(head) < _HEADER_LEN:
        raise ModelFileError(
            f"{path}: {len(head)} bytes is too short to be a TFLite model", reason="truncated"
        )
    if head[4:8] != _TFLITE_IDENTIFIER:
        raise ModelFileError(
            f"{path}: not a TFLite model (file identifier {head[4:8]!r}, expected {_TFLITE_IDENTIFIER!r})",
            reason="not_tflite",
        )


def classify_load_error(path: str | os.PathLike[str], exc: BaseException) -> ModelFileError:
    """Map the interpreter's free-text failure onto a stable reason."""
    text = str(exc).strip()
    lowered = text.lower()
    if "unresolved custom op" in lowered or "didn't find op for builtin" in lowered or (
        "op" in lowered and "not supported" in lowered
    ):
        return ModelFileError(f"{path}: needs an operator this runtime lacks: {text}", reason="unresolved_op")
    if "not a valid flatbuffer" in lowered or "schema version" in lowered or "truncated" in lowered:
        size = Path(path).stat().st_size if Path(path).exists() else 0
        return ModelFileError(
            f"{path}: damaged or truncated TFLite file ({size} bytes): {text}", reason="truncated"
        )
    return ModelFileError(f"{path}: the interpreter cannot load this model: {text}", reason="invalid")


def load_backend(preferred: str | None = None) -> Backend:
    """The first importable backend, or ``preferred`` (also read from ``EDGEFLEET_BACKEND``).

    Raises:
        BackendUnavailable: no backend imports, or the preferred one does not.
    """
    wanted = preferred or os.environ.get("EDGEFLEET_BACKEND") or None
    if wanted is not None and wanted not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {wanted!r}; choose one of {', '.join(BACKENDS)}")
    candidates = (wanted,) if wanted else BACKENDS
    failures: list[str] = []
    for name in candidates:
        try:
            module = importlib.import_module(f"{name}.interpreter")
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        package = importlib.import_module(name)
        version = getattr(package, "__version__", None) or _dist_version(name)
        return Backend(name=name, version=version, interpreter_cls=module.Interpreter)
    raise BackendUnavailable(
        "no TFLite interpreter is importable ("
        + "; ".join(failures)
        + "). Install one: `pip install 'edgefleet[litert]'` (ai-edge-litert) or, on images"
        " with NumPy < 2, `pip install 'edgefleet[legacy]'` (tflite-runtime)."
    )


def _dist_version(module_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = module_name.replace("_", "-")
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
