"""What the device should do to reach its desired state: a plan, decided over plain data.

Pure: no I/O, no clock, inputs never changed. The agent reads the store, the engine, its
routes and its transfers, calls ``plan``, then runs the steps through the installer, the
engine and the transfer manager, publishing an event per step (``Step.event``). Like
``runtime.plan_sync`` and ``store.recovery.plan_recovery``, the decision is a function that
tests drive with tables and hypothesis, no broker, no files.

Steps (frozen dataclasses; every one names its model):

    step       when                                            runs as (installer / agent)        event
    Fetch      desired version's blob is not here, no          begin_download, chunk transfer,    downloading
               transfer of it running                          install_downloaded
    Install    the blob is here, the version is not installed  install_blob                       verifying
    Activate   the version is installed, not active (e.g. a    activate_version                   active
               rollback the controller ordered)
    Route      where calls go changes (local <-> a node)       switch the API's route             routed
    Remove     a model the desired state no longer names       unload, forget route, drop the     removed
                                                               store record (gc frees the blobs)
    Refuse     the desired version cannot be installed here:   nothing; publish once per          refused
               ``hash_mismatch`` (installed with other bytes)  generation and model
               or it already failed here (its reason)
    Noop       the model differs from desired, but work in     nothing: wait for it
               flight will get it there (``why``)

``Fetch``, ``Install``, ``Activate``, ``Route`` and ``Remove`` are *actions* (they change
something); ``Refuse`` and ``Noop`` are *holds*, derived again from the same inputs each
time. The contract: executing every action successfully and planning again yields no
actions (only the same holds). ``Plan.actions`` / ``Plan.holds`` split them.

Rules:

- **No desired state yet** (``None``): nothing at all. A device provisioned offline keeps
  serving what ``edge-runtime install`` put there; only a verified document steers it.
- **Absent means removed.** Once a desired state exists it is the whole truth, as the
  ``DesiredState`` docstring says and as Kubernetes and device twins do: a model it does not
  name (in the store, served, or routed to a node) gets ``Remove`` — unloaded, its route
  dropped, its store record deleted so ``gc`` reclaims the blobs. A model installed by hand
  on a steered device is therefore removed by the next reconcile. ``Remove`` is the only
  step that ever names a model the desired state does not mention.
- **A version's bytes never change.** Desired ``name@version`` with a sha256 other than the
  one installed (active or previous) → ``Refuse(reason="hash_mismatch")``; nothing is
  fetched, the installed bytes stay.
- **No endless retries.** If the store's last install result is for exactly the desired
  version and ended ``rolled_back`` (``health_check_failed``, ``crash_loop``,
  ``load_failed``) or ``refused`` for a reason fixed by the bytes (``invalid_model``,
  ``hash_mismatch``, ``version_conflict``, ``invalid_request``) → ``Refuse`` with that
  reason, until the desired version changes. Failures that may pass (``quota_exceeded``,
  ``interrupted``, transfer timeouts, ``install_in_progress``) are retried on the next
  reconcile. The controller retries a failed version by releasing a new one.
- **At most one install per model**, and none while one is in progress: an install record
  in the store (any state) → ``Noop(why="install_in_progress")``, even when it is for an
  older desired version (it finishes or rolls back first; the installer has no abort).
  ``Fetch``, ``Install`` and ``Activate`` are alternatives: at most one of them per model.
- **One transfer per artifact.** A desired sha256 already being transferred (by any model:
  blobs are content-addressed), or fetched by an earlier model of the same plan →
  ``Noop(why="transfer_in_progress")``, never a second ``Fetch``.
- **Routes.** ``route`` is compared with the current one (``routes``, absent = ``local``).
  Moving calls away from here is immediate (make-before-break is the controller's job: it
  routes here to a node only once that node serves the model). Moving them *to* local waits
  until something will be active here: an active version now, or a Fetch/Install/Activate
  earlier in this plan. ``install: false`` means hold no copy: no Fetch/Install/Activate; a
  copy already on disk is kept (calls fall back to it when the executor is unreachable).
- **Order** is deterministic: every ``Remove`` first (frees memory and quota before new
  bytes arrive), by name; then each desired model by name, its version step before its
  ``Route``. The agent runs a model's steps in order and skips the rest of that model's
  steps when one fails; other models go on.

``report`` builds the ``models`` part of the device's retained ``state`` message.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from edge_runtime.protocol.messages import (
    LOCAL,
    REASONS,
    DesiredState,
    HealthSpec,
    InstalledModel,
    InstalledVersion,
    InstallProgress,
    ModelSpec,
)
from edge_runtime.store.state import ModelState, StoreState

# Install results that the same bytes would produce again: retrying them cannot help.
FINAL_ROLLED_BACK = "rolled_back"  # any reason: health_check_failed, crash_loop, load_failed
FINAL_REFUSALS: frozenset[str] = frozenset({"invalid_model", "hash_mismatch", "version_conflict", "invalid_request"})
MAX_REPORTED_VERSIONS = 16  # InstalledModel.versions' limit

ReportedState = dict[str, InstalledModel]
"""``DeviceState.models``: what the device holds, by model name."""


# -- steps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """Transfer the artifact, then install it (``begin_download`` … ``install_downloaded``)."""

    event: ClassVar[str] = "downloading"
    name: str
    version: str
    sha256: str
    size: int
    health: Optional[HealthSpec] = field(default=None, compare=True, repr=False)
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Install:
    """Install a blob already in the store (``install_blob``)."""

    event: ClassVar[str] = "verifying"
    name: str
    version: str
    sha256: str
    health: Optional[HealthSpec] = field(default=None, compare=True, repr=False)


@dataclass(frozen=True)
class Activate:
    """Serve an installed version again (``activate_version``)."""

    event: ClassVar[str] = "active"
    name: str
    version: str


@dataclass(frozen=True)
class Route:
    """Send the model's calls to ``target`` (``local`` or an executor node)."""

    event: ClassVar[str] = "routed"
    name: str
    target: str


