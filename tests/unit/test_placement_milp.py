"""The exact placement MILP (controller/placement_milp.py): hand instances with a known optimum,
the exact linearisation of queueing, the hard constraints, and the MILP never worse than the
heuristic on random small instances — every assignment judged by placement.evaluate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import placement as P
from controller import placement_milp as M

MB = 1 << 20
REL = 1e-5  # HiGHS's feasibility tolerance on the peak, times the peak's weight


def node(nid: str, tier: str = "edge", cores: int = 1, memory_mb: int = 1024, online: bool = True) -> P.Node:
    return P.Node(nid, tier, cores, memory_mb * MB, online=online)


def snap(nodes: list[P.Node], models: list[P.Model], workloads: list[P.Workload], **kw) -> P.Snapshot:
    return P.Snapshot(nodes=tuple(nodes), models={m.name: m for m in models}, workloads=tuple(workloads), **kw)


def rate_for(util: float, service_ms: float, cores: int = 1) -> float:
    """Requests/s that put ``util`` of a ``cores`` node's capacity on it."""
    return util * cores * 1000.0 / service_ms


def check_constraints(s: P.Snapshot, plan: P.Plan, policy: P.Policy) -> None:
    keys = {w.key for w in s.workloads}
    assert set(plan.assignment) == keys  # exactly one executor each
    ev = P.evaluate(s, plan.assignment, policy)
    assert ev.feasible, (ev.over_memory, ev.over_target, ev.offline_executors)
    nodes = {n.id: n for n in s.nodes}
    for nid, used in ev.memory_bytes.items():
        assert used <= nodes[nid].memory_bytes
    for nid, rho in ev.utilisation.items():
        assert rho <= policy.utilisation_target + 1e-9
    for w in s.workloads:
        to = plan.assignment[w.key]
        if not nodes[w.source].online:
            assert to == w.executor  # dormant: never moved
        else:
            assert nodes[to].online
    assert plan.violations_after == ev.violations
    assert plan.peak_utilisation_after == ev.peak_utilisation
    moved = {(m.model, m.source) for m in plan.moves}
    assert moved == {w.key for w in s.workloads if plan.assignment[w.key] != w.executor}
    for m in plan.moves:
        assert m.reason in M.MILP_REASONS


# -- hand instances with a known optimum --------------------------------------------------------

VISION = P.Model("vision", 300 * MB, 20.0)
KWS = P.Model("kws", 100 * MB, 10.0)


def test_overloaded_device_moves_to_the_cloud():
    s = snap([node("dev"), node("cloud", "cloud", cores=8, memory_mb=8192)], [VISION],
             [P.Workload("vision", "dev", rate_for(0.9, 20.0), 1000.0, "dev")])  # p95 at home ~600 ms
    plan = M.solve(s)
    assert plan.method == "milp"
    assert dict(plan.assignment) == {("vision", "dev"): "cloud"}
    assert [(m.from_node, m.to_node, m.reason) for m in plan.moves] == [("dev", "cloud", "over_utilisation")]
    assert plan.violations_after == 0
    assert plan.peak_utilisation_after == pytest.approx(0.9 / 8)


def test_tight_slo_keeps_the_workload_home_over_a_lower_peak():
    # the cloud would cut the peak from 0.5 to 0.125, but its 40 ms round trip breaks the SLO:
    # violations come first
    nodes = [node("dev", cores=2), node("cloud", "cloud", cores=8, memory_mb=8192)]
    rate = rate_for(0.5, 20.0, 2)
    p95_home = P.predict_p95_ms(rate, 20.0, 2, 0.0)
    p95_cloud = P.predict_p95_ms(rate, 20.0, 8, 40.0)
    assert p95_home + 5 < p95_cloud
    s = snap(nodes, [VISION], [P.Workload("vision", "dev", rate, p95_home + 5, "dev")])
    plan = M.solve(s)
    assert plan.moves == ()
    assert plan.violations_after == 0
    loose = snap(nodes, [VISION], [P.Workload("vision", "dev", rate, p95_cloud + 5, "dev")])
    plan = M.solve(loose)  # with room for the round trip, the lower peak wins
    assert [m.to_node for m in plan.moves] == ["cloud"]
    assert plan.peak_utilisation_after == pytest.approx(0.125)


