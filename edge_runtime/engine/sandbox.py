"""Validate an untrusted model file in a child process, so a crash costs a child, not the daemon.

Interpreters are C++ parsing attacker-reachable bytes. LiteRT verifies the flatbuffer, but
tflite-runtime 2.14 does not: a file cut in the middle makes it SIGSEGV (found by our own
truncation tests). So a new file is loaded, allocated and invoked once on zeros in
``python -m edge_runtime.engine.sandbox``; only if that child says the file is sound does the
daemon load it itself. A child killed by a signal becomes ``ModelFileError(reason=
"interpreter_crash")``. Files already in the store were validated this way when they came
in and are trusted by their sha256 afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from edge_runtime.engine.signature import Signature
from edge_runtime.errors import EdgeRuntimeError, ModelFileError

DEFAULT_TIMEOUT_S = 120.0


def validate_isolated(path: str | os.PathLike[str], *, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Signature:
    """Load, allocate and invoke ``path`` once in a child process; return its signature.

    Raises:
        ModelFileError: the child refused the file, crashed on it, or ran out of time.
        BackendUnavailable: no interpreter package is importable in the child.
    """
    cmd = [sys.executable, "-m", "edge_runtime.engine.sandbox", str(path)]
    # The child is not part of any crash test: a crash point there would look like a bad file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_CRASH_")}
    if backend:
        env["EDGEFLEET_BACKEND"] = backend
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ModelFileError(f"{path}: validating the model took longer than {timeout:.0f} s", reason="invalid") from exc
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ModelFileError(
            f"{path}: the interpreter crashed ({name}) loading this file; it is damaged or hostile",
            reason="interpreter_crash",
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise ModelFileError(
            f"{path}: the validator exited {proc.returncode} without a verdict: {proc.stderr.strip()[-500:]}",
            reason="invalid",
        ) from exc
    if not answer.get("ok"):
        from edge_runtime.errors import error_from_dict

        raise error_from_dict(answer.get("error") or {})
    return Signature.from_dict(answer["signature"])


def _child(path: str) -> dict[str, Any]:
    from edge_runtime.engine.backends import load_backend

    try:
        interp = load_backend().interpreter(path, num_threads=1)
        sig = Signature.of(interp)
        for spec, arr in zip(sig.inputs, sig.zeros()):
            interp.set_tensor(spec.index, arr)
        interp.invoke()
        return {"ok": True, "signature": sig.to_dict(with_index=True)}
    except EdgeRuntimeError as exc:
        return {"ok": False, "error": exc.to_dict()}
    except Exception as exc:  # anything else the interpreter raises is a refusal too
        return {"ok": False, "error": ModelFileError(f"{path}: {type(exc).__name__}: {exc}", reason="invalid").to_dict()}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])), flush=True)
