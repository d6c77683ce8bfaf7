"""The placement planner as pure functions: a fleet snapshot in, a plan out. No I/O, no clock
(``Snapshot.now`` is the caller's time); the controller builds the snapshot from birth
capacity and telemetry, calls ``plan``, and migrates per ``Plan.moves``.

The model
---------
A *node* is any runtime (``tier`` "edge" or "cloud"). A *workload* is one (model, source
device) pair: the applications on ``source`` call ``model`` at ``rate`` requests/s with a p95
target ``slo_ms``; ``executor`` is the node that serves those calls now (``source`` when
local). An assignment maps every (model, source) to exactly one executor.

Latency. A node is an M/M/c queue with ``c = cores``. Its utilisation is

    rho(n) = sum over workloads w it executes of rate(w) * S(n, model(w)) / 1000 / cores(n)

with ``S(n, m)`` the measured mean service time (``Snapshot.service_ms``) or the model's
reference ``Model.service_ms`` when the node has none. Requests of different models share
the node's servers, so a workload's p95 is that of an M/M/c queue at the node's *total*
utilisation with the workload's own service time:

    p95(w) = rtt(source, executor) + S(n, m) * q95(rho(n), c)

where ``q95(rho, c)`` is the 95th percentile of response time (wait + service) in units of
the mean service time, from the Erlang C formula (``predict_p95_ms`` is the same thing for
one stream). Response times scale with S at fixed rho and c, which is what makes the
planner fast: a node's workloads all stay within their SLOs iff
``q95(rho, c) <= min over them of (slo - rtt) / S``, one number per node.
``rho >= 1`` gives an infinite p95. An offline executor gives an infinite p95.

Round trips: 0 on the same node; else ``Snapshot.rtt_ms[(source, node)]``, else the reverse
pair, else ``Policy.default_rtt_ms[(tier(source), tier(node))]``.

Memory. A node's memory use is the sum of the *distinct* models it executes (one loaded copy
serves every source routed to it) and must stay within ``Node.memory_bytes``. Assumption:
every source keeps its own copy of the model on disk for fallback; disk is not modelled, and
a source's local copy counts against its memory only while it executes the model itself.

Dormant workloads: a workload whose *source* is offline has no callers. It keeps its
executor, still holds memory there (nothing unloads it), adds no utilisation, is never
counted as a violation and is never moved.

Objective (lexicographic): fewest SLO violations, then lowest peak utilisation over online
nodes, then fewest moves (``objective``). Hysteresis keeps plans from flapping: a workload
moved less than ``cooldown_s`` ago is not moved again (unless its executor is offline), and
a move is admissible only if it brings its workload back from an offline executor, removes
its SLO violation, takes load off a node over the utilisation target, is part of lowering
the fleet's peak utilisation by at least ``peak_gain`` (0.02 by default; None: never for
the peak alone), or -- only when ``min_gain_ms`` is set (default None) -- cuts its predicted
p95 by at least ``max(min_gain_ms, move_cost_ms)`` without raising the peak. A move never
puts a node over its memory or the utilisation target, and never pushes a workload that
meets its SLO over it.

The heuristic (``plan``)
------------------------
Rounds until nothing moves, each in priority order:

1. workloads on offline executors (reason ``offline_executor``);
2. violating workloads, worst first (``slo_violation``);
3. nodes over the utilisation target, highest first: their workloads, largest load first,
   until the node is back under target (``over_utilisation``);
4. the peak (``peak_utilisation``), once per plan (``_lower_peak``): bisection for the
   lowest level L (within 3% of the peak; 0.2% in a fleet of at most 64 nodes) such that
   every online node can be brought to utilisation <= L: from each node above L the fewest
   workloads that suffice are taken off and placed largest first, each on the candidate
   left least utilised that keeps every SLO. A small fleet also tries every node, and when
   that fails re-places every movable workload (most constrained first, then largest
   first; spread, pack, or where it runs cheapest), then polishes with single moves and
   swaps off the busiest node. Nothing moves unless the peak drops by ``peak_gain``; the
   search repeats from its result until it does not. Then single moves off the busiest node
   while one lowers it by ``peak_gain``;
5. with ``min_gain_ms`` set: workloads whose p95 can drop by ``max(min_gain_ms,
   move_cost_ms)`` without raising the fleet's peak utilisation (``latency_gain``) --
   latency is not in the objective, so such a move must not worsen it.

A workload moves at most once per plan, except in step 4, where one may move on (its Move
then reads from its executor before the plan to its executor after it; back where it
started, it is no move). Each repeat of step 4 lowers the peak, so rounds end, and the last
round changes nothing, so planning the result again moves nothing (the property tests
check it, with the moved workloads cooling down).

Candidate executors for a workload: its source, the least-loaded nodes that already run the
model (a heap per model), and the least-loaded edge and cloud nodes (a heap per tier). Heaps
are lazy (stale entries skipped), so a plan costs about O(workloads * k log nodes). Among
admissible candidates the best is the one with (no violation, lowest resulting peak,
lowest p95 + ``move_cost_ms``), where "resulting peak" counts only above the current peak
(below it, latency decides).
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Collection, Mapping, Optional

__all__ = [
    "Node",
    "Model",
    "Workload",
    "Snapshot",
    "Policy",
    "Move",
    "Plan",
    "Evaluation",
    "Objective",
    "TIERS",
    "REASONS",
    "predict_p95_ms",
    "queue_p95_factor",
    "evaluate",
    "objective",
    "plan",
    "apply_plan",
    "check_snapshot",
    "rtt_between",
    "service_time_ms",
]

TIERS = ("edge", "cloud")
REASONS = ("offline_executor", "slo_violation", "over_utilisation", "latency_gain", "peak_utilisation")
_QUANTILE_TAIL = 0.05  # p95
_CANDIDATES_PER_MODEL = 3
_CANDIDATES_PER_TIER = 3
_MAX_HEAP_SCAN = 24

# Lowering the peak: the level is searched to this fraction of the peak (a small fleet can
# afford a finer search), and a small fleet tries every node and these placement rules.
_LEVEL_TOL_SMALL = 0.002
_LEVEL_TOL_LARGE = 0.03
_RULES = ("least_utilised", "most_utilised", "cheapest")
_Q_IDLE = -math.log(0.05)  # q95 of an idle queue: one exponential service time
_ALL_CANDIDATES_UP_TO = 64  # nodes: a fleet this small tries every node when lowering the peak
_EPS = 1e-9  # the heuristic's own checks keep this relative slack, so float drift in its
# incremental loads never turns into a violation or an overrun when evaluate recomputes them

Key = tuple[str, str]  # (model, source)


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Node:
    id: str
    tier: str  # "edge" | "cloud"
    cores: int  # c servers of the M/M/c queue
    memory_bytes: int  # memory available for models
    accelerator: Optional[str] = None
    online: bool = True


@dataclass(frozen=True)
class Model:
    name: str
    memory_bytes: int  # resident size when loaded on an executor
    service_ms: float  # mean service time on a reference node, used when a node has no measurement


@dataclass(frozen=True)
class Workload:
    model: str
    source: str  # the device whose applications call it
    rate: float  # requests/s measured
    slo_ms: float  # p95 latency target
    executor: str  # the node serving it now (== source when local)

    @property
    def key(self) -> Key:
        return (self.model, self.source)


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[Node, ...]
    models: Mapping[str, Model]
    workloads: tuple[Workload, ...]
    service_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (node, model) measured mean
    rtt_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (source, node) measured round trip
    last_moved: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (model, source) -> time of last move
    now: float = 0.0


def _default_rtt() -> Mapping[tuple[str, str], float]:
    return MappingProxyType(
        {("edge", "edge"): 5.0, ("edge", "cloud"): 40.0, ("cloud", "edge"): 40.0, ("cloud", "cloud"): 5.0}
    )


@dataclass(frozen=True)
class Policy:
    utilisation_target: float = 0.7
    # a latency-only move (reason "latency_gain") must cut the workload's p95 by this much;
    # None: never move for latency alone (latency is not in the objective; SLOs are)
    min_gain_ms: Optional[float] = None
    cooldown_s: float = 600.0  # per workload, after a move
    move_cost_ms: float = 2.0  # added to a moved workload's p95 when choosing; fewest moves as last tie-break
    # (tier of source, tier of node) -> round trip when not measured; the same node is always 0
    default_rtt_ms: Mapping[tuple[str, str], float] = field(default_factory=_default_rtt)
    max_moves: Optional[int] = None
    # a move for the peak alone (reason "peak_utilisation") must lower the busiest node's
    # utilisation by at least this much; None: never move for the peak alone
    peak_gain: Optional[float] = 0.02


@dataclass(frozen=True)
class Move:
    model: str
    source: str
    from_node: str
    to_node: str
    reason: str  # one of REASONS
    p95_before_ms: float
    p95_after_ms: float  # predicted for this workload at the state right after this move


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]
    assignment: Mapping[tuple[str, str], str]  # (model, source) -> executor after the plan
    violations_before: int
    violations_after: int
    peak_utilisation_before: float
    peak_utilisation_after: float
    method: str  # "heuristic" | "milp"


@dataclass(frozen=True)
class Evaluation:
    p95_ms: Mapping[tuple[str, str], float]  # (model, source) -> predicted p95 (active workloads only)
    utilisation: Mapping[str, float]  # node -> rho (every node)
    memory_bytes: Mapping[str, int]  # node -> bytes of distinct models it executes
    violating: tuple[tuple[str, str], ...]  # active workloads over their SLO, sorted
    peak_utilisation: float  # max rho over online nodes
    over_memory: tuple[str, ...]  # nodes whose models exceed their memory
    over_target: tuple[str, ...]  # online nodes with rho > utilisation_target
    offline_executors: tuple[str, ...]  # offline nodes serving an active workload

    @property
    def violations(self) -> int:
        return len(self.violating)

    @property
    def feasible(self) -> bool:
        """Memory within limits, every node within the utilisation target, no active
        workload on an offline executor (SLO violations are the objective, not feasibility)."""
        return not (self.over_memory or self.over_target or self.offline_executors)


@dataclass(frozen=True, order=True)
class Objective:
    """Lexicographic: compare with ``<``; lower is better."""

    violations: int
    peak_utilisation: float
    moves: int


# --------------------------------------------------------------------------- queueing


def _erlang_c(servers: int, rho: float) -> float:
    """Probability that an arrival waits in M/M/c at per-server utilisation rho < 1."""
    a = servers * rho
    b = 1.0  # Erlang B, by the stable recurrence
    for k in range(1, servers + 1):
        b = a * b / (k + a * b)
    return b / (1.0 - rho * (1.0 - b))


def _tail(t: float, c_wait: float, theta: float) -> tuple[float, float]:
    """P(T > t) and its density for T = S + W, S ~ Exp(1), W = 0 w.p. 1 - c_wait else Exp(theta)."""
    e1 = math.exp(-t)
    if abs(theta - 1.0) < 1e-9:
        g = e1 * (1.0 + t)
        h = t * e1
    else:
        et = math.exp(-theta * t)
        g = (theta * e1 - et) / (theta - 1.0)
        h = theta * (e1 - et) / (theta - 1.0)
    return (1.0 - c_wait) * e1 + c_wait * g, (1.0 - c_wait) * e1 + c_wait * h


def queue_p95_factor(rho: float, servers: int) -> float:
    """p95 of M/M/c response time (wait + service) in units of the mean service time, at
    per-server utilisation ``rho``; ``inf`` when ``rho >= 1``. Exact (Erlang C), solved by
    safeguarded Newton on the closed-form tail."""
    if servers < 1:
        raise ValueError("servers must be >= 1")
    if rho >= 1.0 or math.isnan(rho):
        return math.inf
    if rho <= 0.0:
        return -math.log(_QUANTILE_TAIL)
    c_wait = _erlang_c(servers, rho)
    if c_wait <= 0.0:  # underflow: nobody waits
        return -math.log(_QUANTILE_TAIL)
    theta = servers * (1.0 - rho)
    # P(S > a) + P(W > b) <= 0.05 with each term 0.025: an upper bracket.
    hi = math.log(2 / _QUANTILE_TAIL) + max(0.0, math.log(2 * c_wait / _QUANTILE_TAIL)) / theta
    lo = -math.log(_QUANTILE_TAIL)  # T >= S, so its p95 is at least S's
    # Newton on log P(T > t), nearly linear for a mix of exponential tails; kept in [lo, hi].
    target = math.log(_QUANTILE_TAIL)
    t = lo
    for _ in range(200):
        p, dens = _tail(t, c_wait, theta)
        if p <= 0.0 or dens <= 0.0:
            nxt = (lo + hi) / 2
        else:
            diff = math.log(p) - target
            if diff > 0:
                lo = t
            elif diff < 0:
                hi = t
            else:
                return t
            nxt = t + diff * p / dens
            if abs(nxt - t) <= 1e-12 * t:
                return nxt
            if not (lo <= nxt <= hi):
                nxt = (lo + hi) / 2
        if hi - lo <= 1e-12 * hi:
            return nxt
        t = nxt
    return t


def predict_p95_ms(rate: float, service_ms: float, servers: int, rtt_ms: float) -> float:
    """Round trip plus the p95 of response time of an M/M/c queue (Erlang C) with arrival
    ``rate`` (requests/s), mean ``service_ms`` and ``servers`` servers; ``inf`` when the
    utilisation ``rate * service_ms / 1000 / servers`` is 1 or more.

    Raises:
        ValueError: negative rate or non-positive service time or servers.
    """
    if rate < 0 or service_ms <= 0 or servers < 1:
        raise ValueError("rate must be >= 0, service_ms > 0 and servers >= 1")
    rho = rate * service_ms / 1000.0 / servers
    return rtt_ms + service_ms * queue_p95_factor(rho, servers)


# --------------------------------------------------------------------------- snapshot checks


def check_snapshot(snapshot: Snapshot) -> None:
    """Raise ``ValueError`` naming the bad field; return None for a well-formed snapshot."""
    ids: set[str] = set()
    for i, n in enumerate(snapshot.nodes):
        where = f"nodes[{i}]"
        if not isinstance(n.id, str) or not n.id:
            raise ValueError(f"{where}.id: must be a non-empty string")
        if n.id in ids:
            raise ValueError(f"{where}.id: duplicate node id {n.id!r}")
        ids.add(n.id)
        if n.tier not in TIERS:
            raise ValueError(f"{where}.tier: {n.tier!r} is not one of {TIERS}")
        if not isinstance(n.cores, int) or isinstance(n.cores, bool) or n.cores < 1:
            raise ValueError(f"{where}.cores: must be an int >= 1, got {n.cores!r}")
        if n.memory_bytes < 0:
            raise ValueError(f"{where}.memory_bytes: negative ({n.memory_bytes})")
    for name, m in snapshot.models.items():
        if m.name != name:
            raise ValueError(f"models[{name!r}].name: is {m.name!r}")
        if m.memory_bytes < 0:
            raise ValueError(f"models[{name!r}].memory_bytes: negative ({m.memory_bytes})")
        if not (m.service_ms > 0 and math.isfinite(m.service_ms)):
            raise ValueError(f"models[{name!r}].service_ms: must be > 0, got {m.service_ms!r}")
    seen: set[Key] = set()
    for i, w in enumerate(snapshot.workloads):
        where = f"workloads[{i}]"
        if w.model not in snapshot.models:
            raise ValueError(f"{where}.model: unknown model {w.model!r}")
        if w.source not in ids:
            raise ValueError(f"{where}.source: unknown node {w.source!r}")
        if w.executor not in ids:
            raise ValueError(f"{where}.executor: unknown node {w.executor!r}")
        if not (w.rate >= 0 and math.isfinite(w.rate)):
            raise ValueError(f"{where}.rate: must be a finite number >= 0, got {w.rate!r}")
        if not w.slo_ms > 0:
            raise ValueError(f"{where}.slo_ms: must be > 0, got {w.slo_ms!r}")
        if w.key in seen:
            raise ValueError(f"{where}: duplicate workload (model {w.model!r}, source {w.source!r})")
        seen.add(w.key)
    for (node, model), v in snapshot.service_ms.items():
        if node not in ids:
            raise ValueError(f"service_ms[{(node, model)!r}]: unknown node {node!r}")
        if model not in snapshot.models:
            raise ValueError(f"service_ms[{(node, model)!r}]: unknown model {model!r}")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"service_ms[{(node, model)!r}]: must be > 0, got {v!r}")
    for (src, node), v in snapshot.rtt_ms.items():
        if src not in ids or node not in ids:
            raise ValueError(f"rtt_ms[{(src, node)!r}]: unknown node")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"rtt_ms[{(src, node)!r}]: must be >= 0, got {v!r}")
    for (model, source) in snapshot.last_moved:
        if (model, source) not in seen:
            raise ValueError(f"last_moved[{(model, source)!r}]: unknown workload")


def _check_policy(policy: Policy) -> None:
    if not 0 < policy.utilisation_target <= 1:
        raise ValueError(f"utilisation_target: must be in (0, 1], got {policy.utilisation_target!r}")
    if (policy.min_gain_ms is not None and policy.min_gain_ms < 0) or policy.cooldown_s < 0 or policy.move_cost_ms < 0:
        raise ValueError("min_gain_ms, cooldown_s and move_cost_ms must be >= 0")
    if policy.peak_gain is not None and not policy.peak_gain > 0:
        raise ValueError(f"peak_gain: must be > 0 or None, got {policy.peak_gain!r}")
    if policy.max_moves is not None and policy.max_moves < 0:
        raise ValueError("max_moves: must be >= 0")


# --------------------------------------------------------------------------- evaluation


def service_time_ms(snapshot: Snapshot, node: str, model: str) -> float:
    """Measured mean service time of ``model`` on ``node``, else the model's reference."""
    v = snapshot.service_ms.get((node, model))
    return v if v is not None else snapshot.models[model].service_ms


