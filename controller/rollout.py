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

Choices the driver and the console can rely on:

- ``decide`` computes a fixpoint: a wave is started, its devices that already run the new
  version are ``done``, the wave soaks (``soak_s`` 0: the next wave starts) all in one
  decision, so applying it and calling again with the same facts and time changes nothing.
- A reported failure fails an ``updating`` or ``waiting`` step unless the device runs the new
  version; a ``done`` step fails only when the device no longer runs it and reports why.
- An online device past its deadline is ``failed`` (``step_timeout``); an offline one goes
  back to ``waiting`` (its clock restarts when it returns). A device without facts is offline.
- ``waiting -> updating`` keeps ``started_at`` (failures are counted from the first
  assignment) and sets a fresh deadline.
- While paused, steps are still tracked and the gates still abort (safer); no wave starts
  and no soak begins or ends. ``resume`` clears ``soak_until``: the wave soaks again in full.
- After success, steps still ``waiting`` are tracked to their outcome, without gates.
  After abort only ``reverting`` steps are tracked (to ``reverted``); nothing is assigned.
- Waves advance to the next wave index present among the steps (``assign_waves`` numbers
  them 0..k-1, so that is ``wave + 1``); a rollout without steps succeeds at once.
- ``figures`` (the last gate figures) change only when a figure changes; they are frozen
  once the rollout has finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from controller.store import ModelWindow, RolloutRecord

ROLLOUT_STATES = ("pending", "running", "paused", "succeeded", "aborted")
ACTIVE_STATES = ("pending", "running", "paused")
STEP_STATES = ("pending", "updating", "waiting", "done", "failed", "reverting", "reverted")

# Step states a wave may finish in (nothing in flight); "waiting" never blocks a wave.
_SETTLED = ("done", "failed", "waiting")
# Step states that were given the new version (an abort reverts them).
_STARTED = ("updating", "waiting", "done", "failed")
_ROLLOUT_COLUMNS = ("state", "wave", "wave_started_at", "soak_until", "reason", "figures", "finished_at")
_STEP_COLUMNS = ("state", "started_at", "deadline", "finished_at", "reason", "detail")
_EPS = 1e-9  # float slack for ceil(n * pct / 100)


