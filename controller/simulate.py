"""``fleetctl simulate``: the placement planner (``controller.placement``) run over a seeded
synthetic fleet, in process, with and without rebalancing.

    fleetctl simulate --nodes N --workloads M --scenario hotspot|diurnal|failure
                      [--steps 60] [--seed 1] [--rebalance-every 1] [--rows 20] [--json]

The fleet (``synthetic_fleet``): N nodes -- edge devices (Pi class: 4 cores, 4 GiB; Jetson
class: 6 cores, 8 GiB, an accelerator, twice as fast) and one cloud node per 20 (32 cores,
64 GiB, three times as fast as a Pi) -- in three regions; M workloads, each a (model,
source device) pair from a small catalogue of models, with a request rate and a latency
SLO. Service times per (node, model) are the model's Pi time times the node's speed
factor (with +-10% jitter); round trips: 0 to itself, 8-15 ms to a peer in the same region,
40-80 ms across regions, 20-30 ms to a cloud node in the region, 50-90 ms to another.
Each device's rates are drawn so that its own workloads use 20-50% of its cores. The
largest model does not fit a Pi: its workloads start on a cloud node of their region.

Scenarios over ``--steps`` steps of one simulated minute (``scenario_events``):

    hotspot  5% of the edge devices (at least one, drawn from the half with the most
             local load at the start) see 5x their request rates from step T/3 until
             step 2T/3, then back to normal
    diurnal  rates follow a day curve (0.25x at night to 2.5x at the peak), the whole run
             being one day, phase-shifted by 8 hours per region
    failure  the cloud node carrying the most workloads goes offline at step T/3 and comes
             back at step 2T/3 (no cloud node: the busiest node)

Two arms start from the same assignment -- the initial one above, planned once on the
first step's snapshot -- and see the same rates and the same offline nodes:

    static     the assignment never changes; a workload whose executor is offline fails
               (counted as a violation and as failed)
    rebalance  each step (or every ``--rebalance-every K`` steps) ``placement.plan`` runs on
               the step's snapshot (with ``last_moved`` and ``now``, so cooldown and
               hysteresis act under the default ``Policy``) and its moves are applied;
               a move takes effect within the step it is planned in

Per step and arm: SLO violations (workloads whose predicted p95 exceeds their SLO, or that
failed), failed workloads, peak utilisation (busiest online node), moves. Summary per arm:
violation-steps (the sum of violations over the steps), steps with any violation, failed
workload-steps, peak utilisation (max and mean over the steps), moves in total and the
most moves of one workload (flapping shows there).

Output: a table over time (sampled rows) and the summary table; ``--json`` prints one
document ``{"params", "initial_moves", "initial_plans", "events", "series": {"static":
[...], "rebalance": [...]}, "summary": {"static": {...}, "rebalance": {...}}, "moves":
[the rebalancing arm's moves: step, model, source, from, to, reason, p95 before/after
(null: infinite)], "timing"}`` (only ``timing`` depends on the machine; everything else is
a function of the arguments). Bad arguments are usage errors (exit 2).

Cost: a snapshot holds a round trip for every (edge device, node) pair, and the planner
checks the whole snapshot on each call (three per step), so time grows with nodes squared:
200 x 1000 for 60 steps takes seconds; 500 x 2500, about a second per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from controller import placement
from controller.placement import Model, Node, Policy, Snapshot, Workload
from edge_runtime.console import emit_json, positive_int
from edge_runtime.errors import EdgeRuntimeError

__all__ = ["SCENARIOS", "SimulateError", "SyntheticFleet", "synthetic_fleet", "simulate", "add_cli"]

SCENARIOS = ("hotspot", "diurnal", "failure")
ARMS = ("static", "rebalance")
STEP_S = 60.0  # one simulated minute per step
REGIONS = ("eu", "us", "ap")
GIB = 1 << 30
MIB = 1 << 20

# (kind, share of the edge devices, cores, memory, accelerator, speed factor: service time x)
_EDGE_KINDS = (("pi", 0.65, 4, 4 * GIB, None, 1.0), ("jetson", 0.35, 6, 8 * GIB, "gpu", 0.5))
_CLOUD = (32, 64 * GIB, None, 1 / 3)
# (name, memory, service time on a Pi in ms, share of the workloads, SLO in ms)
_CATALOGUE = (
    ("kws", 8 * MIB, 4.0, 0.20, 60.0),
    ("vision-s", 24 * MIB, 12.0, 0.22, 120.0),
    ("vision-m", 90 * MIB, 30.0, 0.20, 250.0),
    ("detect", 160 * MIB, 45.0, 0.15, 350.0),
    ("asr", 450 * MIB, 90.0, 0.13, 600.0),
    ("llm-s", 5 * GIB, 400.0, 0.10, 2000.0),
)
HOTSPOT_SHARE, HOTSPOT_FACTOR = 0.05, 5.0
CLOUD_EVERY = 20  # one cloud node per 20 nodes (at least one when N >= 2)
_WARM_UP_PLANS = 5  # at most, for the initial placement


class SimulateError(EdgeRuntimeError):
    """The arguments describe no fleet this simulator can build (e.g. more workloads than
    (model, device) pairs)."""

    code = "invalid_argument"
    http_status = 400


@dataclass
class SyntheticFleet:
    """A seeded fleet: what a snapshot holds, minus the per-step rates and online state."""

    nodes: tuple[Node, ...]
    models: dict[str, Model]
    workloads: tuple[Workload, ...]  # base rates; executor = the initial placement
    service_ms: dict[tuple[str, str], float]
    rtt_ms: dict[tuple[str, str], float]
    region: dict[str, str]  # node id -> region

    @property
    def edge_ids(self) -> list[str]:
        return [n.id for n in self.nodes if n.tier == "edge"]

    @property
    def cloud_ids(self) -> list[str]:
        return [n.id for n in self.nodes if n.tier == "cloud"]


def max_workloads(nodes: int) -> int:
    """How many distinct (model, source) pairs a fleet of ``nodes`` offers."""
    edges = nodes - _cloud_count(nodes)
    return edges * len(_CATALOGUE)


def _cloud_count(nodes: int) -> int:
    return 0 if nodes < 2 else max(1, nodes // CLOUD_EVERY)


def synthetic_fleet(nodes: int, workloads: int, *, seed: int = 1) -> SyntheticFleet:
    """A fleet of ``nodes`` nodes and ``workloads`` workloads, the same for the same seed.

    Raises:
        SimulateError: ``nodes`` or ``workloads`` < 1, or more workloads than (model, edge
            device) pairs.
    """
    if nodes < 1 or workloads < 1:
        raise SimulateError(f"need at least one node and one workload, got {nodes} nodes, {workloads} workloads")
    if workloads > max_workloads(nodes):
        raise SimulateError(f"{workloads} workloads do not fit {nodes} nodes: at most {max_workloads(nodes)} "
                            f"(one per model and edge device, {len(_CATALOGUE)} models)")
    rng = random.Random(seed)
    n_cloud = _cloud_count(nodes)
    n_edge = nodes - n_cloud
    width = len(str(nodes))
    node_list: list[Node] = []
    speed: dict[str, float] = {}
    region: dict[str, str] = {}
    for i in range(n_edge):
        kind = _EDGE_KINDS[0] if rng.random() < _EDGE_KINDS[0][1] else _EDGE_KINDS[1]
        _, _, cores, memory, accel, factor = kind
        node = Node(id=f"edge-{i:0{width}d}", tier="edge", cores=cores, memory_bytes=memory, accelerator=accel)
        node_list.append(node)
        speed[node.id] = factor
        region[node.id] = REGIONS[i % len(REGIONS)]
    for i in range(n_cloud):
        cores, memory, accel, factor = _CLOUD
        node = Node(id=f"cloud-{i}", tier="cloud", cores=cores, memory_bytes=memory, accelerator=accel)
        node_list.append(node)
        speed[node.id] = factor
        region[node.id] = REGIONS[i % len(REGIONS)]
    by_name = {name: Model(name=name, memory_bytes=mem, service_ms=ms) for name, mem, ms, _, _ in _CATALOGUE}
    models = list(by_name.values())
    slo = {name: s for name, _, _, _, s in _CATALOGUE}

    service: dict[tuple[str, str], float] = {}
    for node in node_list:
        for m in models:
            service[(node.id, m.name)] = round(m.service_ms * speed[node.id] * rng.uniform(0.9, 1.1), 3)

    rtt: dict[tuple[str, str], float] = {}
    edges = [n for n in node_list if n.tier == "edge"]
    for src in edges:
        for dst in node_list:
            if dst.id == src.id:
                rtt[(src.id, dst.id)] = 0.0
            elif dst.tier == "cloud":
                rtt[(src.id, dst.id)] = round(rng.uniform(20, 30) if region[dst.id] == region[src.id]
                                              else rng.uniform(50, 90), 2)
            else:
                rtt[(src.id, dst.id)] = round(rng.uniform(8, 15) if region[dst.id] == region[src.id]
                                              else rng.uniform(40, 80), 2)

    # Workloads: distinct (model, source) pairs, models drawn by their share.
    names = [c[0] for c in _CATALOGUE]
    weights = [c[3] for c in _CATALOGUE]
    pairs: set[tuple[str, str]] = set()
    chosen: list[tuple[str, str]] = []
    free = {e.id: set(names) for e in edges}
    order = [e.id for e in edges]
    k = 0
    while len(chosen) < workloads:
        src = order[k % len(order)]
        k += 1
        left = [(n, w) for n, w in zip(names, weights) if n in free[src]]
        if not left:
            continue
        name = rng.choices([n for n, _ in left], weights=[w for _, w in left])[0]
        free[src].discard(name)
        pairs.add((name, src))
        chosen.append((name, src))
    by_source: dict[str, list[str]] = {}
    for name, src in chosen:
        by_source.setdefault(src, []).append(name)

    node_by_id = {n.id: n for n in node_list}
    cloud_load: Counter[str] = Counter()
    wl: list[Workload] = []
    for src in order:
        names_here = by_source.get(src, [])
        if not names_here:
            continue
        node = node_by_id[src]
        # Own demand (core-seconds per second) of 20-50% of the device's cores, split at random.
        demand = node.cores * rng.uniform(0.2, 0.5)
        split = [rng.uniform(0.5, 1.5) for _ in names_here]
        total = sum(split)
        for name, part in zip(names_here, split):
            model = by_name[name]
            rate = demand * part / total / (service[(src, name)] / 1000.0)
            executor = src
            if model.memory_bytes > node.memory_bytes:
                rate = min(rate, rng.uniform(0.5, 2.0))
                executor = _initial_remote(src, model, node_list, region, rtt, cloud_load)
            cloud_load[executor] += 1
            wl.append(Workload(model=name, source=src, rate=round(rate, 3), slo_ms=slo[name], executor=executor))
    return SyntheticFleet(nodes=tuple(node_list), models=by_name, workloads=tuple(wl), service_ms=service,
                          rtt_ms=rtt, region=region)


def _initial_remote(src: str, model: Model, nodes: Sequence[Node], region: dict[str, str],
                    rtt: dict[tuple[str, str], float], load: Counter[str]) -> str:
    """Where a model too large for its source starts: the least loaded cloud node of the
    source's region (else any cloud node, else the nearest node it fits)."""
    clouds = [n for n in nodes if n.tier == "cloud"]
    if clouds:
        local = [n for n in clouds if region[n.id] == region[src]] or clouds
        return min(local, key=lambda n: (load[n.id], n.id)).id
    fits = [n for n in nodes if n.memory_bytes >= model.memory_bytes]
    return min(fits, key=lambda n: (rtt.get((src, n.id), math.inf), n.id)).id if fits else src