def _rtt(snapshot: Snapshot, policy: Policy, tiers: Mapping[str, str], source: str, node: str) -> float:
    if source == node:
        return 0.0
    v = snapshot.rtt_ms.get((source, node))
    if v is None:
        v = snapshot.rtt_ms.get((node, source))
    if v is None:
        pair = (tiers[source], tiers[node])
        v = policy.default_rtt_ms.get(pair)
        if v is None:
            v = policy.default_rtt_ms.get((pair[1], pair[0]), 0.0)
    return v


def rtt_between(snapshot: Snapshot, source: str, node: str, policy: Policy = Policy()) -> float:
    """Round trip from ``source`` to ``node`` as the planner predicts it."""
    return _rtt(snapshot, policy, {n.id: n.tier for n in snapshot.nodes}, source, node)


def evaluate(
    snapshot: Snapshot, assignment: Mapping[tuple[str, str], str], policy: Policy = Policy()
) -> Evaluation:
    """Predict every workload's p95 and every node's utilisation and memory under
    ``assignment`` ((model, source) -> executor; a workload missing from it keeps its
    current executor).

    Raises:
        ValueError: a malformed snapshot, or an assignment naming an unknown node or workload.
    """
    check_snapshot(snapshot)
    return _evaluate(snapshot, assignment, policy)


