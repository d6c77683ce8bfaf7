"""Make-before-break migration as pure functions: decide one step of moving the calls of a
workload (model, source device) from executor A (``from_node``) to executor B
(``to_node``) from plain facts and the time. No I/O, no clock: the driver
(``migrations.py``) reads the store, calls ``decide``, and applies the ``Decision``.

An executor is named by its node (device) id; the source's *route* for it is ``"local"``
when the executor is the source itself, else the executor's id.

States (persisted in ``migrations.state``; every step has a deadline):

    pending ─► deploying ─► switching ─► unloading ─► done
                  │             │
                  └──── any step failing ───► reverting ─► reverted
                                                  └─(source never confirms)─► failed

    deploying   B runs the model: when B lacks it, an assignment on B (route local, install)
                is added; waits until B reports the version active. (B = the source itself:
                the source's own assignment keeps its route and gets ``install``.)
    switching   the source's assignment routes to B (``install`` kept: calls fall back to the
                local copy when B is unreachable); waits until the source reports route == B.
    unloading   when A is not the source and nothing else routes to A (``Facts.from_in_use``
                counts other devices' assignments routed to A, other active migrations
                onto it, and -- in the driver -- A's own applications when A is an edge
                device rather than a cloud node): A's assignment is removed; waits until A reports the model gone
                (or is offline: its retained desired state unloads it when it returns).
                A deadline here ends ``done`` with failure ``unload_unconfirmed`` -- the
                calls already moved, so nothing is reverted.
    reverting   the source's route goes back to A, and B's assignment is removed when this
                migration added it; waits until the source reports route == A -> reverted,
                past the deadline -> failed (``revert_unconfirmed``).

What fails a step (deploying and switching): B offline (``target_offline``); B reporting a
failure for (model, version) since the step started (``target_failed``: rolled_back,
refused, rejected); B no longer running the version while switching (``target_failed``);
the step's deadline (``deploy_timeout``, ``switch_timeout``); the operator (``aborted``).

Choices the driver and the console can rely on:

- Assignments are emitted only on a transition (entering deploying, switching, unloading,
  reverting), so ``decide`` on the record its decision produced, with the same facts and
  time, is empty. Applying a transition's assignment twice (a crash between the assignment
  and the compare-and-set) changes nothing the second time.
- ``decide`` computes a fixpoint: B already running the version goes pending -> deploying
  -> switching in one decision.
- Deadlines are ``now + Timeouts.<step>`` when the step starts; ``now > deadline`` fails it.
- The failure codes are ``FAILURES``; each has a row in docs/operations.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from controller.store import MigrationRecord

STATES = ("pending", "deploying", "switching", "unloading", "done", "reverting", "reverted", "failed")
ACTIVE_STATES = ("pending", "deploying", "switching", "unloading", "reverting")
FINAL_STATES = ("done", "reverted", "failed")
FAILURES = ("target_offline", "target_failed", "deploy_timeout", "switch_timeout", "revert_unconfirmed",
            "unload_unconfirmed", "aborted")
LOCAL = "local"

_COLUMNS = ("state", "step_started_at", "deadline", "failure", "detail", "finished_at")


@dataclass(frozen=True)
class Timeouts:
    """Seconds each step may take.

    Raises (on construction):
        ValueError: a value that is not a finite number > 0 (the message names it).
    """

    deploy_s: float = 300.0
    switch_s: float = 120.0
    unload_s: float = 120.0
    revert_s: float = 300.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"timeouts.{f.name}: expected seconds > 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Timeouts":
        """Missing fields take their defaults; unknown ones are refused (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError(f"timeouts: expected an object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"timeouts: unknown field(s) {', '.join(map(repr, unknown))} (expected some of "
                             f"{', '.join(known)})")
        return cls(**data)


@dataclass(frozen=True)
class NodeFacts:
    """What the controller knows of one node for the migration's model."""

    online: bool = False
    active_version: Optional[str] = None  # the version it reports active (None: not running it)
    route: Optional[str] = None  # the route it reports for the model (None: it does not hold it)
    # A failure it reported for (model, version) since the current step started: (reason, detail).
    failure: Optional[tuple[str, Optional[str]]] = None


@dataclass(frozen=True)
class Facts:
    source: NodeFacts = field(default_factory=NodeFacts)
    target: NodeFacts = field(default_factory=NodeFacts)  # B
    origin: NodeFacts = field(default_factory=NodeFacts)  # A
    from_in_use: int = 0  # other workloads routed to A (other devices' assignments, other migrations onto A)


@dataclass(frozen=True)
class Assign:
    """One device's assignment of the migration's model: route and install (the version is
    the migration's)."""

    route: str
    install: bool = True


@dataclass(frozen=True)
class Decision:
    """What to change: ``assign`` {device_id: Assign | None (remove the model)}; ``fields``:
    migration columns; ``notes``: one line per thing that happened."""

    assign: dict[str, Optional[Assign]] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.assign or self.fields)


def route_to(record: MigrationRecord, node: str) -> str:
    """The source's route value for executor ``node``."""
    return LOCAL if node == record.source else node


class _Work:
    def __init__(self, record: MigrationRecord) -> None:
        self.record = record
        self.timeouts = Timeouts.from_dict(record.timeouts)
        self.fields = {name: getattr(record, name) for name in _COLUMNS}
        self.assign: dict[str, Optional[Assign]] = {}
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

    def step(self, state: str, now: float, timeout: Optional[float]) -> None:
        self.set(state=state, step_started_at=now, deadline=None if timeout is None else now + timeout)

    def finish(self, state: str, now: float, failure: Optional[str] = None, detail: Optional[str] = None) -> None:
        self.set(state=state, deadline=None, finished_at=now)
        if failure is not None:
            self.set(failure=failure, detail=detail)

    def decision(self) -> Decision:
        changed = {k: v for k, v in self.fields.items() if getattr(self.record, k) != v}
        return Decision(assign=dict(self.assign), fields=changed, notes=tuple(self.notes))


def _revert(w: _Work, now: float, failure: str, detail: Optional[str]) -> None:
    r = w.record
    w.set(failure=failure, detail=detail)
    w.step("reverting", now, w.timeouts.revert_s)
    w.assign[r.source] = Assign(route_to(r, r.from_node), install=True)
    if not r.target_had and r.to_node != r.source:
        w.assign[r.to_node] = None
    what = f" ({detail})" if detail else ""
    w.notes.append(f"{failure}{what}: reverting {r.source}'s route to {r.from_node}")


def _target_problem(w: _Work, facts: Facts, *, running: bool) -> Optional[tuple[str, Optional[str]]]:
    """Why B cannot take the calls, or None. ``running``: B must already run the version."""
    r, b = w.record, facts.target
    if not b.online:
        return "target_offline", f"{r.to_node} is offline"
    if b.failure is not None and b.active_version != r.version:
        reason, detail = b.failure
        return "target_failed", f"{r.to_node}: {reason}" + (f" ({detail})" if detail else "")
    if running and b.active_version != r.version:
        return "target_failed", f"{r.to_node} no longer runs {r.model}@{r.version}"
    return None


def _pass(w: _Work, facts: Facts, now: float) -> None:
    r = w.record
    state = w.state
    if state == "pending":
        w.step("deploying", now, w.timeouts.deploy_s)
        if r.to_node == r.source:
            w.assign[r.source] = Assign(route_to(r, r.from_node), install=True)
        elif not r.target_had:
            w.assign[r.to_node] = Assign(LOCAL, install=True)
        w.notes.append(f"deploying {r.model}@{r.version} to {r.to_node}"
                       + ("" if r.to_node == r.source or not r.target_had else " (it has it already)"))
    elif state == "deploying":
        problem = _target_problem(w, facts, running=False)
        if problem is not None:
            _revert(w, now, *problem)
        elif facts.target.active_version == r.version:
            w.step("switching", now, w.timeouts.switch_s)
            w.assign[r.source] = Assign(route_to(r, r.to_node), install=True)
            w.notes.append(f"{r.to_node} runs {r.model}@{r.version}: switching {r.source}'s route to it")
        elif now > (w.fields["deadline"] or math.inf):
            _revert(w, now, "deploy_timeout", f"{r.to_node} not active within {w.timeouts.deploy_s:g}s")
    elif state == "switching":
        problem = _target_problem(w, facts, running=True)
        if facts.source.route == route_to(r, r.to_node):
            if r.from_node == r.source or facts.from_in_use:
                kept = "" if r.from_node == r.source else \
                    f"; {r.from_node} keeps it ({facts.from_in_use} other workload(s) use it)"
                w.finish("done", now)
                w.notes.append(f"{r.source} routes to {r.to_node}: done{kept}")
            else:
                w.step("unloading", now, w.timeouts.unload_s)
                w.assign[r.from_node] = None
                w.notes.append(f"{r.source} routes to {r.to_node}: unloading {r.model} from {r.from_node}")
        elif problem is not None:
            _revert(w, now, *problem)
        elif now > (w.fields["deadline"] or math.inf):
            _revert(w, now, "switch_timeout", f"{r.source} did not confirm the route within {w.timeouts.switch_s:g}s")
    elif state == "unloading":
        a = facts.origin
        if a.active_version is None and a.route is None:
            w.finish("done", now)
            w.notes.append(f"{r.from_node} unloaded {r.model}: done")
        elif not a.online:
            w.finish("done", now)
            w.notes.append(f"{r.from_node} is offline: it unloads {r.model} when it returns; done")
        elif now > (w.fields["deadline"] or math.inf):
            w.finish("done", now, "unload_unconfirmed",
                     f"{r.from_node} did not confirm the unload within {w.timeouts.unload_s:g}s")
            w.notes.append(f"done; {r.from_node} did not confirm the unload")
    elif state == "reverting":
        if facts.source.route == route_to(r, r.from_node):
            w.finish("reverted", now)
            w.notes.append(f"{r.source} routes to {r.from_node} again: reverted")
        elif now > (w.fields["deadline"] or math.inf):
            w.finish("failed", now)
            w.set(detail=f"{w.fields['failure']}: {w.fields['detail'] or ''}; then {r.source} did not confirm "
                         f"the route back to {r.from_node} within {w.timeouts.revert_s:g}s")
            w.set(failure="revert_unconfirmed")
            w.notes.append(f"failed: {r.source} never confirmed the route back to {r.from_node}")


def decide(record: MigrationRecord, facts: Facts, now: float) -> Decision:
    """One step of ``record`` given the facts and the time. Pure; calling it again with the
    same facts and time on the record its decision produced gives an empty decision.

    Raises:
        ValueError: the record's timeouts are invalid (the message names the field).
    """
    w = _Work(record)
    for _ in range(len(STATES) + 2):  # each pass moves the state forward or changes nothing
        before = w.changes
        _pass(w, facts, now)
        if w.changes == before:
            return w.decision()
    raise RuntimeError(f"migration {record.id}: decide() did not settle (a bug in the transitions)")


def abort(record: MigrationRecord, *, now: float, reason: Optional[str] = None) -> Decision:
    """The operator's abort: a migration that has not switched yet reverts (failure
    ``aborted``).

    Raises:
        ValueError: it has switched already (unloading), or it is finished or reverting.
    """
    if record.state not in ("pending", "deploying", "switching"):
        raise ValueError(f"cannot abort migration {record.id}: it is {record.state}; only a pending, deploying or "
                         "switching migration can be aborted (once switched, migrate it back instead)")
    w = _Work(record)
    _revert(w, now, "aborted", reason or "aborted by operator")
    return w.decision()
