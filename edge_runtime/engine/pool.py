"""A fixed pool of interpreters for one model version.

An interpreter is not thread-safe, so each call borrows one for the duration of
set_tensor → invoke → get_tensor. A call that finds every interpreter busy waits for the
next one to come back (bounded by the pool size, so load turns into queueing, never into
unbounded memory). ``invoke`` releases the GIL, so two calls really do run on two cores.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.engine.backends import Backend
from edge_runtime.engine.signature import Signature


class InterpreterPool:
    def __init__(self, backend: Backend, path: str | os.PathLike[str], *, size: int, num_threads: int) -> None:
        """Build ``size`` allocated interpreters for the model at ``path``.

        Raises:
            ModelFileError: the file cannot be loaded (see ``Backend.interpreter``).
        """
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        first = backend.interpreter(path, num_threads=num_threads)
        self.signature = Signature.of(first)
        self._in_idx = [s.index for s in self.signature.inputs]
        self._out_idx = [s.index for s in self.signature.outputs]
        self._all: list[Any] = [first] + [
            backend.interpreter(path, num_threads=num_threads) for _ in range(size - 1)
        ]
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for interp in self._all:
            self._free.put(interp)
        self.size = size

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Invoke on checked, ordered feeds; outputs are copies the caller owns."""
        interp = self._free.get()
        try:
            for idx, arr in zip(self._in_idx, feeds):
                interp.set_tensor(idx, arr)
            interp.invoke()
            return [interp.get_tensor(idx) for idx in self._out_idx]
        finally:
            self._free.put(interp)

    def warm_up(self) -> None:
        """Invoke every interpreter once so the first real call pays no first-run costs."""
        zeros = self.signature.zeros()
        borrowed = [self._free.get() for _ in range(self.size)]
        try:
            for interp in borrowed:
                for idx, arr in zip(self._in_idx, zeros):
                    interp.set_tensor(idx, arr)
                interp.invoke()
        finally:
            for interp in borrowed:
                self._free.put(interp)
