"""The rollout state machine (controller/rollout.py): plans, waves, decide() and request(),
on records built by hand — no store, no clock, no broker."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.rollout import (
    ACTIVE_STATES, ROLLOUT_STATES, STEP_STATES, Decision, DeviceFacts, Gates, Plan, assign_waves, decide, request,
)
from controller.store import ModelWindow, RolloutRecord, StepRecord

T0 = 1_700_000_000.0
NEW, OLD = "2.0", "1.0"


# -- helpers ---------------------------------------------------------------------------------


def make_rollout(waves: dict[str, int], *, plan: Optional[Plan] = None, state: str = "pending", wave: int = 0,
                 previous: Optional[dict[str, Optional[str]]] = None, steps: Optional[dict[str, dict[str, Any]]] = None,
                 **fields: Any) -> RolloutRecord:
    """A rollout of model "m" to version NEW over ``waves`` {device: wave}; every step pending
    unless ``steps`` gives its columns."""
    previous = previous or {}
    steps = steps or {}
    records = tuple(
        StepRecord(rollout_id=1, device_id=d, wave=w, previous_version=previous.get(d, OLD),
                   **{"state": "pending", **steps.get(d, {})})
        for d, w in sorted(waves.items(), key=lambda item: (item[1], item[0]))
    )
    base: dict[str, Any] = dict(
        id=1, model="m", version=NEW, target="all", plan=(plan or Plan()).to_dict(), state=state, wave=wave,
        wave_started_at=None, soak_until=None, reason=None, figures=None, created_at=T0, updated_at=T0,
        finished_at=None, created_by="op", revision=0, steps=records,
    )
    base.update(fields)
    return RolloutRecord(**base)


def planned(devices: list[str], plan: Plan, **kw: Any) -> RolloutRecord:
    return make_rollout(dict(assign_waves(devices, plan)), plan=plan, **kw)


def apply(record: RolloutRecord, decision: Decision) -> RolloutRecord:
    """What the driver does with a decision, on the record only (assignments are the fleet's)."""
    changes = decision.steps
    for device_id in changes:
        assert device_id in {s.device_id for s in record.steps}, device_id
    steps = tuple(dataclasses.replace(s, **changes.get(s.device_id, {})) for s in record.steps)
    for s in steps:
        assert s.state in STEP_STATES, s
    updated = dataclasses.replace(record, **decision.fields, steps=steps, revision=record.revision + 1)
    assert updated.state in ROLLOUT_STATES
    return updated


def step(record: RolloutRecord, device_id: str) -> StepRecord:
    return next(s for s in record.steps if s.device_id == device_id)


def states(record: RolloutRecord) -> dict[str, str]:
    return {s.device_id: s.state for s in record.steps}


def fact(device_id: str, active: Optional[str] = OLD, *, online: bool = True,
         failure: Optional[tuple[str, Optional[str]]] = None) -> DeviceFacts:
    return DeviceFacts(device_id=device_id, online=online, active_version=active, failure=failure)


def facts_of(*items: DeviceFacts) -> dict[str, DeviceFacts]:
    return {f.device_id: f for f in items}


def run(record: RolloutRecord, facts: dict[str, DeviceFacts], now: float,
        gates: Gates = Gates()) -> tuple[RolloutRecord, Decision]:
    """decide, apply, and check that deciding again on the same inputs is a no-op."""
    decision = decide(record, facts, gates, now)
    after = apply(record, decision)
    again = decide(after, facts, gates, now)
    assert again.empty, again
    assert not again.notes, again.notes
    return after, decision


class Fleet:
    """Simulated devices that follow their desired state: ``ok`` ones activate what they
    are given, ``fail`` ones refuse the new version (and report why), ``silent`` ones never
    answer. Offline devices do nothing."""

    def __init__(self, behaviour: dict[str, str], online: dict[str, bool], previous: dict[str, Optional[str]]):
        self.behaviour = behaviour
        self.online = dict(online)
        self.active = dict(previous)
        self.desired: dict[str, Optional[str]] = {}
        self.failure: dict[str, tuple[str, Optional[str]]] = {}

    def facts(self) -> dict[str, DeviceFacts]:
        return {d: DeviceFacts(device_id=d, online=self.online[d], active_version=self.active[d],
                               failure=self.failure.get(d)) for d in self.behaviour}

    def take(self, assign: dict[str, Optional[str]]) -> None:
        self.desired.update(assign)

    def act(self) -> None:
        for d, how in self.behaviour.items():
            if not self.online[d] or d not in self.desired or how == "silent":
                continue
            want = self.desired[d]
            if how == "fail" and want == NEW:
                self.failure[d] = ("health_check_failed", "max abs diff 3.2")
            else:
                self.active[d] = want


def cumulative(shares: list[float]) -> list[float]:
    return sorted(shares) + [100.0]


# -- Plan ------------------------------------------------------------------------------------


def test_plan_defaults_round_trip() -> None:
    assert Plan.from_dict({}) == Plan()
    assert Plan.from_dict(Plan().to_dict()) == Plan()
    plan = Plan.from_dict({"canary_pct": 10, "waves": [25, 50, 100], "soak_s": 0, "min_calls": 5})
    assert plan.waves == (25.0, 50.0, 100.0) and plan.canary_pct == 10.0
    assert Plan.from_dict(plan.to_dict()) == plan


@given(
    canary=st.none() | st.floats(min_value=0.01, max_value=99.99),
    waves=st.lists(st.floats(min_value=0.5, max_value=99.5), max_size=5, unique=True).map(cumulative),
    soak=st.floats(min_value=0, max_value=1e6),
    timeout=st.floats(min_value=0.001, max_value=1e6),
    min_calls=st.integers(min_value=1, max_value=10_000),
    errors=st.none() | st.floats(min_value=0, max_value=100),
    latency=st.none() | st.floats(min_value=0, max_value=1e4),
)
def test_plan_round_trips_through_json_shape(canary, waves, soak, timeout, min_calls, errors, latency) -> None:
    plan = Plan(canary_pct=canary, waves=tuple(waves), soak_s=soak, step_timeout_s=timeout, min_calls=min_calls,
                max_error_rate_pct=errors, max_latency_regression_pct=latency)
    data = plan.to_dict()
    assert isinstance(data["waves"], list)
    assert Plan.from_dict(data) == plan


@pytest.mark.parametrize("data, field", [
    pytest.param({"waves": []}, "plan.waves", id="no-waves"),
    pytest.param({"waves": [50, 25, 100]}, "plan.waves", id="decreasing"),
    pytest.param({"waves": [50, 50, 100]}, "plan.waves", id="repeated"),
    pytest.param({"waves": [25, 50]}, "plan.waves", id="last-not-100"),
    pytest.param({"waves": [0, 100]}, "plan.waves[0]", id="zero-wave"),
    pytest.param({"waves": [50, 120]}, "plan.waves[1]", id="over-100"),
    pytest.param({"waves": "100"}, "plan.waves", id="waves-a-string"),
    pytest.param({"waves": [True]}, "plan.waves[0]", id="waves-bool"),
    pytest.param({"canary_pct": 0}, "plan.canary_pct", id="canary-zero"),
    pytest.param({"canary_pct": 100}, "plan.canary_pct", id="canary-all"),
    pytest.param({"canary_pct": "10%"}, "plan.canary_pct", id="canary-text"),
    pytest.param({"soak_s": -1}, "plan.soak_s", id="negative-soak"),
    pytest.param({"soak_s": float("nan")}, "plan.soak_s", id="nan-soak"),
    pytest.param({"step_timeout_s": 0}, "plan.step_timeout_s", id="zero-timeout"),
    pytest.param({"max_failures_pct": 101}, "plan.max_failures_pct", id="failures-over-100"),
    pytest.param({"max_failures_pct": None}, "plan.max_failures_pct", id="failures-null"),
    pytest.param({"max_error_rate_pct": -1}, "plan.max_error_rate_pct", id="negative-error-rate"),
    pytest.param({"max_latency_regression_pct": -5}, "plan.max_latency_regression_pct", id="negative-latency"),
    pytest.param({"min_calls": 0}, "plan.min_calls", id="zero-min-calls"),
    pytest.param({"min_calls": 2.5}, "plan.min_calls", id="fractional-min-calls"),
    pytest.param({"canary": 10}, "unknown field", id="unknown-field"),
])
def test_plan_from_dict_refuses(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        Plan.from_dict(data)
    assert field in str(info.value)


def test_plan_from_dict_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match="expected an object"):
        Plan.from_dict([100])  # type: ignore[arg-type]


# -- assign_waves ------------------------------------------------------------------------------


def sizes(assigned: list[tuple[str, int]]) -> list[int]:
    out: list[int] = []
    for _, wave in assigned:
        if wave == len(out):
            out.append(0)
        out[wave] += 1
    return out


@pytest.mark.parametrize("n, canary, waves, expected", [
    pytest.param(10, None, (100,), [10], id="one-wave"),
    pytest.param(10, 10, (100,), [1, 9], id="canary-then-all"),
    pytest.param(20, 10, (25, 50, 100), [2, 3, 5, 10], id="canary-and-cumulative-waves"),
    pytest.param(3, 1, (100,), [1, 2], id="canary-at-least-one"),
    pytest.param(1, 10, (25, 50, 100), [1], id="one-device-is-the-canary"),
    pytest.param(4, 30, (25, 50, 100), [2, 2], id="wave-inside-canary-dropped"),
    pytest.param(3, None, (10, 20, 100), [1, 2], id="equal-cuts-dropped"),
    pytest.param(100, None, (29, 57, 100), [29, 28, 43], id="exact-percentages"),
    pytest.param(0, 10, (100,), [], id="no-devices"),
])
def test_assign_waves_table(n: int, canary: Optional[float], waves: tuple[float, ...], expected: list[int]) -> None:
    devices = [f"dev-{i:03d}" for i in reversed(range(n))]
    assigned = assign_waves(devices, Plan(canary_pct=canary, waves=waves))
    assert sizes(assigned) == expected
    assert [d for d, _ in assigned] == sorted(devices)


@given(
    devices=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), max_size=60),
    canary=st.none() | st.floats(min_value=0.1, max_value=99.9),
    waves=st.lists(st.floats(min_value=0.1, max_value=99.9), max_size=4, unique=True).map(cumulative),
)
def test_assign_waves_properties(devices: list[str], canary: Optional[float], waves: list[float]) -> None:
    plan = Plan(canary_pct=canary, waves=tuple(waves))
    assigned = assign_waves(devices, plan)
    assert [d for d, _ in assigned] == sorted(set(devices))  # every device once, stable order
    indexes = [w for _, w in assigned]
    assert indexes == sorted(indexes)
    assert sorted(set(indexes)) == list(range(len(set(indexes))))  # 0..k-1, none empty
    assert assign_waves(list(reversed(devices)), plan) == assigned
    n = len(set(devices))
    if n and canary is not None:
        assert 1 <= sizes(assigned)[0] <= max(1, math.ceil(n * canary / 100))


