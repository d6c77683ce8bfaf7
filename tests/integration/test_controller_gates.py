"""End to end: the rollout's telemetry gates (error rate, p95 latency regression) on a real
``fleetctl serve`` subprocess and the embedded broker, with simulated devices
(tests/simfleet.py) that verify the signed desired states, fetch the chunks and report
telemetry whose figures the test chooses per (model, version).

Each case puts v1 on every device first (a rollout to all), then rolls v2 out with a
canary (2 of 8 devices) and one more wave:

1. v2 reports 10 % errors against ``--max-error-rate 1%``: the rollout aborts in the canary
   wave with a reason naming the error rate; both canary devices are told v1 again and run
   it; the other six never got v2 (no new desired document, never active).
2. v2's p95 is three times v1's against ``--max-latency-regression 20%``: the same, the
   reason names the p95 latency.
3. the control: v2 reports what v1 does; the rollout succeeds on every device, and its
   last figures show the gates had the calls they need to judge (so 1 and 2 abort because
   of v2's figures, not because the gates abort everything).

The abort cases soak long (the abort comes as soon as the telemetry is in, so it costs
nothing when they pass; on a loaded machine a slow ingest cannot let the canary's soak run
out before the figures arrive). The control soaks a few seconds per wave.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from controller.apiclient import ApiClient
from tests.fleetkit import ControllerProcess, make_keys, push_model
from tests.helpers import wait_until
from tests.simfleet import SimFleet

N = 8
CANARY_PCT = 25.0  # 2 of 8
NAME = "kws"
HZ = 5.0  # telemetry per device and second
RATE = 100.0  # calls per second of the model: 20 calls a sample, min_calls (20) from the first sample
HEALTHY = {"rate": RATE, "error_rate": 0.0, "p95_ms": 12.0}
FINAL = ("succeeded", "aborted")


class Figures:
    """What the simulated devices report per model version (``SimFleet.model_reports``)."""

    def __init__(self) -> None:
        self.by_version: dict[str, Mapping[str, float]] = {}

    def __call__(self, device_id: str, model: str, version: str) -> Mapping[str, float]:
        return self.by_version.get(version, HEALTHY)


@pytest.fixture
def rig(amqtt_broker: Any, tmp_path: Path,
        model_files: dict[str, Path]) -> Iterator[tuple[ApiClient, SimFleet, Figures]]:
    keys = make_keys(tmp_path / "keys")
    figures = Figures()
    ctl = ControllerProcess(amqtt_broker.url, tmp_path / "ctl", keys)
    fleet = SimFleet(amqtt_broker.url, N, prefix="gate", telemetry_hz=HZ, model_reports=figures, initial_models={},
                     root_json=(keys / "root.json").read_bytes(), timeout=30)
    try:
        ctl.wait_online()
        fleet.start()
        with ApiClient(amqtt_broker.url, timeout=20) as api:
            wait_until(lambda: {d["id"] for d in api.call("devices.list") if d["online"]} >= set(fleet.ids),
                       timeout=30, what="every simulated device online at the controller")
            push_model(api, model_files["tiny_v1"], NAME, "1")
            push_model(api, model_files["tiny_v2"], NAME, "2")
            first = wait_final(api, api.call("deploy", model=NAME, version="1", to="all", soak_s=0.5)["id"])
            assert first["state"] == "succeeded", first
            assert fleet.active_count(NAME, "1") == N
            yield api, fleet, figures
    finally:
        fleet.close(graceful=False)
        ctl.__exit__(None, None, None)


def wait_final(api: ApiClient, rollout_id: int, timeout: float = 90.0) -> dict[str, Any]:
    return wait_until(lambda: (lambda r: r if r["state"] in FINAL else None)(api.call("rollouts.show", id=rollout_id)),
                      timeout=timeout, interval=0.3, what=f"rollout {rollout_id} to finish")


def wait_past_canary(api: ApiClient, rollout_id: int, timeout: float = 90.0) -> dict[str, Any]:
    """The rollout once it has finished or moved past the canary (wave 0)."""
    return wait_until(lambda: (lambda r: r if r["state"] in FINAL or r["wave"] > 0 else None)(
        api.call("rollouts.show", id=rollout_id)), timeout=timeout, interval=0.3,
        what=f"rollout {rollout_id} to finish or leave the canary")


def desired_generations(api: ApiClient) -> dict[str, Any]:
    return {d["id"]: d["desired_generation"] for d in api.call("devices.list")}


def assert_aborted_in_canary_and_reverted(api: ApiClient, fleet: SimFleet, row: dict[str, Any],
                                          before: dict[str, Any]) -> None:
    """Aborted in wave 0; the canary back on v1 (desired and running); the rest untouched."""
    assert row["state"] == "aborted" and row["wave"] == 0, row
    canary = sorted(s["device_id"] for s in row["steps"] if s["wave"] == 0)
    rest = sorted(s["device_id"] for s in row["steps"] if s["wave"] > 0)
    assert len(canary) == 2 and len(rest) == N - 2, row["steps"]
    assert all(s["state"] == "pending" and s["started_at"] is None for s in row["steps"] if s["wave"] > 0), row["steps"]
    assert all(s["previous_version"] == "1" for s in row["steps"]), row["steps"]

    final = wait_until(lambda: (lambda r: r if all(s["state"] == "reverted" for s in r["steps"] if s["wave"] == 0)
                                else None)(api.call("rollouts.show", id=row["id"])),
                       timeout=60, interval=0.3, what="the canary reverted")
    assert final["state"] == "aborted" and final["reason"] == row["reason"]
    after = desired_generations(api)
    for d in canary:
        show = api.call("devices.show", id=d)
        assert [(a["model"], a["version"]) for a in show["assignments"]] == [(NAME, "1")], show["assignments"]
        assert show["device"]["models"] == {NAME: "1"}, show["device"]
        dev = fleet.devices[d]
        assert f"{NAME}@2" in dev.stats.active_at  # it did run v2 ...
        assert dev.models[NAME].active == "1"  # ... and runs v1 again
        assert dev._desired is not None and dev._desired.models[NAME].version == "1"  # the signed document it holds
        assert dev.generation == after[d] > before[d]  # reconciled the revert's generation
    for d in rest:
        assert after[d] == before[d], (d, before[d], after[d])  # no new desired document
        dev = fleet.devices[d]
        assert f"{NAME}@2" not in dev.stats.active_at and dev.models[NAME].active == "1"
        assert dev._desired is not None and dev._desired.models[NAME].version == "1"
    assert fleet.active_count(NAME, "1") == N


def test_an_error_rate_above_the_gate_aborts_at_the_canary_and_reverts_it(rig) -> None:
    api, fleet, figures = rig
    figures.by_version["2"] = {**HEALTHY, "error_rate": 0.10}
    before = desired_generations(api)
    row = api.call("deploy", model=NAME, version="2", to="all", canary_pct=CANARY_PCT, waves=[100], soak_s=20,
                   max_error_rate_pct=1.0, max_latency_regression_pct=20.0)
    row = wait_past_canary(api, row["id"])
    assert row["state"] == "aborted" and row["wave"] == 0, row
    assert row["reason"].startswith("error rate "), row
    assert "> 1%" in row["reason"] and "calls of 2" in row["reason"], row["reason"]
    fig = row["figures"]
    assert fig["calls"] >= row["plan"]["min_calls"] and fig["error_rate_pct"] > 1.0, fig
    assert fig["latency_regression_pct"] is not None and abs(fig["latency_regression_pct"]) < 20, fig
    assert_aborted_in_canary_and_reverted(api, fleet, row, before)


def test_a_p95_latency_regression_above_the_gate_aborts_at_the_canary_and_reverts_it(rig) -> None:
    api, fleet, figures = rig
    figures.by_version["2"] = {**HEALTHY, "p95_ms": 3 * HEALTHY["p95_ms"]}
    before = desired_generations(api)
    row = api.call("deploy", model=NAME, version="2", to="all", canary_pct=CANARY_PCT, waves=[100], soak_s=20,
                   max_error_rate_pct=1.0, max_latency_regression_pct=20.0)
    row = wait_past_canary(api, row["id"])
    assert row["state"] == "aborted" and row["wave"] == 0, row
    assert row["reason"].startswith("p95 latency +"), row
    assert "> 20%" in row["reason"], row["reason"]
    fig = row["figures"]
    assert fig["calls"] >= row["plan"]["min_calls"] and fig["baseline_calls"] >= row["plan"]["min_calls"], fig
    assert fig["error_rate_pct"] == 0 and fig["latency_regression_pct"] > 20, fig
    assert_aborted_in_canary_and_reverted(api, fleet, row, before)


def test_a_version_within_the_gates_rolls_out_to_every_device(rig) -> None:
    api, fleet, figures = rig
    figures.by_version["2"] = dict(HEALTHY)
    row = api.call("deploy", model=NAME, version="2", to="all", canary_pct=CANARY_PCT, waves=[100], soak_s=3,
                   max_error_rate_pct=1.0, max_latency_regression_pct=20.0)
    row = wait_final(api, row["id"])
    assert row["state"] == "succeeded" and row["reason"] is None, row
    assert row["counts"] == {"done": N}, row
    # the gates judged real figures: enough calls on both sides, and within the limits
    fig = row["figures"]
    min_calls = row["plan"]["min_calls"]
    assert fig["calls"] >= min_calls and fig["baseline_calls"] >= min_calls, fig
    assert fig["error_rate_pct"] == 0 and abs(fig["latency_regression_pct"]) < 20, fig
    assert fleet.active_count(NAME, "2") == N
    for d in fleet.ids:
        dev = fleet.devices[d]
        assert dev._desired is not None and dev._desired.models[NAME].version == "2"
