"""``fleetctl simulate``: the planner over a seeded synthetic fleet, static vs rebalancing."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import pytest

from controller import simulate as sim
from controller.cli import main

# Small fleets keep the module fast: 24 nodes (one cloud node), 70 workloads, an hour.
N, M, STEPS = 24, 70, 60
# Moves of one workload in the hour: out, maybe once more, and back after one disturbance;
# a whole day with a peak in every region (diurnal) may take it out and back twice.
MAX_MOVES_PER_WORKLOAD = {"hotspot": 3, "failure": 3, "diurnal": 4}


@lru_cache(maxsize=None)
def _run(scenario: str, seed: int = 3) -> str:
    return json.dumps(sim.simulate(N, M, scenario, steps=STEPS, seed=seed))


def run(scenario: str, seed: int = 3) -> dict[str, Any]:
    return json.loads(_run(scenario, seed))


def test_fleet_is_deterministic_and_shaped() -> None:
    a, b = sim.synthetic_fleet(N, M, seed=5), sim.synthetic_fleet(N, M, seed=5)
    assert a == b
    assert a != sim.synthetic_fleet(N, M, seed=6)
    assert len(a.nodes) == N and len(a.workloads) == M
    assert len(a.cloud_ids) == 1 and len(a.edge_ids) == N - 1
    cloud = next(n for n in a.nodes if n.tier == "cloud")
    assert all(cloud.cores > n.cores and cloud.memory_bytes > n.memory_bytes for n in a.nodes if n.tier == "edge")
    pairs = [(w.model, w.source) for w in a.workloads]
    assert len(set(pairs)) == M and all(w.source in a.edge_ids for w in a.workloads)
    assert all(a.rtt_ms[(w.source, w.source)] == 0.0 for w in a.workloads)
    for w in a.workloads:  # every workload starts on a node its model fits
        model = a.models[w.model]
        assert model.memory_bytes <= next(n for n in a.nodes if n.id == w.executor).memory_bytes


@pytest.mark.parametrize("scenario", sim.SCENARIOS)
def test_run_is_deterministic(scenario: str) -> None:
    one = sim.simulate(N, M, scenario, steps=12, seed=9)
    two = sim.simulate(N, M, scenario, steps=12, seed=9)
    for key in ("params", "events", "series", "summary", "moves", "initial_moves", "initial_plans"):
        assert one[key] == two[key]
    assert set(one["series"]) == {"static", "rebalance"} and len(one["series"]["static"]) == 12


@pytest.mark.parametrize("scenario", ["hotspot", "failure"])
def test_rebalancing_beats_static(scenario: str) -> None:
    s = run(scenario)["summary"]
    assert s["rebalance"]["violation_steps"] < s["static"]["violation_steps"]
    assert s["static"]["moves_total"] == 0 and s["rebalance"]["moves_total"] > 0


def test_failure_static_fails_and_rebalance_moves_off() -> None:
    r = run("failure")
    start, end = STEPS // 3, 2 * STEPS // 3
    static, rebalance = r["series"]["static"], r["series"]["rebalance"]
    assert all(row["failed"] > 0 for row in static[start:end])
    assert all(row["failed"] == 0 for row in static[:start] + static[end:])
    assert all(row["failed"] == 0 for row in rebalance)


@pytest.mark.parametrize("scenario", sim.SCENARIOS)
def test_no_flapping_under_default_policy(scenario: str) -> None:
    r = run(scenario)
    s = r["summary"]["rebalance"]
    assert 0 < s["moves_per_workload_max"] <= MAX_MOVES_PER_WORKLOAD[scenario]
    # The cooldown holds: one workload's moves are at least cooldown_s apart (an offline
    # executor may override it; the failure scenario's node is back only after T/3 steps).
    cooldown_steps = sim.Policy().cooldown_s / sim.STEP_S
    last: dict[tuple[str, str], int] = {}
    for m in r["moves"]:
        key = (m["model"], m["source"])
        if key in last and m["reason"] != "offline_executor":
            assert m["step"] - last[key] >= cooldown_steps, m
        last[key] = m["step"]
    assert len(r["moves"]) == s["moves_total"] and len(last) == s["workloads_moved"]


def test_hotspot_returns_to_calm() -> None:
    rebalance = run("hotspot")["series"]["rebalance"]
    assert sum(r["moves"] for r in rebalance[-3:]) == 0  # settled: no moves at the end


def test_rebalance_every_k_moves_only_on_planning_steps() -> None:
    r = sim.simulate(N, M, "hotspot", steps=12, seed=3, rebalance_every=4)
    assert all(row["moves"] == 0 for row in r["series"]["rebalance"] if row["step"] % 4)


def test_sample_steps_keeps_ends_and_events() -> None:
    picked = sim.sample_steps(60, 10, [20, 40])
    assert picked[0] == 0 and picked[-1] == 59 and {19, 20, 21, 39, 40, 41} <= set(picked)
    assert sim.sample_steps(5, 10) == [0, 1, 2, 3, 4]


def test_cli_json_has_both_arms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--nodes", "12", "--workloads", "30", "--scenario", "failure", "--steps", "9",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=_no_constants)  # strict JSON: no Infinity/NaN
    assert set(doc["series"]) == set(doc["summary"]) == {"static", "rebalance"}
    assert len(doc["series"]["rebalance"]) == 9
    assert {"violations", "failed", "peak_utilisation", "moves"} <= set(doc["series"]["static"][0])
    assert doc["params"]["scenario"] == "failure" and doc["events"]
    assert all(m["p95_before_ms"] is None for m in doc["moves"] if m["reason"] == "offline_executor")


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in the JSON output")


@pytest.mark.parametrize("scenario", sim.SCENARIOS)
def test_cli_tables(scenario: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--nodes", "12", "--workloads", "30", "--scenario", scenario, "--steps", "9",
                 "--rows", "4"]) == 0
    out = capsys.readouterr().out
    assert "over time" in out and "summary" in out and "static" in out and "rebalance" in out


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--workloads", "5", "--scenario", "hotspot"], "--nodes"),
    (["--nodes", "5", "--workloads", "5", "--scenario", "meteor"], "--scenario"),
    (["--nodes", "5", "--workloads", "0", "--scenario", "hotspot"], "--workloads"),
    (["--nodes", "5", "--workloads", "5", "--scenario", "hotspot", "--steps", "0"], "--steps"),
    (["--nodes", "2", "--workloads", "50", "--scenario", "hotspot"], "does not fit"),
    (["--workloads", "5", "--scenario", "hotspot"], "--nodes"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_library_refuses_bad_arguments() -> None:
    with pytest.raises(sim.SimulateError):
        sim.synthetic_fleet(0, 1)
    with pytest.raises(sim.SimulateError):
        sim.simulate(5, 5, "meteor")
    with pytest.raises(sim.SimulateError):
        sim.simulate(2, 50, "hotspot")
