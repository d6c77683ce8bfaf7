"""The exact placement: a mixed-integer linear program solved by HiGHS (``scipy.optimize.milp``)
over the same model as the heuristic in ``controller/placement.py``. It is for small
instances only (at most ``MAX_NODES`` nodes x ``MAX_MODELS`` models) and exists to score the
heuristic: ``score`` is the one objective both are judged by, computed by
``placement.evaluate`` (the true M/M/c model), never by either solver's own bookkeeping.

Variables
---------
``x[w, n]`` binary: workload w runs on node n. ``y[m, n]`` binary: model m is loaded on n.
``v[w]`` binary: w violates its SLO. ``u`` continuous: the peak utilisation.

Constraints
-----------
- one executor each: ``sum_n x[w, n] = 1``;
- a workload needs its model loaded: ``x[w, n] <= y[model(w), n]``;
- memory: ``sum_m memory(m) * y[m, n] <= memory(n)`` on every node;
- utilisation: ``rho(n) = sum_w rate(w) * S(n, model(w)) / 1000 / cores(n) * x[w, n]``
  (linear), ``rho(n) <= utilisation_target`` and ``rho(n) <= u`` on every online node;
- active workloads only on online nodes; the rules the heuristic obeys are obeyed here too:
  a dormant workload (source offline) stays where it is; a workload moved less than
  ``cooldown_s`` ago stays unless its executor is offline; at most ``max_moves`` moves.
  ``min_gain_ms`` is not a constraint: it is the heuristic's per-move hysteresis, and the
  optimum is taken over assignments, so the MILP can only do better for ignoring it.

How the queueing is linearised (exactly)
----------------------------------------
A workload's p95 on node n is ``rtt(source, n) + S(n, m) * q95(rho(n), cores(n))``: nonlinear
in the assignment, because ``rho(n)`` depends on everything else on n. But ``q95`` is
strictly increasing in ``rho``, so "w meets its SLO on n" is the same as

    rho(n) <= theta[w, n],   theta = the largest rho with S * q95(rho, c) <= slo - rtt,

a *linear* condition on the node's utilisation. ``theta`` is found once per (w, n) by root
finding on ``queue_p95_factor`` (the very function ``evaluate`` uses), and the indicator is a
big-M row with ``M = target - theta`` (``rho(n) <= target`` holds anyway):

    rho(n) + M * x[w, n] - M * v[w] <= theta + M

(x = 1, v = 0 forces ``rho(n) <= theta``; otherwise the row is implied by the target).
Pairs with ``theta >= target`` cannot violate and get no row; pairs that violate even on an
idle node (``slo - rtt < S * q95(0)``) get ``v[w] >= x[w, n]``. So this is not a bound or a
piecewise approximation: the MILP's violation count is exactly ``evaluate``'s, up to the
``_EPS`` safety margin (1e-6 of utilisation) kept on ``theta`` and the target against the
solver's feasibility tolerances.

Objective
---------
Lexicographic through weights (``weights``): ``violations * W_v + peak * W_p + moves * W_m``
with ``W_m = 1``, ``W_p = 1000 * (workloads + 1)`` (a peak lower by 0.001 outweighs every move
together) and ``W_v = W_p + workloads + 1`` (one violation outweighs any change of peak in
[0, 1] plus every move). The policy's ``move_cost_ms`` is the heuristic's per-move p95 penalty
in milliseconds; in the objective a move counts 1, as in ``placement.objective``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, brentq, milp
from scipy.sparse import coo_matrix

from controller import placement
from controller.placement import Move, Plan, Policy, Snapshot, evaluate, queue_p95_factor, rtt_between, service_time_ms

__all__ = [
    "MAX_NODES",
    "MAX_MODELS",
    "MILP_REASONS",
    "PlacementInfeasible",
    "SolverFailed",
    "Weights",
    "Score",
    "Solution",
    "weights",
    "score",
    "gap",
    "violation_threshold",
    "optimise",
    "solve",
    "random_instance",
]

MAX_NODES = 12
MAX_MODELS = 6
# The heuristic's reasons; "peak_utilisation" (a move that only lowers the fleet's peak) is
# one of them now that the heuristic can shave peaks too.
MILP_REASONS = placement.REASONS
_EPS = 1e-6  # utilisation margin kept against HiGHS's feasibility and integrality tolerances
_Q0 = -math.log(0.05)  # q95 of an idle M/M/c queue: one exponential service time


class PlacementInfeasible(ValueError):
    """No assignment meets the hard constraints (memory, utilisation target, online
    executors, cooldown, max_moves) for this snapshot."""


class SolverFailed(RuntimeError):
    """HiGHS stopped without any feasible assignment (time limit, or a solver error)."""


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Weights:
    violation: float
    peak: float
    move: float


def weights(snapshot: Snapshot) -> Weights:
    """The lexicographic weights (module docstring) for ``snapshot``."""
    n = len(snapshot.workloads)
    peak = 1000.0 * (n + 1)
    return Weights(violation=peak + n + 1, peak=peak, move=1.0)


@dataclass(frozen=True)
class Score:
    """An assignment judged by ``placement.evaluate``. ``value`` is the weighted objective,
    ``inf`` when the assignment is infeasible (memory, utilisation target or an offline
    executor); lower is better."""

    feasible: bool
    violations: int
    peak_utilisation: float
    moves: int
    value: float


def score(snapshot: Snapshot, assignment: Mapping[tuple[str, str], str], policy: Policy = Policy()) -> Score:
    """The objective both solvers are judged by: (feasible, violations, peak utilisation,
    moves) from ``placement.evaluate`` / ``placement.objective``, folded into one number by
    ``weights``. Used by the tests and by bench/placement.py.

    Raises:
        ValueError: a malformed snapshot or assignment (``placement.evaluate``).
    """
    ev = evaluate(snapshot, assignment, policy)
    moves = sum(1 for w in snapshot.workloads if assignment.get(w.key, w.executor) != w.executor)
    wt = weights(snapshot)
    value = ev.violations * wt.violation + ev.peak_utilisation * wt.peak + moves * wt.move
    return Score(ev.feasible, ev.violations, ev.peak_utilisation, moves, value if ev.feasible else math.inf)


def gap(candidate: Score, optimum: Score) -> float:
    """Relative gap ``(candidate - optimum) / optimum`` of the weighted objective: 0 when
    equal, ``inf`` when the candidate is infeasible (or the optimum is 0 and it is not)."""
    if math.isinf(optimum.value):
        raise ValueError("the optimum is infeasible: no gap")
    if math.isinf(candidate.value):
        return math.inf
    if optimum.value <= 0:
        return 0.0 if candidate.value <= 0 else math.inf
    return (candidate.value - optimum.value) / optimum.value


# --------------------------------------------------------------------------- linearisation


def violation_threshold(bound: float, servers: int, limit: float) -> Optional[float]:
    """The largest utilisation ``rho <= limit`` at which ``q95(rho, servers) <= bound``
    (``bound = (slo - rtt) / S``): ``None`` when even ``limit`` is within it (the pair cannot
    violate), ``-1.0`` when even an idle node is over it (the pair always violates)."""
    if bound < _Q0:
        return -1.0
    if queue_p95_factor(limit, servers) <= bound:
        return None
    root = brentq(lambda r: queue_p95_factor(r, servers) - bound, 0.0, limit, xtol=1e-13, rtol=1e-13)
    theta = root
    while theta > 0 and queue_p95_factor(theta, servers) > bound:  # land on the meeting side
        theta -= 1e-12 + 1e-12 * theta
    return max(theta, 0.0)


@dataclass(frozen=True)
class Solution:
    plan: Plan
    optimal: bool  # HiGHS proved optimality (False: the time limit stopped it with a feasible incumbent)
    status: str
    value: float  # the MILP's own objective (weights), for comparison with score(...).value
    seconds: float
    variables: int
    constraints: int


def _check_size(snapshot: Snapshot) -> None:
    n, m = len(snapshot.nodes), len(snapshot.models)
    if n > MAX_NODES or m > MAX_MODELS:
        raise ValueError(
            f"the exact MILP is for small instances only (at most {MAX_NODES} nodes x {MAX_MODELS} models), "
            f"got {n} nodes x {m} models: use controller.placement.plan for larger fleets"
        )


def optimise(snapshot: Snapshot, policy: Policy = Policy(), *, time_limit_s: float = 10) -> Solution:
    """Solve the placement MILP (module docstring) and return the plan with solver details.

    Raises:
        ValueError: more than ``MAX_NODES`` nodes or ``MAX_MODELS`` models; a malformed
            snapshot or policy.
        PlacementInfeasible: no assignment meets the hard constraints.
        SolverFailed: no feasible assignment within ``time_limit_s``, or a solver error.
    """
    placement.check_snapshot(snapshot)
    placement._check_policy(policy)  # noqa: SLF001 - the planner's own policy check, shared
    _check_size(snapshot)
    t0 = time.perf_counter()
    nodes = {n.id: n for n in snapshot.nodes}
    online = [n.id for n in snapshot.nodes if n.online]
    target = policy.utilisation_target - _EPS
    wt = weights(snapshot)
    workloads = snapshot.workloads

    def cooling(w: placement.Workload) -> bool:
        t = snapshot.last_moved.get(w.key)
        return t is not None and snapshot.now - t < policy.cooldown_s

    # -- variables: x (allowed pairs), y (model, node), v (workloads that can violate), u
    xs: list[tuple[int, str]] = []  # (workload index, node)
    fixed: set[int] = set()  # x variables fixed to 1
    active = [nodes[w.source].online for w in workloads]
    forced_moves = 0
    free_stay: list[int] = []  # x[w, executor] of active, movable workloads (objective: stay)
    for i, w in enumerate(workloads):
        if not active[i] or (cooling(w) and nodes[w.executor].online):
            fixed.add(len(xs))
            xs.append((i, w.executor))
            continue
        if not nodes[w.executor].online:
            forced_moves += 1
        for nid in online:
            if nid == w.executor:
                free_stay.append(len(xs))
            xs.append((i, nid))
    by_workload: dict[int, list[int]] = {}
    for j, (i, _) in enumerate(xs):
        by_workload.setdefault(i, []).append(j)
    for i, w in enumerate(workloads):
        if i not in by_workload:
            raise PlacementInfeasible(f"workload ({w.model!r}, {w.source!r}) has no online node to run on")

    ys: dict[tuple[str, str], int] = {}
    for i, nid in xs:
        ys.setdefault((workloads[i].model, nid), len(xs) + len(ys))
    col = len(xs) + len(ys)

    # per pair: load share a = rate * S / 1000 / cores (active only), and the SLO threshold
    load_share = np.zeros(len(xs))
    thresholds: list[tuple[int, int, float]] = []  # (x column, workload, theta)
    for j, (i, nid) in enumerate(xs):
        w = workloads[i]
        if not active[i]:
            continue
        s = service_time_ms(snapshot, nid, w.model)
        load_share[j] = w.rate * s / 1000.0 / nodes[nid].cores
        bound = (w.slo_ms - rtt_between(snapshot, w.source, nid, policy)) / s
        theta = violation_threshold(bound, nodes[nid].cores, policy.utilisation_target)
        if theta is not None:
            thresholds.append((j, i, theta))
    vcol: dict[int, int] = {}
    for _, i, _ in thresholds:
        if i not in vcol:
            vcol[i] = col
            col += 1
    ucol = col
    nvars = col + 1

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []

    def row(entries: list[tuple[int, float]], lb: float, ub: float) -> None:
        r = len(lo)
        for c, a in entries:
            rows.append(r)
            cols.append(c)
            vals.append(a)
        lo.append(lb)
        hi.append(ub)

    for i, js in by_workload.items():  # one executor each
        row([(j, 1.0) for j in js], 1.0, 1.0)
    for j, (i, nid) in enumerate(xs):  # the model is loaded where it runs
        row([(j, 1.0), (ys[(workloads[i].model, nid)], -1.0)], -np.inf, 0.0)
    per_node_y: dict[str, list[tuple[int, float]]] = {}
    for (m, nid), c in ys.items():
        per_node_y.setdefault(nid, []).append((c, float(snapshot.models[m].memory_bytes)))
    for nid, entries in per_node_y.items():  # memory
        row(entries, -np.inf, float(nodes[nid].memory_bytes))
    per_node_x: dict[str, list[tuple[int, float]]] = {}
    for j, (i, nid) in enumerate(xs):
        if load_share[j] > 0:
            per_node_x.setdefault(nid, []).append((j, float(load_share[j])))
    for nid in online:  # utilisation target and peak
        entries = per_node_x.get(nid, [])
        if entries:
            row(entries, -np.inf, target)
            row([*entries, (ucol, -1.0)], -np.inf, 0.0)
    for j, i, theta in thresholds:  # SLO violation indicators
        nid = xs[j][1]
        if theta < 0:
            row([(j, 1.0), (vcol[i], -1.0)], -np.inf, 0.0)
            continue
        th = max(theta - _EPS, 0.0)
        big = target - th
        if big <= 0:
            continue
        entries = dict(per_node_x.get(nid, []))
        entries[j] = entries.get(j, 0.0) + big
        row([*entries.items(), (vcol[i], -big)], -np.inf, th + big)
    if policy.max_moves is not None:  # moves = forced + free workloads not staying on their executor
        budget = policy.max_moves - forced_moves - len(free_stay)
        if free_stay:
            row([(j, -1.0) for j in free_stay], -np.inf, float(budget))
        elif budget < 0:
            raise PlacementInfeasible(f"{forced_moves} workloads must leave offline executors, max_moves is "
                                      f"{policy.max_moves}")

    c = np.zeros(nvars)
    for j in free_stay:
        c[j] = -wt.move
    for vc in vcol.values():
        c[vc] = wt.violation
    c[ucol] = wt.peak
    constant = wt.move * (len(free_stay) + forced_moves)

    lb = np.zeros(nvars)
    ub = np.ones(nvars)
    for j in fixed:
        lb[j] = 1.0
    ub[ucol] = np.inf
    integrality = np.ones(nvars)
    integrality[ucol] = 0
    constraints = []
    if lo:
        a = coo_matrix((vals, (rows, cols)), shape=(len(lo), nvars)).tocsr()
        constraints.append(LinearConstraint(a, np.array(lo), np.array(hi)))
    res = milp(
        c,
        integrality=integrality,
        bounds=Bounds(lb, ub),
        constraints=constraints,
        options={"time_limit": float(time_limit_s), "mip_rel_gap": 1e-9, "disp": False},
    )
    if res.status == 2:
        raise PlacementInfeasible("no assignment meets memory, the utilisation target, online executors, "
                                  "cooldown and max_moves")
    if res.x is None:
        raise SolverFailed(f"HiGHS found no feasible assignment: {res.message}")

    assignment: dict[tuple[str, str], str] = {}
    for i, js in by_workload.items():
        j = max(js, key=lambda j: res.x[j])
        assignment[workloads[i].key] = xs[j][1]
    result = _plan(snapshot, policy, assignment)
    return Solution(
        plan=result,
        optimal=res.status == 0,
        status=str(res.message),
        value=float(res.fun) + constant,
        seconds=time.perf_counter() - t0,
        variables=nvars,
        constraints=len(lo),
    )


def _plan(snapshot: Snapshot, policy: Policy, assignment: dict[tuple[str, str], str]) -> Plan:
    """The Plan for ``assignment``: moves (all at once, so ``p95_after_ms`` is at the final
    assignment), each with the first reason that applies in the heuristic's order, else
    ``peak_utilisation``."""
    nodes = {n.id: n for n in snapshot.nodes}
    before = evaluate(snapshot, {}, policy)
    after = evaluate(snapshot, assignment, policy)
    violating_before, violating_after = set(before.violating), set(after.violating)
    over_before = set(before.over_target)
    order = {r: k for k, r in enumerate(MILP_REASONS)}
    moves = []
    for w in snapshot.workloads:
        to = assignment[w.key]
        if to == w.executor:
            continue
        p_before = before.p95_ms.get(w.key, math.inf)
        p_after = after.p95_ms.get(w.key, math.inf)
        if not nodes[w.executor].online:
            reason = "offline_executor"
        elif w.key in violating_before and w.key not in violating_after:
            reason = "slo_violation"
        elif w.executor in over_before:
            reason = "over_utilisation"
        elif policy.min_gain_ms is not None and p_before - p_after >= policy.min_gain_ms:
            reason = "latency_gain"
        else:
            reason = "peak_utilisation"
        moves.append(Move(w.model, w.source, w.executor, to, reason, p_before, p_after))
    moves.sort(key=lambda mv: (order[mv.reason], mv.model, mv.source))
    return Plan(
        moves=tuple(moves),
        assignment=MappingProxyType(dict(assignment)),
        violations_before=before.violations,
        violations_after=after.violations,
        peak_utilisation_before=before.peak_utilisation,
        peak_utilisation_after=after.peak_utilisation,
        method="milp",
    )


def solve(snapshot: Snapshot, policy: Policy = Policy(), *, time_limit_s: float = 10) -> Plan:
    """The optimal plan for a small snapshot (``method="milp"``); ``optimise`` also says
    whether HiGHS proved optimality within ``time_limit_s``.

    Raises:
        ValueError: more than ``MAX_NODES`` nodes or ``MAX_MODELS`` models; a malformed
            snapshot or policy.
        PlacementInfeasible: no assignment meets the hard constraints.
        SolverFailed: no feasible assignment within ``time_limit_s``, or a solver error.
    """
    return optimise(snapshot, policy, time_limit_s=time_limit_s).plan


# --------------------------------------------------------------------------- random small instances


def random_instance(seed: int, *, max_nodes: int = MAX_NODES, max_models: int = MAX_MODELS) -> Snapshot:
    """A random small fleet for scoring the heuristic against the MILP (tests, bench): 1-3
    cloud nodes and 3-10 edge devices, 2-``max_models`` models, each device calling 1-3 of
    them at skewed rates (lognormal load, so some devices start over the target), measured
    service times on some pairs (cloud faster, edge slower than the reference), measured round
    trips on some pairs, SLOs from tight to loose; now and then an offline node, a workload
    already served by a peer or cloud, or one in its cooldown. Every node starts with memory
    for the models it executes (a device cannot be running what does not fit), so the start
    may be over the utilisation target or violate SLOs but never over memory. Deterministic
    per ``seed``."""

    rng = random.Random(seed)
    n_cloud = rng.randint(1, 3)
    n_edge = rng.randint(3, max(3, max_nodes - n_cloud))
    n_models = rng.randint(2, max_models)
    mb = 1 << 20
    models = {
        f"m{k}": placement.Model(f"m{k}", rng.randint(50, 600) * mb, round(rng.uniform(4.0, 40.0), 3))
        for k in range(n_models)
    }
    nodes = [placement.Node(f"cloud-{k}", "cloud", rng.choice((8, 16)), rng.randint(2, 8) * 512 * mb)
             for k in range(n_cloud)]
    nodes += [placement.Node(f"dev-{k}", "edge", rng.choice((1, 2, 4)), rng.randint(1, 4) * 512 * mb)
              for k in range(n_edge)]
    if rng.random() < 0.15:  # one node offline
        k = rng.randrange(len(nodes))
        n = nodes[k]
        nodes[k] = placement.Node(n.id, n.tier, n.cores, n.memory_bytes, n.accelerator, online=False)
    service: dict[tuple[str, str], float] = {}
    for n in nodes:
        for m in models.values():
            if rng.random() < 0.6:
                scale = rng.uniform(0.3, 0.8) if n.tier == "cloud" else rng.uniform(1.0, 2.5)
                service[(n.id, m.name)] = round(m.service_ms * scale, 3)
    rtt: dict[tuple[str, str], float] = {}
    for a in nodes:
        for b in nodes:
            if a.id < b.id and rng.random() < 0.3:
                rtt[(a.id, b.id)] = round(rng.uniform(2.0, 20.0) if a.tier == b.tier == "edge" else
                                          rng.uniform(15.0, 80.0), 3)
    workloads = []
    last_moved: dict[tuple[str, str], float] = {}
    now = 10_000.0
    clouds = [n.id for n in nodes if n.tier == "cloud"]
    edges = [n for n in nodes if n.tier == "edge"]
    for dev in edges:
        chosen = rng.sample(sorted(models), rng.randint(1, min(3, n_models)))
        share = rng.lognormvariate(math.log(0.35), 0.6)  # the device's total load if all stays local
        for m in chosen:
            s = service.get((dev.id, m), models[m].service_ms)
            rate = share / len(chosen) * dev.cores * 1000.0 / s
            executor = dev.id
            if rng.random() < 0.15:
                executor = rng.choice(clouds + [e.id for e in edges])
            slo = round(s * rng.uniform(3.5, 9.0) + rng.uniform(0.0, 60.0), 3)
            workloads.append(placement.Workload(m, dev.id, round(rate, 4), slo, executor))
            if rng.random() < 0.05:
                last_moved[(m, dev.id)] = now - rng.uniform(0.0, 1200.0)
    needed: dict[str, set[str]] = {}
    for w in workloads:
        needed.setdefault(w.executor, set()).add(w.model)
    nodes = [
        placement.Node(n.id, n.tier, n.cores,
                       max(n.memory_bytes, sum(models[m].memory_bytes for m in needed.get(n.id, ()))),
                       n.accelerator, n.online)
        for n in nodes
    ]
    return placement.Snapshot(
        nodes=tuple(nodes),
        models=models,
        workloads=tuple(workloads),
        service_ms=service,
        rtt_ms=rtt,
        last_moved=last_moved,
        now=now,
    )