def test_peak_is_lowered_with_the_fewest_moves():
    # dev-a carries two equal workloads (0.6 together); dev-b is idle: one move gives peak 0.3
    s = snap([node("dev-a", memory_mb=2048), node("dev-b", memory_mb=2048)], [VISION, KWS], [
        P.Workload("vision", "dev-a", rate_for(0.3, 20.0), 1000.0, "dev-a"),
        P.Workload("kws", "dev-a", rate_for(0.3, 10.0), 1000.0, "dev-a"),
        P.Workload("kws", "dev-b", 0.0, 1000.0, "dev-b"),
    ])
    plan = M.solve(s, P.Policy(min_gain_ms=1000.0))
    assert len(plan.moves) == 1
    assert plan.moves[0].reason == "peak_utilisation"  # not a latency gain under this policy
    assert plan.peak_utilisation_after == pytest.approx(0.3)
    assert M.score(s, plan.assignment).moves == 1


def test_memory_splits_models_that_do_not_fit_together():
    big_a, big_b = P.Model("a", 600 * MB, 10.0), P.Model("b", 600 * MB, 10.0)
    s = snap([node("dev-a", memory_mb=700), node("dev-b", memory_mb=700), node("cloud", "cloud", 8, 1000)],
             [big_a, big_b], [
                 P.Workload("a", "dev-a", rate_for(0.9, 10.0), 1000.0, "dev-a"),
                 P.Workload("b", "dev-b", rate_for(0.9, 10.0), 1000.0, "dev-b"),
             ])
    # both devices are over the target, the cloud holds one of the two models: no feasible plan
    with pytest.raises(M.PlacementInfeasible):
        M.solve(s)
    roomy = snap([*s.nodes[:2], node("cloud", "cloud", 8, 1000), node("cloud-2", "cloud", 8, 1000)], [big_a, big_b],
                 list(s.workloads))
    plan = M.solve(roomy)
    check_constraints(roomy, plan, P.Policy())
    assert {plan.assignment[("a", "dev-a")], plan.assignment[("b", "dev-b")]} == {"cloud", "cloud-2"}


def test_an_unavoidable_violation_is_not_moved_around():
    # an SLO below one bare service time violates everywhere, and the cloud is busier than the
    # device: no move buys anything
    s = snap([node("dev", cores=2), node("cloud", "cloud", cores=8, memory_mb=8192)], [VISION, KWS], [
        P.Workload("vision", "dev", rate_for(0.2, 20.0, 2), 20.0, "dev"),
        P.Workload("kws", "cloud", rate_for(0.5, 10.0, 8), 1000.0, "cloud"),
    ])
    plan = M.solve(s)
    assert plan.moves == ()
    assert plan.violations_after == 1
    assert plan.peak_utilisation_after == pytest.approx(0.5)


def test_an_offline_executor_forces_a_move_and_dormant_workloads_stay():
    s = snap([node("dev"), node("peer", memory_mb=2048), node("gone", "cloud", 8, 8192, online=False),
              node("away", online=False)], [VISION, KWS], [
        P.Workload("vision", "dev", rate_for(0.2, 20.0), 1000.0, "gone"),
        P.Workload("kws", "away", rate_for(0.5, 10.0), 1000.0, "gone"),  # source offline: dormant
    ])
    plan = M.solve(s)
    check_constraints(s, plan, P.Policy())
    assert plan.assignment[("kws", "away")] == "gone"
    assert [m.reason for m in plan.moves] == ["offline_executor"]