def _evaluate(
    snapshot: Snapshot,
    assignment: Mapping[tuple[str, str], str],
    policy: Policy,
    base: Optional[Evaluation] = None,
    changed: Optional[set[str]] = None,
) -> Evaluation:
    """``evaluate`` without the snapshot check. With ``base`` (the evaluation of the
    snapshot's own executors) and ``changed`` (every node a workload left or joined), only
    those nodes and their workloads are recomputed."""
    nodes = {n.id: n for n in snapshot.nodes}
    if assignment:
        keys = {(w.model, w.source) for w in snapshot.workloads}
        for k, ex in assignment.items():
            if k not in keys:
                raise ValueError(f"assignment[{k!r}]: unknown workload")
            if ex not in nodes:
                raise ValueError(f"assignment[{k!r}]: unknown node {ex!r}")
    incremental = base is not None and changed is not None
    tiers = {n.id: n.tier for n in snapshot.nodes}
    measured = snapshot.service_ms
    models = snapshot.models
    todo = changed if incremental else nodes
    load = dict.fromkeys(todo, 0.0)
    loaded: dict[str, set[str]] = {nid: set() for nid in todo}
    execs: list[str] = []
    for w in snapshot.workloads:
        ex = assignment.get((w.model, w.source), w.executor) if assignment else w.executor
        execs.append(ex)
        if ex in loaded:
            loaded[ex].add(w.model)
            if nodes[w.source].online:
                svc = measured.get((ex, w.model))
                load[ex] += w.rate * (svc if svc is not None else models[w.model].service_ms) / 1000.0
    util = dict(base.utilisation) if incremental else {}
    mem = dict(base.memory_bytes) if incremental else {}
    q = {}
    for nid in todo:
        util[nid] = load[nid] / nodes[nid].cores
        mem[nid] = sum(models[m].memory_bytes for m in loaded[nid])
        if loaded[nid]:
            q[nid] = queue_p95_factor(util[nid], nodes[nid].cores)
    p95: dict[Key, float] = dict(base.p95_ms) if incremental else {}
    offline_execs = set()
    for w, ex in zip(snapshot.workloads, execs):
        if not nodes[w.source].online:
            continue
        if not nodes[ex].online:
            offline_execs.add(ex)
        if incremental and ex not in todo:
            continue  # neither it nor its node changed
        key = (w.model, w.source)
        if not nodes[ex].online:
            p95[key] = math.inf
        else:
            svc = measured.get((ex, w.model))
            p95[key] = _rtt(snapshot, policy, tiers, w.source, ex) + (
                svc if svc is not None else models[w.model].service_ms
            ) * q[ex]
    slo = {(w.model, w.source): w.slo_ms for w in snapshot.workloads}
    violating = [k for k, p in p95.items() if p > slo[k]]
    online = [nid for nid, n in nodes.items() if n.online]
    return Evaluation(
        p95_ms=p95,
        utilisation=util,
        memory_bytes=mem,
        violating=tuple(sorted(violating)),
        peak_utilisation=max((util[n] for n in online), default=0.0),
        over_memory=tuple(sorted(n for n in nodes if mem[n] > nodes[n].memory_bytes)),
        over_target=tuple(sorted(n for n in online if util[n] > policy.utilisation_target + 1e-12)),
        offline_executors=tuple(sorted(offline_execs)),
    )


