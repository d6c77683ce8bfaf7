"""The agent's executor (agent/executor.py) on a real store, engine and installer, with its
transfers (agent/transfers.py), reporter (agent/reporter.py) and route table
(agent/routes.py).

The chunk source is the one test double: it records every request, and the test answers
them with real ``ChunkResponse`` payloads through ``Transfers.on_payload`` (no broker). A
fake monotonic clock drives back-off; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from edge_runtime.agent.executor import Executor
from edge_runtime.agent.outbox import Outbox
from edge_runtime.agent.reconcile import Fetch, Noop, Refuse, Remove
from edge_runtime.agent.reporter import Reporter, clean_figures
from edge_runtime.agent.routes import RouteTable
from edge_runtime.agent.transfer import ChunkSource, bitmap_path
from edge_runtime.agent.transfers import Transfers, TransferSettings
from edge_runtime.engine import Engine, inspect_model
from edge_runtime.installer import Installer
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import (
    ChunkRequest,
    ChunkResponse,
    DesiredState,
    ErrorInfo,
    Event,
    HealthSpec,
    SystemFigures,
    Telemetry,
)
from edge_runtime.store import ModelStore
from tests import trustkit

DEVICE = trustkit.DEVICE
CHUNK = 1024
WALL = datetime(2026, 1, 2, tzinfo=timezone.utc)


# -- kit ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSource(ChunkSource):
    """Records every request; the test answers (or refuses) them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []  # every request ever sent
        self.pending: list[tuple[str, int, int]] = []  # not answered yet

    def _send(self, sha256: str, offset: int, length: int) -> None:
        self.log.append((sha256, offset, length))
        self.pending.append((sha256, offset, length))


def request_of(sha: str, offset: int, length: int) -> ChunkRequest:
    return ChunkRequest(request_id=f"r-{offset}", sha256=sha, offset=offset, length=length,
                        reply_to=topics.chunk_inbox(DEVICE, sha))


def deliver(transfers: Transfers, response: ChunkResponse) -> bool:
    return transfers.on_payload(topics.chunk_inbox(DEVICE, response.sha256), messages.encode(response))


def serve(transfers: Transfers, source: RecordingSource, blobs: dict[str, bytes], *,
          limit: Optional[int] = None) -> int:
    """Answer requests (pumping to refill windows) until none is left or ``limit`` answered."""
    answered = 0
    while True:
        transfers.pump()
        if not source.pending:
            return answered
        while source.pending:
            if limit is not None and answered >= limit:
                return answered
            sha, offset, length = source.pending.pop(0)
            data = blobs[sha]
            assert deliver(transfers, ChunkResponse.answer(request_of(sha, offset, length),
                                                           data[offset:offset + length], size=len(data)))
            answered += 1


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    path: Path
    data: bytes
    signature: dict[str, Any]

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@pytest.fixture(scope="module")
def artifacts(model_files: dict[str, Path]) -> dict[str, Artifact]:
    out = {}
    for version, key in (("1", "tiny_v1"), ("2", "tiny_v2")):
        path = model_files[key]
        out[version] = Artifact("tiny", version, path, path.read_bytes(), inspect_model(str(path)).to_dict())
    return out


def desired(generation: int, models: dict[str, tuple[Artifact, Optional[HealthSpec]]]) -> DesiredState:
    specs: dict[str, Any] = {}
    for name, (art, health) in models.items():
        manifest: dict[str, Any] = {"name": name, "version": art.version, "sha256": art.sha, "size": len(art.data),
                                    "signature": art.signature}
        if health is not None:
            manifest["health"] = health
        specs[name] = {"version": art.version, "manifest": manifest, "route": "local", "install": True}
    return DesiredState.model_validate(trustkit.doc_body("desired", generation=generation, models=specs))


