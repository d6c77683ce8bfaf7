"""A pool of interpreters for one model version that grows with real concurrency.

An interpreter is not thread-safe, so each call borrows one for the duration of
set_tensor → invoke → get_tensor. ``invoke`` releases the GIL, so two calls really do run
on two cores.

Each interpreter costs its tensor arena plus (with XNNPACK) a packed copy of the weights,
~18 MB for a 2 MB vision model, so the pool starts with ``initial`` interpreters (one, by
default) and adds another, up to ``size``, only when a call finds every interpreter busy.
The new one is built and warmed on a background thread while that call waits for
whichever interpreter frees first, so growth never adds a load's latency to a call. Most
recently returned first (LIFO): a hot interpreter's weights are still in cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.engine.backends import Backend
from edge_runtime.engine.signature import Signature

log = logging.getLogger(__name__)
_GROWTH_RETRY_S = 5.0


class InterpreterPool:
    def __init__(
        self, backend: Backend, path: str | os.PathLike[str], *, size: int, num_threads: int, initial: int = 1
    ) -> None:
        """Build ``initial`` allocated interpreters (at most ``size``) for the model at ``path``.

        Raises:
            ModelFileError: the file cannot be loaded (see ``Backend.interpreter``).
        """
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._backend, self._path, self._num_threads = backend, path, num_threads
        first = backend.interpreter(path, num_threads=num_threads)
        self.signature = Signature.of(first)
        self._in_idx = [s.index for s in self.signature.inputs]
        self._out_idx = [s.index for s in self.signature.outputs]
        self._all: list[Any] = [first] + [
            backend.interpreter(path, num_threads=num_threads) for _ in range(min(max(initial, 1), size) - 1)
        ]
        self._free: list[Any] = list(self._all)
        self._cond = threading.Condition(threading.Lock())
        self._growing = False
        self._retry_growth_at = 0.0
        self.size = size

    @property
    def count(self) -> int:
        """Interpreters built so far (memory in use grows with this)."""
        return len(self._all)

    def _acquire(self) -> Any:
        with self._cond:
            if (not self._free and not self._growing and len(self._all) < self.size
                    and time.monotonic() >= self._retry_growth_at):
                try:
                    threading.Thread(target=self._grow, name="pool-grow", daemon=True).start()
                    self._growing = True
                except RuntimeError:  # no thread to be had right now: serve with what we have
                    self._retry_growth_at = time.monotonic() + _GROWTH_RETRY_S
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def _release(self, interp: Any) -> None:
        with self._cond:
            self._free.append(interp)
            self._cond.notify()

    def _grow(self) -> None:
        interp = None
        try:
            interp = self._backend.interpreter(self._path, num_threads=self._num_threads)
            self._invoke_zeros(interp)
        except Exception:  # e.g. ENOMEM/EMFILE: transient, so try again later rather than never
            log.exception("could not add an interpreter to the pool of %s", self._path)
        with self._cond:
            self._growing = False
            if interp is None:
                self._retry_growth_at = time.monotonic() + _GROWTH_RETRY_S
                return
            self._all.append(interp)
            self._free.append(interp)
            self._cond.notify()

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Invoke on checked, ordered feeds; outputs are copies the caller owns."""
        return self.run_timed(feeds)[0]

    def run_timed(self, feeds: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """``run``, and the seconds the call held its interpreter (set_tensor → invoke →
        get_tensor): its service time. The wait for a free interpreter is not in it -- that
        is queueing, which the placement planner's M/M/c model adds itself."""
        interp = self._acquire()
        try:
            start = time.perf_counter()
            for idx, arr in zip(self._in_idx, feeds):
                interp.set_tensor(idx, arr)
            interp.invoke()
            outs = [interp.get_tensor(idx) for idx in self._out_idx]
            return outs, time.perf_counter() - start
        finally:
            self._release(interp)

    def _invoke_zeros(self, interp: Any) -> None:
        for idx, arr in zip(self._in_idx, self.signature.zeros()):
            interp.set_tensor(idx, arr)
        interp.invoke()

    def warm_up(self) -> None:
        """Invoke every interpreter once so the first real call pays no first-run costs."""
        with self._cond:
            borrowed, self._free = self._free, []
        try:
            for interp in borrowed:
                self._invoke_zeros(interp)
        finally:
            with self._cond:
                self._free.extend(borrowed)
                self._cond.notify_all()