def objective(
    snapshot: Snapshot, assignment: Mapping[tuple[str, str], str], policy: Policy = Policy()
) -> Objective:
    """The planner's objective for ``assignment``: (violations, peak utilisation, moves),
    where moves counts workloads whose executor differs from the snapshot's."""
    ev = evaluate(snapshot, assignment, policy)
    moves = sum(1 for w in snapshot.workloads if assignment.get(w.key, w.executor) != w.executor)
    return Objective(ev.violations, ev.peak_utilisation, moves)


def apply_plan(snapshot: Snapshot, result: Plan) -> Snapshot:
    """The snapshot after ``result`` is carried out at ``snapshot.now``: executors updated,
    each moved workload's ``last_moved`` set to now. (For tests and the simulator.)"""
    moved = {(m.model, m.source) for m in result.moves}
    workloads = tuple(
        Workload(w.model, w.source, w.rate, w.slo_ms, result.assignment.get(w.key, w.executor))
        for w in snapshot.workloads
    )
    last = dict(snapshot.last_moved)
    for k in moved:
        last[k] = snapshot.now
    return Snapshot(
        nodes=snapshot.nodes,
        models=snapshot.models,
        workloads=workloads,
        service_ms=snapshot.service_ms,
        rtt_ms=snapshot.rtt_ms,
        last_moved=last,
        now=snapshot.now,
    )


# --------------------------------------------------------------------------- the heuristic