class Device:
    """One device's agent parts on one data dir; ``restart()`` builds them again on it."""

    def __init__(self, root: Path, clock: Optional[FakeClock] = None) -> None:
        self.root = root
        self.data = root / "data"
        self.clock = clock or FakeClock()
        self.source = RecordingSource()
        self.store = ModelStore(self.data)
        self.engine = Engine()
        self.installer = Installer(self.store, self.engine)
        self.outbox = Outbox(root / "o.sqlite", max_items=1000, max_bytes=10_000_000)
        self.reporter = Reporter(self.outbox, DEVICE, wall=lambda: WALL)
        (self.data / "agent").mkdir(parents=True, exist_ok=True)  # as the daemon does
        self.routes = RouteTable(self.data / "agent" / "routes.json")
        self.transfers = Transfers(self.source, TransferSettings(chunk_size=CHUNK, window=4, retry_initial_s=5.0,
                                                                 retry_max_s=60.0), clock=self.clock)
        self.generation: Optional[int] = None
        self.executor = Executor(self.installer, self.transfers, self.reporter, self.routes,
                                 generation=lambda: self.generation)

    def close(self) -> None:
        self.transfers.close()
        self.outbox.close()

    def restart(self) -> Device:
        self.close()
        return Device(self.root, self.clock)

    def events(self) -> list[Event]:
        return [messages.decode("event", item.payload) for item in self.outbox.peek(10_000)
                if item.topic == topics.events(DEVICE)]

    def reconcile(self, state: DesiredState) -> None:
        self.generation = state.generation
        self.executor.run(self.executor.plan(state))

    def serving(self, sample: dict[str, np.ndarray]) -> str:
        version, _ = self.engine.predict_versioned("tiny", sample)
        return version


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Device]:
    device = Device(tmp_path)
    yield device
    device.close()


@pytest.fixture(scope="module")
def sample(zoo: dict[str, Any]) -> dict[str, np.ndarray]:
    return zoo["tiny_v1"].sample_inputs(seed=1)


def collapse(steps: list[str]) -> list[str]:
    out: list[str] = []
    for s in steps:
        if not out or out[-1] != s:
            out.append(s)
    return out


def install_v1(dev: Device, artifacts: dict[str, Artifact], generation: int = 1) -> DesiredState:
    state = desired(generation, {"tiny": (artifacts["1"], None)})
    dev.reconcile(state)
    serve(dev.transfers, dev.source, {artifacts["1"].sha: artifacts["1"].data})
    assert dev.executor.transfer_finished()
    assert dev.store.model("tiny").active == "1"
    return state


# -- reporter -----------------------------------------------------------------------------


def test_event_seqs_are_ordered_and_persist_across_a_reopened_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=1000, max_bytes=10_000_000)
    reporter = Reporter(outbox, DEVICE, wall=lambda: WALL)
    assert reporter.event("verifying", model="tiny", version="1") == 1
    assert reporter.event("staged", model="tiny", version="1") == 2
    outbox.close()
    outbox = Outbox(path, max_items=1000, max_bytes=10_000_000)
    try:
        reporter = Reporter(outbox, DEVICE, wall=lambda: WALL)
        assert reporter.event("active", model="tiny", version="1", generation=4) == 3
        items = outbox.peek(10)
        assert {i.topic for i in items} == {topics.events(DEVICE)}
        got = [messages.decode("event", i.payload) for i in items]
        assert [(e.seq, e.step) for e in got] == [(1, "verifying"), (2, "staged"), (3, "active")]
        assert got[-1].generation == 4 and got[-1].at == WALL
    finally:
        outbox.close()