# -- scenarios ----------------------------------------------------------------------


@dataclass
class Scenario:
    """Per step: a rate factor per workload and the set of offline nodes."""

    name: str
    steps: int
    rate_factor: Callable[[int, Workload], float]
    offline: Callable[[int], frozenset[str]]
    events: list[dict[str, Any]] = field(default_factory=list)


_BASELINE = Scenario("baseline", 1, lambda s, w: 1.0, lambda s: frozenset())


def build_scenario(name: str, fleet: SyntheticFleet, *, steps: int, seed: int,
                   start: Optional[dict[tuple[str, str], str]] = None) -> Scenario:
    """The scenario ``name`` over ``steps`` steps on ``fleet`` (see the module docstring);
    ``start`` is the assignment the run starts from (default: the fleet's executors), for
    ``failure`` to pick the busiest cloud node.

    Raises:
        SimulateError: an unknown scenario.
    """
    rng = random.Random(f"{seed}:{name}")
    start_step, end_step = steps // 3, max(steps // 3 + 1, (2 * steps) // 3)
    if name == "hotspot":
        # Drawn from the busier half of the edge devices (by the load of their own workloads
        # they execute at the start): a device whose calls all run elsewhere is no hotspot.
        where = start or {(w.model, w.source): w.executor for w in fleet.workloads}
        own: Counter[str] = Counter({e: 0.0 for e in fleet.edge_ids})
        for w in fleet.workloads:
            if where[(w.model, w.source)] == w.source:
                own[w.source] += w.rate * fleet.service_ms[(w.source, w.model)]
        busier = sorted(own, key=lambda e: (-own[e], e))[:max(1, len(own) // 2)]
        hot = frozenset(rng.sample(busier, max(1, round(len(own) * HOTSPOT_SHARE))))
        events = [{"step": start_step, "event": f"hotspot: {len(hot)} device(s) at {HOTSPOT_FACTOR:g}x their rates"},
                  {"step": end_step, "event": "hotspot over: rates back to normal"}]
        return Scenario(name, steps,
                        lambda s, w: HOTSPOT_FACTOR if w.source in hot and start_step <= s < end_step else 1.0,
                        lambda s: frozenset(), events)
    if name == "diurnal":
        phase = {r: i / len(REGIONS) for i, r in enumerate(REGIONS)}
        region = fleet.region

        def factor(s: int, w: Workload) -> float:
            # One day over the run; 0.25x at night, 2.5x at the region's peak.
            x = math.sin(2 * math.pi * (s / steps + phase[region[w.source]]))
            return 0.25 + 2.25 * (1 + x) / 2

        events = [{"step": 0, "event": "one day over the run, regions 8 h apart"}]
        return Scenario(name, steps, factor, lambda s: frozenset(), events)
    if name == "failure":
        counts = Counter(start.values() if start else (w.executor for w in fleet.workloads))
        pool = fleet.cloud_ids or [n.id for n in fleet.nodes]
        victim = max(pool, key=lambda n: (counts[n], n))
        down = frozenset({victim})
        events = [{"step": start_step, "event": f"{victim} offline ({counts[victim]} workload(s) on it)"},
                  {"step": end_step, "event": f"{victim} back online"}]
        return Scenario(name, steps, lambda s, w: 1.0,
                        lambda s: down if start_step <= s < end_step else frozenset(), events)
    raise SimulateError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")


# -- the run ------------------------------------------------------------------------


def _snapshot(fleet: SyntheticFleet, scenario: Scenario, step: int, assignment: dict[tuple[str, str], str],
              last_moved: dict[tuple[str, str], float]) -> Snapshot:
    offline = scenario.offline(step)
    nodes = tuple(n if n.id not in offline else _replace(n, online=False) for n in fleet.nodes)
    workloads = tuple(_replace(w, rate=round(w.rate * scenario.rate_factor(step, w), 4),
                               executor=assignment[(w.model, w.source)]) for w in fleet.workloads)
    return Snapshot(nodes=nodes, models=fleet.models, workloads=workloads, service_ms=fleet.service_ms,
                    rtt_ms=fleet.rtt_ms, last_moved=dict(last_moved), now=step * STEP_S)


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _measure(snapshot: Snapshot, assignment: dict[tuple[str, str], str], policy: Policy) -> dict[str, Any]:
    """Violations (SLO missed or executor offline), failed, peak utilisation of online nodes."""
    offline = {n.id for n in snapshot.nodes if not n.online}
    ev = placement.evaluate(snapshot, assignment, policy)
    failed = {key for key, node in assignment.items() if node in offline}
    violating = set(ev.violating) | failed  # an offline executor already gives an infinite p95
    return {"violations": len(violating), "failed": len(failed), "peak_utilisation": round(ev.peak_utilisation, 4)}


def simulate(nodes: int, workloads: int, scenario: str, *, steps: int = 60, seed: int = 1,
             rebalance_every: int = 1, policy: Optional[Policy] = None) -> dict[str, Any]:
    """Run both arms; the result is what ``--json`` prints.

    Raises:
        SimulateError: bad sizes, an unknown scenario, ``steps`` or ``rebalance_every`` < 1.
    """
    if steps < 1 or rebalance_every < 1:
        raise SimulateError(f"steps and rebalance_every must be >= 1, got {steps} and {rebalance_every}")
    if scenario not in SCENARIOS:
        raise SimulateError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    policy = policy or Policy()
    fleet = synthetic_fleet(nodes, workloads, seed=seed)
    # The start of both arms: the initial placement as an operator deploys it, planned on the
    # base rates until the planner proposes nothing more but without moves for the peak alone
    # (each device runs its own models unless they break an SLO or the target there); these
    # moves count in neither arm. Spreading load is then the rebalance arm's own work.
    start = {(w.model, w.source): w.executor for w in fleet.workloads}
    plan_s: list[float] = []
    initial_moves = 0
    for _ in range(_WARM_UP_PLANS):
        t0 = time.perf_counter()
        warm = placement.plan(_snapshot(fleet, _BASELINE, 0, start, {}), dataclasses.replace(policy, peak_gain=None))
        plan_s.append(time.perf_counter() - t0)
        for mv in warm.moves:
            start[(mv.model, mv.source)] = mv.to_node
        initial_moves += len(warm.moves)
        if not warm.moves:
            break
    initial_plans = len(plan_s)
    sc = build_scenario(scenario, fleet, steps=steps, seed=seed, start=start)
    assignment = {arm: dict(start) for arm in ARMS}
    last_moved: dict[tuple[str, str], float] = {}
    moved: Counter[tuple[str, str]] = Counter()
    log: list[dict[str, Any]] = []
    series: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for step in range(steps):
        now = step * STEP_S
        moves: dict[str, int] = {"static": 0, "rebalance": 0}
        if step % rebalance_every == 0:
            snap = _snapshot(fleet, sc, step, assignment["rebalance"], last_moved)
            t0 = time.perf_counter()
            result = placement.plan(snap, policy)
            plan_s.append(time.perf_counter() - t0)
            for mv in result.moves:
                key = (mv.model, mv.source)
                assignment["rebalance"][key] = mv.to_node
                last_moved[key] = now
                moved[key] += 1
                log.append({"step": step, "model": mv.model, "source": mv.source, "from": mv.from_node,
                            "to": mv.to_node, "reason": mv.reason, "p95_before_ms": _ms(mv.p95_before_ms),
                            "p95_after_ms": _ms(mv.p95_after_ms)})
            moves["rebalance"] = len(result.moves)
        for arm in ARMS:
            snap = _snapshot(fleet, sc, step, assignment[arm], last_moved)
            row = {"step": step, "t_s": now, **_measure(snap, assignment[arm], policy), "moves": moves[arm]}
            series[arm].append(row)
    summary = {arm: _summarise(series[arm]) for arm in ARMS}
    summary["rebalance"]["moves_per_workload_max"] = max(moved.values(), default=0)
    summary["rebalance"]["workloads_moved"] = len(moved)
    return {
        "params": {"nodes": nodes, "workloads": workloads, "scenario": scenario, "steps": steps, "seed": seed,
                   "rebalance_every": rebalance_every, "step_s": STEP_S,
                   "edge_nodes": len(fleet.edge_ids), "cloud_nodes": len(fleet.cloud_ids)},
        "initial_moves": initial_moves,
        "initial_plans": initial_plans,
        "events": sc.events,
        "series": series,
        "summary": summary,
        "moves": log,
        "timing": {"plans": len(plan_s), "plan_ms_mean": round(1000 * sum(plan_s) / len(plan_s), 3),
                   "plan_ms_max": round(1000 * max(plan_s), 3)},
    }


def _ms(value: float) -> Optional[float]:
    """A latency for JSON: rounded, ``None`` for infinite (an offline or saturated executor)."""
    return round(value, 3) if math.isfinite(value) else None


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    peaks = [r["peak_utilisation"] for r in rows]
    return {
        "violation_steps": sum(r["violations"] for r in rows),
        "steps_with_violations": sum(1 for r in rows if r["violations"]),
        "failed_steps": sum(r["failed"] for r in rows),
        "peak_utilisation_max": max(peaks, default=0.0),
        "peak_utilisation_mean": round(sum(peaks) / len(peaks), 4) if peaks else 0.0,
        "moves_total": sum(r["moves"] for r in rows),
        "moves_per_workload_max": 0,
        "workloads_moved": 0,
    }


# -- output -------------------------------------------------------------------------


def sample_steps(steps: int, rows: int, events: Sequence[int] = ()) -> list[int]:
    """About ``rows`` evenly spaced steps, the first and last, and the steps around each event."""
    if steps <= rows:
        return list(range(steps))
    every = max(1, steps // max(1, rows))
    picked = set(range(0, steps, every)) | {steps - 1}
    for s in events:
        picked |= {x for x in (s - 1, s, s + 1) if 0 <= x < steps}
    return sorted(picked)


def render(result: dict[str, Any], *, rows: int = 20) -> None:
    """The time table (sampled rows) and the summary, as rich tables on stdout."""
    from controller.console import _stdout, _table, fmt

    out = _stdout()
    p = result["params"]
    out.print(f"simulate {p['scenario']}: {p['nodes']} nodes ({p['edge_nodes']} edge, {p['cloud_nodes']} cloud), "
              f"{p['workloads']} workloads, {p['steps']} steps of {p['step_s']:g} s, seed {p['seed']}, "
              f"rebalance every {p['rebalance_every']} step(s); start: {result['initial_moves']} move(s) "
              f"from {result['initial_plans']} plan(s) on the base rates, in both arms")
    events = {e["step"]: e["event"] for e in result["events"]}
    st, rb = result["series"]["static"], result["series"]["rebalance"]
    table_rows = []
    for s in sample_steps(p["steps"], rows, list(events)):
        a, b = st[s], rb[s]
        table_rows.append([str(s), f"{a['t_s'] / 60:g}m", _viol(a), fmt(a["peak_utilisation"]), _viol(b),
                           fmt(b["peak_utilisation"]), str(b["moves"]), events.get(s, "")])
    out.print(_table("over time", ["step", "t", "static viol.", "static peak util", "rebalance viol.",
                                   "rebalance peak util", "moves", "event"], table_rows))
    sm = result["summary"]
    out.print(_table("summary", ["arm", "violation-steps", "steps with violations", "failed", "peak util max",
                                 "peak util mean", "moves", "max moves / workload", "workloads moved"],
                     [[arm, str(sm[arm]["violation_steps"]), str(sm[arm]["steps_with_violations"]),
                       str(sm[arm]["failed_steps"]), fmt(sm[arm]["peak_utilisation_max"]),
                       fmt(sm[arm]["peak_utilisation_mean"]), str(sm[arm]["moves_total"]),
                       str(sm[arm]["moves_per_workload_max"]), str(sm[arm]["workloads_moved"])] for arm in ARMS]))
    t = result["timing"]
    out.print(f"planner: {t['plans']} plans, {t['plan_ms_mean']:.1f} ms mean, {t['plan_ms_max']:.1f} ms max")


def _viol(row: dict[str, Any]) -> str:
    text = str(row["violations"])
    if row["failed"]:
        text += f" ({row['failed']} failed)"
    return f"[red]{text}[/]" if row["violations"] else text


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.workloads > max_workloads(args.nodes):
        args.parser.error(f"--workloads {args.workloads} does not fit --nodes {args.nodes}: at most "
                          f"{max_workloads(args.nodes)} (one per model and edge device, {len(_CATALOGUE)} models)")
    result = simulate(args.nodes, args.workloads, args.scenario, steps=args.steps, seed=args.seed,
                      rebalance_every=args.rebalance_every)
    if args.json:
        emit_json(result)
    else:
        render(result, rows=args.rows)
    return 0


def add_cli(sub: Any, models: Any) -> None:
    """Register ``fleetctl simulate``."""
    p = sub.add_parser("simulate", help="the placement planner over a synthetic fleet, with and without rebalancing",
                       description="Runs controller.placement over seeded synthetic telemetry in process (no broker) "
                                   "and prints SLO violations, peak utilisation and moves over time for a static "
                                   "placement and a rebalancing one.")
    p.add_argument("--nodes", type=positive_int, required=True, metavar="N",
                   help=f"nodes: edge devices and one cloud node per {CLOUD_EVERY}")
    p.add_argument("--workloads", type=positive_int, required=True, metavar="M",
                   help="(model, source device) workloads")
    p.add_argument("--scenario", choices=SCENARIOS, required=True)
    p.add_argument("--steps", type=positive_int, default=60, metavar="T", help="simulated minutes (default 60)")
    p.add_argument("--seed", type=int, default=1, help="the fleet and the scenario (default 1)")
    p.add_argument("--rebalance-every", type=positive_int, default=1, metavar="K",
                   help="plan every K steps in the rebalancing arm (default 1)")
    p.add_argument("--rows", type=positive_int, default=20, metavar="R",
                   help="about R sampled rows over time (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON document: params, events, series, summary, moves")
    p.set_defaults(fn=cmd_simulate, parser=p)