class _State:
    """Mutable planning state: loads, loaded models, per-node SLO margins, lazy heaps."""

    def __init__(self, snapshot: Snapshot, policy: Policy):
        self.s = snapshot
        self.p = policy
        self.nodes = {n.id: n for n in snapshot.nodes}
        self.tiers = {n.id: n.tier for n in snapshot.nodes}
        self.target = policy.utilisation_target
        self.min_gain = None if policy.min_gain_ms is None else max(policy.min_gain_ms, policy.move_cost_ms, 1e-6)
        self.svc_measured = snapshot.service_ms
        self.models = snapshot.models
        self.work = {w.key: w for w in snapshot.workloads}
        self.active = {w.key for w in snapshot.workloads if self.nodes[w.source].online}
        self.exec: dict[Key, str] = {w.key: w.executor for w in snapshot.workloads}
        self.moves_made = 0  # state changes, including a moved workload moving on
        self.load = dict.fromkeys(self.nodes, 0.0)  # busy servers (sum of rate * S)
        self.model_count: dict[str, dict[str, int]] = defaultdict(dict)  # node -> model -> workloads
        self.members: dict[str, set[Key]] = defaultdict(set)  # node -> active workloads it executes
        for w in snapshot.workloads:
            ex = w.executor
            mc = self.model_count[ex]
            mc[w.model] = mc.get(w.model, 0) + 1
            if w.key in self.active:
                self.load[ex] += w.rate * self.svc(ex, w.model) / 1000.0
                self.members[ex].add(w.key)
        self.mem = {
            nid: sum(self.models[m].memory_bytes for m in self.model_count.get(nid, ())) for nid in self.nodes
        }
        self._q: dict[str, float] = {}
        self._min_svc: dict[str, float] = {m: x.service_ms for m, x in self.models.items()}
        for (_, m), v in snapshot.service_ms.items():
            self._min_svc[m] = min(self._min_svc[m], v)
        self.min_rtt = min([*policy.default_rtt_ms.values(), *snapshot.rtt_ms.values()], default=0.0)
        self._margin: dict[str, float] = {}
        self._scan: dict[str, tuple[list, list]] = {}
        self.version = dict.fromkeys(self.nodes, 0)
        # lazy heaps of (utilisation, version, node)
        self.tier_heap: dict[str, list] = {t: [] for t in TIERS}
        self.model_heap: dict[str, list] = defaultdict(list)
        self.peak_heap: list = []  # (-utilisation, version, node), online nodes only
        for nid, n in self.nodes.items():
            if n.online:
                self._push(nid)

    # -- basic quantities
    def svc(self, node: str, model: str) -> float:
        v = self.svc_measured.get((node, model))
        return v if v is not None else self.models[model].service_ms

    def min_svc(self, model: str) -> float:
        return self._min_svc[model]

    def util(self, node: str) -> float:
        return self.load[node] / self.nodes[node].cores

    def q(self, node: str) -> float:
        v = self._q.get(node)
        if v is None:
            v = self._q[node] = queue_p95_factor(self.util(node), self.nodes[node].cores)
        return v

    def rtt(self, source: str, node: str) -> float:
        return _rtt(self.s, self.p, self.tiers, source, node)

    def p95(self, key: Key) -> float:
        ex = self.exec[key]
        if not self.nodes[ex].online:
            return math.inf
        w = self.work[key]
        return self.rtt(w.source, ex) + self.svc(ex, w.model) * self.q(ex)

    def violates(self, key: Key) -> bool:
        return self.p95(key) > self.work[key].slo_ms

    def margin(self, node: str) -> float:
        """Largest q95 factor the node may reach without pushing a workload it serves within
        its SLO over it (inf when none)."""
        v = self._margin.get(node)
        if v is None:
            v = self._margin[node] = self.margin_without(node, ())
        return v

    def margin_without(self, node: str, leaving: Collection[Key]) -> float:
        """``margin`` over the workloads on ``node`` that are not in ``leaving`` (uncached)."""
        v = math.inf
        cur = self.q(node)
        for k in self.members[node]:
            if k in leaving:
                continue
            w = self.work[k]
            s = self.svc(node, w.model)
            r = self.rtt(w.source, node)
            if r + s * cur <= w.slo_ms:  # only those meeting it now are protected
                v = min(v, (w.slo_ms - r) / s)
        return v

    # -- heaps
    def _push(self, node: str) -> None:
        u = self.util(node)
        ver = self.version[node]
        heapq.heappush(self.tier_heap[self.tiers[node]], (u, ver, node))
        heapq.heappush(self.peak_heap, (-u, ver, node))
        for m in self.model_count.get(node, ()):
            heapq.heappush(self.model_heap[m], (u, ver, node))

    def _least(self, heap: list, k: int, accept) -> list[str]:
        """Up to k current entries of a lazy min-heap passing ``accept``; heap left intact."""
        out, popped, scanned = [], [], 0
        while heap and len(out) < k and scanned < _MAX_HEAP_SCAN:
            entry = heapq.heappop(heap)
            u, ver, node = entry
            if ver != self.version[node]:
                continue  # stale: dropped for good
            popped.append(entry)
            scanned += 1
            if accept(node):
                out.append(node)
        for e in popped:
            heapq.heappush(heap, e)
        return out

    def peak(self) -> float:
        node = self.peak_node()
        return 0.0 if node is None else self.util(node)

    def peak_node(self) -> Optional[str]:
        """The online node with the highest utilisation (ties: the least id)."""
        h = self.peak_heap
        while h:
            u, ver, node = h[0]
            if ver == self.version[node]:
                return node
            heapq.heappop(h)
        return None

    def scan(self, node: str) -> tuple[list, list]:
        """The node's violating workloads as (-excess, -load, key) and the keys that pass
        the latency-gain filter; cached until the node changes."""
        v = self._scan.get(node)
        if v is None:
            viol, gain = [], []
            for key in self.members[node]:
                w = self.work[key]
                p = self.p95(key)
                if p > w.slo_ms:
                    viol.append((-(p - w.slo_ms), -w.rate * self.svc(node, w.model), key))
                if self.min_gain is not None and _may_gain(self, key, self.min_gain):
                    gain.append(key)
            v = self._scan[node] = (viol, gain)
        return v

    def _touch(self, node: str) -> None:
        self.version[node] += 1
        self._scan.pop(node, None)
        self._q.pop(node, None)
        self._margin.pop(node, None)
        if self.nodes[node].online:
            self._push(node)

    # -- moves
    def move(self, key: Key, to: str) -> None:
        w = self.work[key]
        frm = self.exec[key]
        mc = self.model_count[frm]
        mc[w.model] -= 1
        if mc[w.model] == 0:
            del mc[w.model]
            self.mem[frm] -= self.models[w.model].memory_bytes
        self.members[frm].discard(key)
        self.load[frm] = max(0.0, self.load[frm] - w.rate * self.svc(frm, w.model) / 1000.0)
        mt = self.model_count[to]
        if w.model not in mt:
            self.mem[to] += self.models[w.model].memory_bytes
        mt[w.model] = mt.get(w.model, 0) + 1
        self.members[to].add(key)
        self.load[to] += w.rate * self.svc(to, w.model) / 1000.0
        self.exec[key] = to
        self.moves_made += 1
        self._touch(frm)
        self._touch(to)

    def candidates(self, key: Key, wide: bool = False) -> list[str]:
        w = self.work[key]
        cur = self.exec[key]
        if wide and len(self.nodes) <= _ALL_CANDIDATES_UP_TO:
            return [n for n in self.nodes if n != cur and self.nodes[n].online]
        out: list[str] = []
        seen = {cur}

        def add(n: str) -> None:
            if n not in seen:
                seen.add(n)
                out.append(n)

        if self.nodes[w.source].online:
            add(w.source)
        mbytes = self.models[w.model].memory_bytes

        def fits(n: str) -> bool:
            return n not in seen and (
                w.model in self.model_count.get(n, ()) or self.mem[n] + mbytes <= self.nodes[n].memory_bytes
            )

        for n in self._least(self.model_heap.get(w.model, []), _CANDIDATES_PER_MODEL, lambda n: n not in seen):
            add(n)
        for tier in TIERS:
            for n in self._least(self.tier_heap[tier], _CANDIDATES_PER_TIER, fits):
                add(n)
        return out

    def util_with(self, key: Key, to: str, leaving: float = 0.0) -> Optional[float]:
        """``to``'s utilisation with the workload added (``leaving`` load taken off), or None
        when it is offline or lacks the memory."""
        w = self.work[key]
        n = self.nodes[to]
        if not n.online or (
            w.model not in self.model_count.get(to, ())
            and self.mem[to] + self.models[w.model].memory_bytes > n.memory_bytes
        ):
            return None
        return (self.load[to] - leaving + w.rate * self.svc(to, w.model) / 1000.0) / n.cores

    def try_at(
        self, key: Key, to: str, limit: float = math.inf, cap: Optional[float] = None, leaving: float = 0.0
    ) -> Optional[tuple[float, float]]:
        """(utilisation after, p95 after) if ``to`` may take the workload with a p95 of at
        most ``limit`` and its utilisation stays within ``cap`` (default: the target), else None."""
        u_after = self.util_with(key, to, leaving)
        if u_after is None or u_after > (self.target if cap is None else min(cap, self.target)) * (1 - _EPS):
            return None
        w = self.work[key]
        n = self.nodes[to]
        s = self.svc(to, w.model)
        r = self.rtt(w.source, to)
        if r + s * self.q(to) > limit:  # its p95 there is at least this, before it adds load
            return None
        qf = queue_p95_factor(u_after, n.cores)
        if qf > self.margin(to) * (1 - _EPS):
            return None
        return u_after, r + s * qf


def plan(snapshot: Snapshot, policy: Policy = Policy()) -> Plan:
    """The fast heuristic (module docstring). Deterministic for a given snapshot.

    Raises:
        ValueError: a malformed snapshot or policy (``check_snapshot``).
    """
    check_snapshot(snapshot)
    _check_policy(policy)
    # Planning allocates millions of small tuples (heap entries) and frees none of them in
    # cycles: the cyclic collector's passes over them are ~10% of a large plan, for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(snapshot, policy)
    finally:
        if collecting:
            gc.enable()


