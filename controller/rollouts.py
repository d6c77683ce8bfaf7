"""The rollout driver: reads rollouts and device facts from the store, asks the pure state
machine (``rollout.decide``) what to do, and applies it — assignments (new desired
generations, then signed and published), step and rollout fields (compare-and-set).

Everything it needs is in the store, so a restarted controller (or another replica)
carries a rollout on from where it stands. Applying is ordered so a crash in between is
harmless: assignments first (idempotent: the same version again changes nothing), then the
CAS on the rollout; a lost CAS (another replica got there first) is dropped and the next
tick decides again from fresh facts. Desired documents are published after both.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Optional

from controller import rollout as machine
from controller.apispec import Deploy
from controller.rollout import ACTIVE_STATES, Decision, DeviceFacts, Gates, Plan
from controller.store import Assignment, Conflict, NotFound, RolloutRecord, Store

__all__ = ["RolloutDriver"]

log = logging.getLogger(__name__)

FAILURE_STEPS = ("rolled_back", "refused", "rejected")
TRACK_FINISHED_S = 7 * 86400  # finished rollouts still watched for offline devices that come back
BASELINE_WINDOW_S = 3600  # the previous version's figures: from an hour before the rollout started


class RolloutDriver:
    """See the module docstring. ``publish_desired(device_ids)`` signs and publishes."""

    def __init__(self, store: Store, publish_desired: Callable[[Iterable[str]], Any], *,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.publish_desired = publish_desired
        self.clock = clock
        self.notes: list[str] = []  # the latest lines, for logs and tests
        self.conflicts = 0
        self._lock = threading.Lock()

    # -- the console's operations -----------------------------------------------------------

    def create(self, params: Deploy, *, actor: str) -> RolloutRecord:
        """A new rollout of ``params.model@version`` to ``params.to``, started at once.

        Raises:
            NotFound: no such release, device or group. Conflict: a rollout of the model is
                already active. ValueError: a bad plan (the message names the field).
        """
        self.store.get_release(params.model, params.version)
        plan = Plan.from_dict({
            "canary_pct": params.canary_pct, "waves": tuple(params.waves), "soak_s": params.soak_s,
            "max_failures_pct": params.max_failures_pct, "max_error_rate_pct": params.max_error_rate_pct,
            "max_latency_regression_pct": params.max_latency_regression_pct, "step_timeout_s": params.step_timeout_s,
        })
        devices = self.store.resolve_target(params.to)
        if not devices:
            raise NotFound(f"{params.to} has no devices; add some with `fleetctl group add` or wait for them to connect")
        steps = [(device, wave, self._current_version(device, params.model))
                 for device, wave in machine.assign_waves(devices, plan)]
        now = self.clock()
        with self._lock:
            record = self.store.create_rollout(model=params.model, version=params.version, target=params.to,
                                               plan=plan.to_dict(), steps=steps, created_by=actor, now=now)
            self.store.audit(actor, "deploy", f"rollout:{record.id}",
                             {"model": params.model, "version": params.version, "to": params.to,
                              "devices": len(devices), "plan": plan.to_dict()}, now=now)
            self._advance(record.id)
        return self.store.get_rollout(record.id)

    def request(self, rollout_id: int, action: str, *, actor: str, reason: Optional[str] = None) -> RolloutRecord:
        """pause | resume | abort.

        Raises:
            NotFound: no such rollout. ValueError: the action does not apply now.
        """
        with self._lock:
            for _ in range(5):
                record = self.store.get_rollout(rollout_id)
                decision = machine.request(record, action, now=self.clock(), reason=reason)
                try:
                    self._apply(record, decision)
                except Conflict:
                    continue
                self.store.audit(actor, f"rollout.{action}", f"rollout:{rollout_id}",
                                 {"reason": reason} if reason else None, now=self.clock())
                self._advance(rollout_id)
                return self.store.get_rollout(rollout_id)
        raise Conflict(f"rollout {rollout_id} kept changing under us; try again")

    # -- the ticker -------------------------------------------------------------------------

    def tick(self) -> int:
        """Advance every rollout that may move; returns how many changed."""
        changed = 0
        now = self.clock()
        with self._lock:
            for summary in self.store.list_rollouts():
                if summary.state in ACTIVE_STATES or (summary.finished_at or now) > now - TRACK_FINISHED_S:
                    try:
                        changed += self._advance(summary.id)
                    except Exception:  # one broken rollout must not stop the others
                        log.exception("rollout %d: tick failed", summary.id)
        return changed

    # -- inside -----------------------------------------------------------------------------

    def _advance(self, rollout_id: int) -> int:
        """Decide and apply until nothing changes (a wave that ends may start the next)."""
        changed = 0
        for _ in range(10):
            record = self.store.get_rollout(rollout_id)
            if record.state not in ACTIVE_STATES and not any(
                    s.state in ("updating", "waiting", "reverting") for s in record.steps):
                return changed
            decision = machine.decide(record, self._facts(record), self._gates(record), self.clock())
            if decision.empty:
                return changed
            try:
                self._apply(record, decision)
            except Conflict:
                self.conflicts += 1
                return changed
            changed = 1
        return changed

    def _apply(self, record: RolloutRecord, decision: Decision) -> None:
        now = self.clock()
        steps = {d: dict(f) for d, f in decision.steps.items()}
        if decision.assign:
            changes: dict[str, dict[str, Optional[Assignment]]] = {}
            for device, version in decision.assign.items():
                changes[device] = {record.model: None if version is None else self._assignment(device, record.model, version)}
            generations = self.store.set_assignments(changes, now=now)
            for device, generation in generations.items():
                if decision.assign.get(device) == record.version:
                    steps.setdefault(device, {})["generation"] = generation
        self.store.update_rollout(record.id, record.revision, fields=dict(decision.fields), steps=steps, now=now)
        for note in decision.notes:
            log.info("rollout %d (%s@%s): %s", record.id, record.model, record.version, note)
            self.notes.append(f"rollout {record.id}: {note}")
        del self.notes[:-200]
        if decision.assign:
            self.publish_desired(sorted(decision.assign))

    def _assignment(self, device: str, model: str, version: str) -> Assignment:
        # keep the route the placement planner chose; only the version changes
        for a in self.store.assignments(device):
            if a.model == model:
                return Assignment(device, model, version, a.route, a.install)
        return Assignment(device, model, version)

    def _current_version(self, device: str, model: str) -> Optional[str]:
        for a in self.store.assignments(device):
            if a.model == model:
                return a.version
        try:
            return self.store.get_device(device).active_version(model)
        except NotFound:
            return None

    def _facts(self, record: RolloutRecord) -> dict[str, DeviceFacts]:
        facts: dict[str, DeviceFacts] = {}
        for step in record.steps:
            try:
                device = self.store.get_device(step.device_id)
            except NotFound:
                facts[step.device_id] = DeviceFacts(step.device_id, online=False, active_version=None)
                continue
            failure = None
            if step.state in ("updating", "waiting") and step.started_at is not None:
                failure = self._failure(step.device_id, record, since=step.started_at, generation=step.generation)
            facts[step.device_id] = DeviceFacts(
                step.device_id, online=device.online, active_version=device.active_version(record.model),
                reported_generation=device.reported_generation, failure=failure,
            )
        return facts

    def _failure(self, device_id: str, record: RolloutRecord, *, since: float,
                 generation: Optional[int]) -> Optional[tuple[str, Optional[str]]]:
        for event in self.store.recent_events(device_id=device_id, since=since, limit=200):
            if event.get("step") not in FAILURE_STEPS:
                continue
            if event.get("model") == record.model and event.get("version") == record.version:
                return str(event.get("reason") or event["step"]), event.get("detail")
            # a desired document refused as a whole (trust, decode) carries its generation
            if event.get("step") == "rejected" and generation is not None and event.get("generation") == generation:
                return str(event.get("reason") or "rejected"), event.get("detail")
        return None

    def _gates(self, record: RolloutRecord) -> Gates:
        started = [s.device_id for s in record.steps if s.state not in ("pending",)]
        if record.state not in ("running", "paused") or not started:
            return Gates()
        since = min((s.started_at for s in record.steps if s.started_at is not None), default=record.created_at)
        new = self.store.model_window(record.model, record.version, devices=started, since=since)
        previous = Counter(s.previous_version for s in record.steps if s.previous_version)
        if not previous:
            return Gates(new=new)
        baseline_version = previous.most_common(1)[0][0]
        baseline = self.store.model_window(record.model, baseline_version, since=record.created_at - BASELINE_WINDOW_S)
        return Gates(new=new, baseline=baseline)
