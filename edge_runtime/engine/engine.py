"""The engine: named models, each served by one loaded version, swapped without a gap.

Hot swap follows TF Serving's availability-preserving policy: build and warm the new
version's interpreters while the old one keeps serving, then replace one reference. A call
that already took the old reference finishes on the old version; the old interpreters are
freed when the last such call returns. No lock is held while a model loads, so no call
waits for a load.

Per-model figures (``ModelStats``, read by telemetry): ``calls`` and ``errors``; for each
successful call its end-to-end latency (input checks, the wait for a free interpreter, the
run) in ``latencies_s`` and its service time in ``service_s`` -- only the time it held an
interpreter, so waiting behind other calls is not in it (the placement planner adds
queueing itself). Calls an executor node runs for other nodes go through ``for_peers()``:
they count in ``calls`` (they use this engine) but not in ``own_calls``, the calls made by
this device's own callers.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.engine.backends import Backend, load_backend
from edge_runtime.engine.pool import InterpreterPool
from edge_runtime.engine.signature import Feeds, Signature
from edge_runtime.errors import InputError, ModelNotFound, ModelUnavailable

_LATENCY_WINDOW = 4096


@dataclass
class ModelStats:
    """Per-model counters since the model name was first served (they survive swaps).

    ``calls``: successful calls; ``own_calls``: those not run for another node (see
    ``Engine.for_peers``); ``errors``: calls refused for their inputs. The windows hold the
    newest successful calls: ``latencies_s`` end to end, ``service_s`` only the time each
    held its interpreter (appended together, so their tails are the same calls)."""

    calls: int = 0
    errors: int = 0
    own_calls: int = 0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))
    service_s: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))

    def percentiles(self) -> dict[str, float]:
        if not self.latencies_s:
            return {}
        ms = np.fromiter(self.latencies_s, dtype=np.float64) * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


@dataclass(frozen=True)
class LoadedModel:
    """One model version, loaded and warm, ready to be activated."""

    name: str
    version: str
    path: str
    pool: InterpreterPool
    loaded_at: float
    load_seconds: float

    @property
    def signature(self) -> Signature:
        return self.pool.signature

    def predict(self, inputs: Feeds, *, coerce: bool = False) -> dict[str, np.ndarray]:
        return self.predict_timed(inputs, coerce=coerce)[0]

    def predict_timed(self, inputs: Feeds, *, coerce: bool = False) -> tuple[dict[str, np.ndarray], float]:
        """``predict``, and the seconds the call held an interpreter (``InterpreterPool.run_timed``)."""
        feeds = self.signature.feeds(inputs, coerce=coerce)
        outs, held_s = self.pool.run_timed(feeds)
        return {spec.name: out for spec, out in zip(self.signature.outputs, outs)}, held_s

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "signature": self.signature.to_dict(),
            "pool_size": self.pool.size,
            "interpreters": self.pool.count,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 4),
        }


class Engine:
    """Serves predictions for named models; thread-safe."""

    def __init__(self, *, backend: Backend | None = None, pool_size: int = 2, num_threads: int = 1) -> None:
        """
        Raises:
            BackendUnavailable: no interpreter package is importable.
        """
        self.backend = backend or load_backend()
        self.pool_size = pool_size
        self.num_threads = num_threads
        self._active: dict[str, LoadedModel] = {}
        self._stats: dict[str, ModelStats] = {}
        # Names the store holds but that are not serving (loading, or their load failed):
        # callers get 503 with the reason rather than a misleading 404.
        self._unavailable: dict[str, str] = {}
        self._write_lock = threading.Lock()

    def load(self, name: str, version: str, path: str | os.PathLike[str], *, warm_up: bool = True) -> LoadedModel:
        """Build (and warm) a version without serving it yet.

        The pool starts as large as the version it will replace has grown, so a swap under
        load does not make callers queue while the new pool catches up.

        Raises:
            ModelFileError: the file cannot be loaded.
        """
        start = time.perf_counter()
        current = self._active.get(name)
        initial = current.pool.count if current is not None else 1
        pool = InterpreterPool(self.backend, path, size=self.pool_size, num_threads=self.num_threads, initial=initial)
        if warm_up:
            pool.warm_up()
        return LoadedModel(
            name=name,
            version=version,
            path=str(path),
            pool=pool,
            loaded_at=time.time(),
            load_seconds=time.perf_counter() - start,
        )

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Serve ``model`` from now on; return the version it replaced."""
        with self._write_lock:
            self._stats.setdefault(model.name, ModelStats())  # before the model is visible
            old = self._active.get(model.name)
            self._active[model.name] = model
            self._unavailable.pop(model.name, None)
        return old

    def mark_unavailable(self, name: str, reason: str) -> None:
        """Answer calls to ``name`` with 503 and ``reason`` until a version is activated."""
        with self._write_lock:
            if name not in self._active:
                self._unavailable[name] = reason

    def swap(self, name: str, version: str, path: str | os.PathLike[str]) -> LoadedModel:
        """Load, warm, then activate; the old version serves until the last moment."""
        model = self.load(name, version, path)
        self.activate(model)
        return model

    def unload(self, name: str) -> LoadedModel | None:
        with self._write_lock:
            self._unavailable.pop(name, None)
            return self._active.pop(name, None)

    def get(self, name: str) -> LoadedModel:
        """
        Raises:
            ModelNotFound: no version of ``name`` is active.
            ModelUnavailable: the store holds ``name`` but it is loading or failed to load.
        """
        model = self._active.get(name)
        if model is None:
            reason = self._unavailable.get(name)
            if reason is not None:
                raise ModelUnavailable(f"model {name!r} is not serving yet: {reason}")
            served = ", ".join(sorted(self._active)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {served})")
        return model

    def names(self) -> list[str]:
        return sorted(self._active)

    def models(self) -> list[LoadedModel]:
        return [m for _, m in sorted(self._active.items())]  # one snapshot: unloads may race

    def stats(self, name: str) -> ModelStats:
        return self._stats.setdefault(name, ModelStats())

    def predict(self, name: str, inputs: Feeds, *, coerce: bool = False) -> dict[str, np.ndarray]:
        """Run the active version of ``name``.

        Raises:
            ModelNotFound: no version of ``name`` is active.
            InputError: the inputs do not match the model's signature.
        """
        return self.predict_versioned(name, inputs, coerce=coerce)[1]

    def predict_versioned(
        self, name: str, inputs: Feeds, *, coerce: bool = False
    ) -> tuple[str, dict[str, np.ndarray]]:
        """``predict`` that also says which version answered (swaps happen between calls)."""
        model = self.get(name)  # one reference read: this call stays on this version
        return model.version, self.predict_on(model, inputs, coerce=coerce)

    def predict_on(self, model: LoadedModel, inputs: Feeds, *, coerce: bool = False,
                   for_peer: bool = False) -> dict[str, np.ndarray]:
        """Run on one version the caller already holds (several calls that must agree on
        the version, e.g. the chunks of one REST request, even if a swap lands between them).
        ``for_peer``: the call is run for another node (not counted in ``own_calls``).

        Raises:
            InputError: the inputs do not match the model's signature.
        """
        stats = self.stats(model.name)
        start = time.perf_counter()
        try:
            out, held_s = model.predict_timed(inputs, coerce=coerce)
        except InputError:
            stats.errors += 1
            raise
        latency_s = time.perf_counter() - start
        stats.service_s.append(held_s)
        stats.latencies_s.append(latency_s)
        if not for_peer:
            stats.own_calls += 1
        stats.calls += 1
        return out

    def for_peers(self) -> PeerEngine:
        """This engine as an executor node uses it for other nodes' calls: the same models
        and figures, but its calls are not this device's own (``ModelStats.own_calls``)."""
        return PeerEngine(self)


class PeerEngine:
    """``Engine.for_peers()``: every attribute is the engine's, except that predictions
    count as run for another node."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def predict_on(self, model: LoadedModel, inputs: Feeds, *, coerce: bool = False) -> dict[str, np.ndarray]:
        """``Engine.predict_on`` for another node (see there)."""
        return self.engine.predict_on(model, inputs, coerce=coerce, for_peer=True)

    def predict_versioned(self, name: str, inputs: Feeds, *, coerce: bool = False) -> tuple[str, dict[str, np.ndarray]]:
        """``Engine.predict_versioned`` for another node (see there)."""
        model = self.engine.get(name)
        return model.version, self.predict_on(model, inputs, coerce=coerce)

    def predict(self, name: str, inputs: Feeds, *, coerce: bool = False) -> dict[str, np.ndarray]:
        """``Engine.predict`` for another node (see there)."""
        return self.predict_versioned(name, inputs, coerce=coerce)[1]