def test_unknown_reason_becomes_internal_keeping_it_in_detail(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", max_items=1000, max_bytes=10_000_000) as outbox:
        reporter = Reporter(outbox, DEVICE)
        reporter.event("refused", model="tiny", reason="gremlins", detail="in the disk")
        reporter.event("refused", model="tiny", reason="gremlins_only")
        reporter.event("refused", model="tiny", reason="quota_exceeded", detail="full")
        a, b, c = [messages.decode("event", i.payload) for i in outbox.peek(10)]
    assert (a.reason, a.detail) == ("internal", "gremlins: in the disk")
    assert (b.reason, b.detail) == ("internal", "gremlins_only")
    assert (c.reason, c.detail) == ("quota_exceeded", "full")


def test_figures_the_wire_cannot_carry_are_cleaned(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", max_items=1000, max_bytes=10_000_000) as outbox:
        reporter = Reporter(outbox, DEVICE)
        seq = reporter.event("rolled_back", model="tiny", reason="health_check_failed", progress=7.0,
                             figures={"nan": float("nan"), "inf": float("-inf"), "ok": 1.5, "n": 3,
                                      "list": [1, 2], "text": "t" * 500, "k" * 100: True})
        assert seq == 1 and reporter.lost == 0
        event = messages.decode("event", outbox.peek(1)[0].payload)
    f = event.figures
    assert f["nan"] is None and f["inf"] is None
    assert (f["ok"], f["n"], f["list"]) == (1.5, 3, "[1, 2]")
    assert f["text"] == "t" * 200
    assert f["k" * 64] is True
    assert event.progress == 1.0


def test_clean_figures_keeps_at_most_32() -> None:
    out = clean_figures({f"f{i}": i for i in range(40)})
    assert list(out) == [f"f{i}" for i in range(32)]
    assert clean_figures(None) == {}
    assert clean_figures({"x": float("nan"), "y": float("inf")}) == {"x": None, "y": None}


def test_telemetry_seq_stream_is_independent_of_events(tmp_path: Path) -> None:
    def sample(seq: int) -> Telemetry:
        return Telemetry(seq=seq, at=WALL, interval_s=10,
                         system=SystemFigures(cpu_percent=5, memory_total_bytes=10, memory_available_bytes=5))

    with Outbox(tmp_path / "o.sqlite", max_items=1000, max_bytes=10_000_000) as outbox:
        reporter = Reporter(outbox, DEVICE)
        assert [reporter.event("removed", model="m") for _ in range(3)] == [1, 2, 3]
        assert reporter.telemetry(sample) == 1
        assert reporter.event("removed", model="m") == 4
        assert reporter.telemetry(sample) == 2
        tele = [messages.decode("telemetry", i.payload) for i in outbox.peek(10) if i.topic == topics.telemetry(DEVICE)]
    assert [t.seq for t in tele] == [1, 2]


def test_an_event_the_wire_refuses_is_lost_not_raised(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", max_items=1000, max_bytes=10_000_000) as outbox:
        reporter = Reporter(outbox, DEVICE)
        assert reporter.event("refused", model="tiny") is None  # a refused event needs a reason
        assert reporter.lost == 1 and outbox.depth == 0
        assert reporter.event("removed", model="tiny") == 1  # the failed one consumed no seq


# -- routes -------------------------------------------------------------------------------


def test_routes_persist_across_instances_and_local_removes(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "routes.json"
    path.parent.mkdir()
    table = RouteTable(path)
    assert table.all() == {} and table.get("kws") == "local"
    table.set("kws", "node-a")
    table.set("vision", "node-b")
    again = RouteTable(path)
    assert again.all() == {"kws": "node-a", "vision": "node-b"}
    assert again.get("kws") == "node-a" and again.get("other") == "local"
    again.set("kws", "local")
    assert again.get("kws") == "local"
    assert RouteTable(path).all() == {"vision": "node-b"}
    assert json.loads(path.read_bytes()) == {"format": 1, "routes": {"vision": "node-b"}}


def test_set_creates_the_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "routes.json"
    RouteTable(path).set("kws", "node-a")
    assert RouteTable(path).all() == {"kws": "node-a"}


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"format": 2, "routes": {"a": "n"}}',
                                     b'{"format": 1, "routes": ["a"]}', b'{"format": 1, "routes": {"a": "bad id!"}}',
                                     b"\xff\xfe"], ids=["junk", "list", "format2", "routes_list", "bad_node", "binary"])
def test_a_corrupt_route_file_is_an_empty_table(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "routes.json"
    path.write_bytes(content)
    table = RouteTable(path)
    assert table.all() == {} and table.get("a") == "local"
    table.set("a", "node-1")  # and it can be written again
    assert RouteTable(path).all() == {"a": "node-1"}


# -- transfers ----------------------------------------------------------------------------


def test_on_payload_for_no_running_transfer_is_false(dev: Device) -> None:
    sha = "cd" * 32
    resp = ChunkResponse.answer(request_of(sha, 0, 4), b"abcd", size=4)
    assert deliver(dev.transfers, resp) is False
    assert dev.transfers.on_payload("not/a/topic", b"x") is False


def test_cancel_by_model_ends_the_transfer_without_back_off(dev: Device, artifacts: dict[str, Artifact]) -> None:
    dev.reconcile(desired(1, {"tiny": (artifacts["1"], None)}))
    sha = artifacts["1"].sha
    assert dev.transfers.busy() == {sha} and dev.transfers.running()
    cancelled = dev.transfers.cancel(model="tiny")
    assert [j.sha256 for j in cancelled] == [sha]
    assert dev.transfers.cancel(sha256="ef" * 32) == []
    assert dev.executor.transfer_finished()
    assert dev.transfers.busy() == set()  # a final failure: no back-off
    assert dev.transfers.retry_due() is None
    assert dev.store.model("tiny").install is None
    assert dev.store.model("tiny").last_result.reason == "cancelled"


# -- executor: fetch, install, events -----------------------------------------------------


def test_desired_model_is_fetched_installed_and_served(dev: Device, artifacts: dict[str, Artifact],
                                                       sample: dict[str, np.ndarray]) -> None:
    art = artifacts["1"]
    state = desired(3, {"tiny": (art, None)})
    dev.generation = 3
    plan = dev.executor.plan(state)
    fetches = [s for s in plan.actions if isinstance(s, Fetch)]
    assert [(f.name, f.version, f.sha256, f.size) for f in fetches] == [("tiny", "1", art.sha, len(art.data))]

    assert dev.executor.run(plan) is True
    assert dev.transfers.busy() == {art.sha}
    n_chunks = -(-len(art.data) // CHUNK)
    assert [(o, n) for _, o, n in dev.source.log] == [(i * CHUNK, min(CHUNK, len(art.data) - i * CHUNK))
                                                      for i in range(4)]  # the first window
    assert dev.executor.transfer_finished() is False  # nothing ended yet

    serve(dev.transfers, dev.source, {art.sha: art.data})
    assert sorted(o for _, o, _ in dev.source.log) == [i * CHUNK for i in range(n_chunks)]
    assert dev.executor.transfer_finished() is True

    assert dev.serving(sample) == "1"
    np.testing.assert_allclose(dev.engine.predict("tiny", sample)["y"],
                               inspect_reference(art, sample), atol=1e-5)
    model = dev.store.model("tiny")
    assert model.active == "1" and model.install is None
    assert dev.store.blobs.list() == [art.sha]
    assert dev.executor.plan(state).actions == ()  # converged
    assert dev.transfers.busy() == set()

    events = dev.events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert collapse([e.step for e in events]) == ["downloading", "verifying", "staged", "loading", "health_check",
                                                  "active"]
    assert all(e.generation == 3 and e.model == "tiny" and e.version == "1" for e in events)
    downloads = [e for e in events if e.step == "downloading"]
    assert downloads[0].progress == 0.0 and downloads[0].figures == {"size": len(art.data)}
    progress = [e.progress for e in downloads]
    assert progress == sorted(progress) and len(downloads) > 1
    report = dev.executor.report()
    assert report["tiny"].active == "1"


def inspect_reference(art: Artifact, sample: dict[str, np.ndarray]) -> np.ndarray:
    from edge_runtime.modelgen import zoo as z

    bias = 0.0 if art.version == "1" else 0.5
    model = z.tiny_mlp(seed=0, version_bias=bias)
    assert model.data == art.data
    return model.reference(sample)["y"]


def test_a_second_plan_while_the_transfer_runs_has_no_second_fetch(dev: Device, artifacts: dict[str, Artifact]) -> None:
    state = desired(1, {"tiny": (artifacts["1"], None)})
    dev.reconcile(state)
    sent = len(dev.source.log)
    again = dev.executor.plan(state)
    assert not any(isinstance(s, Fetch) for s in again.steps)
    assert any(isinstance(s, Noop) and s.name == "tiny" for s in again.steps)
    dev.executor.run(again)
    assert len(dev.source.log) == sent
    assert len(dev.transfers.jobs()) == 1


# -- executor: a failing transfer ---------------------------------------------------------


def fail_first_request(dev: Device, sha: str) -> None:
    _, offset, length = dev.source.pending.pop(0)
    error = ErrorInfo(type="not_found", reason="artifact_not_found", message="no such artifact")
    assert deliver(dev.transfers, ChunkResponse.failure(request_of(sha, offset, length), error))


def test_artifact_not_found_abandons_the_download_and_backs_off(dev: Device, artifacts: dict[str, Artifact]) -> None:
    art = artifacts["1"]
    state = desired(2, {"tiny": (art, None)})
    dev.reconcile(state)
    part = dev.store.layout.part(dev.store.model("tiny").install.token)
    assert part.exists()
    fail_first_request(dev, art.sha)
    assert dev.executor.transfer_finished() is True

    model = dev.store.model("tiny")
    assert model.install is None and model.active is None
    assert model.last_result.outcome == "refused" and model.last_result.reason == "artifact_not_found"
    assert not part.exists() and not bitmap_path(part).exists()
    refused = [e for e in dev.events() if e.step == "refused"]
    assert refused and all(e.reason == "artifact_not_found" and e.version == "1" for e in refused)
    assert any(e.figures.get("retryable") is True for e in refused)
    assert all(e.generation == 2 for e in refused)

    # Back-off: the artifact still counts as in transfer, so the planner does not fetch it.
    assert dev.transfers.busy() == {art.sha}
    assert dev.transfers.retry_due() == pytest.approx(5.0)
    assert not any(isinstance(s, Fetch) for s in dev.executor.plan(state).steps)
    dev.clock.advance(4.9)
    assert dev.transfers.busy() == {art.sha}
    dev.clock.advance(0.2)
    assert dev.transfers.busy() == set()
    assert dev.transfers.retry_due() is None
    assert [s for s in dev.executor.plan(state).steps if isinstance(s, Fetch)][0].sha256 == art.sha


def test_a_failed_transfer_is_reported_once(dev: Device, artifacts: dict[str, Artifact]) -> None:
    art = artifacts["1"]
    dev.reconcile(desired(2, {"tiny": (art, None)}))
    fail_first_request(dev, art.sha)
    dev.executor.transfer_finished()
    refused = [e for e in dev.events() if e.step == "refused"]
    assert len(refused) == 1  # the executor's, with the transfer's figures; the installer's is muted
    assert refused[0].figures["requested"] == 4


# -- executor: remove ---------------------------------------------------------------------


def test_remove_unloads_the_model_and_drops_its_record(dev: Device, artifacts: dict[str, Artifact]) -> None:
    art = artifacts["1"]
    dev.installer.install_file("tiny", "1", art.path, expected_sha256=art.sha)
    dev.installer.load_all()
    dev.routes.set("tiny", "node-x")
    assert "tiny" in dev.engine.names()
    state = DesiredState.model_validate(trustkit.doc_body("desired", generation=5, models={}))
    plan = dev.executor.plan(state)
    assert [type(s) for s in plan.steps] == [Remove] and plan.steps[0].name == "tiny"
    dev.generation = 5
    dev.executor.run(plan)
    assert "tiny" not in dev.engine.names()
    assert "tiny" not in dev.store.read().models
    assert dev.store.blobs.list() == []
    assert dev.routes.all() == {}
    removed = [e for e in dev.events() if e.step == "removed"]
    assert [(e.model, e.generation) for e in removed] == [("tiny", 5)]
    assert dev.executor.plan(state).steps == ()


# -- executor: the health gate ------------------------------------------------------------


def test_failing_health_check_rolls_back_to_the_old_version(dev: Device, artifacts: dict[str, Artifact],
                                                            sample: dict[str, np.ndarray]) -> None:
    install_v1(dev, artifacts)
    v2 = artifacts["2"]
    right = inspect_reference(v2, sample)
    health = HealthSpec.of(sample, {"y": right + 10.0})  # expected outputs that v2 does not produce
    state = desired(2, {"tiny": (v2, health)})
    dev.reconcile(state)
    serve(dev.transfers, dev.source, {v2.sha: v2.data})
    first = len(dev.events())
    assert dev.executor.transfer_finished()

    assert dev.serving(sample) == "1"
    model = dev.store.model("tiny")
    assert model.active == "1" and model.install is None
    assert model.last_result.outcome == "rolled_back" and model.last_result.reason == "health_check_failed"
    new = dev.events()[first - 1:]
    rolled = [e for e in new if e.step == "rolled_back"]
    assert len(rolled) == 1
    assert (rolled[0].model, rolled[0].version, rolled[0].reason, rolled[0].generation) == \
        ("tiny", "2", "health_check_failed", 2)
    assert rolled[0].figures  # the health figures travel with it
    assert not any(e.step == "active" and e.version == "2" for e in new)

    # Not retried: a Refuse hold, reported once per generation.
    plan = dev.executor.plan(state)
    assert plan.actions == ()
    assert [(type(s), s.reason) for s in plan.holds] == [(Refuse, "health_check_failed")]
    before = len(dev.events())
    dev.executor.run(plan)
    dev.executor.run(dev.executor.plan(state))
    refusals = dev.events()[before:]
    assert [(e.step, e.reason, e.version) for e in refusals] == [("refused", "health_check_failed", "2")]


def test_correct_health_check_activates_the_new_version(dev: Device, artifacts: dict[str, Artifact],
                                                        sample: dict[str, np.ndarray]) -> None:
    install_v1(dev, artifacts)
    v2 = artifacts["2"]
    health = HealthSpec.of(sample, {"y": inspect_reference(v2, sample)}, atol=1e-4)
    dev.reconcile(desired(2, {"tiny": (v2, health)}))
    serve(dev.transfers, dev.source, {v2.sha: v2.data})
    dev.executor.transfer_finished()
    assert dev.serving(sample) == "2"
    assert dev.store.model("tiny").previous == ["1"]


# -- executor: resuming downloads at start-up ---------------------------------------------


def half_download(dev: Device, art: Artifact, state: DesiredState) -> tuple[Path, int]:
    """Start the download, receive half the chunks, shut down. Returns (part, chunks)."""
    dev.reconcile(state)
    n_chunks = -(-len(art.data) // CHUNK)
    half = n_chunks // 2
    assert serve(dev.transfers, dev.source, {art.sha: art.data}, limit=half) == half
    part = dev.store.layout.part(dev.store.model("tiny").install.token)
    return part, n_chunks


def test_resume_requests_only_the_missing_chunks(dev: Device, artifacts: dict[str, Artifact],
                                                 sample: dict[str, np.ndarray]) -> None:
    art = artifacts["1"]
    state = desired(1, {"tiny": (art, None)})
    part, n_chunks = half_download(dev, art, state)
    half = n_chunks // 2
    restarted = dev.restart()
    try:
        assert bitmap_path(part).exists()
        assert [name for name, _ in restarted.installer.pending_downloads()] == ["tiny"]
        restarted.generation = 1
        assert restarted.executor.resume_downloads(state) == ["tiny"]
        job, = restarted.transfers.jobs()
        assert job.transfer.counters.resumed_chunks == half
        serve(restarted.transfers, restarted.source, {art.sha: art.data})
        requested = sorted(o for _, o, _ in restarted.source.log)
        assert requested == [i * CHUNK for i in range(half, n_chunks)]
        assert restarted.executor.transfer_finished()
        done = [e for e in restarted.events() if e.step == "downloading" and e.progress == 1.0]
        assert done and done[-1].figures["resumed_chunks"] == half
        assert done[-1].figures["requested"] == n_chunks - half and done[-1].figures["retried"] == 0
        assert restarted.serving(sample) == "1"
        assert restarted.store.model("tiny").install is None
        assert not part.exists()
    finally:
        restarted.close()


@pytest.mark.parametrize("change", ["other_version", "not_named", "no_desired"])
def test_resume_abandons_a_download_no_longer_desired(dev: Device, artifacts: dict[str, Artifact],
                                                      change: str) -> None:
    art = artifacts["1"]
    part, _ = half_download(dev, art, desired(1, {"tiny": (art, None)}))
    restarted = dev.restart()
    try:
        later = {
            "other_version": desired(2, {"tiny": (artifacts["2"], None)}),
            "not_named": DesiredState.model_validate(trustkit.doc_body("desired", generation=2, models={})),
            "no_desired": None,
        }[change]
        assert restarted.executor.resume_downloads(later) == []
        assert restarted.transfers.jobs() == []
        assert restarted.source.log == []
        model = restarted.store.read().models.get("tiny")
        assert model is not None and model.install is None
        assert model.last_result.outcome == "refused"
        assert not part.exists() and not bitmap_path(part).exists()
        assert restarted.installer.pending_downloads() == []
        refused = [e for e in restarted.events() if e.step == "refused"]
        assert len(refused) == 1 and refused[0].version == "1"
        assert "interrupted" in f"{refused[0].reason} {refused[0].detail}"
    finally:
        restarted.close()
