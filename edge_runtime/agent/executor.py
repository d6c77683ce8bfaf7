"""Runs a reconcile plan: each step through the installer, the engine, the transfers and the
route table, with an event for what happened.

``reconcile.plan`` decides over plain data; this module is where the decision touches the
device. It gathers the planner's inputs (store, engine, running transfers, blobs, routes),
runs the actions in the plan's order, and skips the rest of a model's steps when one of them
fails (other models go on). Fetches do not block: a fetch starts a transfer and returns;
when the transfer ends, ``transfer_finished`` hands the bytes to the installer (or gives the
download up with the transfer's reason) and the next plan goes on from there.

Events: the installer reports every state it enters (``Installer.on_event``); ``installer_event``
turns those into wire events, so a model's install is reported step by step (downloading,
verifying, staged, loading, health_check, active | rolled_back | refused) with the reason
and the health figures. A ``Refuse`` hold is reported once per generation and model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

from edge_runtime.agent import reconcile
from edge_runtime.agent.reconcile import Activate, Fetch, Install, Plan, Refuse, Remove, Route, Step
from edge_runtime.agent.reporter import Reporter
from edge_runtime.agent.routes import RouteTable
from edge_runtime.agent.transfer import Progress
from edge_runtime.agent.transfers import Job, Transfers
from edge_runtime.engine import Engine
from edge_runtime.errors import EdgeRuntimeError, InstallError
from edge_runtime.installer import Installer
from edge_runtime.protocol.messages import STEPS, DesiredState
from edge_runtime.runtime import serving
from edge_runtime.store import ModelStore

log = logging.getLogger(__name__)

# Installer states that are wire steps as they are; the others are reported differently.
_WIRE_STATES = frozenset(STEPS) - {"fallback"}


class Executor:
    """Plans and runs reconcile steps for one device."""

    def __init__(
        self,
        installer: Installer,
        transfers: Transfers,
        reporter: Reporter,
        routes: RouteTable,
        *,
        generation: Callable[[], Optional[int]] = lambda: None,
        max_artifact_bytes: Optional[int] = None,
    ) -> None:
        self.installer = installer
        self.store: ModelStore = installer.store
        self.engine: Engine = installer.engine
        self.transfers = transfers
        self.reporter = reporter
        self.routes = routes
        self._generation = generation
        self.max_artifact_bytes = max_artifact_bytes  # this device's limit (config limits.max_artifact_bytes)
        self._refusals: set[tuple[Optional[int], str, str, str]] = set()
        self._quiet: Optional[tuple[str, str]] = None  # an abandon the executor reports itself
        installer.on_event = self.installer_event
        transfers.on_progress = self.transfer_progress

    # -- planning -----------------------------------------------------------------------

    def plan(self, desired: Optional[DesiredState]) -> Plan:
        """The plan from the device's current state to ``desired`` (reads store and engine)."""
        return reconcile.plan(
            desired,
            self.store.read(),
            serving=serving(self.engine),
            transfers_in_progress=self.transfers.busy(),
            blobs_present=self.store.blobs.list(),
            routes=self.routes.all(),
            max_artifact_bytes=self.max_artifact_bytes,
        )

    def report(self) -> reconcile.ReportedState:
        """``DeviceState.models``: what the device holds now."""
        return reconcile.report(self.store.read(), serving(self.engine), routes=self.routes.all())

    # -- running ------------------------------------------------------------------------

    def run(self, plan: Plan) -> bool:
        """Run every action of ``plan`` and report its refusals; True if anything was tried."""
        failed: set[str] = set()
        tried = False
        for step in plan.steps:
            if step.name in failed:
                continue
            if isinstance(step, Refuse):
                self._report_refusal(plan.generation, step)
                continue
            if not isinstance(step, reconcile.ACTIONS):
                continue
            tried = True
            try:
                self._run(step, plan.generation)
            except Exception as exc:  # one model's failure must not stop the others
                failed.add(step.name)
                self._failed(step, exc, plan.generation)
        return tried

    def _run(self, step: Step, generation: Optional[int]) -> None:
        if isinstance(step, Remove):
            self._remove(step.name, generation)
        elif isinstance(step, Fetch):
            self._fetch(step)
        elif isinstance(step, Install):
            self.installer.install_blob(step.name, step.version, step.sha256,
                                        health=step.health.to_health_check() if step.health else None)
        elif isinstance(step, Activate):
            self.installer.activate_version(step.name, step.version)
        elif isinstance(step, Route):
            self.routes.set(step.name, step.target)
            self.reporter.event("routed", model=step.name, generation=generation, detail=f"calls go to {step.target}")

    def _fetch(self, step: Fetch) -> None:
        part = self.installer.begin_download(
            step.name, step.version, expected_sha256=step.sha256, expected_size=step.size,
            health=step.health.to_health_check() if step.health else None,
        )
        self.transfers.start(step.name, step.version, step.sha256, step.size, part, resume=False)

    def _remove(self, name: str, generation: Optional[int]) -> None:
        for job in self.transfers.cancel(model=name):
            log.info("cancelled the transfer of %s for %s: the model is no longer desired", job.sha256[:12], name)
        self.engine.unload(name)
        self.routes.set(name, "local")
        self.store.remove_model(name)
        self.store.gc()
        self.reporter.event("removed", model=name, generation=generation)

    def _failed(self, step: Step, exc: BaseException, generation: Optional[int]) -> None:
        if isinstance(exc, InstallError):
            return  # the installer already reported it (refused / rolled_back, with its reason)
        reason = getattr(exc, "reason", None) or getattr(exc, "code", None) or "internal"
        version = getattr(step, "version", None)
        if not isinstance(exc, EdgeRuntimeError):
            log.exception("%s of %s failed", type(step).__name__, step.name)
        self.reporter.event("refused", model=step.name, version=version, generation=generation,
                            reason=str(reason), detail=f"{type(step).__name__.lower()}: {exc}")

    def _report_refusal(self, generation: Optional[int], step: Refuse) -> None:
        key = (generation, step.name, step.version, step.reason)
        if key in self._refusals:
            return
        self._refusals.add(key)
        self.reporter.event("refused", model=step.name, version=step.version, generation=generation,
                            reason=step.reason, detail=step.detail)

    # -- transfers ----------------------------------------------------------------------

    def resume_downloads(self, desired: Optional[DesiredState]) -> list[str]:
        """At start-up: continue every download a restart interrupted that is still
        desired (from its bitmap); give up the others. Returns the models resumed."""
        resumed = []
        for name, record in self.installer.pending_downloads():
            spec = desired.models.get(name) if desired is not None else None
            wanted = (spec is not None and spec.install and spec.version == record.version
                      and record.sha256 == spec.manifest.sha256 and record.size is not None)
            if not wanted or record.sha256 is None or record.size is None:
                self.installer.abandon_download(name, record.version, reason="interrupted",
                                                detail="the restarted device no longer wants this version")
                continue
            part = self.store.layout.part(record.token)
            job = self.transfers.start(name, record.version, record.sha256, record.size, part, resume=True)
            log.info("resumed the transfer of %s %s: %d of %d chunks on disk", name, record.version,
                     job.transfer.counters.resumed_chunks, job.transfer.n_chunks)
            resumed.append(name)
        return resumed

    def transfer_finished(self) -> bool:
        """Install what finished downloading; give up failed downloads. True if any ended."""
        jobs = self.transfers.finished()
        for job in jobs:
            err = job.transfer.error
            c = job.transfer.counters
            if err is None:
                # The transfer's own account, so a controller (and a test) can tell a clean
                # resume from one that fetched chunks again.
                self.reporter.event(
                    "downloading", model=job.name, version=job.version, progress=1.0, generation=self._generation(),
                    figures={"bytes": job.size, "size": job.size, "requested": c.requested, "retried": c.retried,
                             "timeouts": c.timeouts, "duplicates": c.duplicates, "resumed_chunks": c.resumed_chunks,
                             "chunks_total": job.transfer.n_chunks})
                try:
                    self.installer.install_downloaded(job.name, job.version)
                except InstallError:
                    pass  # reported by the installer
                except Exception as exc:
                    log.exception("installing %s %s failed", job.name, job.version)
                    self.reporter.event("refused", model=job.name, version=job.version, reason="internal",
                                        detail=str(exc), generation=self._generation())
                continue
            self._quiet = (job.name, job.version)  # reported below, with the transfer's figures
            try:
                self.installer.abandon_download(job.name, job.version, reason=err.reason, detail=str(err))
            finally:
                self._quiet = None
            self.reporter.event(
                "refused", model=job.name, version=job.version, reason=err.reason, detail=str(err),
                generation=self._generation(),
                figures={"retryable": err.retryable, "bytes": job.transfer.bytes_done, "size": job.size,
                         "requested": c.requested, "retried": c.retried, "timeouts": c.timeouts},
            )
        return bool(jobs)

    def transfer_progress(self, job: Job, progress: Progress) -> None:
        if progress.state != "running" or (progress.bytes_done == 0 and job.transfer.counters.resumed_chunks == 0):
            return  # the start is the installer's "downloading", the end its next state
        self.reporter.event("downloading", model=job.name, version=job.version, progress=progress.fraction,
                            generation=self._generation(),
                            figures={"bytes": progress.bytes_done, "size": progress.size,
                                     "chunks": progress.chunks_done, "chunks_total": progress.chunks_total})

    # -- installer events ---------------------------------------------------------------

    def installer_event(self, name: str, state: str, details: dict[str, Any]) -> None:
        """The installer's step reports as wire events."""
        version = details.get("version")
        if state == "refused" and self._quiet == (name, version):
            return
        figures = details.get("figures") or {}
        if state == "recovered":
            outcome = details.get("outcome")
            if outcome == "rolled_back":
                reason, _, detail = str(details.get("detail") or "crash_loop").partition(": ")
                self.reporter.event("rolled_back", model=name, version=version, reason=reason, detail=detail)
            return
        if state not in _WIRE_STATES:
            log.info("%s: %s %s", name, state, details.get("detail", ""))
            return
        if state == "downloading" and details.get("size") is not None:
            figures = {"size": details["size"]}
        self.reporter.event(
            state, model=name, version=version, generation=self._generation(),
            reason=details.get("reason"), detail=details.get("detail"), figures=figures,
            progress=0.0 if state == "downloading" else None,
        )


__all__ = ["Executor"]
