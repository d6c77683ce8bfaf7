"""Interpreter backends, per-model interpreter pools, input checks and hot swap."""

from edge_runtime.engine.backends import BACKENDS, Backend, load_backend
from edge_runtime.engine.engine import Engine, LoadedModel, ModelStats
from edge_runtime.engine.signature import Feeds, Signature, TensorSpec


def inspect_model(path: str, *, backend: Backend | None = None) -> Signature:
    """Load ``path`` once and return its signature: the install-time validity check.

    Raises:
        ModelFileError: not TFLite, truncated, or needs an operator this build lacks.
        BackendUnavailable: no interpreter package is importable.
    """
    interp = (backend or load_backend()).interpreter(path, num_threads=1)
    return Signature.of(interp)


__all__ = [
    "BACKENDS",
    "Backend",
    "Engine",
    "Feeds",
    "LoadedModel",
    "ModelStats",
    "Signature",
    "TensorSpec",
    "inspect_model",
    "load_backend",
]