def _plan(snapshot: Snapshot, policy: Policy) -> Plan:
    before = _evaluate(snapshot, {}, policy)
    st = _State(snapshot, policy)
    moves: list[Move] = []
    frozen: set[Key] = set()  # moved in this plan: its Move is in ``moves``
    returned: set[Key] = set()  # moved and then back home: no Move, but moved for good
    budget = policy.max_moves if policy.max_moves is not None else math.inf
    # a latency-only move must beat min_gain and its own cost, and gain something (None: off)
    min_gain = st.min_gain

    def cooling(key: Key) -> bool:
        t = snapshot.last_moved.get(key)
        return t is not None and snapshot.now - t < policy.cooldown_s


    def movable(key: Key) -> bool:
        if key in frozen or key in returned or key not in st.active:
            return False
        if not st.nodes[st.exec[key]].online:
            return True  # an offline executor overrides the cooldown
        return not cooling(key)

    def best(key: Key, reason: str) -> bool:
        """Move ``key`` to its best admissible candidate for ``reason``; True if moved."""
        if len(moves) >= budget:
            return False
        w = st.work[key]
        frm = st.exec[key]
        p_before = st.p95(key)
        viol_before = p_before > w.slo_ms
        peak = st.peak()
        if reason == "offline_executor" or (reason == "over_utilisation" and viol_before):
            limit = math.inf
        elif reason == "latency_gain":
            limit = min(w.slo_ms, p_before - min_gain)
        else:
            limit = w.slo_ms
        choice = None
        for cand in st.candidates(key):
            r = st.try_at(key, cand, limit)
            if r is None:
                continue
            u_after, p_after = r
            viol_after = p_after > w.slo_ms * (1 - _EPS)
            if reason == "offline_executor":
                ok = True
            elif reason == "slo_violation":
                ok = viol_before and not viol_after
            elif reason == "over_utilisation":
                ok = viol_after <= viol_before
            else:  # latency_gain
                ok = (
                    not viol_after
                    and p_before - p_after >= min_gain
                    and u_after <= peak + 1e-12
                )
            if not ok:
                continue
            score = (viol_after, max(u_after, peak), p_after + policy.move_cost_ms, cand)
            if choice is None or score < choice[0]:
                choice = (score, cand, p_after)
        if choice is None:
            return False
        _, to, p_after = choice
        st.move(key, to)
        frozen.add(key)
        if not st.nodes[frm].online:
            reason = "offline_executor"  # whichever step found it a place
        moves.append(Move(w.model, w.source, frm, to, reason, p_before, p_after))
        return True

    peak_done = False
    while True:  # to a fixpoint. It ends: steps 1-3 and 5 move a workload at most once per plan
        # (one moved for the peak and back home stays put, see _record), and each peak move
        # lowers the sorted utilisations, of which a finite fleet has finitely many.
        n_before = st.moves_made
        # 1. offline executors
        for key in sorted(k for k in st.active if not st.nodes[st.exec[k]].online):
            if movable(key):
                best(key, "offline_executor")
        # 2. violations, worst first (excess, then load, descending)
        viol = sorted(v for n in st.nodes for v in st.scan(n)[0] if movable(v[2]))
        for _, _, key in viol:
            if movable(key) and st.violates(key):
                best(key, "slo_violation")
        # 3. nodes over the utilisation target, highest first
        over = sorted(
            (-st.util(n), n) for n in st.nodes if st.nodes[n].online and st.util(n) > st.target + 1e-12
        )
        for _, node in over:
            ks = sorted(
                (k for k in st.members[node] if movable(k)),
                key=lambda k: (-st.work[k].rate * st.svc(node, st.work[k].model), k),
            )
            for key in ks:
                if st.util(node) <= st.target + 1e-12:
                    break
                best(key, "over_utilisation")
        # 4. lower the peak: the lowest level every node can be brought to, then single moves
        if policy.peak_gain is not None and not peak_done:
            peak_done = True
            while _lower_peak(st, policy, movable, frozen, returned, moves, budget):
                pass  # again from where it got to: a greedy level search is not monotone
        if policy.peak_gain is not None:
            cap = 4 * len(st.work) + 16  # a backstop: each shave lowers the sorted loads
            while cap > 0 and _shave(st, policy, movable, frozen, returned, moves, budget):
                cap -= 1
        # 5. latency gains that do not raise the peak
        for key in sorted(k for n in st.nodes for k in st.scan(n)[1]):
            if min_gain is not None and movable(key) and _may_gain(st, key, min_gain):
                best(key, "latency_gain")
        if st.moves_made == n_before:
            break

    assignment = MappingProxyType(dict(st.exec))
    changed = {m.from_node for m in moves} | {m.to_node for m in moves}
    after = _evaluate(snapshot, assignment, policy, before, changed)
    return Plan(
        moves=tuple(moves),
        assignment=assignment,
        violations_before=before.violations,
        violations_after=after.violations,
        peak_utilisation_before=before.peak_utilisation,
        peak_utilisation_after=after.peak_utilisation,
        method="heuristic",
    )


def _may_gain(st: _State, key: Key, min_gain: float) -> bool:
    """Cheap filter for step 4: could any node cut this workload's p95 by ``min_gain``?
    The best conceivable p95 elsewhere is at least one bare service time (q95 >= ln 20)."""
    w = st.work[key]
    p = st.p95(key)
    if math.isinf(p):
        return True
    floor = -math.log(_QUANTILE_TAIL) * st.min_svc(w.model)
    if st.exec[key] == w.source:
        floor += st.min_rtt  # staying home is the only way to pay no round trip
    return p - floor >= min_gain



def _record(
    st: _State, moves: list, frozen: set, returned: set, key: Key, frm: str, to: str, reason: str, p_before: float,
    p_after: Optional[float] = None,
) -> None:
    """Add the move of ``key`` (already made) to ``moves``, or rewrite the Move of a workload
    this plan moved before (from its original executor). Back there drops its Move and puts
    it in ``returned``: the plan's other steps must not move it again, or a step that moves
    it out and a peak move that brings it back would cycle (seen: a plan that never ended).
    ``p_after``: the p95 predicted there (default: the state's, now)."""
    w = st.work[key]
    if p_after is None:
        p_after = st.p95(key)
    if key in frozen:
        i = next(i for i, m in enumerate(moves) if (m.model, m.source) == key)
        first = moves[i]
        if first.from_node == to:
            del moves[i]
            frozen.discard(key)
            returned.add(key)
        else:
            moves[i] = dataclasses.replace(first, to_node=to, p95_after_ms=p_after)
    elif frm != to:
        frozen.add(key)
        moves.append(Move(w.model, w.source, frm, to, reason, p_before, p_after))


