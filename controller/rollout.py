"""The rollout state machine as pure functions: plan a deploy into waves, and decide one
step from plain facts. No I/O, no clock: the driver (``rollouts.py``) reads the store,
calls ``decide``, and applies the ``Decision``.

States of a rollout (persisted in ``rollouts.state``; like AWS IoT Jobs / hawkBit groups):

    pending ──start──► running ──every wave done and soaked──► succeeded
                        │  ▲ pause/resume
                        ▼  │
                       paused
    running/paused ──gate crossed or abort──► aborted   (every updated device reverted)

Steps (one per device, ``rollout_devices.state``):

    pending   its wave has not started
    updating  desired state carries the new version; deadline = started_at + step_timeout
    waiting   its wave started while the device was offline: desired is set (retained),
              the clock starts when it comes back (then ``updating``); never counts as failed
    done      the device reports the new version active
    failed    it reported a failure (rolled_back / refused / rejected for this version), or
              an online device passed its deadline: counted against ``max_failures``
    reverting the rollout aborted: desired is back at the previous version
    reverted  the device reports the previous version active (or the model gone when
              there was none)

Gates, checked while a wave runs and while it soaks:
    failures  failed / (steps started so far)            > max_failures_pct   -> abort
    errors    new version's error rate (wave devices)    > max_error_rate_pct -> abort
              (only once ``min_calls`` calls are in)
    latency   new p95 / previous version's p95 - 1       > max_latency_regression_pct -> abort
              (only once both sides have ``min_calls``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from controller.store import ModelWindow, RolloutRecord

ROLLOUT_STATES = ("pending", "running", "paused", "succeeded", "aborted")
ACTIVE_STATES = ("pending", "running", "paused")
STEP_STATES = ("pending", "updating", "waiting", "done", "failed", "reverting", "reverted")


@dataclass(frozen=True)
class Plan:
    """What ``fleetctl deploy`` asked for. Percentages are 0..100. ``waves`` are cumulative
    shares of the target devices (the last is 100); the canary, when set, is wave 0."""

    canary_pct: Optional[float] = None
    waves: tuple[float, ...] = (100.0,)
    soak_s: float = 60.0
    max_failures_pct: float = 5.0
    max_error_rate_pct: Optional[float] = 1.0
    max_latency_regression_pct: Optional[float] = 20.0
    step_timeout_s: float = 300.0
    min_calls: int = 20

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Raises ValueError: out-of-range or inconsistent values (message names the field)."""
        raise NotImplementedError


def assign_waves(devices: list[str], plan: Plan) -> list[tuple[str, int]]:
    """(device_id, wave index) for every device, in a stable order: the canary (at least one
    device when ``canary_pct`` is set) first, then each cumulative wave; no wave is empty
    (empty ones are dropped and later indexes close up)."""
    raise NotImplementedError


@dataclass(frozen=True)
class DeviceFacts:
    """What the controller knows of one device right now."""

    device_id: str
    online: bool
    active_version: Optional[str]  # of the rollout's model, as last reported
    reported_generation: Optional[int] = None
    # A failure the device reported for (model, version) since its step started:
    # (reason, detail), e.g. ("health_check_failed", "max abs diff 3.2").
    failure: Optional[tuple[str, Optional[str]]] = None


@dataclass(frozen=True)
class Gates:
    """Telemetry of the new version on the devices updated so far (since their step
    started) and of the previous version (over the same window, any device)."""

    new: ModelWindow = field(default_factory=ModelWindow)
    baseline: ModelWindow = field(default_factory=ModelWindow)


@dataclass(frozen=True)
class Decision:
    """What to change. ``assign``: {device_id: version | None (remove the model)} to put in
    desired state; ``fields``: rollout columns; ``steps``: {device_id: {column: value}};
    ``notes``: one line per thing that happened, for the event log."""

    assign: dict[str, Optional[str]] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.assign or self.fields or self.steps)


def decide(rollout: RolloutRecord, facts: dict[str, DeviceFacts], gates: Gates, now: float) -> Decision:
    """One step of ``rollout`` (with its steps) given the devices' facts, the gate figures
    and the time. Pure; calling it again with the same inputs after applying its decision
    gives an empty decision."""
    raise NotImplementedError


def request(rollout: RolloutRecord, action: str, *, now: float, reason: Optional[str] = None) -> Decision:
    """The operator's ``pause`` | ``resume`` | ``abort`` as a decision (abort reverts like a
    crossed gate).

    Raises:
        ValueError: the action does not apply in the rollout's state (message says why).
    """
    raise NotImplementedError