# -- decide: the paths ----------------------------------------------------------------------------


def test_canary_then_all_succeeds_through_the_soaks() -> None:
    plan = Plan(canary_pct=10, waves=(100,), soak_s=60)
    devices = [f"dev-{i}" for i in range(10)]
    r = planned(devices, plan)
    old = facts_of(*(fact(d) for d in devices))

    r, d = run(r, old, T0)
    assert r.state == "running" and r.wave == 0 and r.wave_started_at == T0 and r.soak_until is None
    assert d.assign == {"dev-0": NEW}
    assert step(r, "dev-0").state == "updating" and step(r, "dev-0").deadline == T0 + plan.step_timeout_s
    assert set(states(r).values()) == {"updating", "pending"}
    assert "wave 0 started: 1 device" in d.notes

    canary_done = {**old, "dev-0": fact("dev-0", NEW)}
    r, d = run(r, canary_done, T0 + 5)
    assert step(r, "dev-0").state == "done" and step(r, "dev-0").finished_at == T0 + 5
    assert r.soak_until == T0 + 65 and r.wave == 0
    assert any("soaking 60s" in n for n in d.notes)
    assert r.figures["failures_pct"] == 0 and r.figures["done"] == 1

    r, d = run(r, canary_done, T0 + 64)  # still soaking
    assert d.empty and r.wave == 0

    r, d = run(r, canary_done, T0 + 65)
    assert r.wave == 1 and r.wave_started_at == T0 + 65 and r.soak_until is None
    assert d.assign == {f"dev-{i}": NEW for i in range(1, 10)}
    assert "wave 1 started: 9 devices" in d.notes

    all_done = facts_of(*(fact(dv, NEW) for dv in devices))
    r, d = run(r, all_done, T0 + 100)
    assert r.state == "running" and r.soak_until == T0 + 160
    r, d = run(r, all_done, T0 + 160)
    assert r.state == "succeeded" and r.finished_at == T0 + 160
    assert set(states(r).values()) == {"done"}
    assert any(n.startswith("succeeded") for n in d.notes)
    r, d = run(r, all_done, T0 + 1000)
    assert d.empty


