"""The migration driver: reads migrations and node facts from the store, asks the pure state
machine (``migration.decide``) what to do, and applies it -- assignments (new desired
generations, then signed and published), then the migration's fields (compare-and-set).

Like ``rollouts.RolloutDriver``: everything lives in the store, so a restarted controller
(or another replica) carries a migration on from where it stands. A crash between the
assignments and the CAS is harmless (the same assignment again changes nothing); a lost
CAS is dropped and the next tick decides again from fresh facts. Desired documents are
published after both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Optional

from controller import migration as machine
from controller.migration import ACTIVE_STATES, Decision, Facts, NodeFacts, Timeouts
from controller.store import Assignment, Conflict, MigrationRecord, NotFound, Store

__all__ = ["MigrationDriver"]

log = logging.getLogger(__name__)

FAILURE_STEPS = ("rolled_back", "refused", "rejected")


class MigrationDriver:
    """See the module docstring. ``publish_desired(device_ids)`` signs and publishes."""

    def __init__(self, store: Store, publish_desired: Callable[[Iterable[str]], Any], *,
                 clock: Callable[[], float], timeouts: Optional[Timeouts] = None) -> None:
        self.store = store
        self.publish_desired = publish_desired
        self.clock = clock
        self.timeouts = timeouts or Timeouts()
        self.notes: list[str] = []  # the latest lines, for logs and tests
        self.conflicts = 0
        self._lock = threading.RLock()

    # -- the console's operations -----------------------------------------------------------

    def create(self, model: str, source: str, to: str, *, actor: str, reason: Optional[str] = None,
               prediction: Optional[dict[str, Any]] = None,
               timeouts: Optional[dict[str, Any]] = None) -> MigrationRecord:
        """Start moving ``source``'s calls of ``model`` to executor ``to``.

        Raises:
            NotFound: no such device (source or target), or the source has no assignment of
                the model. Conflict: a migration of (model, source) is active; the target
                runs another version or forwards the model elsewhere. ValueError: ``to`` is
                where the calls already go; bad timeouts.
        """
        t = Timeouts.from_dict({**self.timeouts.to_dict(), **(timeouts or {})})
        self.store.get_device(source)
        self.store.get_device(to)
        mine = self._assignment(source, model)
        if mine is None:
            raise NotFound(f"{source} has no assignment of {model}: deploy it there first (fleetctl deploy "
                           f"{model}@VERSION --to {source})")
        from_node = source if mine.route == machine.LOCAL else mine.route
        if from_node == to:
            raise ValueError(f"{source}'s calls of {model} already go to {to}: nothing to migrate")
        target_had = to == source and mine.install
        if to != source:
            theirs = self._assignment(to, model)
            if theirs is not None and theirs.version != mine.version:
                raise Conflict(f"{to} is assigned {model}@{theirs.version} but {source} runs {mine.version}: "
                               f"deploy one version to both first")
            if theirs is not None and theirs.route != machine.LOCAL:
                raise Conflict(f"{to} forwards {model} to {theirs.route}: it cannot execute it for {source}; "
                               f"migrate {to} back to local first")
            target_had = theirs is not None
        now = self.clock()
        with self._lock:
            record = self.store.create_migration(
                model=model, version=mine.version, source=source, from_node=from_node, to_node=to,
                target_had=target_had, timeouts=t.to_dict(), reason=reason, prediction=prediction,
                created_by=actor, now=now)
            self.store.audit(actor, "migrate", f"migration:{record.id}",
                             {"model": model, "source": source, "from": from_node, "to": to, "reason": reason},
                             now=now)
            self._advance(record.id)
        return self.store.get_migration(record.id)

    def abort(self, migration_id: int, *, actor: str, reason: Optional[str] = None) -> MigrationRecord:
        """Raises NotFound; ValueError when it cannot be aborted any more."""
        with self._lock:
            for _ in range(5):
                record = self.store.get_migration(migration_id)
                decision = machine.abort(record, now=self.clock(), reason=reason)
                try:
                    self._apply(record, decision)
                except Conflict:
                    continue
                self.store.audit(actor, "migration.abort", f"migration:{migration_id}",
                                 {"reason": reason} if reason else None, now=self.clock())
                self._advance(migration_id)
                return self.store.get_migration(migration_id)
        raise Conflict(f"migration {migration_id} kept changing under us; try again")

    def active_workloads(self) -> set[tuple[str, str]]:
        """(model, source) of every active migration."""
        return {(m.model, m.source) for m in self.store.list_migrations(states=ACTIVE_STATES)}

    # -- the ticker -------------------------------------------------------------------------

    def tick(self) -> int:
        """Advance every active migration; returns how many changed."""
        changed = 0
        with self._lock:
            for m in self.store.list_migrations(states=ACTIVE_STATES):
                try:
                    changed += self._advance(m.id)
                except Exception:  # one broken migration must not stop the others
                    log.exception("migration %d: tick failed", m.id)
        return changed

    # -- inside -----------------------------------------------------------------------------

    def _advance(self, migration_id: int) -> int:
        changed = 0
        for _ in range(10):
            record = self.store.get_migration(migration_id)
            if record.state not in ACTIVE_STATES:
                return changed
            decision = machine.decide(record, self._facts(record), self.clock())
            if decision.empty:
                return changed
            try:
                self._apply(record, decision)
            except Conflict:
                self.conflicts += 1
                return changed
            changed = 1
        return changed

    def _apply(self, record: MigrationRecord, decision: Decision) -> None:
        now = self.clock()
        if decision.assign:
            changes: dict[str, dict[str, Optional[Assignment]]] = {}
            for device, a in decision.assign.items():
                changes[device] = {record.model: None if a is None else
                                   Assignment(device, record.model, record.version, a.route, a.install)}
            self.store.set_assignments(changes, now=now)
        self.store.update_migration(record.id, record.revision, fields=dict(decision.fields), now=now)
        for note in decision.notes:
            log.info("migration %d (%s for %s: %s -> %s): %s", record.id, record.model, record.source,
                     record.from_node, record.to_node, note)
            self.notes.append(f"migration {record.id}: {note}")
        del self.notes[:-200]
        if decision.assign:
            self.publish_desired(sorted(decision.assign))

    def _assignment(self, device: str, model: str) -> Optional[Assignment]:
        return next((a for a in self.store.assignments(device) if a.model == model), None)

    def _node(self, device_id: str, record: MigrationRecord, *, failures_since: Optional[float]) -> NodeFacts:
        try:
            device = self.store.get_device(device_id)
        except NotFound:
            return NodeFacts()
        entry = device.reported.get(record.model)
        failure = None
        if failures_since is not None:
            for event in self.store.recent_events(device_id=device_id, since=failures_since, limit=200):
                if (event.get("step") in FAILURE_STEPS and event.get("model") == record.model
                        and event.get("version") == record.version):
                    failure = (str(event.get("reason") or event["step"]), event.get("detail"))
                    break
        return NodeFacts(
            online=device.online,
            active_version=(entry or {}).get("active"),
            route=None if entry is None else (entry.get("route") or machine.LOCAL),
            failure=failure,
        )

    def _facts(self, record: MigrationRecord) -> Facts:
        since = record.step_started_at if record.state in ("deploying", "switching") else None
        in_use = 0
        if record.from_node != record.source:
            in_use = sum(1 for a in self.store.all_assignments(record.model)
                         if a.device_id != record.source and a.route == record.from_node)
            in_use += sum(1 for m in self.store.list_migrations(states=ACTIVE_STATES, model=record.model)
                          if m.id != record.id and m.to_node == record.from_node)
            try:  # an edge device's own applications may call its copy: only a cloud node is unloaded
                if self.store.get_device(record.from_node).tier != "cloud":
                    in_use += 1
            except NotFound:
                pass
        return Facts(
            source=self._node(record.source, record, failures_since=None),
            target=self._node(record.to_node, record, failures_since=since),
            origin=self._node(record.from_node, record, failures_since=None),
            from_in_use=in_use,
        )
