"""The reconcile plan (agent/reconcile.py): desired vs actual -> steps, one named case per
row, then hypothesis: executing a plan on an in-memory store and planning again converges,
and nothing but ``Remove`` touches a model the desired state does not name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.agent import reconcile as r
from edge_runtime.protocol import messages as m
from edge_runtime.protocol.signed import Target
from edge_runtime.store.state import (
    INSTALL_STATES,
    InstallRecord,
    LastResult,
    ModelState,
    StoreState,
    VersionRecord,
    state_problems,
    with_active,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SIGNATURE = m.ModelSignature(
    inputs=[m.SignatureTensor(name="x", dtype="float32", shape=[1, 4])],
    outputs=[m.SignatureTensor(name="y", dtype="float32", shape=[1, 2])],
)


def sha(name: str, version: str, *, evil: bool = False) -> str:
    """The sha256 a release of ``name`` ``version`` has (``evil``: other bytes, same version)."""
    return hashlib.sha256(f"{name}-{version}{'-evil' if evil else ''}".encode()).hexdigest()


def spec(name: str, version: str, *, route: str = m.LOCAL, install: bool = True, evil: bool = False) -> m.ModelSpec:
    manifest = m.ModelManifest(name=name, version=version, sha256=sha(name, version, evil=evil), size=1000,
                               signature=SIGNATURE)
    return m.ModelSpec(version=version, manifest=manifest, route=route, install=install)


def desired(*specs: m.ModelSpec, generation: int = 1) -> m.DesiredState:
    return m.DesiredState(issued_at=T0, expires=T0 + timedelta(days=1), target=Target(device="pi-1"),
                          generation=generation, models={s.manifest.name: s for s in specs})


def model(
    name: str,
    *versions: str,
    evil: tuple[str, ...] = (),
    install: Optional[tuple[str, str]] = None,
    last: Optional[tuple[str, str, Optional[str]]] = None,
) -> tuple[str, ModelState]:
    """``versions``: active first, then previous (newest first). ``install``: (version, state)
    in progress. ``last``: (version, outcome, reason) of the last install."""
    records = {v: VersionRecord(sha256=sha(name, v, evil=v in evil), size=1000, installed_at=T0) for v in versions}
    return name, ModelState(
        active=versions[0] if versions else None,
        previous=list(versions[1:]),
        versions=records,
        install=None if install is None else InstallRecord(
            version=install[0], token="00112233aabbccdd", sha256=sha(name, install[0]), size=1000,
            state=install[1], started_at=T0),
        last_result=None if last is None else LastResult(version=last[0], outcome=last[1], reason=last[2], at=T0),
    )


def store(*models: tuple[str, ModelState]) -> StoreState:
    state = StoreState(models=dict(models))
    assert state_problems(state) == []
    return state


def serving_of(state: StoreState) -> dict[str, tuple[str, str]]:
    """What the engine serves once the runtime has synced it to the store."""
    return {n: (mo.active, mo.versions[mo.active].sha256) for n, mo in state.models.items() if mo.active}


def brief(step: r.Step) -> str:
    """A step as the tables spell it: ``kind name [version|target] [reason|why]``."""
    kind = type(step).__name__.lower()
    if isinstance(step, r.Route):
        return f"route {step.name} {step.target}"
    if isinstance(step, r.Remove):
        return f"remove {step.name}"
    extra = f" {step.reason}" if isinstance(step, r.Refuse) else f" {step.why}" if isinstance(step, r.Noop) else ""
    return f"{kind} {step.name} {step.version}{extra}"


# -- the table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    desired: Optional[m.DesiredState]
    actual: StoreState
    expected: list[str]
    transfers: frozenset[str] = frozenset()
    blobs: frozenset[str] = frozenset()
    routes: dict[str, str] = field(default_factory=dict)
    serving: Optional[dict[str, tuple[str, str]]] = None  # None: what the store has active


CASES = [
    Case("fresh_device", desired(spec("kws", "1")), store(), ["fetch kws 1"]),
    Case("no_desired_state_yet_keeps_everything", None, store(model("kws", "1")), []),
    Case("new_version", desired(spec("kws", "2")), store(model("kws", "1")), ["fetch kws 2"]),
    Case("new_version_blob_already_here", desired(spec("kws", "2")), store(model("kws", "1")), ["install kws 2"],
         blobs=frozenset({sha("kws", "2")})),
    Case("same_version_noop", desired(spec("kws", "1")), store(model("kws", "1", "0")), []),
    Case("rollback_to_previous", desired(spec("kws", "1")), store(model("kws", "2", "1")), ["activate kws 1"]),
    Case("route_change_only", desired(spec("kws", "1", route="node-a")), store(model("kws", "1")),
         ["route kws node-a"]),
    Case("route_back_to_local", desired(spec("kws", "1")), store(model("kws", "1")), ["route kws local"],
         routes={"kws": "node-a"}),
    Case("route_between_nodes", desired(spec("kws", "1", route="node-b")), store(model("kws", "1")),
         ["route kws node-b"], routes={"kws": "node-a"}),
    Case("routed_elsewhere_without_a_copy", desired(spec("kws", "1", route="node-a", install=False)), store(),
         ["route kws node-a"]),
    Case("no_copy_wanted_keeps_the_one_on_disk", desired(spec("kws", "2", route="node-a", install=False)),
         store(model("kws", "1")), [], routes={"kws": "node-a"}),
    Case("route_to_local_after_its_install", desired(spec("kws", "1")), store(), ["fetch kws 1", "route kws local"],
         routes={"kws": "node-a"}),
    Case("route_to_local_waits_for_a_copy", desired(spec("kws", "1")),
         store(model("kws", last=("1", "rolled_back", "health_check_failed"))),
         ["refuse kws 1 health_check_failed"], routes={"kws": "node-a"}),
    Case("new_version_and_route", desired(spec("kws", "2", route="node-a")), store(model("kws", "1")),
         ["fetch kws 2", "route kws node-a"]),
    Case("removed_model", desired(spec("kws", "1")), store(model("kws", "1"), model("old", "3")), ["remove old"]),
    Case("removed_model_only_routed", desired(), store(), ["remove old"], routes={"old": "node-a"}),
    Case("removed_model_only_served", desired(), store(), ["remove old"], serving={"old": ("1", sha("old", "1"))}),
    Case("removed_model_with_install_in_progress", desired(), store(model("old", "1", install=("2", "downloading"))),
         ["remove old"]),
    Case("empty_desired_state_removes_everything", desired(), store(model("b", "1"), model("a", "1")),
         ["remove a", "remove b"]),
    Case("hash_mismatch_active", desired(spec("kws", "1", evil=True)), store(model("kws", "1")),
         ["refuse kws 1 hash_mismatch"]),
    Case("hash_mismatch_previous", desired(spec("kws", "1")), store(model("kws", "2", "1", evil=("1",))),
         ["refuse kws 1 hash_mismatch"]),
    Case("hash_mismatch_still_routes", desired(spec("kws", "1", route="node-a", evil=True)), store(model("kws", "1")),
         ["refuse kws 1 hash_mismatch", "route kws node-a"]),
    Case("failed_version_not_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "rolled_back", "health_check_failed"))),
         ["refuse kws 2 health_check_failed"], blobs=frozenset({sha("kws", "2")})),
    Case("crash_loop_not_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "rolled_back", "crash_loop"))),
         ["refuse kws 2 crash_loop"]),
    Case("load_failure_not_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "rolled_back", "load_failed"))),
         ["refuse kws 2 load_failed"]),
    Case("invalid_model_not_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "refused", "invalid_model"))),
         ["refuse kws 2 invalid_model"]),
    Case("failed_version_retried_once_desired_changes", desired(spec("kws", "3")),
         store(model("kws", "1", last=("2", "rolled_back", "health_check_failed"))), ["fetch kws 3"]),
    Case("failed_earlier_version_may_be_rolled_back_to", desired(spec("kws", "1")),
         store(model("kws", "2", "1", last=("3", "rolled_back", "crash_loop"))), ["activate kws 1"]),
    Case("quota_exceeded_is_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "refused", "quota_exceeded"))),
         ["fetch kws 2"]),
    Case("interrupted_is_retried", desired(spec("kws", "2")),
         store(model("kws", "1", last=("2", "interrupted", "interrupted"))),
         ["fetch kws 2"]),
    Case("transfer_in_progress_not_duplicated", desired(spec("kws", "2")), store(model("kws", "1")),
         ["noop kws 2 transfer_in_progress"], transfers=frozenset({sha("kws", "2")})),
    Case("install_in_progress_not_duplicated", desired(spec("kws", "2")),
         store(model("kws", "1", install=("2", "downloading"))), ["noop kws 2 install_in_progress"],
         transfers=frozenset({sha("kws", "2")})),
    Case("stale_install_finishes_first", desired(spec("kws", "3")), store(model("kws", "1", install=("2", "loading"))),
         ["noop kws 3 install_in_progress"], blobs=frozenset({sha("kws", "2"), sha("kws", "3")})),
    Case("active_wins_over_an_install_record", desired(spec("kws", "1")),
         store(model("kws", "1", install=("2", "staged"))),
         []),
    Case("several_models_ordering", desired(spec("c", "1"), spec("a", "2", route="node-a"), spec("b", "1")),
         store(model("z", "1"), model("a", "1"), model("y", "1"), model("c", "1")),
         ["remove y", "remove z", "fetch a 2", "route a node-a", "install b 1"], blobs=frozenset({sha("b", "1")})),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan(case: Case) -> None:
    serving = serving_of(case.actual) if case.serving is None else case.serving
    before = case.actual.model_dump()
    got = r.plan(case.desired, case.actual, serving=serving, transfers_in_progress=case.transfers,
                 blobs_present=case.blobs, routes=case.routes)
    assert [brief(s) for s in got] == case.expected
    assert case.actual.model_dump() == before  # pure: the input is untouched
    assert got.generation == (case.desired.generation if case.desired else None)


def test_two_models_sharing_one_artifact_fetch_it_once() -> None:
    # "kws" and "kws-b" name the same bytes: one transfer; the other model waits for the blob
    a = spec("kws", "2")
    b = m.ModelSpec(version="2", manifest=a.manifest.model_copy(update={"name": "kws-b"}))
    want = desired(a, b)
    got = r.plan(want, store(), serving={}, transfers_in_progress=(), blobs_present=())
    assert [brief(s) for s in got.steps] == ["fetch kws 2", "noop kws-b 2 transfer_in_progress"]
    # once the blob is there, the other one installs from it without a transfer
    got = r.plan(want, store(model("kws", "2")), serving={}, transfers_in_progress=(), blobs_present={sha("kws", "2")})
    assert [brief(s) for s in got.steps] == ["install kws-b 2"]


def test_case_names_are_distinct() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


def test_steps_carry_what_the_installer_needs() -> None:
    health = m.HealthSpec.of({"x": np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)})
    man = m.ModelManifest(name="kws", version="2", sha256=sha("kws", "2"), size=4321, signature=SIGNATURE,
                          health=health, sources=["https://mirror.example/kws-2.tflite"])
    want = desired(m.ModelSpec(version="2", manifest=man))
    (fetch,) = r.plan(want, store(), serving={})
    assert fetch == r.Fetch("kws", "2", sha("kws", "2"), 4321, health, ("https://mirror.example/kws-2.tflite",))
    (install,) = r.plan(want, store(), serving={}, blobs_present={sha("kws", "2")})
    assert install == r.Install("kws", "2", sha("kws", "2"), health)


def test_refusal_reasons_and_events_are_on_the_wire() -> None:
    weird = store(model("kws", "1", last=("2", "rolled_back", "cosmic_ray")))
    (refuse,) = r.plan(desired(spec("kws", "2")), weird, serving={})
    assert isinstance(refuse, r.Refuse) and refuse.reason == "internal"
    assert "cosmic_ray" in refuse.detail and "not retried" in refuse.detail
    for kind in (*r.ACTIONS, *r.HOLDS):
        assert kind.event is None or kind.event in m.STEPS
    assert set(r.FINAL_REFUSALS) <= set(m.REASONS)
    # a refusal becomes a valid event
    m.Event(seq=1, at=T0, step=refuse.event, model=refuse.name, version=refuse.version, reason=refuse.reason,
            detail=refuse.detail)


def test_actions_and_holds() -> None:
    state = store(model("a", "1"), model("b", "1"), model("gone", "1"))
    want = desired(spec("a", "1", evil=True), spec("b", "2"), spec("c", "1"))
    got = r.plan(want, state, serving=serving_of(state), transfers_in_progress={sha("c", "1")})
    assert [brief(s) for s in got.actions] == ["remove gone", "fetch b 2"]
    assert [brief(s) for s in got.holds] == ["refuse a 1 hash_mismatch", "noop c 1 transfer_in_progress"]
    assert [brief(s) for s in got.for_model("b")] == ["fetch b 2"]
    assert len(got) == 4


# -- report ------------------------------------------------------------------------------


def test_report_lists_what_is_held() -> None:
    state = store(model("kws", "3", "2"), model("det", install=("1", "verifying")),
                  model("failed", last=("1", "refused", "invalid_model")))
    got = r.report(state, serving_of(state), routes={"kws": "node-a", "remote": "node-b"})
    assert got == {
        "kws": m.InstalledModel(active="3", route="node-a", versions=[
            m.InstalledVersion(version="3", sha256=sha("kws", "3"), size=1000),
            m.InstalledVersion(version="2", sha256=sha("kws", "2"), size=1000)]),
        "det": m.InstalledModel(install=m.InstallProgress(version="1", state="verifying")),
        "remote": m.InstalledModel(route="node-b"),
    }
    # it fits the retained state message
    birth = m.DeviceState(online=True, boot_id="b1", bd_seq=0, runtime_version="0.1.0",
                          capabilities=m.Capabilities(cores=4, memory_bytes=1 << 30), models=got)
    assert m.decode("state", m.encode(birth)) == birth


def test_report_says_which_version_answers_calls() -> None:
    state = store(model("kws", "3", "2"))
    fallback = {"kws": ("2", sha("kws", "2"))}  # the active blob is damaged; the engine serves the previous
    assert r.report(state, fallback)["kws"].active == "2"
    assert r.report(state, {})["kws"].active == "3"  # not loaded (yet): the store's word
    assert r.report(state, {"kws": ("2", sha("kws", "2", evil=True))})["kws"].active == "3"


# -- the property: convergence on an in-memory store -------------------------------------

NAMES = ("a", "b", "c", "d")
VERSIONS = ("1", "2", "3")
NODES = ("node-a", "node-b")
KEEP_PREVIOUS = 2
OUTCOMES = ("active", "refused", "interrupted", "rolled_back", "rolled_back")  # rollbacks twice as likely


@dataclass
class World:
    """The device as the plan sees it, small enough to execute steps on."""

    state: StoreState
    serving: dict[str, tuple[str, str]]
    routes: dict[str, str]
    blobs: set[str]
    transfers: set[str]

    def plan(self, want: Optional[m.DesiredState]) -> r.Plan:
        return r.plan(want, self.state, serving=self.serving, transfers_in_progress=self.transfers,
                      blobs_present=self.blobs, routes=self.routes)

    def execute(self, plan: r.Plan) -> None:
        """Run every action as if it succeeded; holds do nothing."""
        models = dict(self.state.models)
        for step in plan.actions:
            current = models.get(step.name) or ModelState()
            if isinstance(step, (r.Fetch, r.Install)):
                assert current.install is None, "an install while one is in progress"
                held = current.versions.get(step.version)
                assert held is None or held.sha256 == step.sha256, "version_conflict: a version's bytes changed"
                if isinstance(step, r.Fetch):
                    assert step.sha256 not in self.transfers, "a second transfer of one artifact"
                    self.blobs.add(step.sha256)
                record = VersionRecord(sha256=step.sha256, size=1000, installed_at=T0)
                models[step.name] = with_active(current, step.version, keep_previous=KEEP_PREVIOUS, record=record)
            elif isinstance(step, r.Activate):
                models[step.name] = with_active(current, step.version, keep_previous=KEEP_PREVIOUS)
            elif isinstance(step, r.Route):
                if step.target == m.LOCAL:
                    assert (models.get(step.name) or ModelState()).active, "routed here with nothing to serve"
                self.routes[step.name] = step.target
            elif isinstance(step, r.Remove):
                models.pop(step.name, None)
                self.routes.pop(step.name, None)
                self.serving.pop(step.name, None)
        self.state = StoreState(models=models)
        assert state_problems(self.state) == []
        self.serving = serving_of(self.state)  # the runtime syncs the engine to the store


@st.composite
def model_states(draw: Any, name: str) -> ModelState:
    held = draw(st.lists(st.sampled_from(VERSIONS), unique=True, max_size=3))
    records = {v: VersionRecord(sha256=sha(name, v, evil=draw(st.booleans()) and draw(st.booleans())), size=1000,
                                installed_at=T0) for v in held}
    install = None
    if draw(st.integers(0, 3)) == 0:
        v = draw(st.sampled_from(VERSIONS))
        install = InstallRecord(version=v, token="00112233aabbccdd", sha256=sha(name, v), size=1000,
                                state=draw(st.sampled_from(INSTALL_STATES)), started_at=T0)
    last = None
    if draw(st.integers(0, 3)):
        last = LastResult(version=draw(st.sampled_from(VERSIONS)),
                          outcome=draw(st.sampled_from(OUTCOMES)),
                          reason=draw(st.sampled_from([None, "health_check_failed", "crash_loop", "invalid_model",
                                                       "quota_exceeded", "hash_mismatch", "interrupted"])),
                          at=T0)
    return ModelState(active=held[0] if held else None, previous=held[1:], versions=records, install=install,
                      last_result=last)


@st.composite
def worlds(draw: Any) -> tuple[Optional[m.DesiredState], World]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    state = StoreState(models={n: draw(model_states(n)) for n in names})
    serving = {n: v for n, v in serving_of(state).items() if draw(st.booleans())}  # some not loaded yet
    if draw(st.booleans()):
        serving["stray"] = ("1", sha("stray", "1"))  # served, but the store has forgotten it
    routed = draw(st.lists(st.sampled_from(NAMES + ("x",)), unique=True))
    routes = {n: draw(st.sampled_from((m.LOCAL, *NODES))) for n in routed}
    every_sha = sorted({sha(n, v, evil=e) for n in NAMES for v in VERSIONS for e in (False, True)})
    blobs = set(draw(st.lists(st.sampled_from(every_sha), unique=True)))
    transfers = set(draw(st.lists(st.sampled_from(every_sha), unique=True, max_size=4)))
    want = None
    if draw(st.integers(0, 9)):  # mostly a desired state
        specs = []
        for n in draw(st.lists(st.sampled_from(NAMES), unique=True)):
            route = draw(st.sampled_from((m.LOCAL, *NODES)))
            specs.append(spec(n, draw(st.sampled_from(VERSIONS)), route=route,
                              install=route == m.LOCAL or draw(st.booleans()), evil=draw(st.integers(0, 5)) == 0))
        want = desired(*specs)
    return want, World(state, serving, routes, blobs, transfers)


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(worlds())
def test_executing_a_plan_converges(case: tuple[Optional[m.DesiredState], World]) -> None:
    want, world = case
    first = world.plan(want)
    assert world.plan(want) == first  # deterministic
    world.execute(first)
    second = world.plan(want)
    assert second.actions == ()
    assert second.holds == first.holds  # refusals and waits stand until their cause changes
    if want is None:
        return
    held = {s.name for s in second.holds}
    for name, s in want.models.items():
        if name in held:
            continue
        if s.install:
            held_model = world.state.models[name]
            assert held_model.active == s.version
            assert held_model.versions[s.version].sha256 == s.manifest.sha256  # the signed bytes, no others
        assert world.routes.get(name, m.LOCAL) == s.route
    # nothing the desired state omits is left behind
    assert set(world.state.models) | set(world.serving) <= set(want.models)
    assert {n for n, t in world.routes.items() if t != m.LOCAL} <= set(want.models)


@PROPERTY
@given(worlds())
def test_plans_touch_only_desired_models_except_remove(case: tuple[Optional[m.DesiredState], World]) -> None:
    want, world = case
    before = (world.state.model_dump(), dict(world.serving), dict(world.routes), set(world.blobs))
    got = world.plan(want)
    assert (world.state.model_dump(), world.serving, world.routes, world.blobs) == before  # pure
    if want is None:
        assert got.steps == ()
        return
    for step in got:
        assert (step.name in want.models) != isinstance(step, r.Remove), step
    names = [s.name for s in got]
    removes = [s.name for s in got if isinstance(s, r.Remove)]
    assert names[:len(removes)] == sorted(removes)  # removes first, by name
    rest = names[len(removes):]
    assert rest == sorted(rest)  # then model by model, by name
    for name in set(rest):
        steps = got.for_model(name)
        assert sum(isinstance(s, (r.Fetch, r.Install, r.Activate, r.Refuse, r.Noop)) for s in steps) <= 1
        assert sum(isinstance(s, r.Route) for s in steps) <= 1
        assert isinstance(steps[-1], r.Route) or len(steps) == 1  # the route after the version step


def test_an_artifact_over_the_device_limit_is_refused_not_fetched() -> None:
    want = desired(spec("kws", "2"))  # size 1000
    (refuse,) = r.plan(want, store(), serving={}, max_artifact_bytes=999)
    assert isinstance(refuse, r.Refuse) and refuse.reason == "too_large" and "999" in refuse.detail
    (fetch,) = r.plan(want, store(), serving={}, max_artifact_bytes=1000)
    assert isinstance(fetch, r.Fetch)
    # bytes already here are installed whatever their size: the limit is about fetching
    (install,) = r.plan(want, store(), serving={}, blobs_present={sha("kws", "2")}, max_artifact_bytes=1)
    assert isinstance(install, r.Install)