def _repack(st: _State, level: float, may_move, p_first: dict[Key, float]) -> Optional[list[tuple[Key, str, str]]]:
    """Bring every online node to utilisation ``level`` or below: from each node above it, the
    fewest movable workloads (the smallest one that suffices, else the largest, repeated)
    are taken off, then placed largest first on the candidate left least utilised, none
    above ``level``, none gaining an SLO violation. Returns the moves made ((key, from,
    to), in order), or None with the state unchanged when some workload finds no place.
    ``p_first`` gets the p95 of each workload before its first move."""
    evicted: list[tuple[float, Key]] = []
    leaving: dict[str, float] = defaultdict(float)  # load still on a node but taken off it
    for nid, n in st.nodes.items():
        if not n.online or st.load[nid] <= level * n.cores * (1 + _EPS):
            continue
        excess = st.load[nid] - level * n.cores
        pool = sorted(
            (st.work[k].rate * st.svc(nid, st.work[k].model) / 1000.0, k) for k in st.members[nid] if may_move(k)
        )
        while excess > 1e-12:
            if not pool:
                return None
            i = next((i for i, (ld, _) in enumerate(pool) if ld >= excess), len(pool) - 1)
            ld, k = pool.pop(i)
            evicted.append((ld, k))
            leaving[nid] += ld
            excess -= ld
    evicted.sort(key=lambda e: (-e[0], e[1]))
    done: list[tuple[Key, str, str]] = []
    for _, key in evicted:
        w = st.work[key]
        frm = st.exec[key]
        if key not in p_first:
            p_first[key] = st.p95(key)
        limit = math.inf if st.violates(key) else w.slo_ms * (1 - _EPS)
        # the least utilised afterwards that keeps every SLO: the cheap part ranks, and the
        # queueing check runs only down the ranking until one passes
        ranked = []
        for cand in st.candidates(key, wide=True):
            u = st.util_with(key, cand, leaving.get(cand, 0.0))
            if u is not None and u <= level * (1 - _EPS):
                ranked.append((u, cand))
        ranked.sort()
        to = next(
            (c for _, c in ranked if st.try_at(key, c, limit, cap=level, leaving=leaving.get(c, 0.0)) is not None),
            None,
        )
        if to is None:
            for k, a, _ in reversed(done):
                st.move(k, a)
            return None
        st.move(key, to)
        leaving[frm] -= w.rate * st.svc(frm, w.model) / 1000.0
        done.append((key, frm, to))
    return done


def _repack_all(
    st: _State, level: float, may_move, p_first: dict[Key, float]
) -> Optional[list[tuple[Key, str, str]]]:
    """Like ``_repack``, but every movable workload is placed again (small fleets: it tries
    every node and moves more): on its executor if that still has room under ``level``, else
    by a rule (``_place``). Two orders — the most constrained first (fewest nodes where it
    keeps its SLO at ``level``), then largest first (LPT) — under each of ``_RULES``; the
    first that places every workload is carried out."""
    base_load: dict[str, float] = dict.fromkeys(st.nodes, 0.0)
    base_loaded: dict[str, set[str]] = {n: set() for n in st.nodes}
    todo: list[Key] = []
    for k, w in st.work.items():
        ex = st.exec[k]
        if k in st.active and may_move(k):
            todo.append(k)
            continue
        if k in st.active:
            base_load[ex] += w.rate * st.svc(ex, w.model) / 1000.0
        base_loaded[ex].add(w.model)
    online = [n for n, x in st.nodes.items() if x.online]
    cap = min(level, st.target) * (1 - _EPS)
    if any(base_load[n] > cap * st.nodes[n].cores for n in online):
        return None  # what may not move keeps some node above the level
    q_at = {n: queue_p95_factor(min(level, st.target), st.nodes[n].cores) for n in online}
    # where each may go at all (alone there: within the level and its SLO), and how many of
    # those keep its SLO with the node at the level (the order's measure of constraint)
    allowed: dict[Key, list[tuple[str, float, float]]] = {}  # (node, load, SLO bound in q95 units)
    tight: dict[Key, int] = {}
    for k in todo:
        w = st.work[k]
        viol = st.violates(k)
        opts = []
        roomy = 0
        for n in online:
            sv = st.svc(n, w.model)
            ld = w.rate * sv / 1000.0
            if ld / st.nodes[n].cores > cap:
                continue
            bound = math.inf if viol else (w.slo_ms - st.rtt(w.source, n)) / sv * (1 - _EPS)
            if bound < _Q_IDLE:
                continue
            opts.append((n, ld, bound))
            roomy += q_at[n] <= bound
        if not opts:
            return None
        allowed[k] = opts
        tight[k] = roomy
    orders = (
        sorted(todo, key=lambda k: (tight[k], -max(o[1] for o in allowed[k]), k)),
        sorted(todo, key=lambda k: (-max(o[1] for o in allowed[k]), k)),
    )
    placed = next(
        (got for rule in _RULES for order in orders
         if (got := _place(st, order, allowed, base_load, base_loaded, cap, rule)) is not None),
        None,
    )
    if placed is None:
        return None
    done = []
    for key, n in placed.items():
        if n != st.exec[key]:
            p_first.setdefault(key, st.p95(key))
            done.append((key, st.exec[key], n))
            st.move(key, n)
    return done


def _place(
    st: _State,
    order: list[Key],
    allowed: Mapping[Key, list[tuple[str, float, float]]],
    base_load: Mapping[str, float],
    base_loaded: Mapping[str, set[str]],
    cap: float,
    rule: str,
) -> Optional[dict[Key, str]]:
    """Place ``order`` one by one (executor for each, or None if one finds no place): its own
    executor when that has room, else the allowed node ``rule`` picks — "least_utilised"
    after it (spread), "most_utilised" (pack), "cheapest" (least share of the node's cores,
    i.e. where it runs fastest relative to the node's size). Every node stays within ``cap``
    and memory; the workload placed and those already on the node stay within their SLOs
    (checked at each placement: a node's utilisation only grows)."""
    load = dict(base_load)
    loaded = {n: set(m) for n, m in base_loaded.items()}
    mem = {n: sum(st.models[m].memory_bytes for m in ms) for n, ms in loaded.items()}
    moving = set(order)
    # the tightest SLO bound (q95 units) of what stays on each node
    bound = {n: st.margin_without(n, moving) for n in st.nodes}
    placed: dict[Key, str] = {}
    for key in order:
        w = st.work[key]
        mbytes = st.models[w.model].memory_bytes
        best = None
        for n, ld, b in allowed[key]:
            node = st.nodes[n]
            if w.model not in loaded[n] and mem[n] + mbytes > node.memory_bytes:
                continue
            u = (load[n] + ld) / node.cores
            if u > cap:
                continue
            if rule == "least_utilised":
                sc: tuple = (n != st.exec[key], u, n)
            elif rule == "most_utilised":
                sc = (n != st.exec[key], -u, n)
            else:
                sc = (n != st.exec[key], ld / node.cores, u, n)
            if best is not None and sc >= best[0]:
                continue
            if queue_p95_factor(u, node.cores) > min(b, bound[n]):
                continue
            best = (sc, n, ld, b)
        if best is None:
            return None
        _, n, ld, b = best
        load[n] += ld
        bound[n] = min(bound[n], b)
        if w.model not in loaded[n]:
            loaded[n].add(w.model)
            mem[n] += mbytes
        placed[key] = n
    return placed