@dataclass(frozen=True)
class Remove:
    """Unload the model, forget its route, drop its store record (gc frees the blobs)."""

    event: ClassVar[str] = "removed"
    name: str


@dataclass(frozen=True)
class Refuse:
    """The desired version will not be installed; ``reason`` is one of ``messages.REASONS``."""

    event: ClassVar[str] = "refused"
    name: str
    version: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Noop:
    """Differs from desired, but work already in flight (``why``) will get it there."""

    event: ClassVar[Optional[str]] = None
    name: str
    version: str
    why: str  # install_in_progress | transfer_in_progress


Step = Union[Fetch, Install, Activate, Route, Remove, Refuse, Noop]
ACTIONS: tuple[type, ...] = (Fetch, Install, Activate, Route, Remove)
HOLDS: tuple[type, ...] = (Refuse, Noop)
_VERSION_STEPS = (Fetch, Install, Activate)


@dataclass(frozen=True)
class Plan:
    """The ordered steps for one desired generation (None: no desired state yet)."""

    steps: tuple[Step, ...] = ()
    generation: Optional[int] = None

    @property
    def actions(self) -> tuple[Step, ...]:
        """The steps that change something; empty once the device has converged."""
        return tuple(s for s in self.steps if isinstance(s, ACTIONS))

    @property
    def holds(self) -> tuple[Step, ...]:
        """Refusals and waits: reported, nothing to run."""
        return tuple(s for s in self.steps if isinstance(s, HOLDS))

    def for_model(self, name: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.name == name)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


# -- planning ----------------------------------------------------------------------------


def plan(
    desired: Optional[DesiredState],
    actual: StoreState,
    *,
    serving: Mapping[str, tuple[str, str]],
    transfers_in_progress: Collection[str] = (),
    blobs_present: Collection[str] = (),
    routes: Optional[Mapping[str, str]] = None,
    max_artifact_bytes: Optional[int] = None,
) -> Plan:
    """The steps that take ``actual`` to ``desired``.

    ``serving``: model name → (version, sha256) the engine serves now. ``transfers_in_progress``:
    sha256 of every artifact being transferred. ``blobs_present``: sha256 of every blob in
    the store. ``routes``: model name → where its calls go now (absent: ``local``).
    """
    if desired is None:
        return Plan()
    routes = routes or {}
    transfers = frozenset(transfers_in_progress)
    blobs = frozenset(blobs_present)
    steps: list[Step] = []

    held = set(actual.models) | set(serving) | {n for n, target in routes.items() if target != LOCAL}
    steps.extend(Remove(name) for name in sorted(held - set(desired.models)))

    for name, spec in sorted(desired.models.items()):
        model = actual.models.get(name) or ModelState()
        version_step = _version_step(name, spec, model, transfers, blobs, max_artifact_bytes) if spec.install else None
        if isinstance(version_step, Fetch):
            # two models sharing one artifact: the first fetches it, the other waits for the blob
            transfers = transfers | {version_step.sha256}
        if version_step is not None:
            steps.append(version_step)
        current = routes.get(name, LOCAL)
        if spec.route != current:
            will_serve_here = model.active is not None or isinstance(version_step, _VERSION_STEPS)
            if spec.route != LOCAL or will_serve_here:
                steps.append(Route(name, spec.route))
    return Plan(tuple(steps), desired.generation)