def test_soak_zero_and_devices_already_updated_finish_in_one_decision() -> None:
    plan = Plan(canary_pct=10, waves=(50, 100), soak_s=0)
    devices = [f"dev-{i}" for i in range(6)]
    r, d = run(planned(devices, plan), facts_of(*(fact(dv, NEW) for dv in devices)), T0)
    assert r.state == "succeeded"
    assert d.assign == {dv: NEW for dv in devices}
    assert set(states(r).values()) == {"done"}


def test_no_steps_succeeds_at_once() -> None:
    r, d = run(make_rollout({}), {}, T0)
    assert r.state == "succeeded" and r.finished_at == T0


def test_failure_at_canary_aborts_and_reverts_only_started_devices() -> None:
    plan = Plan(canary_pct=10, waves=(100,))
    devices = [f"dev-{i}" for i in range(10)]
    r = planned(devices, plan, previous={"dev-0": None})
    old = facts_of(*(fact(dv) for dv in devices), fact("dev-0", None))
    r, _ = run(r, old, T0)

    failing = {**old, "dev-0": fact("dev-0", None, failure=("health_check_failed", "max abs diff 3.2"))}
    r, d = run(r, failing, T0 + 10)
    assert r.state == "aborted" and r.finished_at == T0 + 10
    assert "failures 1/1 = 100% > 5%" in r.reason and "dev-0 health_check_failed" in r.reason
    assert d.assign == {"dev-0": None}  # it had no version: the model is removed
    assert states(r)["dev-0"] == "reverted"  # and it reports none active: nothing left to wait for
    assert step(r, "dev-0").reason == "health_check_failed" and step(r, "dev-0").detail == "max abs diff 3.2"
    assert all(states(r)[dv] == "pending" for dv in devices[1:])
    assert r.figures["failed"] == 1 and r.figures["started"] == 1
    assert any(n.startswith("aborted: failures") for n in d.notes)

    r, d = run(r, old, T0 + 20)  # the other devices never hear of it
    assert d.empty


