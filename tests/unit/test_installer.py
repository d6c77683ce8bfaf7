"""The installer on real .tflite files and the real interpreter: install, refuse, roll back,
swap, recover."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.agent.transfer import bitmap_path
from edge_runtime.engine import Engine, LoadedModel
from edge_runtime.errors import (
    HealthCheckFailed,
    InstallError,
    ModelFileError,
    ModelUnavailable,
    QuotaExceeded,
    StoreCorrupt,
    VersionNotFound,
)
from edge_runtime.health import HealthCheck, health_check_from_files, load_sample
from edge_runtime.installer import Installer
from edge_runtime.modelgen.zoo import BuiltModel, custom_op_model, tiny_mlp
from edge_runtime.store import ModelStore
from edge_runtime.store.state import InstallRecord

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
BIAS = {"1": 0.0, "2": 1.0, "3": 2.0, "4": 3.0}


@dataclass
class Models:
    built: dict[str, BuiltModel]
    files: dict[str, Path]
    sample: dict[str, np.ndarray]

    def ref(self, version: str) -> np.ndarray:
        return self.built[version].reference(self.sample)["y"]

    def sha(self, version: str) -> str:
        return hashlib.sha256(self.built[version].data).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    built = {v: tiny_mlp(0, version_bias=b) for v, b in BIAS.items()}
    files = {v: m.save(root / f"v{v}.tflite") for v, m in built.items()}
    return Models(built=built, files=files, sample=built["1"].sample_inputs(seed=3))


@pytest.fixture
def events() -> list[tuple[str, str, dict[str, Any]]]:
    return []


@pytest.fixture
def inst(tmp_path: Path, events: list[tuple[str, str, dict[str, Any]]]) -> Installer:
    return Installer(ModelStore(tmp_path / "data"), Engine(), on_event=lambda *e: events.append(e))


def served(inst: Installer, models: Models) -> np.ndarray:
    return inst.engine.predict("kws", models.sample)["y"]


def assert_serves(inst: Installer, models: Models, version: str) -> None:
    got_version, out = inst.engine.predict_versioned("kws", models.sample)
    assert got_version == version
    np.testing.assert_allclose(out["y"], models.ref(version), atol=1e-5)
    for other in BIAS:
        if other != version:
            assert not np.allclose(out["y"], models.ref(other), atol=1e-4)


def snapshot(inst: Installer) -> tuple[dict[str, Any], list[str], list[str]]:
    """State (minus what a refusal may change), blob listing, tmp listing."""
    state = inst.store.read().model_dump(mode="json")
    state.pop("revision")
    for model in state["models"].values():
        model.pop("last_result")
    return state, inst.store.blobs.list(), sorted(p.name for p in inst.store.layout.tmp.iterdir())


# -- the happy path ---------------------------------------------------------------------


def test_install_makes_the_version_active_and_serving(inst: Installer, models: Models, events: list) -> None:
    result = inst.install_file("kws", "1", models.files["1"], expected_sha256=models.sha("1"),
                               expected_size=len(models.built["1"].data))
    assert (result.outcome, result.replaced, result.sha256) == ("active", None, models.sha("1"))
    assert result.figures["non_finite"] == 0 and result.figures["latency_ms"] >= 0
    assert_serves(inst, models, "1")
    model = inst.store.model("kws")
    assert model.active == "1" and model.install is None and model.last_result.outcome == "active"
    assert model.versions["1"].signature["inputs"][0]["name"] == "x"
    assert inst.store.fsck() == []
    assert [e[1] for e in events] == ["downloading", "verifying", "staged", "loading", "health_check", "active"]


def test_second_install_keeps_the_first_as_previous(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    result = inst.install_file("kws", "2", models.files["2"])
    assert result.replaced == "1"
    assert_serves(inst, models, "2")
    model = inst.store.model("kws")
    assert (model.active, model.previous) == ("2", ["1"])
    assert set(inst.store.blobs.list()) == {models.sha("1"), models.sha("2")}


def test_third_install_drops_the_oldest_blob(inst: Installer, models: Models) -> None:
    for v in "123":
        inst.install_file("kws", v, models.files[v])
    assert set(inst.store.blobs.list()) == {models.sha("2"), models.sha("3")}
    assert inst.store.fsck() == []


def test_installing_the_active_version_again_is_benign(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    rev = inst.store.revision()
    again = inst.install_file("kws", "1", models.files["1"], expected_sha256=models.sha("1"))
    assert again.outcome == "already_active" and inst.store.revision() == rev


def test_a_version_never_changes_its_bytes(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "1", models.files["2"])
    assert err.value.reason == "version_conflict"
    assert_serves(inst, models, "1")
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "1", models.files["2"], expected_sha256=models.sha("2"))
    assert err.value.reason == "version_conflict"


@pytest.mark.parametrize("bad", ["../x", "", "a b", "x" * 65])
def test_bad_names_are_refused(inst: Installer, models: Models, bad: str) -> None:
    with pytest.raises(InstallError) as err:
        inst.install_file(bad, "1", models.files["1"])
    assert err.value.reason == "invalid_request"
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", bad, models.files["1"])
    assert err.value.reason == "invalid_request"
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "1", models.files["1"], expected_sha256=bad or "0" * 63)
    assert err.value.reason == "invalid_request"
    assert inst.store.read().models == {} and inst.store.blobs.list() == []


# -- bad model files: refused, nothing changes -----------------------------------------------


def _bad_files(models: Models, root: Path) -> dict[str, tuple[Path, set[str]]]:
    data = models.built["1"].data
    out: dict[str, tuple[Path, set[str]]] = {}
    (root / "text.tflite").write_bytes(b"this is not a model, just text\n" * 10)
    out["not_tflite_text"] = (root / "text.tflite", {"not_tflite"})
    (root / "png.tflite").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    out["not_tflite_png"] = (root / "png.tflite", {"not_tflite"})
    (root / "empty.tflite").write_bytes(b"")
    out["empty"] = (root / "empty.tflite", {"truncated"})
    for cut in (4, 8, 64, len(data) // 3, len(data) // 2, len(data) - 16, len(data) - 1):
        p = root / f"cut{cut}.tflite"
        p.write_bytes(data[:cut])
        out[f"truncated_at_{cut}"] = (p, {"truncated", "invalid", "interpreter_crash"})
    out["custom_op"] = (custom_op_model().save(root / "custom.tflite"), {"unresolved_op"})
    return out


def test_bad_model_files_are_refused_and_nothing_changes(
    inst: Installer, models: Models, tmp_path: Path
) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    for case, (path, reasons) in _bad_files(models, tmp_path).items():
        before_state, before_blobs, before_tmp = snapshot(inst)
        rev = inst.store.revision()
        with pytest.raises(InstallError) as err:
            inst.install_file("kws", "3", path)
        assert err.value.reason == "invalid_model", case
        assert isinstance(err.value.__cause__, ModelFileError), case
        assert err.value.__cause__.reason in reasons, (case, err.value.__cause__.reason)
        after_state, after_blobs, after_tmp = snapshot(inst)
        assert after_state == before_state, case
        assert after_blobs == before_blobs, case
        assert after_tmp == before_tmp == [], case
        last = inst.store.model("kws").last_result
        assert (last.version, last.outcome, last.reason) == ("3", "refused", "invalid_model"), case
        assert inst.store.revision() > rev  # the refusal itself was recorded
        assert_serves(inst, models, "2")
    assert inst.store.fsck() == []


def test_hash_mismatch_is_refused_and_nothing_changes(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    before = snapshot(inst)
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "2", models.files["2"], expected_sha256=models.sha("3"))
    assert err.value.reason == "hash_mismatch"
    assert models.sha("3") in str(err.value) and models.sha("2") in str(err.value)
    assert snapshot(inst) == before
    size = len(models.built["2"].data)
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "2", models.files["2"], expected_size=size - 100)
    assert err.value.reason == "hash_mismatch" and "past the expected" in str(err.value)
    assert snapshot(inst) == before
    assert_serves(inst, models, "1")


def test_quota_exceeded_is_refused_and_nothing_changes(tmp_path: Path, models: Models) -> None:
    size = len(models.built["1"].data)
    inst = Installer(ModelStore(tmp_path / "d", quota_bytes=size + size // 2), Engine())
    inst.install_file("kws", "1", models.files["1"])
    before = snapshot(inst)
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "2", models.files["2"])
    assert err.value.reason == "quota_exceeded"
    assert isinstance(err.value.__cause__, QuotaExceeded)
    assert f"needs {size} bytes but only {size // 2} of the" in str(err.value)
    assert snapshot(inst) == before
    assert_serves(inst, models, "1")


# -- failures after verification: rolled back, old version serves ---------------------------


def test_failed_health_check_rolls_back_and_the_old_version_serves(inst: Installer, models: Models, events: list) -> None:
    inst.install_file("kws", "1", models.files["1"])
    state_before, blobs_before, _ = snapshot(inst)
    wrong = HealthCheck(inputs=models.sample, expected={"y": models.ref("1")})  # v2 gives other numbers
    with pytest.raises(HealthCheckFailed) as err:
        inst.install_file("kws", "2", models.files["2"], health=wrong)
    assert err.value.reason == "health_check_failed"
    assert err.value.figures["max_abs_error"] > 1e-3
    assert_serves(inst, models, "1")
    model = inst.store.model("kws")
    assert model.active == "1" and model.install is None
    assert (model.last_result.outcome, model.last_result.reason) == ("rolled_back", "health_check_failed")
    after_state, blobs_after, tmp_after = snapshot(inst)
    assert after_state == state_before and blobs_after == blobs_before and tmp_after == []
    assert events[-1][1] == "rolled_back" and events[-1][2]["reason"] == "health_check_failed"
    assert inst.store.fsck() == []


def test_matching_health_check_passes(inst: Installer, models: Models) -> None:
    check = HealthCheck(inputs=models.sample, expected={"y": models.ref("2")}, latency_budget_ms=10_000)
    result = inst.install_file("kws", "2", models.files["2"], health=check)
    assert result.figures["max_abs_error"] < 1e-5
    assert_serves(inst, models, "2")


def test_latency_over_budget_rolls_back(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    with pytest.raises(HealthCheckFailed, match="over the 0 ms budget") as err:
        inst.install_file("kws", "2", models.files["2"], health=HealthCheck(latency_budget_ms=0.0))
    assert err.value.figures["latency_ms"] > 0
    assert_serves(inst, models, "1")


class FailingEngine(Engine):
    """The real engine, except that loading the named versions fails."""

    def __init__(self, fail: set[str]) -> None:
        super().__init__()
        self.fail = fail

    def load(self, name: str, version: str, path: Any, *, warm_up: bool = True) -> LoadedModel:
        if version in self.fail:
            raise RuntimeError(f"simulated: out of memory loading {version}")
        return super().load(name, version, path, warm_up=warm_up)


def test_load_failure_rolls_back(tmp_path: Path, models: Models) -> None:
    inst = Installer(ModelStore(tmp_path / "d"), FailingEngine({"2"}))
    inst.install_file("kws", "1", models.files["1"])
    with pytest.raises(InstallError) as err:
        inst.install_file("kws", "2", models.files["2"])
    assert err.value.reason == "load_failed" and "out of memory" in str(err.value)
    assert_serves(inst, models, "1")
    assert inst.store.model("kws").last_result.reason == "load_failed"
    assert inst.store.blobs.list() == [models.sha("1")]


# -- switching ---------------------------------------------------------------------------


def test_version_swap_back_and_forth(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    for target, other in [("1", "2"), ("2", "1"), ("1", "2"), ("2", "1")]:
        assert inst.activate_version("kws", target) == other
        assert_serves(inst, models, target)
        model = inst.store.model("kws")
        assert (model.active, model.previous) == (target, [other])
    assert set(inst.store.blobs.list()) == {models.sha("1"), models.sha("2")}
    assert inst.store.fsck() == []


def test_rollback_and_forward_again(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    with pytest.raises(VersionNotFound, match="no previous version"):
        inst.rollback("kws")
    inst.install_file("kws", "2", models.files["2"])
    assert inst.rollback("kws") == "1"
    assert_serves(inst, models, "1")
    assert inst.rollback("kws") == "2"
    assert_serves(inst, models, "2")


def test_activating_an_unknown_version_changes_nothing(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    before = inst.store.layout.state.read_bytes()
    with pytest.raises(VersionNotFound):
        inst.activate_version("kws", "9")
    assert inst.store.layout.state.read_bytes() == before
    assert_serves(inst, models, "1")


def test_switching_to_a_damaged_blob_is_refused(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    path = inst.store.blobs.path(models.sha("1"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = inst.store.layout.state.read_bytes()
    with pytest.raises(StoreCorrupt, match="damaged"):
        inst.rollback("kws")
    assert inst.store.layout.state.read_bytes() == before
    assert_serves(inst, models, "2")


# -- other entry points --------------------------------------------------------------------


def test_transfer_entry_point_after_downloading(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    data = models.built["2"].data
    part = inst.begin_download("kws", "2", expected_sha256=models.sha("2"), expected_size=len(data))
    assert part.parent == inst.store.layout.tmp
    assert inst.store.model("kws").install.state == "downloading"
    with pytest.raises(InstallError) as err:  # one install per model at a time
        inst.install_file("kws", "3", models.files["3"])
    assert err.value.reason == "install_in_progress"
    part.write_bytes(data)
    result = inst.install_downloaded("kws", "2")
    assert result.outcome == "active"
    assert_serves(inst, models, "2")
    with pytest.raises(InstallError) as err:
        inst.install_downloaded("kws", "2")
    assert err.value.reason == "no_download"


def test_install_blob_already_in_store(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    # the same bytes under another model name need no second copy
    result = inst.install_blob("kws-copy", "7", models.sha("2"))
    assert result.outcome == "active"
    assert inst.engine.predict_versioned("kws-copy", models.sample)[0] == "7"
    assert len(inst.store.blobs.list()) == 2
    with pytest.raises(VersionNotFound):
        inst.install_blob("kws", "9", "0" * 64)


def test_events_listener_failure_does_not_break_install(tmp_path: Path, models: Models) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("listener bug")

    inst = Installer(ModelStore(tmp_path / "d"), Engine(), on_event=broken)
    assert inst.install_file("kws", "1", models.files["1"]).outcome == "active"


# -- recovery (in-process; the subprocess crash test is tests/integration/test_store_crash.py) --


def _plant(inst: Installer, models: Models, version: str, state: str, *, attempts: int = 0,
           health: HealthCheck | None = None) -> InstallRecord:
    """Leave an install record as a crash in ``state`` would have left it."""
    token = os.urandom(8).hex()
    sha = models.sha(version)
    if state in ("downloading", "verifying"):
        inst.store.layout.part(token).write_bytes(models.built[version].data[:100])
    else:
        inst.store.blobs.ingest_file(models.files[version], part=inst.store.layout.part(token))
    if health is not None:
        health.save(inst.store.layout.health(token))
    rec = InstallRecord(version=version, token=token, sha256=sha, size=len(models.built[version].data),
                        state=state, attempts=attempts, started_at=T0, health=health is not None)
    inst.store.update_model("kws", lambda m: m.model_copy(update={"install": rec}))
    return rec


def _fresh(inst: Installer) -> Installer:
    """New objects over the same data dir: what a restarted process has."""
    return Installer(ModelStore(inst.store.layout.root), Engine())


@pytest.mark.parametrize("state", ["downloading", "verifying"])
def test_recover_cleans_up_unverified_installs(inst: Installer, models: Models, state: str) -> None:
    inst.install_file("kws", "1", models.files["1"])
    _plant(inst, models, "2", state)
    fresh = _fresh(inst)
    actions = fresh.recover()
    assert [(a.found, a.step, a.outcome) for a in actions if a.step != "load"] == [(state, "clean_up", "interrupted")]
    assert fresh.store.model("kws").last_result.outcome == "interrupted"
    assert list(fresh.store.layout.tmp.iterdir()) == []
    assert fresh.store.fsck() == []
    assert_serves(fresh, models, "1")


@pytest.mark.parametrize(("state", "attempts"), [("staged", 0), ("loading", 1), ("health_check", 2)])
def test_recover_retries_verified_installs(inst: Installer, models: Models, state: str, attempts: int) -> None:
    inst.install_file("kws", "1", models.files["1"])
    _plant(inst, models, "2", state, attempts=attempts)
    fresh = _fresh(inst)
    actions = fresh.recover()
    assert [(a.step, a.outcome) for a in actions] == [("retry", "active")]
    assert_serves(fresh, models, "2")
    assert fresh.store.model("kws").previous == ["1"]
    assert fresh.store.fsck() == []


def test_recover_reruns_the_saved_health_check(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    wrong = HealthCheck(inputs=models.sample, expected={"y": models.ref("1")})
    _plant(inst, models, "2", "health_check", attempts=1, health=wrong)
    fresh = _fresh(inst)
    [action, load] = fresh.recover()
    assert (action.step, action.outcome) == ("retry", "rolled_back")
    assert "health_check_failed" in action.detail
    assert (load.step, load.outcome, load.version) == ("load", "loaded", "1")
    assert_serves(fresh, models, "1")
    assert fresh.store.blobs.list() == [models.sha("1")]
    assert fresh.store.fsck() == []


def test_recover_turns_a_crash_loop_into_a_rollback(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    _plant(inst, models, "2", "loading", attempts=3)
    seen: list[tuple[str, str]] = []
    fresh = Installer(ModelStore(inst.store.layout.root), Engine(), on_event=lambda n, s, d: seen.append((n, s)))
    actions = fresh.recover()
    assert (actions[0].step, actions[0].outcome) == ("roll_back", "rolled_back")
    last = fresh.store.model("kws").last_result
    assert (last.version, last.outcome, last.reason) == ("2", "rolled_back", "crash_loop")
    assert ("kws", "rolled_back") in seen
    assert_serves(fresh, models, "1")
    assert fresh.store.fsck() == []


@pytest.mark.parametrize("state", ["active", "rolled_back"])
def test_recover_finishes_decided_installs(inst: Installer, models: Models, state: str) -> None:
    inst.install_file("kws", "1", models.files["1"])
    if state == "active":
        inst.install_file("kws", "2", models.files["2"])
    rec = _plant(inst, models, "2", "staged")
    inst.store.update_model("kws", lambda m: m.model_copy(update={"install": rec.model_copy(update={"state": state})}))
    fresh = _fresh(inst)
    actions = fresh.recover()
    assert (actions[0].step, actions[0].outcome) == ("finish", "finished")
    assert fresh.store.model("kws").install is None
    assert fresh.store.fsck() == []
    assert_serves(fresh, models, "2" if state == "active" else "1")


def test_recover_with_a_missing_staged_blob_rolls_back(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    _plant(inst, models, "2", "staged")
    inst.store.blobs.delete(models.sha("2"))
    fresh = _fresh(inst)
    actions = fresh.recover()
    assert (actions[0].step, actions[0].outcome) == ("retry", "rolled_back")
    assert "load_failed" in actions[0].detail
    assert_serves(fresh, models, "1")


# -- resumable downloads (a chunked transfer continues after a restart) --------------------


def _plant_download(inst: Installer, models: Models, *, bitmap: bool = True, sha: bool = True) -> InstallRecord:
    """A ``downloading`` record whose transfer got part of the way: part (+ chunk bitmap)."""
    rec = _plant(inst, models, "2", "downloading")
    if not sha:
        rec = rec.model_copy(update={"sha256": None})
        inst.store.update_model("kws", lambda m: m.model_copy(update={"install": rec}))
    if bitmap:
        bitmap_path(inst.store.layout.part(rec.token)).write_text('{"format": 1}\n')
    return rec


def _tmp_names(inst: Installer) -> list[str]:
    return sorted(p.name for p in inst.store.layout.tmp.iterdir())


def test_recover_keeping_downloads_keeps_a_resumable_one(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    rec = _plant_download(inst, models)
    files = sorted([f"{rec.token}.part", f"{rec.token}.part.bitmap"])
    seen: list[tuple[str, str, dict[str, Any]]] = []
    fresh = Installer(ModelStore(inst.store.layout.root), Engine(), on_event=lambda *e: seen.append(e))
    actions = fresh.recover(keep_downloads=True)
    assert [(a.version, a.found, a.step, a.outcome) for a in actions if a.step != "load"] == [
        ("2", "downloading", "resume", "resumable")
    ]
    model = fresh.store.model("kws")
    assert model.install == rec
    assert (model.last_result.version, model.last_result.outcome) == ("1", "active")
    assert _tmp_names(fresh) == files
    assert [(n, s, d["step"]) for n, s, d in seen if s == "recovered"] == [("kws", "recovered", "resume")]
    assert_serves(fresh, models, "1")
    # gc spares the part and the bitmap while the record lives
    fresh.store.gc()
    assert _tmp_names(fresh) == files
    # fsck names every in-progress install; nothing else is wrong
    assert [p for p in fresh.store.fsck() if "interrupted in state 'downloading'" not in p] == []
    assert fresh.pending_downloads() == [("kws", rec)]


@pytest.mark.parametrize(
    ("case", "keep", "bitmap", "sha"),
    [
        ("default_recover", False, True, True),
        ("no_bitmap", True, False, True),
        ("no_expected_sha256", True, True, False),
    ],
)
def test_recover_cleans_up_a_download_it_cannot_resume(
    inst: Installer, models: Models, case: str, keep: bool, bitmap: bool, sha: bool
) -> None:
    inst.install_file("kws", "1", models.files["1"])
    _plant_download(inst, models, bitmap=bitmap, sha=sha)
    fresh = _fresh(inst)
    actions = fresh.recover(keep_downloads=keep)
    assert [(a.step, a.outcome) for a in actions if a.step != "load"] == [("clean_up", "interrupted")]
    model = fresh.store.model("kws")
    assert model.install is None and model.last_result.outcome == "interrupted"
    assert _tmp_names(fresh) == []  # the bitmap goes with the part
    assert fresh.store.fsck() == []


def test_pending_downloads_lists_downloading_records_only(inst: Installer, models: Models) -> None:
    assert inst.pending_downloads() == []
    inst.install_file("kws", "1", models.files["1"])
    inst.begin_download("kws", "2", expected_sha256=models.sha("2"))
    inst.begin_download("aaa", "1")
    inst.begin_download("zzz", "1")
    staged = inst.store.model("zzz").install.model_copy(update={"state": "staged"})
    inst.store.update_model("zzz", lambda m: m.model_copy(update={"install": staged}))
    pending = inst.pending_downloads()
    assert [(n, r.version, r.state) for n, r in pending] == [("aaa", "1", "downloading"), ("kws", "2", "downloading")]
    assert pending[1][1] == inst.store.model("kws").install


def test_abandon_download_records_removes_and_reports(inst: Installer, models: Models, events: list) -> None:
    inst.install_file("kws", "1", models.files["1"])
    health = HealthCheck(inputs=models.sample, expected={"y": models.ref("2")})
    part = inst.begin_download("kws", "2", expected_sha256=models.sha("2"), health=health)
    part.write_bytes(models.built["2"].data[:100])
    bitmap_path(part).write_text('{"format": 1}\n')
    assert len(_tmp_names(inst)) == 3  # part, bitmap, health check
    events.clear()
    assert inst.abandon_download("kws", "2", reason="transfer_timeout", detail="chunk 3 unanswered") is True
    model = inst.store.model("kws")
    assert model.install is None
    last = model.last_result
    assert (last.version, last.outcome, last.reason, last.detail) == ("2", "refused", "transfer_timeout",
                                                                     "chunk 3 unanswered")
    assert _tmp_names(inst) == []
    assert events == [("kws", "refused", {"version": "2", "reason": "transfer_timeout",
                                          "detail": "chunk 3 unanswered"})]
    assert inst.pending_downloads() == []
    assert inst.store.fsck() == []
    assert_serves(inst, models, "1")
    # the model is free for the next install
    assert inst.install_file("kws", "2", models.files["2"]).outcome == "active"


def test_abandon_download_without_detail_records_one(inst: Installer, models: Models) -> None:
    inst.begin_download("kws", "2")
    assert inst.abandon_download("kws", "2", reason="cancelled")
    last = inst.store.model("kws").last_result
    assert (last.outcome, last.reason) == ("refused", "cancelled") and "cancelled" in last.detail


@pytest.mark.parametrize("case", ["no_record", "other_version", "past_downloading"])
def test_abandon_download_changes_nothing_otherwise(inst: Installer, models: Models, events: list,
                                                    case: str) -> None:
    inst.install_file("kws", "1", models.files["1"])
    if case == "other_version":
        _plant_download(inst, models)
    elif case == "past_downloading":
        _plant(inst, models, "2", "verifying")
    before = inst.store.read()
    tmp_before = _tmp_names(inst)
    events.clear()
    assert inst.abandon_download("kws", "3" if case == "other_version" else "2", reason="cancelled") is False
    assert inst.store.read() == before
    assert _tmp_names(inst) == tmp_before
    assert events == []
    assert inst.abandon_download("nobody", "1", reason="cancelled") is False


def test_load_all_serves_every_active_version_once(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("other", "4", models.files["4"])
    fresh = _fresh(inst)
    assert [(a.name, a.outcome) for a in fresh.load_all()] == [("kws", "loaded"), ("other", "loaded")]
    assert fresh.load_all() == []  # already serving: nothing to do
    fresh.engine.unload("other")
    fresh.engine.mark_unavailable("other", "loading")  # what the daemon does at start-up
    assert [(a.name, a.outcome) for a in fresh.load_all()] == [("other", "loaded")]
    assert fresh.engine.predict_versioned("other", models.sample)[0] == "4"
    assert_serves(fresh, models, "1")
    assert fresh.engine.predict_versioned("other", models.sample)[0] == "4"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_start_up_serves_the_previous_version_around_a_damaged_active_blob(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    _flip(inst.store.blobs.path(models.sha("2")))  # damaged in its weights: it would still load
    before = inst.store.layout.state.read_bytes()
    fresh = _fresh(inst)
    actions = fresh.recover()
    assert [(a.version, a.outcome) for a in actions] == [("1", "fallback")]
    assert "version 2" in actions[0].detail and "damaged" in actions[0].detail
    assert_serves(fresh, models, "1")
    assert fresh.store.layout.state.read_bytes() == before  # serving around damage changes nothing
    assert any("damaged" in p for p in fresh.store.fsck())  # but fsck tells the operator


def test_start_up_with_no_usable_version_marks_the_model_unavailable(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    _flip(inst.store.blobs.path(models.sha("2")))
    inst.store.blobs.delete(models.sha("1"))
    fresh = _fresh(inst)
    [action] = fresh.load_all()
    assert (action.version, action.outcome) == ("2", "unavailable")
    with pytest.raises(ModelUnavailable, match=r"damaged.*version 1: blob .* is missing"):
        fresh.engine.predict("kws", models.sample)


def test_load_all_replaces_a_stale_version_in_the_engine(inst: Installer, models: Models) -> None:
    inst.install_file("kws", "1", models.files["1"])
    inst.install_file("kws", "2", models.files["2"])
    other = _fresh(inst)
    other.rollback("kws")  # another process switched the store to 1
    assert [(a.version, a.outcome) for a in inst.load_all()] == [("1", "loaded")]
    assert_serves(inst, models, "1")


# -- health checks on their own --------------------------------------------------------------


@dataclass
class FakeLoaded:
    """Stands in for LoadedModel where the real interpreter cannot produce the case."""

    outputs: dict[str, np.ndarray] | Exception
    name: str = "fake"
    version: str = "1"

    @property
    def signature(self) -> Any:
        class Sig:
            def zeros(self) -> list[np.ndarray]:
                return [np.zeros((1, 2), np.float32)]

        return Sig()

    def predict(self, inputs: Any, *, coerce: bool = False) -> dict[str, np.ndarray]:
        if isinstance(self.outputs, Exception):
            raise self.outputs
        return self.outputs


def test_health_check_counts_non_finite_outputs() -> None:
    fake = FakeLoaded({"y": np.array([[1.0, np.nan, np.inf]], np.float32)})
    with pytest.raises(HealthCheckFailed, match="2 output values are NaN or infinite") as err:
        HealthCheck().run(fake)  # type: ignore[arg-type]
    assert err.value.figures["non_finite"] == 2


def test_health_check_reports_a_model_error() -> None:
    with pytest.raises(HealthCheckFailed, match="failed on the health-check sample") as err:
        HealthCheck().run(FakeLoaded(RuntimeError("invoke failed")))  # type: ignore[arg-type]
    assert "invoke failed" in err.value.figures["error"]


def test_health_check_missing_or_misshapen_output() -> None:
    fake = FakeLoaded({"y": np.zeros((1, 3), np.float32)})
    with pytest.raises(HealthCheckFailed, match="expected output 'z'"):
        HealthCheck(expected={"z": np.zeros((1, 3))}).run(fake)  # type: ignore[arg-type]
    with pytest.raises(HealthCheckFailed, match=r"shape \[1, 3\], expected \[1, 4\]"):
        HealthCheck(expected={"y": np.zeros((1, 4))}).run(fake)  # type: ignore[arg-type]


def test_health_check_tolerance_is_atol_plus_rtol() -> None:
    fake = FakeLoaded({"y": np.array([[1.0, 100.0]], np.float32)})
    HealthCheck(expected={"y": np.array([[1.05, 101.0]])}, atol=0.06, rtol=0.01).run(fake)  # type: ignore[arg-type]
    with pytest.raises(HealthCheckFailed, match="1 of 2 values"):
        HealthCheck(expected={"y": np.array([[1.05, 102.5]])}, atol=0.06, rtol=0.01).run(fake)  # type: ignore[arg-type]


def test_health_check_save_load_and_sample_files(tmp_path: Path, models: Models) -> None:
    check = HealthCheck(inputs=models.sample, expected={"y": models.ref("1")}, atol=1e-3, latency_budget_ms=50)
    check.save(tmp_path / "h.npz")
    back = HealthCheck.load(tmp_path / "h.npz")
    assert (back.atol, back.rtol, back.latency_budget_ms) == (1e-3, 1e-4, 50)
    np.testing.assert_array_equal(back.inputs["x"], models.sample["x"])
    np.testing.assert_array_equal(back.expected["y"], models.ref("1"))
    assert HealthCheck.load(_saved(HealthCheck(), tmp_path / "d.npz")).expected is None

    np.save(tmp_path / "x.npy", models.sample["x"])
    np.savez(tmp_path / "y.npz", y=models.ref("2"))
    assert isinstance(load_sample(tmp_path / "x.npy"), np.ndarray)
    assert set(load_sample(tmp_path / "x.npy", name="x")) == {"x"}
    from_files = health_check_from_files(tmp_path / "x.npy", tmp_path / "y.npz")
    engine = Engine()
    from_files.run(engine.load("kws", "2", models.files["2"]))
    with pytest.raises(HealthCheckFailed):
        from_files.run(engine.load("kws", "1", models.files["1"]))
    with pytest.raises(ValueError):
        load_sample(tmp_path / "h.json")


def _saved(check: HealthCheck, path: Path) -> Path:
    check.save(path)
    return path