def _version_step(
    name: str, spec: ModelSpec, model: ModelState, transfers: frozenset[str], blobs: frozenset[str],
    max_artifact_bytes: Optional[int] = None,
) -> Optional[Step]:
    """The one step (or none) that makes ``spec.version`` active for ``name``."""
    manifest = spec.manifest
    version, sha = spec.version, manifest.sha256
    record = model.versions.get(version)
    if record is not None and record.sha256 != sha:
        return Refuse(name, version, "hash_mismatch",
                      f"{name} {version} is installed with sha256 {record.sha256}, the desired state says {sha}; "
                      "a version's bytes never change")
    if model.active == version and record is not None:
        return None
    if model.install is not None:
        return Noop(name, version, "install_in_progress")
    failed = _final_failure(name, model, version)
    if failed is not None:
        return failed
    if record is not None:
        return Activate(name, version)
    if sha in blobs:
        return Install(name, version, sha, manifest.health)
    if sha in transfers:
        return Noop(name, version, "transfer_in_progress")
    if max_artifact_bytes is not None and manifest.size > max_artifact_bytes:
        return Refuse(name, version, "too_large",
                      f"{name} {version} is {manifest.size} bytes; this device takes artifacts of at most "
                      f"{max_artifact_bytes} (limits.max_artifact_bytes)")
    return Fetch(name, version, sha, manifest.size, manifest.health, tuple(manifest.sources))


def _final_failure(name: str, model: ModelState, version: str) -> Optional[Refuse]:
    """A refusal when the last install of exactly ``version`` failed in a way that repeats."""
    last = model.last_result
    if last is None or last.version != version:
        return None
    final = last.outcome == FINAL_ROLLED_BACK or (last.outcome == "refused" and last.reason in FINAL_REFUSALS)
    if not final:
        return None
    reason = last.reason if last.reason in REASONS else "internal"
    detail = (f"version {version} {last.outcome.replace('_', ' ')} here ({last.reason}); "
              "not retried until the desired version changes")
    if last.detail:
        detail += f": {last.detail}"
    return Refuse(name, version, reason, detail[:2000])


# -- reporting ---------------------------------------------------------------------------


def report(
    actual: StoreState,
    serving: Mapping[str, tuple[str, str]],
    *,
    routes: Optional[Mapping[str, str]] = None,
) -> ReportedState:
    """``DeviceState.models`` from the store: per model the active version, every version on
    disk (active first, then previous, newest first), the route and an install in progress.

    ``active`` is what answers calls: the engine's version when it serves one of the installed
    versions (it falls back to a previous one when the active blob is damaged), else the
    store's. A model routed to a node with nothing on disk is reported with its route only.
    """
    routes = routes or {}
    out: ReportedState = {}
    for name in sorted(set(actual.models) | {n for n, t in routes.items() if t != LOCAL}):
        model = actual.models.get(name) or ModelState()
        order = [v for v in [model.active, *model.previous] if v is not None and v in model.versions]
        order += sorted(set(model.versions) - set(order))
        versions = [
            InstalledVersion(version=v, sha256=model.versions[v].sha256, size=model.versions[v].size)
            for v in order[:MAX_REPORTED_VERSIONS]
        ]
        active = model.active
        now = serving.get(name)
        if now is not None and now[0] in model.versions and model.versions[now[0]].sha256 == now[1]:
            active = now[0]
        install = None
        if model.install is not None:
            install = InstallProgress(version=model.install.version, state=model.install.state)
        if active is None and not versions and install is None and routes.get(name, LOCAL) == LOCAL:
            continue  # only a past result: nothing held, nothing to report
        out[name] = InstalledModel(active=active, versions=versions, route=routes.get(name, LOCAL), install=install)
    return out


__all__ = [
    "ACTIONS", "FINAL_REFUSALS", "HOLDS",
    "Activate", "Fetch", "Install", "Noop", "Plan", "Refuse", "Remove", "ReportedState", "Route", "Step",
    "plan", "report",
]