def test_abort_tracks_reverts_until_each_device_runs_its_previous_version() -> None:
    waves = {"a": 0, "b": 0, "c": 0, "d": 1}
    r = make_rollout(waves, state="running", wave=0, wave_started_at=T0, previous={"c": None}, steps={
        "a": {"state": "done", "started_at": T0}, "b": {"state": "updating", "started_at": T0, "deadline": T0 + 300},
        "c": {"state": "waiting", "started_at": T0},
    })
    d = request(r, "abort", now=T0 + 1, reason="bad numbers")
    r = apply(r, d)
    assert r.state == "aborted" and r.reason == "bad numbers"
    assert d.assign == {"a": OLD, "b": OLD, "c": None}
    assert states(r) == {"a": "reverting", "b": "reverting", "c": "reverting", "d": "pending"}

    mid = facts_of(fact("a", NEW), fact("b", OLD), fact("c", NEW, online=False), fact("d", OLD))
    r, d = run(r, mid, T0 + 2)
    assert states(r) == {"a": "reverting", "b": "reverted", "c": "reverting", "d": "pending"}
    assert not d.assign
    r, d = run(r, facts_of(fact("a", OLD), fact("b", OLD), fact("c", None), fact("d", OLD)), T0 + 3)
    assert states(r) == {"a": "reverted", "b": "reverted", "c": "reverted", "d": "pending"}
    assert not d.assign and d.fields == {}


def test_online_device_past_its_deadline_is_failed() -> None:
    plan = Plan(waves=(100,), step_timeout_s=30, max_failures_pct=50)
    r = planned(["a", "b", "c"], plan)
    facts = facts_of(fact("a"), fact("b"), fact("c"))
    r, _ = run(r, facts, T0)
    r, _ = run(r, {**facts, "a": fact("a", NEW), "b": fact("b", NEW)}, T0 + 10)
    assert states(r) == {"a": "done", "b": "done", "c": "updating"}
    r, d = run(r, {**facts, "a": fact("a", NEW), "b": fact("b", NEW)}, T0 + 30)  # at the deadline: not yet
    assert states(r)["c"] == "updating"
    r, d = run(r, {**facts, "a": fact("a", NEW), "b": fact("b", NEW)}, T0 + 30.5)
    c = step(r, "c")
    assert c.state == "failed" and c.reason == "step_timeout" and c.finished_at == T0 + 30.5
    assert "30s" in c.detail
    assert r.state == "running" and r.soak_until == T0 + 30.5 + plan.soak_s  # 1/3 = 33% <= 50%


def test_timeout_counts_against_the_failure_gate() -> None:
    plan = Plan(waves=(100,), step_timeout_s=30)
    r = planned(["a"], plan)
    r, _ = run(r, facts_of(fact("a")), T0)
    r, d = run(r, facts_of(fact("a")), T0 + 31)
    assert r.state == "aborted" and "a step_timeout" in r.reason
    assert d.assign == {"a": OLD}


