"""From the store to the placement planner and back: ``build_snapshot`` reads devices,
assignments, releases, telemetry and past migrations into a ``placement.Snapshot`` (the
I/O side; the planner stays pure), and ``Rebalancer`` plans over it and starts a migration
for each move (``fleetctl plan [--apply]``, ``fleetctl serve --rebalance-every``).

What the snapshot is made of:

    nodes       every known device: tier, cores and memory from its birth capabilities
                (a device that never sent them: 1 core, no memory for models), online
    models      every model assigned anywhere: memory = its largest assigned release's
                artifact size (a loaded model takes about its file's size); reference
                service time = the median of the measured ones, else ``DEFAULT_SERVICE_MS``
    workloads   one per (model, source) for every assignment on a device that is not a
                cloud node (cloud nodes execute, they do not call): executor = the
                assignment's route (the source itself when local); rate = the
                ``demand_rate`` of the model in the source's newest telemetry: the calls
                its own API received, wherever they ran, so a source whose calls go to
                another node keeps its load (0 when it is offline or silent). From an
                agent older than protocol 1.1 (no ``demand_rate``) the old estimate: its
                ``rate`` (what its engine ran: calls it routed away are not in it), minus
                what other sources routed to it send (an executor's engine counts the calls
                it serves for others too); SLO = ``slo_by_model`` or the default
    service_ms  (node, model) from the node's newest telemetry where it runs the model
                locally and measured one
    rtt_ms      (device, peer) from telemetry's ``peers_rtt_ms``
    last_moved  (model, source) -> when its newest ``done`` migration finished

Workloads with an active migration keep their place: the rebalancer starts no second
migration for them (and the store refuses one anyway).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from controller import placement
from controller.migration import ACTIVE_STATES, LOCAL
from controller.migrations import MigrationDriver
from controller.store import Conflict, NotFound, Store, StoreError

__all__ = ["build_snapshot", "Rebalancer", "DEFAULT_SLO_MS", "DEFAULT_SERVICE_MS", "move_row"]

log = logging.getLogger(__name__)

DEFAULT_SLO_MS = 100.0
DEFAULT_SERVICE_MS = 10.0


def _last_models(device: Any) -> dict[str, dict[str, Any]]:
    t = device.last_telemetry or {}
    return {k: v for k, v in (t.get("models") or {}).items() if isinstance(v, dict)}


def build_snapshot(store: Store, *, now: float, slo_ms: float = DEFAULT_SLO_MS,
                   slo_by_model: Optional[Mapping[str, float]] = None) -> placement.Snapshot:
    """The placement snapshot of the fleet as the store knows it now (module docstring)."""
    devices = {d.id: d for d in store.list_devices()}
    assignments = store.all_assignments()
    slo_by_model = dict(slo_by_model or {})

    nodes = []
    for d in devices.values():
        caps = d.capabilities or {}
        tier = d.tier if d.tier in placement.TIERS else "edge"
        nodes.append(placement.Node(id=d.id, tier=tier, cores=max(1, int(caps.get("cores") or 1)),
                                    memory_bytes=max(0, int(caps.get("memory_bytes") or 0)),
                                    accelerator=caps.get("accelerator"), online=d.online))

    service: dict[tuple[str, str], float] = {}
    rtt: dict[tuple[str, str], float] = {}
    for d in devices.values():
        reported = d.reported or {}
        for model, fig in _last_models(d).items():
            s = fig.get("service_ms")
            route = fig.get("route") or (reported.get(model) or {}).get("route") or LOCAL
            if route == LOCAL and isinstance(s, (int, float)) and s > 0:
                service[(d.id, model)] = float(s)
        for peer, ms in ((d.last_telemetry or {}).get("peers_rtt_ms") or {}).items():
            if peer in devices and peer != d.id and isinstance(ms, (int, float)) and ms >= 0:
                rtt[(d.id, peer)] = float(ms)

    sizes: dict[str, int] = {}
    for a in assignments:
        try:
            size = store.get_release(a.model, a.version).size
        except NotFound:
            size = 0
        sizes[a.model] = max(sizes.get(a.model, 0), size)
    models = {}
    for name, size in sizes.items():
        measured = [v for (n, m), v in service.items() if m == name]
        ref = statistics.median(measured) if measured else DEFAULT_SERVICE_MS
        models[name] = placement.Model(name=name, memory_bytes=size, service_ms=ref)
    service = {k: v for k, v in service.items() if k[1] in models}

    raw_rate: dict[tuple[str, str], float] = {}  # what the source's engine ran
    demand: dict[tuple[str, str], Optional[float]] = {}  # what its API received (None: an older agent)
    executor: dict[tuple[str, str], str] = {}
    for a in assignments:
        d = devices.get(a.device_id)
        if d is None or d.tier == "cloud":
            continue
        key = (a.model, a.device_id)
        executor[key] = a.device_id if a.route == LOCAL else a.route
        fig = _last_models(d).get(a.model) or {}
        raw_rate[key] = _rate(fig.get("rate")) if d.online else 0.0
        reported = fig.get("demand_rate")
        demand[key] = None if reported is None else _rate(reported) if d.online else 0.0
    forwarded: dict[tuple[str, str], float] = {}  # (model, executor) -> rate other sources send it
    for (model, source), ex in executor.items():
        if ex != source:
            sent = demand[(model, source)]
            forwarded[(model, ex)] = forwarded.get((model, ex), 0.0) + (
                raw_rate[(model, source)] if sent is None else sent)
    workloads = []
    for (model, source), ex in sorted(executor.items()):
        if ex not in devices:
            continue  # routed to a node the store never heard of: not plannable
        rate = demand[(model, source)]
        if rate is None:  # an agent before protocol 1.1: estimate from what its engine ran
            rate = raw_rate[(model, source)]
            if ex == source:
                rate = max(0.0, rate - forwarded.get((model, source), 0.0))
        workloads.append(placement.Workload(model=model, source=source, rate=rate,
                                            slo_ms=float(slo_by_model.get(model, slo_ms)), executor=ex))

    keys = {w.key for w in workloads}
    last_moved: dict[tuple[str, str], float] = {}
    for m in store.list_migrations(states=("done",)):
        key = (m.model, m.source)
        if key in keys and m.finished_at is not None:
            last_moved[key] = max(last_moved.get(key, 0.0), m.finished_at)
    return placement.Snapshot(nodes=tuple(nodes), models=models, workloads=tuple(workloads), service_ms=service,
                              rtt_ms=rtt, last_moved=last_moved, now=now)


def _rate(value: Any) -> float:
    """A reported rate as a float, 0 for anything that is not a finite number >= 0."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value >= 0 else 0.0


