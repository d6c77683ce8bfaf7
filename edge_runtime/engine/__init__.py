"""Interpreter backends, per-model interpreter pools, input checks and hot swap."""

from edge_runtime.engine.backends import BACKENDS, Backend, load_backend
from edge_runtime.engine.engine import Engine, LoadedModel, ModelStats
from edge_runtime.engine.signature import Feeds, Signature, TensorSpec


def inspect_model(path: str, *, backend: Backend | None = None, isolate: bool = True) -> Signature:
    """The install-time validity check: load, allocate and (isolated) invoke ``path`` once.

    With ``isolate`` (the default) this happens in a child process, so an interpreter that
    crashes on a damaged file (tflite-runtime 2.14 does) costs the child, not the caller.

    Raises:
        ModelFileError: not TFLite, truncated, needs an operator this build lacks, or
            crashed the interpreter (``reason="interpreter_crash"``).
        BackendUnavailable: no interpreter package is importable.
    """
    backend = backend or load_backend()
    if isolate:
        from edge_runtime.engine.backends import check_header
        from edge_runtime.engine.sandbox import validate_isolated

        check_header(path)  # the cheap refusals need no child process
        return validate_isolated(path, backend=backend.name)
    return Signature.of(backend.interpreter(path, num_threads=1))


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