def test_offline_device_waits_does_not_block_waves_and_converges_later() -> None:
    plan = Plan(waves=(50, 100), soak_s=10, step_timeout_s=30)
    r = planned(["a", "b", "c", "d"], plan)
    assert {s.device_id: s.wave for s in r.steps} == {"a": 0, "b": 0, "c": 1, "d": 1}
    facts = facts_of(fact("a"), fact("b", online=False), fact("c"), fact("d"))
    r, d = run(r, facts, T0)
    assert d.assign == {"a": NEW, "b": NEW}  # desired is set for the offline device too (retained)
    assert states(r)["b"] == "waiting" and step(r, "b").deadline is None
    assert "wave 0 started: 2 devices (1 offline, waiting)" in d.notes

    facts["a"] = fact("a", NEW)
    r, _ = run(r, facts, T0 + 1000)  # long past any deadline: b is still only waiting
    assert states(r)["b"] == "waiting" and r.soak_until == T0 + 1010
    r, _ = run(r, facts, T0 + 1010)
    assert r.wave == 1
    facts["c"], facts["d"] = fact("c", NEW), fact("d", NEW)
    r, _ = run(r, facts, T0 + 1020)
    r, d = run(r, facts, T0 + 1030)
    assert r.state == "succeeded" and states(r)["b"] == "waiting"
    assert "1 offline" in d.notes[-1]

    facts["b"] = fact("b", OLD, online=True)  # back: its clock starts now
    r, d = run(r, facts, T0 + 2000)
    assert states(r)["b"] == "updating" and step(r, "b").deadline == T0 + 2030
    assert step(r, "b").started_at == T0  # failures are counted since the first assignment
    assert not d.assign and "b back online: updating" in d.notes
    facts["b"] = fact("b", NEW)
    r, d = run(r, facts, T0 + 2005)
    assert states(r)["b"] == "done" and r.state == "succeeded"


def test_device_offline_while_updating_goes_back_to_waiting_past_its_deadline() -> None:
    plan = Plan(waves=(100,), step_timeout_s=30)
    r = planned(["a", "b"], plan)
    r, _ = run(r, facts_of(fact("a"), fact("b")), T0)
    gone = facts_of(fact("a", NEW), fact("b", online=False))
    r, _ = run(r, gone, T0 + 10)
    assert states(r) == {"a": "done", "b": "updating"}  # offline but within its deadline
    r, d = run(r, gone, T0 + 31)
    assert states(r) == {"a": "done", "b": "waiting"} and step(r, "b").deadline is None
    assert r.state == "running" and r.soak_until == T0 + 31 + plan.soak_s


def test_waiting_device_that_reports_a_failure_is_failed() -> None:
    r = make_rollout({"a": 0}, plan=Plan(max_failures_pct=100), state="running", wave_started_at=T0,
                     steps={"a": {"state": "waiting", "started_at": T0}})
    r, _ = run(r, facts_of(fact("a", online=False, failure=("refused", "no space"))), T0 + 1)
    assert step(r, "a").state == "failed" and step(r, "a").reason == "refused"


@pytest.mark.parametrize("active, failure, expected", [
    pytest.param(NEW, ("health_check_failed", None), "done", id="still-active-stays-done"),
    pytest.param(OLD, ("rolled_back", "watchdog"), "failed", id="rolled-back-after-activation"),
    pytest.param(OLD, None, "done", id="other-version-without-a-reason-stays-done"),
])
def test_done_step_fails_only_when_the_device_left_the_version(active, failure, expected) -> None:
    r = make_rollout({"a": 0, "b": 1}, plan=Plan(max_failures_pct=100), state="running", wave_started_at=T0,
                     steps={"a": {"state": "done", "started_at": T0, "finished_at": T0 + 1}})
    r, _ = run(r, facts_of(fact("a", active, failure=failure), fact("b")), T0 + 5)
    assert step(r, "a").state == expected


def test_missing_facts_count_as_offline() -> None:
    r = planned(["a"], Plan(step_timeout_s=5, soak_s=60))
    r, d = run(r, {}, T0)
    assert states(r) == {"a": "waiting"} and d.assign == {"a": NEW}
    r, d = run(r, {}, T0 + 100)
    assert states(r) == {"a": "waiting"} and r.state == "succeeded"


# -- gates -------------------------------------------------------------------------------------


def window(calls: int, errors: int = 0, p95: Optional[float] = None) -> ModelWindow:
    return ModelWindow(calls=calls, errors=errors, p95_ms=p95, samples=1 if calls else 0)


