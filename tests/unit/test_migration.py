"""The migration state machine (controller/migration.py) as pure functions: every state,
every step's deadline, every revert path, the operator's abort, and (hypothesis) that a
decision applied and decided again with the same facts and time changes nothing and that
every run ends in a final state."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import migration as mg
from controller.migration import Assign, Decision, Facts, NodeFacts, Timeouts
from controller.store import MigrationRecord

T0 = 1_000.0
V = "2"
T = Timeouts(deploy_s=30, switch_s=20, unload_s=10, revert_s=40)


def make(*, source: str = "cam", from_node: str = "cam", to_node: str = "cloud", target_had: bool = False,
         state: str = "pending", **kw: Any) -> MigrationRecord:
    base = dict(id=1, model="kws", version=V, source=source, from_node=from_node, to_node=to_node,
                target_had=target_had, state=state, timeouts=T.to_dict(), step_started_at=None, deadline=None,
                reason="test", prediction=None, failure=None, detail=None, created_at=T0, updated_at=T0,
                finished_at=None, created_by="t", revision=0)
    base.update(kw)
    return MigrationRecord(**base)


def apply(record: MigrationRecord, decision: Decision) -> MigrationRecord:
    return dataclasses.replace(record, **decision.fields, revision=record.revision + 1)


def node(active: Optional[str] = V, route: Optional[str] = "local", *, online: bool = True,
         failure: Optional[tuple[str, Optional[str]]] = None) -> NodeFacts:
    return NodeFacts(online=online, active_version=active, route=route, failure=failure)


GONE = NodeFacts(online=True, active_version=None, route=None)


def facts(*, source: NodeFacts = node(), target: NodeFacts = GONE, origin: Optional[NodeFacts] = None,
          in_use: int = 0) -> Facts:
    return Facts(source=source, target=target, origin=origin if origin is not None else source, from_in_use=in_use)


def step(record: MigrationRecord, f: Facts, now: float) -> tuple[MigrationRecord, Decision]:
    d = mg.decide(record, f, now)
    after = apply(record, d)
    again = mg.decide(after, f, now)
    assert again.empty, (d, again)  # a fixpoint: the same facts and time change nothing more
    return after, d


# -- the happy paths ------------------------------------------------------------------------


def test_local_to_cloud_deploys_then_switches_then_completes() -> None:
    r = make()
    r, d = step(r, facts(), T0)
    assert r.state == "deploying" and r.deadline == T0 + 30 and r.step_started_at == T0
    assert d.assign == {"cloud": Assign("local", True)}
    # the target installs: nothing moves until it reports the version active
    r, d = step(r, facts(target=node(None, None)), T0 + 5)
    assert d.empty and r.state == "deploying"
    r, d = step(r, facts(target=node()), T0 + 6)
    assert r.state == "switching" and r.deadline == T0 + 26
    assert d.assign == {"cam": Assign("cloud", True)}  # the local copy stays for fallback
    r, d = step(r, facts(target=node()), T0 + 7)
    assert d.empty
    # the source confirms: A is the source itself, nothing to unload
    r, d = step(r, facts(source=node(V, "cloud"), target=node()), T0 + 8)
    assert r.state == "done" and r.finished_at == T0 + 8 and r.failure is None and not d.assign


def test_cloud_to_peer_unloads_the_old_executor_when_nothing_else_uses_it() -> None:
    r = make(from_node="cloud-1", to_node="cloud-2")
    src = node(V, "cloud-1")
    r, d = step(r, facts(source=src, origin=node()), T0)
    r, d = step(r, facts(source=src, target=node(), origin=node()), T0 + 1)
    assert r.state == "switching" and d.assign == {"cam": Assign("cloud-2", True)}
    r, d = step(r, facts(source=node(V, "cloud-2"), target=node(), origin=node()), T0 + 2)
    assert r.state == "unloading" and d.assign == {"cloud-1": None} and r.deadline == T0 + 12
    r, d = step(r, facts(source=node(V, "cloud-2"), target=node(), origin=node()), T0 + 3)
    assert d.empty
    r, d = step(r, facts(source=node(V, "cloud-2"), target=node(), origin=GONE), T0 + 4)
    assert r.state == "done" and r.failure is None


def test_an_old_executor_still_in_use_is_kept() -> None:
    r = make(from_node="cloud-1", to_node="cloud-2", state="switching", deadline=T0 + 20, step_started_at=T0)
    r, d = step(r, facts(source=node(V, "cloud-2"), target=node(), origin=node(), in_use=2), T0 + 1)
    assert r.state == "done" and not d.assign
    assert "keeps it (2 other workload(s)" in d.notes[0]


def test_unloading_an_offline_or_silent_old_executor_still_completes() -> None:
    base = make(from_node="cloud-1", state="unloading", deadline=T0 + 10, step_started_at=T0)
    src = node(V, "cloud")
    r, _ = step(base, facts(source=src, target=node(), origin=node(online=False)), T0 + 1)
    assert r.state == "done" and r.failure is None
    r, _ = step(base, facts(source=src, target=node(), origin=node()), T0 + 10)  # at the deadline: still waiting
    assert r.state == "unloading"
    r, _ = step(base, facts(source=src, target=node(), origin=node()), T0 + 10.5)
    assert r.state == "done" and r.failure == "unload_unconfirmed"


def test_a_target_already_running_it_is_switched_in_one_decision() -> None:
    r, d = step(make(target_had=True), facts(target=node()), T0)
    assert r.state == "switching" and d.assign == {"cam": Assign("cloud", True)}  # B's assignment untouched


def test_back_to_local_keeps_the_route_until_the_source_runs_it() -> None:
    r = make(from_node="cloud", to_node="cam", target_had=False)
    src = node(None, "cloud")  # routed away without a local copy
    r, d = step(r, facts(source=src, target=src, origin=node()), T0)
    assert r.state == "deploying" and d.assign == {"cam": Assign("cloud", True)}  # install, same route
    src = node(V, "cloud")
    r, d = step(r, facts(source=src, target=src, origin=node()), T0 + 1)
    assert r.state == "switching" and d.assign == {"cam": Assign("local", True)}
    src = node(V, "local")
    r, d = step(r, facts(source=src, target=src, origin=node()), T0 + 2)
    assert r.state == "unloading" and d.assign == {"cloud": None}


# -- the revert paths -----------------------------------------------------------------------


def deploying(**kw: Any) -> MigrationRecord:
    return make(state="deploying", step_started_at=T0, deadline=T0 + 30, **kw)


def switching(**kw: Any) -> MigrationRecord:
    return make(state="switching", step_started_at=T0, deadline=T0 + 20, **kw)


QUIET = NodeFacts(online=False)  # the source says nothing (yet): the revert waits for it


@pytest.mark.parametrize("name,record,f,now,failure", [
    ("deploy deadline", deploying(), facts(source=QUIET, target=node(None, None)), T0 + 30.1, "deploy_timeout"),
    ("target offline while deploying", deploying(), facts(source=QUIET, target=node(None, None, online=False)), T0 + 1,
     "target_offline"),
    ("target reports a failure", deploying(),
     facts(source=QUIET, target=node("1", "local", failure=("health_check_failed", "nan"))), T0 + 1, "target_failed"),
    ("switch deadline", switching(), facts(source=QUIET, target=node()), T0 + 20.1, "switch_timeout"),
    ("target offline while switching", switching(), facts(source=QUIET, target=node(online=False)), T0 + 1,
     "target_offline"),
    ("target stopped running it", switching(), facts(source=QUIET, target=node("1")), T0 + 1, "target_failed"),
])
def test_a_failing_step_reverts_the_route_and_removes_what_it_added(name: str, record: MigrationRecord, f: Facts,
                                                                    now: float, failure: str) -> None:
    r, d = step(record, f, now)
    assert r.state == "reverting" and r.failure == failure, name
    assert r.deadline == now + 40 and r.detail
    assert d.assign == {"cam": Assign("local", True), "cloud": None}, name


def test_a_source_that_never_switched_is_reverted_in_one_decision() -> None:
    r, d = step(deploying(), facts(target=node(None, None)), T0 + 31)
    assert r.state == "reverted" and r.failure == "deploy_timeout" and r.finished_at == T0 + 31
    assert d.assign == {"cam": Assign("local", True), "cloud": None}  # re-asserted: harmless when unchanged


def test_a_target_that_had_the_model_keeps_it_on_revert() -> None:
    r, d = step(deploying(target_had=True), facts(target=node(None, None, online=False)), T0 + 1)
    assert d.assign == {"cam": Assign("local", True)}


def test_a_failure_event_is_ignored_once_the_version_runs() -> None:
    # an earlier attempt failed, a retry succeeded: it runs the version, so it is good
    r, d = step(deploying(), facts(target=node(V, failure=("rolled_back", None))), T0 + 1)
    assert r.state == "switching"


def test_reverting_ends_reverted_when_the_source_confirms_else_failed() -> None:
    rev = make(state="reverting", step_started_at=T0, deadline=T0 + 40, failure="deploy_timeout", detail="slow")
    r, d = step(rev, facts(source=node(V, "cloud")), T0 + 1)
    assert d.empty
    r, d = step(rev, facts(source=node(V, "local")), T0 + 2)
    assert r.state == "reverted" and r.failure == "deploy_timeout" and r.finished_at == T0 + 2
    r, d = step(rev, facts(source=node(V, "cloud", online=False)), T0 + 41)
    assert r.state == "failed" and r.failure == "revert_unconfirmed" and "deploy_timeout" in r.detail


def test_the_source_confirming_wins_over_a_target_gone_afterwards() -> None:
    r, _ = step(switching(), facts(source=node(V, "cloud"), target=node(online=False)), T0 + 1)
    assert r.state == "done"


def test_final_states_never_move() -> None:
    for state in mg.FINAL_STATES:
        assert mg.decide(make(state=state), facts(target=node(online=False)), T0 + 1e6).empty


# -- the operator's abort -------------------------------------------------------------------


@pytest.mark.parametrize("state", ["pending", "deploying", "switching"])
def test_abort_reverts_before_the_switch(state: str) -> None:
    d = mg.abort(make(state=state, deadline=T0 + 5), now=T0 + 1, reason="maintenance")
    assert d.fields["state"] == "reverting" and d.fields["failure"] == "aborted" and d.fields["detail"] == "maintenance"
    assert d.assign == {"cam": Assign("local", True), "cloud": None}


@pytest.mark.parametrize("state", ["unloading", "reverting", "done", "reverted", "failed"])
def test_abort_refused_after_the_switch(state: str) -> None:
    with pytest.raises(ValueError, match=f"it is {state}"):
        mg.abort(make(state=state), now=T0)


def test_timeouts_round_trip_and_refusals() -> None:
    assert Timeouts.from_dict(T.to_dict()) == T
    assert Timeouts.from_dict({}) == Timeouts()
    for bad in ({"deploy_s": 0}, {"switch_s": -1}, {"unload_s": float("nan")}, {"revert_s": True}):
        with pytest.raises(ValueError, match="timeouts."):
            Timeouts.from_dict(bad)
    with pytest.raises(ValueError, match="unknown"):
        Timeouts.from_dict({"soak_s": 1})


def test_every_failure_code_is_documented_in_the_module() -> None:
    assert all(f"``{code}``" in (mg.__doc__ or "") for code in mg.FAILURES)


# -- properties -----------------------------------------------------------------------------

NODES = ["cam", "peer", "cloud"]
nodes = st.builds(NodeFacts, online=st.booleans(), active_version=st.sampled_from([None, "1", V]),
                  route=st.sampled_from([None, "local", "cam", "peer", "cloud"]),
                  failure=st.sampled_from([None, ("rolled_back", None), ("refused", "x")]))


@st.composite
def records(draw: Any) -> MigrationRecord:
    source = "cam"
    from_node = draw(st.sampled_from(NODES))
    to_node = draw(st.sampled_from([n for n in NODES if n != from_node]))
    state = draw(st.sampled_from(mg.STATES))
    started = None if state == "pending" else T0  # a stored record past pending has its step's start and deadline
    return make(source=source, from_node=from_node, to_node=to_node, target_had=draw(st.booleans()), state=state,
                step_started_at=started, deadline=None if started is None else T0 + draw(st.sampled_from([10, 20])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records(), source=nodes, target=nodes, origin=nodes, in_use=st.integers(0, 2),
       now=st.sampled_from([T0, T0 + 5, T0 + 15, T0 + 100]))
def test_decide_is_a_fixpoint_and_moves_only_forward(record: MigrationRecord, source: NodeFacts, target: NodeFacts,
                                                     origin: NodeFacts, in_use: int, now: float) -> None:
    f = Facts(source=source, target=target, origin=origin, from_in_use=in_use)
    d = mg.decide(record, f, now)
    after = apply(record, d)
    assert mg.decide(after, f, now).empty
    assert after.state in mg.STATES
    if record.state in mg.FINAL_STATES:
        assert d.empty
    if after.state in mg.FINAL_STATES and record.state not in mg.FINAL_STATES:
        assert after.finished_at == now and after.deadline is None
    if after.state in mg.ACTIVE_STATES and after.state != "pending":
        assert after.deadline is not None and after.deadline >= (after.step_started_at or 0)
    # an executor that the source still relies on is never removed
    for device, a in d.assign.items():
        if a is None:
            assert device != record.source
            if device == record.from_node:  # A goes only once the source has switched away from it
                assert after.state in ("unloading", "done")
            else:  # B goes only on a revert, and only when this migration added it
                assert device == record.to_node and not record.target_had
                assert after.state in ("reverting", "reverted", "failed")
    if after.state == "reverting" and record.state != "reverting":
        assert d.assign[record.source] == Assign(mg.route_to(record, record.from_node), True)


@settings(max_examples=200, deadline=None)
@given(record=records(), script=st.lists(st.tuples(nodes, nodes, nodes), min_size=1, max_size=6))
def test_every_run_ends_final_once_time_passes_every_deadline(record: MigrationRecord,
                                                              script: list[tuple[NodeFacts, ...]]) -> None:
    now = T0
    for source, target, origin in script:
        now += 7
        record = apply(record, mg.decide(record, Facts(source=source, target=target, origin=origin), now))
    # nothing confirms any more: each remaining step runs into its deadline
    silent = Facts(source=node(None, None), target=node(None, None), origin=node(None, "local"))
    for _ in range(4):
        now += 1000
        record = apply(record, mg.decide(record, silent, now))
    assert record.state in mg.FINAL_STATES


# -- the driver, the snapshot and the rebalancer over a real (SQLite) store ---------------------

from controller.fleet_snapshot import Rebalancer, build_snapshot  # noqa: E402
from controller.migrations import MigrationDriver  # noqa: E402
from controller.store import Assignment, Store  # noqa: E402
from edge_runtime.protocol import messages as msg  # noqa: E402
from tests.storekit import add_kws_release  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _state(store: Store, device: str, *, tier: str = "edge", models: Optional[dict[str, tuple[Optional[str], str]]] = None,
           cores: int = 4, online: bool = True) -> None:
    store.apply_state(device, msg.DeviceState(
        online=online, boot_id="b", bd_seq=1, runtime_version="0.9",
        capabilities=msg.Capabilities(cores=cores, memory_bytes=1 << 30, tier=tier),
        models={n: msg.InstalledModel(active=a, route=r) for n, (a, r) in (models or {}).items()},
    ).model_dump(mode="json"), now=T0)


@pytest.fixture
def fleet(tmp_path: Any) -> Any:
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    add_kws_release(store, V, created_at=T0)
    _state(store, "cam", models={"kws": (V, "local")})
    _state(store, "cloud", tier="cloud", cores=16)
    store.set_assignments({"cam": {"kws": Assignment("cam", "kws", V)}}, now=T0)
    published: list[list[str]] = []
    clock = Clock()
    driver = MigrationDriver(store, lambda ids: published.append(list(ids)), clock=clock, timeouts=T)
    yield store, driver, clock, published
    store.close()


def test_driver_runs_a_migration_from_the_store_facts(fleet: Any) -> None:
    store, driver, clock, published = fleet
    m = driver.create("kws", "cam", "cloud", actor="ops")
    assert (m.state, m.target_had, m.from_node) == ("deploying", False, "cam")
    assert store.assignments("cloud") == [Assignment("cloud", "kws", V)] and published == [["cloud"]]
    assert driver.tick() == 0  # nothing reported yet
    _state(store, "cloud", tier="cloud", models={"kws": (V, "local")})
    clock.t += 1
    assert driver.tick() == 1 and store.get_migration(m.id).state == "switching"
    assert store.assignments("cam") == [Assignment("cam", "kws", V, route="cloud", install=True)]
    _state(store, "cam", models={"kws": (V, "cloud")})
    clock.t += 1
    driver.tick()
    assert store.get_migration(m.id).state == "done"
    with pytest.raises(ValueError, match="already go to cloud"):
        driver.create("kws", "cam", "cloud", actor="ops")
    # and back: the cloud node is unloaded once nothing routes to it
    back = driver.create("kws", "cam", "cam", actor="ops")
    assert back.state == "switching" and store.assignments("cam")[0].route == "local"
    _state(store, "cam", models={"kws": (V, "local")})
    clock.t += 1
    driver.tick()
    assert store.get_migration(back.id).state == "unloading" and store.assignments("cloud") == []
    _state(store, "cloud", tier="cloud")
    driver.tick()
    assert store.get_migration(back.id).state == "done"


def test_driver_refusals_and_abort(fleet: Any) -> None:
    store, driver, clock, published = fleet
    from controller.store import Conflict, NotFound

    with pytest.raises(NotFound):
        driver.create("kws", "cam", "nowhere", actor="ops")
    with pytest.raises(NotFound, match="no assignment"):
        driver.create("other", "cam", "cloud", actor="ops")
    store.set_assignments({"cloud": {"kws": Assignment("cloud", "kws", V, route="cam")}}, now=T0)
    with pytest.raises(Conflict, match="forwards kws"):
        driver.create("kws", "cam", "cloud", actor="ops")
    store.set_assignments({"cloud": {"kws": None}}, now=T0)
    m = driver.create("kws", "cam", "cloud", actor="ops")
    with pytest.raises(Conflict, match="is deploying"):
        driver.create("kws", "cam", "cloud", actor="ops")
    aborted = driver.abort(m.id, actor="ops", reason="changed my mind")
    assert (aborted.state, aborted.failure) == ("reverted", "aborted")  # the source never switched
    assert store.assignments("cloud") == [] and store.assignments("cam")[0].route == "local"


def test_snapshot_and_rebalancer_move_an_overloaded_source(fleet: Any) -> None:
    store, driver, clock, published = fleet
    # cam: 1 core, 200 calls/s of a 10 ms model = 2x its capacity; the cloud node idles
    _state(store, "cam", models={"kws": (V, "local")}, cores=1)
    tel = msg.Telemetry(seq=1, at="2024-01-01T00:00:00Z", boot_id="b", interval_s=1.0,
                        system=msg.SystemFigures(cpu_percent=99, memory_total_bytes=1 << 30,
                                                 memory_available_bytes=1 << 29),
                        models={"kws": msg.ModelFigures(version=V, rate=200.0, service_ms=10.0)},
                        peers_rtt_ms={"cloud": 12.0})
    store.add_telemetry("cam", tel.model_dump(mode="json"), now=T0)
    snap = build_snapshot(store, now=clock(), slo_ms=80.0)
    assert {n.id: (n.tier, n.cores) for n in snap.nodes} == {"cam": ("edge", 1), "cloud": ("cloud", 16)}
    assert [(w.model, w.source, w.rate, w.slo_ms, w.executor) for w in snap.workloads] == [
        ("kws", "cam", 200.0, 80.0, "cam")]
    assert snap.models["kws"].memory_bytes == 5000 and snap.service_ms == {("cam", "kws"): 10.0}
    assert snap.rtt_ms == {("cam", "cloud"): 12.0}

    reb = Rebalancer(store, driver, clock, slo_ms=80.0)
    dry = reb.plan()
    assert [(m["source"], m["from_node"], m["to_node"], m["migration"]) for m in dry["moves"]] == [
        ("cam", "cam", "cloud", None)]
    assert dry["moves"][0]["p95_after_ms"] < 80.0 and store.list_migrations() == []
    applied = reb.plan(apply=True)
    mid = applied["moves"][0]["migration"]
    m = store.get_migration(mid)
    assert (m.to_node, m.reason, m.state) == ("cloud", applied["moves"][0]["reason"], "deploying")
    assert m.prediction["p95_after_ms"] == applied["moves"][0]["p95_after_ms"]
    again = reb.plan(apply=True)  # the workload has an active migration: not started twice
    assert again["moves"][0]["migration"] is None and f"migration {mid} is active" in again["moves"][0]["skipped"]


# -- the console ---------------------------------------------------------------------------------


def test_console_commands_have_json_connection_options_and_params() -> None:
    from controller import apiclient, console
    from controller.cli import build_parser

    parser = build_parser()
    for argv in (["migrate", "kws", "--source", "cam", "--to", "cloud"], ["migrations", "ls"],
                 ["migrations", "show", "1"], ["migrations", "abort", "1"], ["plan"], ["plan", "--apply"]):
        args = parser.parse_args([*argv, "--json", "--broker", "mqtt://h:1", "--username", "u",
                                  "--password-file", "p", "--timeout", "3s"])
        assert args.json and args.broker == "mqtt://h:1" and args.timeout == 3.0 and callable(args.fn), argv
    args = parser.parse_args(["migrate", "kws", "--source", "cam", "--to", "cloud", "--deploy-timeout", "2m"])
    params = console.migrate_params(args)
    assert params == {"model": "kws", "source": "cam", "to": "cloud", "timeouts": {"deploy_s": 120.0}}
    assert apiclient.validate_params("migrate", params)["timeouts"]["switch_s"] is None
    assert console.ACTIVE_MIGRATION_STATES == mg.ACTIVE_STATES


def test_console_tables_render() -> None:
    from rich.console import Console

    from controller import console

    row = {"id": 4, "model": "kws", "version": "2", "source": "cam", "from_node": "cam", "to_node": "cloud",
           "state": "reverted", "target_had": False, "timeouts": T.to_dict(), "step_started_at": T0, "deadline": None,
           "reason": "slo_violation", "prediction": {"p95_before_ms": 120.5, "p95_after_ms": 40.0},
           "failure": "deploy_timeout", "detail": "cloud not active within 30s", "created_at": T0, "updated_at": T0,
           "finished_at": T0 + 31, "created_by": "ops"}
    out = Console(record=True, width=250, color_system=None)
    for item in [console.migrations_table([row]), *console.migration_detail(row),
                 *console.plan_detail({"moves": [{"model": "kws", "source": "cam", "from_node": "cam",
                                                  "to_node": "cloud", "reason": "slo_violation",
                                                  "p95_before_ms": 120.5, "p95_after_ms": None, "migration": 4,
                                                  "skipped": None}],
                                       "violations_before": 1, "violations_after": 0,
                                       "peak_utilisation_before": 2.0, "peak_utilisation_after": 0.1,
                                       "method": "heuristic", "workloads": 1, "nodes": 2}),
                 *console.plan_detail({"moves": []})]:
        out.print(item)
    text = out.export_text()
    for piece in ("kws@2", "cam: cam -> cloud", "reverted", "deploy_timeout", "120.5 ms -> 40.0 ms", "slo_violation",
                  "1 -> 0", "200% -> 10%", "no moves"):
        assert piece in text, piece
