"""Telemetry: one ``messages.Telemetry`` per interval, built from psutil and the engine.

``TelemetryCollector.collect(seq, ...)`` samples the system (CPU, load, memory, the
hottest CPU-like temperature sensor when the board has one, free disk of the data dir, own
RSS) and every model the engine serves. Per the protocol, a model's ``calls`` and
``errors`` are cumulative (a controller takes differences, so a lost message loses
nothing), while ``rate``, ``demand_rate``, the percentiles, ``service_ms`` and
``utilisation`` cover the interval since the previous ``collect`` (measured with the
injected ``clock``). The interval's deltas are kept in ``last_deltas`` for the agent's own
use.

Two figures feed the placement planner and must not be confused with their neighbours:

    service_ms    mean time the interval's calls held an interpreter (the engine's
                  ``service_s``): no waiting for a busy interpreter, which the planner's
                  queueing model adds itself; the percentiles are end to end
    demand_rate   calls/s this device's own local API received for the model, whatever
                  served them: the local engine (``own_calls``: a local route, or a
                  fallback to the local copy) plus the calls the executor at ``route``
                  answered (``forwarded``) or that failed with no local copy
                  (``forward_failures``). An executor's calls for other nodes are in
                  ``rate`` but not here: they are the other nodes' demand. Calls refused
                  for their inputs count in neither.

Remote inference adds to a model's figures: ``extra()`` (the agent's caller and executor
node counters, e.g. ``forwarded``, ``fallbacks``, ``served_for_peers``) is merged into each
model's figures, and a model routed elsewhere with no local copy is reported from them
alone; ``routes()`` sets each model's ``route``; ``collect(peers_rtt_ms=...)`` carries the
measured round trip to each executor node. The executor node runs other nodes' calls on
the engine, so its ``calls``, ``service_ms`` and ``utilisation`` include them.

``collect`` never raises for a missing sensor, a platform without load average, an
unreadable data dir, or a model unloaded between listing and reading it: that figure is
left out (``None``) or the model is skipped. The only thing the caller must get right is
``seq`` (from the outbox's ``next_seq``/``append_seq``).

Thread-safe (one lock around the delta bookkeeping); cheap enough for a 1 s interval.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import psutil

from edge_runtime.protocol import messages

log = logging.getLogger(__name__)

_ID_RE = re.compile(messages.ID_PATTERN)
_VERSION_RE = re.compile(messages.VERSION_PATTERN)
_MAX_MODELS = 256  # Telemetry.models max_length
# Sensor chips that measure the CPU/SoC, best first (x86 Intel/AMD, Raspberry Pi and other
# ARM boards, then the generic ACPI zone).
_CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal",
                "soc-thermal", "cpu", "acpitz")
_CPU_HINTS = ("cpu", "core", "soc", "package")


# Remote inference counters (cumulative, from ``extra``) of routed calls that did not run on
# the local engine; with the engine's ``own_calls`` they make a model's demand.
_ROUTED = ("forwarded", "forward_failures")


@dataclass(frozen=True)
class ModelDelta:
    """What one model did during the last interval."""

    calls: int
    errors: int
    elapsed_s: float


class TelemetryCollector:
    """Builds the periodic ``Telemetry`` message for one device."""

    def __init__(
        self,
        engine: Any,
        *,
        data_dir: Union[str, os.PathLike[str]],
        device_id: str,
        clock: Callable[[], float] = time.monotonic,
        proc: Optional[psutil.Process] = None,
        interval_s: float = 10.0,
        boot_id: Optional[str] = None,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        extra: Optional[Callable[[], Mapping[str, Mapping[str, int]]]] = None,
        routes: Optional[Callable[[], Mapping[str, str]]] = None,
    ) -> None:
        """
        ``interval_s`` is the configured telemetry interval reported in each message
        (settable later, e.g. by ``set-config``); rates use the measured time between
        collects. ``boot_id`` goes into every message when given.
        """
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.device_id = device_id
        self.interval_s = interval_s
        self.boot_id = boot_id
        self._extra = extra
        self._routes = routes
        self._clock = clock
        self._wall = wall
        self._proc = proc if proc is not None else psutil.Process()
        self._lock = threading.Lock()
        self._started = clock()
        self._last_at = self._started
        # Cumulative (calls, errors, own_calls) per model at the previous collect, and the
        # routed calls (``_ROUTED``) from ``extra``. Models already served now are the
        # baseline; a model first seen later starts from zero.
        self._prev: dict[str, tuple[int, int, int]] = {}
        for name in self._names():
            stats = self._stats(name)
            if stats is not None:
                self._prev[name] = (stats.calls, stats.errors, _own_calls(stats))
        self._prev_routed: dict[str, int] = {}
        try:
            for name, counters in (self._extra() if self._extra else {}).items():
                self._prev_routed[name] = _routed(counters)
        except Exception:
            log.debug("telemetry: remote figures unavailable", exc_info=True)
        self.last_deltas: dict[str, ModelDelta] = {}
        # psutil.cpu_percent(interval=None) compares against its previous call; the first
        # one returns a meaningless 0.0, so spend it here.
        try:
            psutil.cpu_percent(interval=None)
        except Exception:  # pragma: no cover - exotic platforms
            pass

    # -- the message ---------------------------------------------------------------------

    def collect(
        self,
        seq: int,
        *,
        broker_rtt_ms: Optional[float] = None,
        outbox_depth: int = 0,
        outbox_dropped: int = 0,
        peers_rtt_ms: Optional[Mapping[str, float]] = None,
    ) -> messages.Telemetry:
        """The telemetry sample numbered ``seq``; resets the interval.

        Raises:
            pydantic.ValidationError: only for a bad argument (negative ``seq`` or outbox
                figures, NaN round trip); nothing the system or the engine does.
        """
        system = self.system()
        with self._lock:
            now = self._clock()
            elapsed = now - self._last_at
            self._last_at = now
            models, deltas = self._models(elapsed)
            self.last_deltas = deltas
        if broker_rtt_ms is not None and not (math.isfinite(broker_rtt_ms) and broker_rtt_ms >= 0):
            broker_rtt_ms = None
        peers = {node: float(ms) for node, ms in (peers_rtt_ms or {}).items()
                 if _ID_RE.match(node) and isinstance(ms, (int, float)) and math.isfinite(ms) and ms >= 0}
        return messages.Telemetry(
            seq=seq,
            at=self._wall(),
            boot_id=self.boot_id,
            interval_s=self.interval_s,
            uptime_s=max(0.0, now - self._started),
            system=system,
            models=models,
            broker_rtt_ms=broker_rtt_ms,
            peers_rtt_ms=dict(list(peers.items())[:_MAX_MODELS]),
            outbox=messages.OutboxFigures(depth=outbox_depth, dropped=outbox_dropped),
        )

    # -- system figures ------------------------------------------------------------------

    def system(self) -> messages.SystemFigures:
        """The system figures now (CPU since the previous call)."""
        try:
            cpu = float(psutil.cpu_percent(interval=None))
        except Exception:
            cpu = 0.0
        cpu = min(100.0, max(0.0, cpu)) if math.isfinite(cpu) else 0.0
        load: tuple[Optional[float], ...] = (None, None, None)
        try:
            load = tuple(float(x) if math.isfinite(x) and x >= 0 else None for x in os.getloadavg())
        except (OSError, AttributeError):
            pass
        try:
            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
        except Exception:
            total = available = 0
        return messages.SystemFigures(
            cpu_percent=cpu,
            load_1m=load[0],
            load_5m=load[1],
            load_15m=load[2],
            memory_total_bytes=max(0, total),
            memory_available_bytes=max(0, available),
            temperature_c=temperature(),
            disk_free_bytes=self._disk_free(),
            rss_bytes=self._rss(),
        )

    def _disk_free(self) -> Optional[int]:
        path = self.data_dir
        # The data dir may not exist yet: its filesystem is the nearest existing parent's.
        while not path.exists() and path.parent != path:
            path = path.parent
        try:
            return max(0, int(psutil.disk_usage(str(path)).free))
        except Exception:
            return None

    def _rss(self) -> Optional[int]:
        try:
            return max(0, int(self._proc.memory_info().rss))
        except Exception:
            return None

    # -- per-model figures ---------------------------------------------------------------

    def _names(self) -> list[str]:
        try:
            return list(self.engine.names())
        except Exception:
            return []

    def _stats(self, name: str) -> Any:
        try:
            return self.engine.stats(name)
        except Exception:
            return None

    def _models(self, elapsed: float) -> tuple[dict[str, messages.ModelFigures], dict[str, ModelDelta]]:
        try:
            loaded = {m.name: m for m in self.engine.models()}  # one snapshot: versions, pools
        except Exception:
            loaded = {}
        figures: dict[str, messages.ModelFigures] = {}
        deltas: dict[str, ModelDelta] = {}
        for name in self._names():
            if name not in loaded or not _ID_RE.match(name):
                continue  # unloaded since names(), or a name the wire cannot carry
            stats = self._stats(name)
            if stats is None:
                continue
            try:
                fig, delta = self._model(name, loaded[name], stats, elapsed)
            except Exception:  # a model torn down mid-read: report it next time
                log.debug("telemetry: skipping model %s", name, exc_info=True)
                continue
            deltas[name] = delta
            if len(figures) < _MAX_MODELS:
                figures[name] = fig
        return self._remote(figures, elapsed), deltas

    def _remote(self, figures: dict[str, messages.ModelFigures], elapsed: float) -> dict[str, messages.ModelFigures]:
        """``figures`` with each model's route and the remote-inference counters merged in,
        and its routed calls added to its ``demand_rate``."""
        try:
            extra = {k: dict(v) for k, v in (self._extra() if self._extra else {}).items()}
            routes = dict(self._routes() if self._routes else {})
        except Exception:
            log.debug("telemetry: remote figures unavailable", exc_info=True)
            return figures
        fields = messages.ModelFigures.model_fields
        out: dict[str, messages.ModelFigures] = {}
        for name in list(figures) + [n for n in extra if n not in figures]:
            if not _ID_RE.match(name) or len(out) >= _MAX_MODELS:
                continue
            update: dict[str, Any] = {k: int(v) for k, v in extra.get(name, {}).items()
                                      if k in fields and isinstance(v, int) and v >= 0}
            route = routes.get(name, messages.LOCAL)
            if _ID_RE.match(route):
                update["route"] = route
            base = figures.get(name) or messages.ModelFigures()
            routed = _routed(extra.get(name, {}))
            prev = self._prev_routed.get(name, 0)
            self._prev_routed[name] = routed
            d_routed = routed - prev if routed >= prev else routed  # went back: a fresh counter
            update["demand_rate"] = (base.demand_rate or 0.0) + (d_routed / elapsed if elapsed > 0 else 0.0)
            try:
                out[name] = messages.ModelFigures.model_validate({**base.model_dump(), **update})
            except Exception:
                log.debug("telemetry: bad remote figures for %s", name, exc_info=True)
                if name in figures:
                    out[name] = figures[name]
        return out

    def _model(self, name: str, model: Any, stats: Any, elapsed: float) -> tuple[messages.ModelFigures, ModelDelta]:
        calls, errors, own = int(stats.calls), int(stats.errors), _own_calls(stats)
        prev_calls, prev_errors, prev_own = self._prev.get(name, (0, 0, 0))
        # Counters only grow; if one went back (a fresh stats object), count from zero.
        d_calls = calls - prev_calls if calls >= prev_calls else calls
        d_errors = errors - prev_errors if errors >= prev_errors else errors
        d_own = own - prev_own if own >= prev_own else own
        self._prev[name] = (calls, errors, own)
        delta = ModelDelta(calls=d_calls, errors=d_errors, elapsed_s=max(0.0, elapsed))

        p50 = p95 = p99 = service = util = None
        latency_ms = _recent_ms(stats.latencies_s, d_calls)  # this interval's calls, end to end
        if latency_ms.size:
            p50, p95, p99 = (float(x) for x in np.percentile(latency_ms, [50, 95, 99]))
        service_ms = _recent_ms(getattr(stats, "service_s", ()), d_calls)  # their interpreter time
        if service_ms.size:
            service = float(service_ms.mean())
            pool_size = int(getattr(getattr(model, "pool", None), "size", 0) or 0)
            if elapsed > 0 and pool_size > 0:
                util = service / 1e3 * d_calls / elapsed / pool_size
        version = getattr(model, "version", None)
        fig = messages.ModelFigures(
            version=version if isinstance(version, str) and _VERSION_RE.match(version) else None,
            calls=calls,
            errors=errors,
            rate=d_calls / elapsed if elapsed > 0 else 0.0,
            demand_rate=d_own / elapsed if elapsed > 0 else 0.0,  # _remote adds the routed calls
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            service_ms=service,
            utilisation=util,
        )
        return fig, delta


def _own_calls(stats: Any) -> int:
    """Calls made by this device's own callers (an engine without the split: all of them)."""
    return int(getattr(stats, "own_calls", stats.calls))