@pytest.mark.parametrize("plan, gates, crossed", [
    pytest.param(Plan(), Gates(new=window(19, 19)), None, id="errors-below-min-calls"),
    pytest.param(Plan(), Gates(new=window(20, 1)), "error rate 5% > 1% (1/20 calls of 2.0)", id="errors-crossed"),
    pytest.param(Plan(), Gates(new=window(100, 1)), None, id="errors-at-the-limit"),
    pytest.param(Plan(max_error_rate_pct=None), Gates(new=window(100, 100)), None, id="error-gate-off"),
    pytest.param(Plan(min_calls=1), Gates(new=window(1, 1)), "error rate 100%", id="min-calls-1"),
    pytest.param(Plan(), Gates(new=window(50, 0, 30.0), baseline=window(50, 0, 20.0)),
                 "p95 latency +50% > 20% (30 ms vs 20 ms before)", id="latency-crossed"),
    pytest.param(Plan(), Gates(new=window(50, 0, 24.0), baseline=window(50, 0, 20.0)), None, id="latency-at-the-limit"),
    pytest.param(Plan(), Gates(new=window(50, 0, 30.0), baseline=window(19, 0, 20.0)), None,
                 id="latency-baseline-below-min-calls"),
    pytest.param(Plan(), Gates(new=window(19, 0, 30.0), baseline=window(50, 0, 20.0)), None,
                 id="latency-new-below-min-calls"),
    pytest.param(Plan(), Gates(new=window(50, 0, 30.0), baseline=window(50, 0, None)), None, id="no-baseline-p95"),
    pytest.param(Plan(), Gates(new=window(50, 0, None), baseline=window(50, 0, 20.0)), None, id="no-new-p95"),
    pytest.param(Plan(max_latency_regression_pct=None), Gates(new=window(50, 0, 90.0), baseline=window(50, 0, 20.0)),
                 None, id="latency-gate-off"),
])
def test_telemetry_gates(plan: Plan, gates: Gates, crossed: Optional[str]) -> None:
    r = planned(["a", "b", "c"], plan)
    facts = facts_of(fact("a", NEW), fact("b"), fact("c"))
    r, _ = run(r, facts, T0)
    assert r.state == "running"
    r, d = run(r, facts, T0 + 10, gates)
    if crossed is None:
        assert r.state == "running"
    else:
        assert r.state == "aborted" and r.reason.startswith(crossed)
        assert d.assign == {"a": OLD, "b": OLD, "c": OLD}
    figures = r.figures
    assert figures["calls"] == gates.new.calls and figures["baseline_p95_ms"] == gates.baseline.p95_ms


def test_gates_are_checked_while_soaking() -> None:
    r = planned(["a"], Plan(waves=(100,), soak_s=60))
    r, _ = run(r, facts_of(fact("a", NEW)), T0)
    assert r.state == "running" and r.soak_until == T0 + 60
    r, _ = run(r, facts_of(fact("a", NEW)), T0 + 30, Gates(new=window(100, 50)))
    assert r.state == "aborted" and r.reason.startswith("error rate 50%")


def test_figures_change_only_with_the_figures() -> None:
    r = planned(["a", "b"], Plan())
    facts = facts_of(fact("a"), fact("b"))
    r, _ = run(r, facts, T0, Gates(new=window(5, 0, 10.0)))
    assert r.figures == {
        "started": 2, "failed": 0, "done": 0, "waiting": 0, "updating": 2, "failures_pct": 0.0,
        "calls": 5, "errors": 0, "error_rate_pct": 0.0, "p95_ms": 10.0, "baseline_calls": 0,
        "baseline_p95_ms": None, "latency_regression_pct": None,
    }
    d = decide(r, facts, Gates(new=window(5, 0, 10.0)), T0 + 1)
    assert d.empty
    d = decide(r, facts, Gates(new=window(8, 1, 10.0)), T0 + 1)
    assert set(d.fields) == {"figures"} and d.fields["figures"]["error_rate_pct"] == 12.5


# -- request: pause, resume, abort ---------------------------------------------------------------


@pytest.mark.parametrize("state", ROLLOUT_STATES)
@pytest.mark.parametrize("action", ["pause", "resume", "abort"])
def test_request_rules(state: str, action: str) -> None:
    allowed = {"pause": {"pending", "running"}, "resume": {"paused"}, "abort": set(ACTIVE_STATES)}[action]
    r = make_rollout({"a": 0}, state=state)
    if state in allowed:
        d = request(r, action, now=T0)
        expected = {"pause": "paused", "resume": "running", "abort": "aborted"}[action]
        assert d.fields["state"] == expected and d.notes
    else:
        with pytest.raises(ValueError, match=f"cannot {action} rollout 1: it is {state}"):
            request(r, action, now=T0)


def test_request_unknown_action() -> None:
    with pytest.raises(ValueError, match="expected pause, resume or abort"):
        request(make_rollout({"a": 0}), "restart", now=T0)


def test_operator_abort_default_reason_and_pending_steps_stay() -> None:
    r = apply(make_rollout({"a": 0, "b": 1}), request(make_rollout({"a": 0, "b": 1}), "abort", now=T0))
    assert r.state == "aborted" and r.reason == "aborted by operator" and r.finished_at == T0
    assert states(r) == {"a": "pending", "b": "pending"}
    r, d = run(r, facts_of(fact("a"), fact("b")), T0 + 1)
    assert d.empty


