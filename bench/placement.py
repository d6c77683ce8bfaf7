"""The placement planner: how fast the heuristic plans a large fleet, and how close it comes to
the exact MILP on small ones.

    python bench/placement.py [--json] [--quick]

1. plan_time: ``placement.plan`` on a synthetic fleet of 10,000 nodes x 100 models
   (``--quick``: 1,000 x 100) — 99% edge devices, 1% cloud nodes; each device calls 1-4
   models picked by a Zipf law at skewed rates (lognormal load, median 0.3 of the device,
   about one device in ten over the 0.7 target), 5% of workloads already on a cloud node,
   measured service times for every (device, its model) and (cloud, model) pair and round trips
   from every device to three cloud nodes. Seeded. The median of 3 runs is the figure (the
   snapshot is built once, outside the timing). The target is this first plan, which starts
   far from balanced; ``replan_s_median`` is the next one, after the plan is carried out
   (``placement.apply_plan``), as ``fleetctl serve --rebalance-every`` would run it.
2. heuristic_vs_milp: 200 random small instances (``placement_milp.random_instance``,
   <= 12 nodes x 6 models; ``--quick``: 20), seeds 0, 1, ... skipping those where no feasible
   assignment exists. Both plans are judged by ``placement_milp.score`` (placement.evaluate;
   violations, then peak utilisation, then moves, folded by the MILP's weights) and
   ``gap = (heuristic - MILP) / MILP``; an infeasible heuristic plan has an infinite gap.
3. migration_under_load: a placeholder until remote inference and migration land (issue 6).

The last line of stdout is one JSON object (DESIGN.md's report shape); the targets are the
issue's: plan time <= 2 s at 10,000 x 100, within 5% of the optimum on >= 95% of instances.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from controller import placement as P  # noqa: E402
from controller import placement_milp as M  # noqa: E402
from edge_runtime.benchmark import report, target  # noqa: E402

MB = 1 << 20


def log(msg: str) -> None:
    print(f"[placement] {msg}", file=sys.stderr, flush=True)


def synthetic_fleet(n_nodes: int, n_models: int, seed: int = 6) -> P.Snapshot:
    """The large fleet of section 1 (module docstring)."""
    rng = np.random.default_rng(seed)
    n_cloud = max(1, n_nodes // 100)
    n_edge = n_nodes - n_cloud
    ref_ms = rng.uniform(2.0, 50.0, n_models).round(3)
    mem = rng.integers(20, 500, n_models) * MB
    models = {f"model-{k:03d}": P.Model(f"model-{k:03d}", int(mem[k]), float(ref_ms[k])) for k in range(n_models)}
    names = list(models)
    zipf = 1.0 / np.arange(1, n_models + 1)
    zipf /= zipf.sum()
    clouds = [f"cloud-{k:03d}" for k in range(n_cloud)]
    service: dict[tuple[str, str], float] = {}
    for c in clouds:
        for k, name in enumerate(names):
            service[(c, name)] = round(float(ref_ms[k] * rng.uniform(0.3, 0.8)), 3)
    rtt: dict[tuple[str, str], float] = {}
    workloads = []
    edges = []
    edge_cores = rng.choice([2, 4, 4, 6], n_edge)
    edge_mem = rng.integers(1, 9, n_edge) * 1024 * MB
    share = rng.lognormal(math.log(0.3), 0.7, n_edge)
    counts = rng.integers(1, 5, n_edge)
    for d in range(n_edge):
        dev = f"dev-{d:05d}"
        cores = int(edge_cores[d])
        chosen = rng.choice(n_models, size=int(counts[d]), replace=False, p=zipf)
        need = 0
        for k in chosen:
            name = names[k]
            s = round(float(ref_ms[k] * rng.uniform(1.0, 2.5)), 3)
            service[(dev, name)] = s
            rate = float(share[d]) / len(chosen) * cores * 1000.0 / s
            slo = round(s * float(rng.uniform(4.0, 10.0)) + float(rng.uniform(20.0, 80.0)), 3)
            executor = dev if rng.random() >= 0.05 else clouds[int(rng.integers(n_cloud))]
            if executor == dev:
                need += int(mem[k])
            workloads.append(P.Workload(name, dev, round(rate, 4), slo, executor))
        for c in rng.choice(n_cloud, size=min(3, n_cloud), replace=False):
            rtt[(dev, clouds[int(c)])] = round(float(rng.uniform(15.0, 80.0)), 3)
        edges.append(P.Node(dev, "edge", cores, max(int(edge_mem[d]), need)))
    cloud_nodes = [P.Node(c, "cloud", int(rng.choice([32, 64])), int(rng.integers(64, 129)) * 1024 * MB)
                   for c in clouds]
    return P.Snapshot(nodes=tuple(edges + cloud_nodes), models=models, workloads=tuple(workloads),
                      service_ms=service, rtt_ms=rtt, now=1_000_000.0)


def bench_plan_time(n_nodes: int, n_models: int, runs: int = 3) -> dict[str, Any]:
    t0 = time.perf_counter()
    snap = synthetic_fleet(n_nodes, n_models)
    build_s = time.perf_counter() - t0
    policy = P.Policy()
    times = []
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = P.plan(snap, policy)
        times.append(time.perf_counter() - t0)
    assert result is not None
    reasons: dict[str, int] = {}
    for m in result.moves:
        reasons[m.reason] = reasons.get(m.reason, 0) + 1
    after = P.evaluate(snap, result.assignment, policy)
    steady = P.apply_plan(snap, result)  # the next rebalance: the plan carried out, nothing new
    replan = []
    for _ in range(runs):
        t0 = time.perf_counter()
        second = P.plan(steady, policy)
        replan.append(time.perf_counter() - t0)
    out = {
        "nodes": len(snap.nodes),
        "cloud_nodes": sum(1 for n in snap.nodes if n.tier == "cloud"),
        "models": len(snap.models),
        "workloads": len(snap.workloads),
        "service_ms_entries": len(snap.service_ms),
        "rtt_ms_entries": len(snap.rtt_ms),
        "snapshot_build_s": round(build_s, 3),
        "plan_s_median": round(statistics.median(times), 4),
        "plan_s_runs": [round(t, 4) for t in times],
        "moves": len(result.moves),
        "moves_by_reason": reasons,
        "violations_before": result.violations_before,
        "violations_after": result.violations_after,
        "peak_utilisation_before": round(result.peak_utilisation_before, 4),
        "peak_utilisation_after": round(result.peak_utilisation_after, 4),
        "nodes_over_target_after": len(after.over_target),
        "feasible_after": after.feasible,
        "replan_s_median": round(statistics.median(replan), 4),
        "replan_moves": len(second.moves),
    }
    log(f"plan {out['nodes']:,} nodes x {out['models']} models, {out['workloads']:,} workloads: "
        f"median {out['plan_s_median']:.3f} s over {runs} runs, {out['moves']} moves, violations "
        f"{out['violations_before']} -> {out['violations_after']}, peak {out['peak_utilisation_before']} -> "
        f"{out['peak_utilisation_after']}")
    return out


def bench_gap(instances: int, time_limit_s: float = 10.0) -> dict[str, Any]:
    policy = P.Policy()
    gaps: list[float] = []
    skipped = 0
    not_optimal = 0
    more_violations = 0
    same_violations = 0  # feasible with as few violations as the optimum: any gap is peak and moves
    heuristic_infeasible = 0
    milp_s: list[float] = []
    heur_s: list[float] = []
    peak_ratio: list[float] = []
    sizes: list[tuple[int, int, int]] = []
    seed = 0
    while len(gaps) < instances:
        snap = M.random_instance(seed)
        seed += 1
        try:
            sol = M.optimise(snap, policy, time_limit_s=time_limit_s)
        except M.PlacementInfeasible:
            skipped += 1
            continue
        t0 = time.perf_counter()
        heur = P.plan(snap, policy)
        heur_s.append(time.perf_counter() - t0)
        milp_s.append(sol.seconds)
        not_optimal += not sol.optimal
        sm = M.score(snap, sol.plan.assignment, policy)
        sh = M.score(snap, heur.assignment, policy)
        g = M.gap(sh, sm)
        gaps.append(g)
        sizes.append((len(snap.nodes), len(snap.models), len(snap.workloads)))
        heuristic_infeasible += not sh.feasible
        more_violations += sh.feasible and sh.violations > sm.violations
        same_violations += sh.feasible and sh.violations == sm.violations
        if sh.feasible and sh.violations == sm.violations and sm.peak_utilisation > 0:
            peak_ratio.append(sh.peak_utilisation / sm.peak_utilisation)
    finite = [g for g in gaps if math.isfinite(g)]
    within = sum(1 for g in gaps if g <= 0.05) / len(gaps)
    worst = max(gaps)
    out = {
        "instances": len(gaps),
        "seeds_tried": seed,
        "skipped_infeasible": skipped,
        "max_nodes": max(s[0] for s in sizes),
        "max_models": max(s[1] for s in sizes),
        "max_workloads": max(s[2] for s in sizes),
        "milp_not_proven_optimal": not_optimal,
        "gap_median": round(statistics.median(gaps), 4) if math.isfinite(statistics.median(gaps)) else "inf",
        "gap_worst": round(worst, 4) if math.isfinite(worst) else "inf",
        "gap_worst_finite": round(max(finite), 4) if finite else None,
        "within_5pct_share": round(within, 4),
        "heuristic_infeasible": heuristic_infeasible,  # over memory / target or on an offline node where the MILP is not
        "heuristic_more_violations": more_violations,
        "heuristic_same_violations_share": round(same_violations / len(gaps), 4),
        "peak_ratio_median_same_violations": round(statistics.median(peak_ratio), 4) if peak_ratio else None,
        "milp_s_median": round(statistics.median(milp_s), 4),
        "milp_s_max": round(max(milp_s), 4),
        "heuristic_s_median": round(statistics.median(heur_s), 5),
    }
    log(f"heuristic vs MILP on {out['instances']} instances: gap median {out['gap_median']}, worst {out['gap_worst']}, "
        f"within 5%: {within:.1%}; heuristic infeasible {heuristic_infeasible}, more violations {more_violations}; "
        f"MILP median {out['milp_s_median']} s, max {out['milp_s_max']} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    ap.add_argument("--quick", action="store_true", help="1,000 nodes and 20 small instances (a smoke run)")
    args = ap.parse_args()
    n_nodes, n_models, instances = (1000, 100, 20) if args.quick else (10_000, 100, 200)
    metrics: dict[str, Any] = {"quick": args.quick}
    metrics["plan_time"] = bench_plan_time(n_nodes, n_models)
    metrics["heuristic_vs_milp"] = bench_gap(instances)
    metrics["migration_under_load"] = {"skipped": "needs remote inference + migration (issue 6, not landed yet)"}
    targets = {
        f"plan_s_{n_nodes}x{n_models}": target(metrics["plan_time"]["plan_s_median"], 2.0, "<="),
        "within_5pct_of_optimum_share": target(metrics["heuristic_vs_milp"]["within_5pct_share"], 0.95, ">="),
    }
    out = report("placement", metrics, targets)
    for key, t in targets.items():
        log(f"target {key}: {t['value']} {t['op']} {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