def _number(name: str, value: Any, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or null" if optional else "a number"
        raise ValueError(f"plan.{name}: expected {kind}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"plan.{name}: expected a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class Plan:
    """What ``fleetctl deploy`` asked for. Percentages are 0..100. ``waves`` are cumulative
    shares of the target devices (the last is 100); the canary, when set, is wave 0.

    Raises (on construction):
        ValueError: out-of-range or inconsistent values (message names the field).
    """

    canary_pct: Optional[float] = None
    waves: tuple[float, ...] = (100.0,)
    soak_s: float = 60.0
    max_failures_pct: float = 5.0
    max_error_rate_pct: Optional[float] = 1.0
    max_latency_regression_pct: Optional[float] = 20.0
    step_timeout_s: float = 300.0
    min_calls: int = 20

    def __post_init__(self) -> None:
        canary = _number("canary_pct", self.canary_pct, optional=True)
        if canary is not None and not 0 < canary < 100:
            raise ValueError(f"plan.canary_pct: expected more than 0 and less than 100 (or null), got {canary:g}")
        if isinstance(self.waves, (str, bytes)) or not isinstance(self.waves, (list, tuple)):
            raise ValueError(f"plan.waves: expected a list of cumulative percentages ending at 100, got {self.waves!r}")
        waves = tuple(_number(f"waves[{i}]", w) for i, w in enumerate(self.waves))
        if not waves:
            raise ValueError("plan.waves: expected at least one wave (e.g. [100]), got []")
        for i, w in enumerate(waves):
            if not 0 < w <= 100:  # type: ignore[operator]
                raise ValueError(f"plan.waves[{i}]: expected more than 0 and at most 100, got {w:g}")
            if i and w <= waves[i - 1]:  # type: ignore[operator]
                raise ValueError(f"plan.waves: expected strictly increasing cumulative percentages, "
                                 f"got {waves[i - 1]:g} then {w:g}")
        if waves[-1] != 100:
            raise ValueError(f"plan.waves: expected the last wave to be 100 (every device), got {waves[-1]:g}")
        soak = _number("soak_s", self.soak_s)
        if soak < 0:  # type: ignore[operator]
            raise ValueError(f"plan.soak_s: expected seconds >= 0, got {soak:g}")
        max_failures = _number("max_failures_pct", self.max_failures_pct)
        if not 0 <= max_failures <= 100:  # type: ignore[operator]
            raise ValueError(f"plan.max_failures_pct: expected 0..100, got {max_failures:g}")
        max_errors = _number("max_error_rate_pct", self.max_error_rate_pct, optional=True)
        if max_errors is not None and not 0 <= max_errors <= 100:
            raise ValueError(f"plan.max_error_rate_pct: expected 0..100 (or null), got {max_errors:g}")
        max_latency = _number("max_latency_regression_pct", self.max_latency_regression_pct, optional=True)
        if max_latency is not None and max_latency < 0:
            raise ValueError(f"plan.max_latency_regression_pct: expected >= 0 (or null), got {max_latency:g}")
        timeout = _number("step_timeout_s", self.step_timeout_s)
        if timeout <= 0:  # type: ignore[operator]
            raise ValueError(f"plan.step_timeout_s: expected seconds > 0, got {timeout:g}")
        if isinstance(self.min_calls, bool) or not isinstance(self.min_calls, int) or self.min_calls < 1:
            raise ValueError(f"plan.min_calls: expected an integer >= 1, got {self.min_calls!r}")
        for name, value in (("canary_pct", canary), ("waves", waves), ("soak_s", soak),
                            ("max_failures_pct", max_failures), ("max_error_rate_pct", max_errors),
                            ("max_latency_regression_pct", max_latency), ("step_timeout_s", timeout)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``Plan.from_dict(plan.to_dict()) == plan``."""
        return {
            "canary_pct": self.canary_pct,
            "waves": list(self.waves),
            "soak_s": self.soak_s,
            "max_failures_pct": self.max_failures_pct,
            "max_error_rate_pct": self.max_error_rate_pct,
            "max_latency_regression_pct": self.max_latency_regression_pct,
            "step_timeout_s": self.step_timeout_s,
            "min_calls": self.min_calls,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Raises ValueError: out-of-range or inconsistent values (message names the field).
        Missing fields take their defaults; unknown fields are refused."""
        if not isinstance(data, dict):
            raise ValueError(f"plan: expected an object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"plan: unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(expected some of {', '.join(known)})")
        return cls(**data)


def assign_waves(devices: list[str], plan: Plan) -> list[tuple[str, int]]:
    """(device_id, wave index) for every device, in a stable order: the canary (at least one
    device when ``canary_pct`` is set) first, then each cumulative wave; no wave is empty
    (empty ones are dropped and later indexes close up)."""
    ids = sorted(set(devices))
    n = len(ids)
    if not n:
        return []
    ends: list[int] = []
    if plan.canary_pct is not None:
        ends.append(max(1, math.ceil(n * plan.canary_pct / 100 - _EPS)))
    ends.extend(math.ceil(n * w / 100 - _EPS) for w in plan.waves)
    ends[-1] = n  # the last wave takes everything left
    out: list[tuple[str, int]] = []
    start, index = 0, 0
    for end in ends:
        end = min(n, max(start, end))
        if end > start:
            out.extend((device, index) for device in ids[start:end])
            index += 1
            start = end
    return out


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


# -- the working copy decide() and request() change ----------------------------------------


class _Work:
    """The rollout's columns and its steps' columns as mutable dicts; every change counted,
    so ``decide`` can run passes until one changes nothing, then diff against the record."""

    def __init__(self, rollout: RolloutRecord) -> None:
        self.rollout = rollout
        self.fields = {name: getattr(rollout, name) for name in _ROLLOUT_COLUMNS}
        self.steps = {s.device_id: {name: getattr(s, name) for name in _STEP_COLUMNS} for s in rollout.steps}
        self.records = {s.device_id: s for s in rollout.steps}
        self.assign: dict[str, Optional[str]] = {}
        self.notes: list[str] = []
        self.changes = 0

    @property
    def state(self) -> str:
        return self.fields["state"]

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            if self.fields[name] != value:
                self.fields[name] = value
                self.changes += 1

    def set_step(self, device_id: str, **values: Any) -> None:
        step = self.steps[device_id]
        for name, value in values.items():
            if step[name] != value:
                step[name] = value
                self.changes += 1

    def count(self, *states: str, wave: Optional[int] = None) -> int:
        return sum(1 for d, s in self.steps.items()
                   if s["state"] in states and (wave is None or self.records[d].wave == wave))

    def decision(self) -> Decision:
        changed = {k: v for k, v in self.fields.items() if getattr(self.rollout, k) != v}
        steps: dict[str, dict[str, Any]] = {}
        for device_id, step in self.steps.items():
            record = self.records[device_id]
            diff = {k: v for k, v in step.items() if getattr(record, k) != v}
            if diff:
                steps[device_id] = diff
        return Decision(assign=dict(self.assign), fields=changed, steps=steps, notes=tuple(self.notes))


def _pct(x: float) -> str:
    return f"{x:.3g}%" if x < 1000 else f"{x:.0f}%"


def _start_steps(w: _Work, plan: Plan, facts: dict[str, DeviceFacts], now: float) -> None:
    """Give every pending step of the current (or an earlier) wave the new version."""
    wave = w.fields["wave"]
    started = waiting = 0
    for device_id, step in w.steps.items():
        if step["state"] != "pending" or w.records[device_id].wave > wave:
            continue
        w.assign[device_id] = w.rollout.version
        if _facts(facts, device_id).online:
            w.set_step(device_id, state="updating", started_at=now, deadline=now + plan.step_timeout_s,
                       finished_at=None, reason=None, detail=None)
        else:
            w.set_step(device_id, state="waiting", started_at=now, deadline=None,
                       finished_at=None, reason=None, detail=None)
            waiting += 1
        started += 1
    if w.fields["wave_started_at"] is None:
        w.set(wave_started_at=now)
    if started:
        extra = f" ({waiting} offline, waiting)" if waiting else ""
        plural = "device" if started == 1 else "devices"
        w.notes.append(f"wave {wave} started: {started} {plural}{extra}")


def _facts(facts: dict[str, DeviceFacts], device_id: str) -> DeviceFacts:
    return facts.get(device_id) or DeviceFacts(device_id=device_id, online=False, active_version=None)


def _track(w: _Work, plan: Plan, facts: dict[str, DeviceFacts], now: float) -> None:
    """Move updating/waiting/done steps by what their devices report and the time."""
    version = w.rollout.version
    for device_id, step in w.steps.items():
        state = step["state"]
        if state not in ("updating", "waiting", "done"):
            continue
        f = _facts(facts, device_id)
        if state == "done":
            if f.failure is not None and f.active_version != version:
                reason, detail = f.failure
                w.set_step(device_id, state="failed", finished_at=now, reason=reason, detail=detail)
                w.notes.append(f"{device_id} failed after activating {version}: {reason}")
            continue
        if f.active_version == version:
            w.set_step(device_id, state="done", deadline=None, finished_at=now, reason=None, detail=None)
            w.notes.append(f"{device_id} done: {version} active")
        elif f.failure is not None:
            reason, detail = f.failure
            w.set_step(device_id, state="failed", finished_at=now, reason=reason, detail=detail)
            w.notes.append(f"{device_id} failed: {reason}" + (f" ({detail})" if detail else ""))
        elif state == "waiting":
            if f.online:
                w.set_step(device_id, state="updating", deadline=now + plan.step_timeout_s)
                w.notes.append(f"{device_id} back online: updating")
        elif step["deadline"] is not None and now > step["deadline"]:
            if f.online:
                detail = f"no answer within {plan.step_timeout_s:g}s"
                w.set_step(device_id, state="failed", finished_at=now, reason="step_timeout", detail=detail)
                w.notes.append(f"{device_id} failed: step_timeout ({detail})")
            else:
                w.set_step(device_id, state="waiting", deadline=None)
                w.notes.append(f"{device_id} offline past its deadline: waiting")


def _track_revert(w: _Work, facts: dict[str, DeviceFacts], now: float) -> None:
    for device_id, step in w.steps.items():
        if step["state"] != "reverting":
            continue
        previous = w.records[device_id].previous_version
        if _facts(facts, device_id).active_version == previous:
            w.set_step(device_id, state="reverted", finished_at=now)
            w.notes.append(f"{device_id} reverted to {previous or 'no version'}")


def _figures(w: _Work, gates: Gates) -> dict[str, Any]:
    started = w.count(*_STARTED)
    failed = w.count("failed")
    new, base = gates.new, gates.baseline
    regression = None
    if new.p95_ms is not None and base.p95_ms:
        regression = (new.p95_ms / base.p95_ms - 1) * 100
    return {
        "started": started, "failed": failed, "done": w.count("done"),
        "waiting": w.count("waiting"), "updating": w.count("updating"),
        "failures_pct": round(failed / started * 100, 3) if started else 0.0,
        "calls": new.calls, "errors": new.errors,
        "error_rate_pct": round(new.error_rate * 100, 3) if new.error_rate is not None else None,
        "p95_ms": new.p95_ms,
        "baseline_calls": base.calls,
        "baseline_p95_ms": base.p95_ms,
        "latency_regression_pct": round(regression, 3) if regression is not None else None,
    }


def _gate(w: _Work, plan: Plan, gates: Gates) -> Optional[str]:
    """The reason of the first gate crossed, or None."""
    started = w.count(*_STARTED)
    failed = w.count("failed")
    if started and failed / started * 100 > plan.max_failures_pct:
        which = [f"{d} {s['reason'] or 'failed'}" for d, s in sorted(w.steps.items()) if s["state"] == "failed"]
        more = f" and {len(which) - 3} more" if len(which) > 3 else ""
        return (f"failures {failed}/{started} = {_pct(failed / started * 100)} > {plan.max_failures_pct:g}% "
                f"({', '.join(which[:3])}{more})")
    new, base = gates.new, gates.baseline
    if plan.max_error_rate_pct is not None and new.calls >= plan.min_calls and new.error_rate is not None:
        rate = new.error_rate * 100
        if rate > plan.max_error_rate_pct:
            return (f"error rate {_pct(rate)} > {plan.max_error_rate_pct:g}% "
                    f"({new.errors}/{new.calls} calls of {w.rollout.version})")
    if (plan.max_latency_regression_pct is not None and new.calls >= plan.min_calls
            and base.calls >= plan.min_calls and new.p95_ms is not None and base.p95_ms):
        regression = (new.p95_ms / base.p95_ms - 1) * 100
        if regression > plan.max_latency_regression_pct:
            return (f"p95 latency +{_pct(regression)} > {plan.max_latency_regression_pct:g}% "
                    f"({new.p95_ms:g} ms vs {base.p95_ms:g} ms before)")
    return None


def _abort(w: _Work, reason: str, now: float) -> None:
    """state aborted; every step that got the new version goes back to its previous one."""
    w.set(state="aborted", reason=reason, finished_at=now, soak_until=None)
    w.notes.append(f"aborted: {reason}")
    reverting = 0
    for device_id, step in w.steps.items():
        if step["state"] in _STARTED:
            w.assign[device_id] = w.records[device_id].previous_version
            w.set_step(device_id, state="reverting")
            reverting += 1
    if reverting:
        w.notes.append(f"reverting {reverting} device{'s' if reverting != 1 else ''} to their previous version")


def _advance(w: _Work, now: float, soak_s: float) -> None:
    """The current wave: soak once nothing is in flight, then the next wave or success."""
    wave = w.fields["wave"]
    if w.count("pending", "updating", wave=wave):
        return
    if not any(s.wave == wave for s in w.records.values()):
        w.set(soak_until=now)  # a wave without devices (none at all, or a gap) has nothing to soak
    elif w.fields["soak_until"] is None:
        w.set(soak_until=now + soak_s)
        counts = f"{w.count('done', wave=wave)} done, {w.count('failed', wave=wave)} failed, " \
                 f"{w.count('waiting', wave=wave)} waiting"
        w.notes.append(f"wave {wave} complete ({counts}): soaking {soak_s:g}s")
    if now < w.fields["soak_until"]:
        return
    later = sorted({s.wave for s in w.records.values() if s.wave > wave})
    if later:
        w.set(wave=later[0], wave_started_at=now, soak_until=None)
    else:
        w.set(state="succeeded", finished_at=now, soak_until=None)
        waiting = w.count("waiting")
        later_note = f", {waiting} offline (they update when they return)" if waiting else ""
        w.notes.append(f"succeeded: {w.count('done')} done, {w.count('failed')} failed{later_note}")


def _pass(w: _Work, plan: Plan, facts: dict[str, DeviceFacts], gates: Gates, now: float) -> None:
    if w.state == "pending":
        first = min((s.wave for s in w.records.values()), default=0)
        w.set(state="running", wave=first, wave_started_at=now, soak_until=None)
    if w.state in ("running", "paused", "succeeded"):
        _track(w, plan, facts, now)
    elif w.state == "aborted":
        _track_revert(w, facts, now)
    if w.state in ("running", "paused"):
        w.set(figures=_figures(w, gates))
        crossed = _gate(w, plan, gates)
        if crossed is not None:
            _abort(w, crossed, now)
    if w.state == "running":
        _start_steps(w, plan, facts, now)
        _advance(w, now, plan.soak_s)


def decide(rollout: RolloutRecord, facts: dict[str, DeviceFacts], gates: Gates, now: float) -> Decision:
    """One step of ``rollout`` (with its steps) given the devices' facts, the gate figures
    and the time. Pure; calling it again with the same inputs after applying its decision
    gives an empty decision.

    Raises:
        ValueError: the rollout's plan is invalid (message names the field).
    """
    plan = Plan.from_dict(rollout.plan)
    w = _Work(rollout)
    # Each pass moves at least one column towards a terminal state, and waves only go up:
    # this bounds the passes; running out means a bug in the transitions.
    for _ in range(4 * len(rollout.steps) + 4 * len({s.wave for s in rollout.steps}) + 8):
        before = w.changes
        _pass(w, plan, facts, gates, now)
        if w.changes == before:
            return w.decision()
    raise RuntimeError(f"rollout {rollout.id}: decide() did not settle (a bug in the transitions)")


def request(rollout: RolloutRecord, action: str, *, now: float, reason: Optional[str] = None) -> Decision:
    """The operator's ``pause`` | ``resume`` | ``abort`` as a decision (abort reverts like a
    crossed gate).

    Raises:
        ValueError: the action does not apply in the rollout's state (message says why).
    """
    allowed = {"pause": ("pending", "running"), "resume": ("paused",), "abort": ACTIVE_STATES}
    if action not in allowed:
        raise ValueError(f"unknown action {action!r}: expected pause, resume or abort")
    if rollout.state not in allowed[action]:
        raise ValueError(f"cannot {action} rollout {rollout.id}: it is {rollout.state}; "
                         f"{action} applies only to a rollout that is {' or '.join(allowed[action])}")
    w = _Work(rollout)
    suffix = f": {reason}" if reason else ""
    if action == "pause":
        w.set(state="paused")
        w.notes.append(f"paused by operator{suffix}")
    elif action == "resume":
        w.set(state="running", soak_until=None)
        w.notes.append(f"resumed by operator{suffix}")
    else:
        _abort(w, reason or "aborted by operator", now)
    return w.decision()