def test_pause_holds_the_next_wave_but_tracks_steps_and_gates() -> None:
    plan = Plan(waves=(50, 100), soak_s=0, step_timeout_s=30, max_failures_pct=25)
    r = planned(["a", "b", "c", "d"], plan)
    facts = facts_of(fact("a"), fact("b"), fact("c"), fact("d"))
    r, _ = run(r, facts, T0)
    r = apply(r, request(r, "pause", now=T0 + 1, reason="looking"))
    assert r.state == "paused"

    facts["a"], facts["b"] = fact("a", NEW), fact("b", NEW)
    r, d = run(r, facts, T0 + 2)
    assert states(r) == {"a": "done", "b": "done", "c": "pending", "d": "pending"}
    assert r.wave == 0 and r.soak_until is None and not d.assign  # wave 1 waits for resume

    r = apply(r, request(r, "resume", now=T0 + 3))
    r, d = run(r, facts, T0 + 4)
    assert r.wave == 1 and d.assign == {"c": NEW, "d": NEW}

    r = apply(r, request(r, "pause", now=T0 + 5))
    r, d = run(r, facts, T0 + 40)  # both time out while paused: the gate still aborts
    assert r.state == "aborted" and r.reason.startswith("failures 2/4 = 50% > 25% (c step_timeout, d step_timeout)")
    assert d.assign == {"a": OLD, "b": OLD, "c": OLD, "d": OLD}


def test_paused_from_pending_starts_on_resume() -> None:
    r = planned(["a"], Plan())
    r = apply(r, request(r, "pause", now=T0))
    r, d = run(r, facts_of(fact("a")), T0 + 1)
    assert not d.assign and not d.steps and r.state == "paused"
    r = apply(r, request(r, "resume", now=T0 + 2))
    r, d = run(r, facts_of(fact("a")), T0 + 3)
    assert d.assign == {"a": NEW} and r.wave_started_at == T0 + 3


def test_resume_soaks_the_wave_again() -> None:
    r = make_rollout({"a": 0, "b": 1}, plan=Plan(soak_s=60), state="running", wave_started_at=T0, soak_until=T0 + 60,
                     steps={"a": {"state": "done", "started_at": T0}})
    r = apply(r, request(r, "pause", now=T0 + 10))
    r = apply(r, request(r, "resume", now=T0 + 100))
    assert r.soak_until is None
    r, _ = run(r, facts_of(fact("a", NEW), fact("b")), T0 + 100)
    assert r.wave == 0 and r.soak_until == T0 + 160


# -- resume from persisted state ------------------------------------------------------------------


def test_resume_mid_wave_from_a_persisted_record() -> None:
    """A controller restart: only the persisted record (running, wave 1 half done) is known."""
    plan = Plan(canary_pct=25, waves=(100,), soak_s=30, step_timeout_s=60)
    r = make_rollout({"a": 0, "b": 1, "c": 1, "d": 1}, plan=plan, state="running", wave=1, wave_started_at=T0 + 100,
                     steps={
                         "a": {"state": "done", "started_at": T0, "finished_at": T0 + 5},
                         "b": {"state": "done", "started_at": T0 + 100, "finished_at": T0 + 110},
                         "c": {"state": "updating", "started_at": T0 + 100, "deadline": T0 + 160},
                         "d": {"state": "waiting", "started_at": T0 + 100},
                     })
    facts = facts_of(fact("a", NEW), fact("b", NEW), fact("c"), fact("d", online=False))
    r, d = run(r, facts, T0 + 150)
    assert not d.assign and not d.steps and r.state == "running"  # c is within its deadline, d offline
    facts["c"] = fact("c", NEW)
    r, d = run(r, facts, T0 + 155)
    assert states(r)["c"] == "done" and r.soak_until == T0 + 185 and not d.assign
    r, d = run(r, facts, T0 + 185)
    assert r.state == "succeeded"


def test_resume_a_running_record_whose_wave_was_not_started() -> None:
    """Crash between writing ``wave`` and the steps: the pending steps of the wave start now."""
    r = make_rollout({"a": 0, "b": 1}, state="running", wave=1, wave_started_at=None,
                     steps={"a": {"state": "done", "started_at": T0}})
    r, d = run(r, facts_of(fact("a", NEW), fact("b")), T0 + 10)
    assert d.assign == {"b": NEW} and r.wave_started_at == T0 + 10 and states(r)["b"] == "updating"


def test_invalid_plan_in_a_record_is_a_value_error() -> None:
    r = dataclasses.replace(make_rollout({"a": 0}), plan={"waves": [50]})
    with pytest.raises(ValueError, match="plan.waves"):
        decide(r, {}, Gates(), T0)


# -- properties ------------------------------------------------------------------------------------

DEVICES = [f"d{i}" for i in range(6)]
VERSIONS = st.sampled_from([NEW, OLD, None, "0.9"])
TIMES = st.sampled_from([None, T0, T0 + 50, T0 + 400])


@st.composite
def step_columns(draw: st.DrawFn) -> dict[str, Any]:
    return {"state": draw(st.sampled_from(STEP_STATES)), "started_at": draw(TIMES), "deadline": draw(TIMES),
            "finished_at": draw(TIMES), "reason": draw(st.sampled_from([None, "step_timeout"])), "detail": None}