def _routed(counters: Mapping[str, Any]) -> int:
    """Routed calls that did not run on the local engine, from remote-inference counters."""
    total = 0
    for key in _ROUTED:
        value = counters.get(key, 0)
        if isinstance(value, int) and value >= 0:
            total += value
    return total


def _recent_ms(window: Any, n: int) -> np.ndarray:
    """The newest ``n`` samples of a window of seconds, as finite milliseconds >= 0."""
    recent = _snapshot(window)[-n:] if n > 0 else []
    ms = np.asarray(recent, dtype=np.float64) * 1e3
    return ms[np.isfinite(ms) & (ms >= 0)]


def _snapshot(window: Any) -> list[float]:
    """A copy of a latency deque that other threads append to."""
    for _ in range(3):
        try:
            return list(window)
        except RuntimeError:  # "deque mutated during iteration"
            continue
    return []


def temperature() -> Optional[float]:
    """The hottest current reading of the most CPU-like sensor, in °C; None when the board
    has no sensor (or psutil cannot read it on this platform). Never raises."""
    try:
        sensors = psutil.sensors_temperatures()
    except Exception:  # AttributeError where psutil has no sensors, OSError reading sysfs
        return None
    if not isinstance(sensors, dict) or not sensors:
        return None
    try:
        return _pick_temperature(sensors)
    except Exception:
        return None


def _pick_temperature(sensors: dict[str, Any]) -> Optional[float]:
    def readings(entries: Any) -> list[float]:
        out = []
        for entry in entries or ():
            value = getattr(entry, "current", None)
            if isinstance(value, (int, float)) and math.isfinite(value) and -100 <= value <= 250:
                out.append(float(value))
        return out

    lowered = {str(k).lower(): v for k, v in sensors.items()}
    order = [k for k in _CPU_SENSORS if k in lowered]
    order += [k for k in lowered if k not in order and any(h in k for h in _CPU_HINTS)]
    order += [k for k in lowered if k not in order]
    for key in order:
        values = readings(lowered[key])
        if values:
            return max(values)
    return None


__all__ = ["ModelDelta", "TelemetryCollector", "temperature"]