def test_cooldown_and_max_moves_bind_as_in_the_heuristic():
    nodes = [node("dev-a"), node("dev-b"), node("cloud", "cloud", cores=8, memory_mb=8192)]
    work = [P.Workload("vision", "dev-a", rate_for(0.9, 20.0), 1000.0, "dev-a"),
            P.Workload("vision", "dev-b", rate_for(0.9, 20.0), 1000.0, "dev-b")]
    cooling = snap(nodes, [VISION], work, last_moved={("vision", "dev-a"): 900.0}, now=1000.0)
    with pytest.raises(M.PlacementInfeasible):  # dev-a may not move yet and is over the target
        M.solve(cooling, P.Policy(cooldown_s=600))
    s = snap(nodes, [VISION], work)
    with pytest.raises(M.PlacementInfeasible):  # both must move, one move allowed
        M.solve(s, P.Policy(max_moves=1))
    plan = M.solve(s, P.Policy(max_moves=2))
    assert len(plan.moves) == 2
    hot = snap(nodes, [VISION], [work[0], P.Workload("vision", "dev-b", rate_for(0.5, 20.0), 1000.0, "dev-b")])
    plan = M.solve(hot, P.Policy(max_moves=1))  # the budget goes to the node over the target
    assert [(m.source, m.reason) for m in plan.moves] == [("dev-a", "over_utilisation")]


def test_larger_instances_are_refused_with_the_reason():
    many = snap([node(f"dev-{k}") for k in range(13)], [VISION], [])
    with pytest.raises(ValueError, match=r"at most 12 nodes x 6 models.*13 nodes x 1 models"):
        M.solve(many)
    models = [P.Model(f"m{k}", MB, 1.0) for k in range(7)]
    with pytest.raises(ValueError, match="small instances only"):
        M.solve(snap([node("dev")], models, []))


def test_bad_input_is_refused_by_the_planners_checks():
    s = snap([node("dev")], [VISION], [P.Workload("vision", "nowhere", 1.0, 100.0, "dev")])
    with pytest.raises(ValueError, match="unknown node"):
        M.solve(s)
    with pytest.raises(ValueError, match="utilisation_target"):
        M.solve(snap([node("dev")], [VISION], []), P.Policy(utilisation_target=1.5))


# -- the linearisation is exact ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(bound=st.floats(2.0, 60.0), servers=st.integers(1, 32), limit=st.floats(0.05, 1.0, exclude_max=True))
def test_violation_threshold_is_the_boundary_of_q95(bound, servers, limit):
    theta = M.violation_threshold(bound, servers, limit)
    if theta is None:
        assert P.queue_p95_factor(limit, servers) <= bound
    elif theta < 0:
        assert P.queue_p95_factor(0.0, servers) > bound
    else:
        assert 0 <= theta <= limit
        assert P.queue_p95_factor(theta, servers) <= bound
        assert P.queue_p95_factor(min(theta + 1e-9, limit), servers) > bound or theta + 1e-9 >= limit


@pytest.mark.parametrize("seed", range(30))
def test_milp_objective_is_evaluates_and_never_worse_than_the_heuristic(seed):
    s = M.random_instance(seed)
    policy = P.Policy()
    try:
        sol = M.optimise(s, policy)
    except M.PlacementInfeasible:
        heuristic = M.score(s, P.plan(s, policy).assignment, policy)
        assert not heuristic.feasible  # nothing feasible exists, so the heuristic cannot have found one
        return
    assert sol.optimal
    check_constraints(s, sol.plan, policy)
    milp = M.score(s, sol.plan.assignment, policy)
    # the MILP's own objective is evaluate's: the queueing linearisation is exact
    assert sol.value == pytest.approx(milp.value, rel=REL)
    heuristic = M.score(s, P.plan(s, policy).assignment, policy)
    assert milp.value <= heuristic.value * (1 + REL) or math.isinf(heuristic.value)
    assert M.gap(heuristic, milp) >= -REL
    assert milp.violations <= heuristic.violations


def test_gap_and_score():
    s = snap([node("dev"), node("cloud", "cloud", cores=8, memory_mb=8192)], [VISION],
             [P.Workload("vision", "dev", rate_for(0.9, 20.0), 500.0, "dev")])
    stay = M.score(s, {})
    assert not stay.feasible and math.isinf(stay.value)
    moved = M.score(s, {("vision", "dev"): "cloud"})
    assert moved.feasible and moved.moves == 1 and moved.violations == 0
    wt = M.weights(s)
    assert moved.value == pytest.approx(moved.peak_utilisation * wt.peak + wt.move)
    assert M.gap(moved, moved) == 0.0
    assert M.gap(stay, moved) == math.inf
    with pytest.raises(ValueError):
        M.gap(moved, stay)