def _lower_peak(st: _State, policy: Policy, movable, frozen: set, returned: set, moves: list, budget: float) -> bool:
    """Step 4: the lowest utilisation level every online node can be brought to, found by
    bisection (to ``_LEVEL_TOL_*`` of the peak) from ``peak - peak_gain`` down, each level
    tried by ``_repack`` (and in a small fleet ``_repack_all``, then ``_polish``). Nothing
    moves unless the peak drops by at least ``peak_gain`` within the move budget. The Moves
    read from each workload's executor before this step to its executor after it."""
    peak = st.peak()
    if peak <= 0:
        return False

    def may_move(k: Key) -> bool:
        return k in frozen or movable(k)

    p_before: dict[Key, float] = {}
    small = len(st.nodes) <= _ALL_CANDIDATES_UP_TO
    tol = (_LEVEL_TOL_SMALL if small else _LEVEL_TOL_LARGE) * peak

    def attempt(level: float) -> Optional[list[tuple[Key, str, str]]]:
        made = _repack(st, level, may_move, p_before)
        if made is None and small:
            made = _repack_all(st, level, may_move, p_before)
        if made is not None and len(moves) + len({k for k, _, _ in best + made if k not in frozen}) > budget:
            for k, a, _ in reversed(made):
                st.move(k, a)
            return None
        return made

    # The first level is the least worth moving for. In a large fleet each level reached is
    # kept and the next, lower one starts from it (a workload may move on: cheaper than
    # starting over); a small one starts every level from the same state and keeps the lowest.
    best: list[tuple[Key, str, str]] = []
    hi = peak - policy.peak_gain
    if hi <= 0 or (made := attempt(hi)) is None:
        return False
    best += made
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if small:
            for k, a, _ in reversed(best):
                st.move(k, a)
        made = attempt(mid)
        if made is None:
            lo = mid
            if small:
                for k, _, to in best:  # back to the lowest level found, as found
                    st.move(k, to)
        else:
            hi = mid
            best = made if small else best + made
    if small:
        extra = _polish(
            st, may_move, lambda n: len(moves) + len({k for k, _, _ in best if k not in frozen} | n) <= budget, p_before
        )
        best = best + extra
    first: dict[Key, str] = {}
    for key, frm, _ in best:
        first.setdefault(key, frm)
    for key, frm in first.items():
        _record(st, moves, frozen, returned, key, frm, st.exec[key], "peak_utilisation", p_before[key])
    return st.peak() < peak - policy.peak_gain / 2  # it got lower: worth another search


def _fits(st: _State, nodes: tuple[str, ...], protect: set) -> bool:
    """Every node in ``nodes`` within memory and the utilisation target, and every workload on
    them in ``protect`` (those meeting their SLO before) within its SLO."""
    for n in nodes:
        node = st.nodes[n]
        if st.mem[n] > node.memory_bytes or st.util(n) > st.target * (1 - _EPS):
            return False
        for k in st.members[n]:
            if k in protect and st.p95(k) > st.work[k].slo_ms * (1 - _EPS):
                return False
    return True


def _polish(st: _State, may_move, within_budget, p_first: dict[Key, float]) -> list[tuple[Key, str, str]]:
    """Local search on the busiest node (small fleets): the single move, else the swap of two
    workloads, that lowers the higher utilisation of the nodes involved furthest below the
    peak (by at least 0.1% of it), without a new SLO violation; until none does."""
    done: list[tuple[Key, str, str]] = []
    protect = {k for k in st.active if not st.violates(k)}
    online = [n for n, x in st.nodes.items() if x.online]
    for _ in range(4 * len(st.work)):
        node = st.peak_node()
        if node is None:
            break
        u_peak = st.util(node)
        bar = u_peak * (1 - 1e-3)
        choice = None
        for a in sorted(k for k in st.members[node] if may_move(k)):
            for m in online:
                if m == node:
                    continue
                if within_budget({a}):
                    st.move(a, m)
                    if _fits(st, (node, m), protect):
                        sc = max(st.util(node), st.util(m))
                        if sc < bar and (choice is None or sc < choice[0]):
                            choice = (sc, ((a, node, m),))
                    st.move(a, node)
                for b in sorted(k for k in st.members[m] if may_move(k)):
                    if not within_budget({a, b}):
                        continue
                    st.move(a, m)
                    st.move(b, node)
                    if _fits(st, (node, m), protect):
                        sc = max(st.util(node), st.util(m))
                        if sc < bar and (choice is None or sc < choice[0]):
                            choice = (sc, ((a, node, m), (b, m, node)))
                    st.move(b, m)
                    st.move(a, node)
        if choice is None:
            break
        for k, frm, to in choice[1]:
            p_first.setdefault(k, st.p95(k))
            st.move(k, to)
            done.append((k, frm, to))
    return done


def _shave(st: _State, policy: Policy, movable, frozen: set, returned: set, moves: list, budget: float) -> bool:
    """One peak move: the workload of the busiest node and the candidate that bring the
    pair's higher utilisation lowest, if that is at least ``peak_gain`` below the peak and no
    workload gains a violation. A workload this plan already moved may move on (its Move is
    rewritten from its original executor; one back home drops it). True if one moved."""
    node = st.peak_node()
    if node is None:
        return False
    u_peak = st.util(node)
    ceiling = u_peak - policy.peak_gain
    cores = st.nodes[node].cores
    can_add = len(moves) < budget
    choice = None
    for key in st.members[node]:
        if not (key in frozen or (can_add and movable(key))):
            continue
        w = st.work[key]
        u_from = u_peak - w.rate * st.svc(node, w.model) / 1000.0 / cores
        if u_from > ceiling or (choice is not None and u_from > choice[0][0]):
            continue
        p_before = st.p95(key)
        viol_before = p_before > w.slo_ms
        limit = math.inf if viol_before else w.slo_ms * (1 - _EPS)
        for cand in st.candidates(key):
            r = st.try_at(key, cand, limit)
            if r is None:
                continue
            u_after, p_after = r
            if not viol_before and p_after > limit:
                continue
            worst = max(u_from, u_after)
            if worst > ceiling:
                continue
            score = (worst, p_after + policy.move_cost_ms, key, cand)
            if choice is None or score < choice[0]:
                choice = (score, p_before, p_after)
    if choice is None:
        return False
    (_, _, key, to), p_before, p_after = choice
    st.move(key, to)
    _record(st, moves, frozen, returned, key, node, to, "peak_utilisation", p_before, p_after)
    return True