@st.composite
def situations(draw: st.DrawFn) -> tuple[RolloutRecord, dict[str, DeviceFacts], Gates, float]:
    n = draw(st.integers(min_value=0, max_value=len(DEVICES)))
    devices = DEVICES[:n]
    waves = {d: draw(st.integers(min_value=0, max_value=3)) for d in devices}
    plan = Plan(canary_pct=draw(st.none() | st.just(20.0)), soak_s=draw(st.sampled_from([0.0, 30.0])),
                step_timeout_s=draw(st.sampled_from([10.0, 300.0])),
                max_failures_pct=draw(st.sampled_from([0.0, 5.0, 50.0, 100.0])),
                min_calls=draw(st.sampled_from([1, 20])))
    r = make_rollout(
        waves, plan=plan, state=draw(st.sampled_from(ROLLOUT_STATES)), wave=draw(st.integers(0, 3)),
        wave_started_at=draw(TIMES), soak_until=draw(TIMES),
        previous={d: draw(st.sampled_from([OLD, None])) for d in devices},
        steps={d: draw(step_columns()) for d in devices},
    )
    facts = {d: DeviceFacts(device_id=d, online=draw(st.booleans()), active_version=draw(VERSIONS),
                            failure=draw(st.none() | st.just(("health_check_failed", "x"))))
             for d in devices if draw(st.integers(0, 5))}  # now and then a device without facts
    calls = draw(st.integers(0, 40))
    gates = Gates(new=window(calls, draw(st.integers(0, calls)), draw(st.none() | st.sampled_from([10.0, 30.0]))),
                  baseline=window(draw(st.integers(0, 40)), 0, draw(st.none() | st.just(20.0))))
    return r, facts, gates, draw(st.sampled_from([T0, T0 + 20, T0 + 500, T0 + 10_000]))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_decide_is_idempotent(situation: tuple[RolloutRecord, dict[str, DeviceFacts], Gates, float]) -> None:
    r, facts, gates, now = situation
    first = decide(r, facts, gates, now)
    assert decide(r, facts, gates, now) == first  # pure
    after = apply(r, first)
    again = decide(after, facts, gates, now)
    assert again.empty, (first, again)
    if first.assign:
        assert r.state in ACTIVE_STATES  # only an active rollout assigns
    if r.state in ("succeeded", "aborted"):
        assert after.state == r.state
    if after.state == "aborted" and r.state != "aborted":
        assert after.reason and after.finished_at == now
        previous = {s.device_id: s.previous_version for s in r.steps}
        assert all(previous[d] == v for d, v in first.assign.items())  # only reverts
        started = {s.device_id for s in r.steps if s.state in ("updating", "waiting", "done", "failed")}
        assert started <= set(first.assign)
        assert not any(s.state in ("updating", "waiting", "done", "failed") for s in after.steps)


@settings(max_examples=150, deadline=None)
@given(
    behaviour=st.lists(st.sampled_from(["ok", "fail", "silent"]), min_size=1, max_size=8),
    offline=st.lists(st.booleans(), min_size=8, max_size=8),
    canary=st.none() | st.just(10.0),
    waves=st.sampled_from([(100.0,), (50.0, 100.0), (25.0, 50.0, 100.0)]),
    max_failures=st.sampled_from([0.0, 25.0, 100.0]),
)
def test_a_rollout_always_ends_and_nothing_stays_updating(behaviour, offline, canary, waves, max_failures) -> None:
    """Simulated devices (some never answer, some refuse, some offline): once time passes
    every deadline the rollout has finished and no online device is left updating."""
    plan = Plan(canary_pct=canary, waves=waves, soak_s=20, step_timeout_s=60, max_failures_pct=max_failures)
    devices = [f"dev-{i}" for i in range(len(behaviour))]
    fleet = Fleet(dict(zip(devices, behaviour)), {d: not offline[i] for i, d in enumerate(devices)},
                  {d: OLD for d in devices})
    r = planned(devices, plan)
    now = T0
    for _ in range(40):
        r, d = run(r, fleet.facts(), now)
        fleet.take(d.assign)
        fleet.act()
        now += 30
    assert r.state in ("succeeded", "aborted")
    for s in r.steps:
        if fleet.online[s.device_id]:
            assert s.state != "updating", s
        if s.state == "waiting":
            assert not fleet.online[s.device_id]
    if r.state == "aborted":
        for s in r.steps:
            assert s.state in ("pending", "reverting", "reverted")
            if s.state == "reverting":
                assert fleet.behaviour[s.device_id] == "silent" or not fleet.online[s.device_id]
    else:
        failed = sum(s.state == "failed" for s in r.steps)
        assert failed / len(devices) * 100 <= max_failures
        for s in r.steps:
            if fleet.behaviour[s.device_id] == "ok" and fleet.online[s.device_id]:
                assert s.state == "done"