def move_row(move: placement.Move) -> dict[str, Any]:
    return {"model": move.model, "source": move.source, "from_node": move.from_node, "to_node": move.to_node,
            "reason": move.reason, "p95_before_ms": _finite(move.p95_before_ms),
            "p95_after_ms": _finite(move.p95_after_ms)}


def _finite(x: float) -> Optional[float]:
    return round(x, 3) if x == x and abs(x) != float("inf") else None  # JSON has no inf


@dataclass
class Rebalancer:
    """Plan over the store's snapshot; start a migration per move (skipping workloads that
    already have an active one)."""

    store: Store
    driver: MigrationDriver
    clock: Callable[[], float]
    slo_ms: float = DEFAULT_SLO_MS
    slo_by_model: dict[str, float] = field(default_factory=dict)
    policy: placement.Policy = field(default_factory=placement.Policy)
    runs: int = 0
    started: int = 0

    def plan(self, *, apply: bool = False, actor: str = "controller:rebalance") -> dict[str, Any]:
        """{moves: [move rows, each with "migration" (the id started, or None) and "skipped"
        (why not, or None)], violations_before/after, peak_utilisation_before/after, method,
        workloads, nodes}."""
        snapshot = build_snapshot(self.store, now=self.clock(), slo_ms=self.slo_ms, slo_by_model=self.slo_by_model)
        result = placement.plan(snapshot, self.policy)
        busy = {(m.model, m.source): m.id for m in self.store.list_migrations(states=ACTIVE_STATES)}
        rows = []
        for move in result.moves:
            row = {**move_row(move), "migration": None, "skipped": None}
            if (move.model, move.source) in busy:
                row["skipped"] = f"migration {busy[(move.model, move.source)]} is active"
            elif apply:
                try:
                    rec = self.driver.create(
                        move.model, move.source, move.to_node, actor=actor, reason=move.reason,
                        prediction={"p95_before_ms": row["p95_before_ms"], "p95_after_ms": row["p95_after_ms"]})
                    row["migration"] = rec.id
                    self.started += 1
                except (Conflict, NotFound, ValueError) as exc:
                    row["skipped"] = str(exc)
                except StoreError as exc:
                    row["skipped"] = str(exc)
            rows.append(row)
        self.runs += 1
        return {"moves": rows, "violations_before": result.violations_before,
                "violations_after": result.violations_after,
                "peak_utilisation_before": _finite(result.peak_utilisation_before),
                "peak_utilisation_after": _finite(result.peak_utilisation_after),
                "method": result.method, "workloads": len(snapshot.workloads), "nodes": len(snapshot.nodes)}

    def tick(self) -> int:
        """One rebalancing round (``--rebalance-every``): migrations started."""
        before = self.started
        out = self.plan(apply=True)
        n = self.started - before
        if out["moves"]:
            log.info("rebalance: %d move(s) planned, %d migration(s) started (violations %s -> %s)",
                     len(out["moves"]), n, out["violations_before"], out["violations_after"])
        return n
