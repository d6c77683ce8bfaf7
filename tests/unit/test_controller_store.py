"""The controller's SQL store on SQLite: every method, idempotent ingest, CAS, uploads, and
an acknowledged write surviving kill -9.

The tests take a ``url`` fixture; ``tests/integration/test_controller_store_pg.py`` imports
the ``CORE`` ones and runs them again against a real PostgreSQL by overriding ``url``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pytest
import sqlalchemy as sa

from controller import schema
from controller.store import (
    Assignment,
    Conflict,
    DigestMismatch,
    Incomplete,
    NotFound,
    ReleaseRecord,
    Report,
    Store,
    StoreError,
    StoreUnavailable,
)
from edge_runtime.protocol import messages as m

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0  # a whole hour: 472222 * 3600
PART = schema.BLOB_PART_BYTES


# -- message builders (real pydantic models, dumped as the wire carries them) ------------------


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def tel(seq: int, *, boot: str = "b1", at: Optional[float] = None,
        models: Optional[dict[str, tuple[Optional[str], int, int, Optional[float]]]] = None) -> dict[str, Any]:
    """A Telemetry sample; ``models``: {name: (version, cumulative calls, cumulative errors, p95)}."""
    figs = {name: m.ModelFigures(version=v, calls=c, errors=e, p95_ms=p) for name, (v, c, e, p) in (models or {}).items()}
    return m.Telemetry(
        seq=seq, at=_iso(T0 + seq if at is None else at), boot_id=boot, interval_s=1.0,
        system=m.SystemFigures(cpu_percent=1.0, memory_total_bytes=1 << 30, memory_available_bytes=1 << 29),
        models=figs,
    ).model_dump(mode="json")


def birth(boot: str, bd_seq: int, *, groups: tuple[str, ...] = (), active: Optional[str] = None,
          generation: Optional[int] = None, tier: str = "edge") -> dict[str, Any]:
    models = {"det": m.InstalledModel(active=active)} if active else {}
    return m.DeviceState(
        online=True, boot_id=boot, bd_seq=bd_seq, runtime_version="0.9",
        capabilities=m.Capabilities(cores=4, memory_bytes=1 << 30, tier=tier),
        models=models, generation=generation, groups=list(groups),
    ).model_dump(mode="json")


def death(boot: str, bd_seq: int) -> dict[str, Any]:
    return m.DeviceState(online=False, boot_id=boot, bd_seq=bd_seq).model_dump(mode="json")


def event(seq: int, *, step: str = "active", model: str = "det", version: str = "2.0",
          reason: Optional[str] = None) -> dict[str, Any]:
    return m.Event(seq=seq, at=_iso(T0 + seq), step=step, model=model, version=version,
                   reason=reason).model_dump(mode="json")


def reply(seq: int, *, ok: bool = True) -> dict[str, Any]:
    err = None if ok else m.ErrorInfo(type="internal", message="boom")
    return m.Reply(seq=seq, command="ping", ok=ok, error=err).model_dump(mode="json")


def release(model: str = "det", version: str = "2.0", sha: str = "a" * 64, at: float = T0) -> ReleaseRecord:
    return ReleaseRecord(model=model, version=version, sha256=sha, size=10, manifest={"name": model},
                         envelope="{}", created_at=at, created_by="alice")


def rows(url: str, table: sa.Table, *order: str) -> list[dict[str, Any]]:
    """A table's rows read straight from the database (a second engine)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            q = sa.select(table).order_by(*(table.c[o] for o in order))
            return [dict(r) for r in conn.execute(q).mappings()]
    finally:
        engine.dispose()


def expected_deltas(samples: list[dict[str, Any]]) -> dict[tuple[int, str], tuple[int, int]]:
    """The reference: in seq order, each model's counters minus the previous sample's when it
    is the same boot (a counter that went down counts whole)."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    prev: Optional[dict[str, Any]] = None
    for s in sorted(samples, key=lambda x: x["seq"]):
        before = prev["models"] if prev is not None and prev["boot_id"] == s["boot_id"] else {}
        for name, fig in s["models"].items():
            c, e = fig["calls"], fig["errors"]
            if name in before:
                pc, pe = before[name]["calls"], before[name]["errors"]
                c, e = (c - pc if c >= pc else c), (e - pe if e >= pe else e)
            out[(s["seq"], name)] = (c, e)
        prev = s
    return out


def stream(n: int, *, reboot_at: Optional[int] = None, seed: int = 1) -> list[dict[str, Any]]:
    """n samples of two models with growing counters; a reboot (counters from 0) at ``reboot_at``."""
    rnd = random.Random(seed)
    out, calls, errors, boot = [], {"det": 0, "cls": 0}, {"det": 0, "cls": 0}, "b1"
    for seq in range(1, n + 1):
        if seq == reboot_at:
            boot, calls, errors = "b2", {"det": 0, "cls": 0}, {"det": 0, "cls": 0}
        for k in calls:
            calls[k] += rnd.randint(0, 50)
            errors[k] += rnd.randint(0, 2)
        out.append(tel(seq, boot=boot, at=T0 + seq * 60.0, models={
            "det": ("1.0", calls["det"], errors["det"], float(rnd.randint(5, 30))),
            "cls": ("3.1", calls["cls"], errors["cls"], None)}))
    return out


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ctl' / 'controller.db'}"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store.open(url)
    yield s
    s.close()


# -- opening -----------------------------------------------------------------------------------


def test_open_is_idempotent_and_keeps_data(url: str) -> None:
    s = Store.open(url)
    s.register_device("d1", now=T0)
    s.close()
    s = Store.open(url)
    assert [x.id for x in s.list_devices()] == ["d1"]
    s.close()


def test_open_refuses_a_newer_schema_and_a_missing_one(url: str) -> None:
    Store.open(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(schema.meta).where(schema.meta.c.key == "schema_version").values(value=99))
    engine.dispose()
    with pytest.raises(StoreUnavailable, match="newer than this controller"):
        Store.open(url)


def test_open_without_create_on_an_empty_database(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(StoreUnavailable, match="no controller schema"):
        Store.open(f"sqlite:///{tmp_path / 'empty.db'}", create=False)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        Store.open(f"sqlite:///{tmp_path / 'nope.db'}", create=False)


def test_open_rejects_other_urls_and_names_the_url_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite:///PATH"):
        Store.open("mysql://u@h/db")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="file/x.db"):
        Store.open(f"sqlite:///{blocker}/x.db")


def test_sqlite_runs_wal_synchronous_full_with_foreign_keys(store: Store, url: str) -> None:
    with store._engine.connect() as conn:  # the engine's own connections carry the pragmas
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert sqlite3.sqlite_version_info >= (3, 35)  # UPDATE ... RETURNING


def test_in_memory_sqlite_works() -> None:
    s = Store.open("sqlite://")
    s.register_device("d1", now=T0)
    assert s.get_device("d1").id == "d1"
    assert s.size_bytes() is None
    s.close()


# -- devices and groups ---------------------------------------------------------------------------


def test_devices_and_groups(store: Store) -> None:
    rec = store.register_device("d2", groups=("lab",), now=T0)
    assert (rec.id, rec.online, rec.groups, rec.registered_at) == ("d2", False, ("lab",), T0)
    store.register_device("d2", groups=("lab", "north"), now=T0 + 5)  # idempotent, adds north
    assert store.get_device("d2").registered_at == T0
    store.add_group("north", ("d1", "d3"), now=T0)  # registers d1, d3
    store.add_group("empty", now=T0)
    assert store.list_groups() == {"empty": [], "lab": ["d2"], "north": ["d1", "d2", "d3"]}
    assert [d.id for d in store.list_devices()] == ["d1", "d2", "d3"]
    assert [d.id for d in store.list_devices(group="north")] == ["d1", "d2", "d3"]
    assert store.get_device("d2").groups == ("lab", "north")
    assert store.resolve_target("all") == ["d1", "d2", "d3"]
    assert store.resolve_target("group:lab") == ["d2"]
    assert store.resolve_target("device:d3") == ["d3"]
    with pytest.raises(NotFound, match="fleetctl"):
        store.resolve_target("device:zz")
    with pytest.raises(NotFound):
        store.resolve_target("group:zz")
    with pytest.raises(ValueError, match="device:ID"):
        store.resolve_target("fleet")
    store.remove_group("north", ("d1",))
    assert store.list_groups()["north"] == ["d2", "d3"]
    store.remove_group("north")
    assert "north" not in store.list_groups()
    assert store.get_device("d2").groups == ("lab",)
    with pytest.raises(NotFound):
        store.remove_group("north")
    with pytest.raises(NotFound, match="never connected"):
        store.get_device("nope")


def test_apply_state_birth_death_and_stale_will(store: Store) -> None:
    assert store.apply_state("d1", birth("b1", 1, groups=("lab",), active="1.0", generation=3), now=T0)
    d = store.get_device("d1")
    assert (d.online, d.boot_id, d.bd_seq, d.runtime_version, d.tier) == (True, "b1", 1, "0.9", "edge")
    assert d.active_version("det") == "1.0" and d.reported_generation == 3 and d.groups == ("lab",)
    assert d.capabilities is not None and d.capabilities["cores"] == 4
    assert (d.state_at, d.last_seen) == (T0, T0)
    assert not store.apply_state("d1", birth("b1", 1, groups=("lab",), active="1.0", generation=3), now=T0 + 1)
    # The process restarts: a new birth (bd_seq 2), then the old process's Will arrives late.
    assert store.apply_state("d1", birth("b2", 2, tier="cloud"), now=T0 + 10)
    assert not store.apply_state("d1", death("b1", 1), now=T0 + 11)
    d = store.get_device("d1")
    assert (d.online, d.boot_id, d.bd_seq, d.tier, d.reported) == (True, "b2", 2, "cloud", {})
    assert d.groups == ("lab",)  # memberships are only ever added by a birth
    # The current Will marks it offline, once; a late copy of that process's birth does not revive it.
    assert store.apply_state("d1", death("b2", 2), now=T0 + 20)
    assert not store.apply_state("d1", death("b2", 2), now=T0 + 21)
    assert not store.apply_state("d1", birth("b2", 2), now=T0 + 22)
    assert store.get_device("d1").online is False
    # An older process's birth over a newer live one is stale.
    assert store.apply_state("d1", birth("b3", 3), now=T0 + 30)
    assert not store.apply_state("d1", birth("b2", 2), now=T0 + 31)
    assert store.get_device("d1").boot_id == "b3"
    # A Will of a device never seen registers it, offline.
    assert store.apply_state("d9", death("x", 1), now=T0)
    assert store.get_device("d9").online is False


def test_touch_only_moves_last_seen_forward(store: Store) -> None:
    store.register_device("d1", now=T0)
    store.touch("d1", now=T0 + 5)
    store.touch("d1", now=T0 + 2)
    store.touch("ghost", now=T0)  # unknown: nothing
    assert store.get_device("d1").last_seen == T0 + 5
    with pytest.raises(NotFound):
        store.get_device("ghost")


# -- releases, uploads, blobs -------------------------------------------------------------------------


def test_releases(store: Store) -> None:
    store.add_release(release(version="2.0", at=T0 + 2))
    store.add_release(release(version="1.0", sha="b" * 64, at=T0 + 1))
    store.add_release(release(version="2.0", at=T0 + 2))  # same sha: no-op
    with pytest.raises(Conflict, match="new version"):
        store.add_release(release(version="2.0", sha="c" * 64))
    store.add_release(release(model="cls", version="1.0", sha="d" * 64))
    assert store.get_release("det", "2.0") == release(version="2.0", at=T0 + 2)
    assert [(r.model, r.version) for r in store.list_releases()] == [("cls", "1.0"), ("det", "1.0"), ("det", "2.0")]
    assert [r.version for r in store.list_releases("det")] == ["1.0", "2.0"]
    assert store.release_by_sha("b" * 64).version == "1.0"  # type: ignore[union-attr]
    assert store.release_by_sha("f" * 64) is None
    with pytest.raises(NotFound):
        store.get_release("det", "9.9")


def _begin(store: Store, data: bytes, upload_id: str = "u1", version: str = "2.0") -> str:
    sha = hashlib.sha256(data).hexdigest()
    store.begin_upload(upload_id, model="det", version=version, size=len(data), sha256=sha, created_by="alice",
                       now=T0)
    return sha


def test_upload_out_of_order_with_a_duplicate_part_round_trips(store: Store, tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 12345)  # three blob parts after the re-cut
    sha = _begin(store, data)
    _begin(store, data)  # idempotent
    cuts = [(o, data[o:o + 100_000]) for o in range(0, len(data), 100_000)]
    random.Random(3).shuffle(cuts)
    held = 0
    for off, chunk in cuts:
        held = store.add_upload_part("u1", off, chunk)
    assert held == len(data)
    assert store.add_upload_part("u1", cuts[0][0], cuts[0][1]) == len(data)  # redelivered: no-op
    assert not store.has_blob(sha)
    assert store.finish_upload("u1") == (sha, len(data))
    assert store.has_blob(sha) and store.blob_size(sha) == len(data)
    out = tmp_path / "blob"
    assert store.write_blob_to(sha, str(out)) == len(data)
    assert out.read_bytes() == data
    with pytest.raises(NotFound, match="no upload"):
        store.finish_upload("u1")  # dropped once finished
    # The same bytes again: the blob held is kept.
    _begin(store, data, upload_id="u2", version="2.1")
    store.add_upload_part("u2", 0, data)
    assert store.finish_upload("u2") == (sha, len(data))


def test_upload_errors(store: Store) -> None:
    data = b"x" * 1000
    sha = _begin(store, data)
    with pytest.raises(Conflict, match="new id"):
        store.begin_upload("u1", model="det", version="2.0", size=999, sha256=sha, created_by="a", now=T0)
    with pytest.raises(ValueError, match="outside the declared size"):
        store.add_upload_part("u1", 900, b"y" * 200)
    with pytest.raises(NotFound):
        store.add_upload_part("nope", 0, b"y")
    with pytest.raises(ValueError, match="hex"):
        store.begin_upload("u9", model="det", version="2.0", size=1, sha256="XYZ", created_by="a", now=T0)
    store.add_upload_part("u1", 0, data[:300])
    store.add_upload_part("u1", 500, data[500:])
    with pytest.raises(Incomplete, match=r"\[300, 500\)"):
        store.finish_upload("u1")
    store.add_upload_part("u1", 250, data[250:600])  # overlaps both neighbours: fine
    _begin(store, b"abc", upload_id="u3", version="3.0")
    store.add_upload_part("u3", 0, b"ab")
    with pytest.raises(Incomplete, match=r"\[2, 3\) of 3 are missing"):
        store.finish_upload("u3")
    assert store.finish_upload("u1") == (sha, 1000)
    # A digest mismatch drops the upload.
    store.begin_upload("u4", model="det", version="4.0", size=3, sha256="0" * 64, created_by="a", now=T0)
    store.add_upload_part("u4", 0, b"abc")
    with pytest.raises(DigestMismatch, match="dropped"):
        store.finish_upload("u4")
    assert not store.has_blob("0" * 64)
    with pytest.raises(NotFound):
        store.finish_upload("u4")
    # A release that exists with another sha refuses the upload.
    store.add_release(release(version="5.0", sha="e" * 64))
    with pytest.raises(Conflict, match="new version"):
        _begin(store, b"other", upload_id="u5", version="5.0")


def test_put_blob_and_empty_blob(store: Store, tmp_path: Path) -> None:
    data = os.urandom(PART + 1)
    src = tmp_path / "src"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(StoreError, match="hashes to"):
        store.put_blob("1" * 64, str(src))
    assert not store.has_blob("1" * 64)
    store.put_blob(sha, str(src))
    store.put_blob(sha, str(src))  # held: no-op
    assert store.write_blob_to(sha, str(tmp_path / "out")) == len(data)
    assert (tmp_path / "out").read_bytes() == data
    empty = _begin(store, b"", upload_id="e")
    assert store.finish_upload("e") == (empty, 0)
    assert store.has_blob(empty) and store.write_blob_to(empty, str(tmp_path / "e")) == 0
    with pytest.raises(NotFound):
        store.write_blob_to("2" * 64, str(tmp_path / "x"))


# -- desired state ------------------------------------------------------------------------------------


def A(dev: str, version: str, model: str = "det", route: str = "local") -> Assignment:  # noqa: N802
    return Assignment(device_id=dev, model=model, version=version, route=route)


def test_set_assignments_generations(store: Store) -> None:
    store.add_group("g", ("d1", "d2"), now=T0)
    assert store.set_assignments({"d1": {"det": A("d1", "1.0")}, "d2": {"det": None}}, now=T0) == {"d1": 1, "d2": 0}
    assert store.get_desired("d2") is None
    assert store.set_assignments({"d1": {"det": A("d1", "1.0")}}, now=T0 + 1) == {"d1": 1}  # identical: kept
    assert store.set_assignments({"d1": {"det": A("d1", "2.0"), "cls": A("d1", "1.0", "cls")}}, now=T0 + 2) == {"d1": 2}
    assert store.assignments("d1") == [A("d1", "1.0", "cls"), A("d1", "2.0")]
    assert store.set_assignments({"d1": {"det": A("d1", "2.0", route="cloud1")}}, now=T0 + 3) == {"d1": 3}
    assert store.set_assignments({"d1": {"cls": None}}, now=T0 + 4) == {"d1": 4}
    assert store.set_assignments({"d1": {"cls": None}}, now=T0 + 5) == {"d1": 4}
    desired = store.get_desired("d1")
    assert desired is not None and (desired.generation, desired.changed_at) == (4, T0 + 4)
    with pytest.raises(NotFound, match="register"):
        store.set_assignments({"d1": {"det": A("d1", "9.0")}, "zz": {"det": A("zz", "1.0")}}, now=T0)
    assert store.assignments("d1") == [A("d1", "2.0", route="cloud1")]  # all or nothing
    with pytest.raises(ValueError):
        store.set_assignments({"d1": {"det": A("d2", "1.0")}}, now=T0)
    # The signed document is kept only for the current generation.
    assert not store.record_signed("d1", 3, "env3", signed_at=T0, expires_at=T0 + 60)
    assert store.record_signed("d1", 4, "env4", signed_at=T0, expires_at=T0 + 60)
    desired = store.get_desired("d1")
    assert desired is not None and (desired.envelope, desired.signed_generation) == ("env4", 4)
    assert [x.device_id for x in store.list_desired()] == ["d1"]


# -- rollouts -----------------------------------------------------------------------------------------


def test_rollouts_cas_and_one_active_per_model(store: Store) -> None:
    r = store.create_rollout(model="det", version="2.0", target="group:g", plan={"waves": [10, 100]},
                             steps=[("d2", 1, "1.0"), ("d1", 0, None)], created_by="alice", now=T0)
    assert (r.state, r.revision, r.wave) == ("pending", 0, 0)
    assert [(s.device_id, s.wave, s.previous_version, s.state) for s in r.steps] == [
        ("d1", 0, None, "pending"), ("d2", 1, "1.0", "pending")]
    with pytest.raises(ValueError, match="more than one step"):
        store.create_rollout(model="x", version="1", target="all", plan={}, steps=[("d1", 0, None), ("d1", 1, None)],
                             created_by="a", now=T0)
    with pytest.raises(Conflict, match=f"rollout {r.id} of det is pending"):
        store.create_rollout(model="det", version="3.0", target="all", plan={}, steps=[], created_by="b", now=T0)
    other = store.create_rollout(model="cls", version="1.0", target="all", plan={}, steps=[], created_by="b",
                                 now=T0 + 1)
    r2 = store.update_rollout(r.id, 0, fields={"state": "running", "wave_started_at": T0 + 5},
                              steps={"d1": {"state": "updating", "generation": 7, "deadline": T0 + 65}}, now=T0 + 5)
    assert (r2.state, r2.revision, r2.updated_at, r2.steps[0].state, r2.steps[0].generation) == (
        "running", 1, T0 + 5, "updating", 7)
    with pytest.raises(Conflict, match="revision 1, not 0"):
        store.update_rollout(r.id, 0, fields={"state": "paused"}, steps={}, now=T0 + 6)
    with pytest.raises(NotFound):
        store.update_rollout(999, 0, fields={}, steps={}, now=T0)
    with pytest.raises(NotFound, match="no step"):
        store.update_rollout(r.id, 1, fields={}, steps={"zz": {"state": "done"}}, now=T0)
    assert store.get_rollout(r.id).revision == 1  # the failed update changed nothing
    with pytest.raises(ValueError, match="revision"):
        store.update_rollout(r.id, 1, fields={"revision": 5}, steps={}, now=T0)
    assert [s.rollout_id for s in store.steps_for_device("d1")] == [r.id]
    r3 = store.update_rollout(r.id, 1, fields={"state": "aborted", "reason": "gate", "finished_at": T0 + 9,
                                               "figures": {"errors": 0.5}}, steps={}, now=T0 + 9)
    assert (r3.state, r3.figures, r3.revision) == ("aborted", {"errors": 0.5}, 2)
    assert [s.rollout_id for s in store.steps_for_device("d1")] == [r.id]  # updating: still tracked
    assert store.steps_for_device("d2") == []  # pending in a finished rollout: no longer
    assert [s.rollout_id for s in store.steps_for_device("d2", active_only=False)] == [r.id]
    r4 = store.create_rollout(model="det", version="3.0", target="all", plan={}, steps=[], created_by="b", now=T0 + 10)
    with pytest.raises(Conflict, match="second rollout"):
        store.update_rollout(r.id, 2, fields={"state": "running"}, steps={}, now=T0 + 11)
    assert [x.id for x in store.list_rollouts()] == [r4.id, other.id, r.id]
    assert [x.id for x in store.list_rollouts(states=("aborted",))] == [r.id]
    assert store.list_rollouts()[0].steps == ()
    with pytest.raises(NotFound):
        store.get_rollout(999)


# -- migrations ---------------------------------------------------------------------------------------


def test_migrations_cas_and_one_active_per_workload(store: Store) -> None:
    timeouts = {"deploy_s": 30.0, "switch_s": 20.0, "unload_s": 10.0, "revert_s": 40.0}
    kw = dict(version="2.0", from_node="d1", to_node="cloud1", target_had=False, timeouts=timeouts, created_by="alice")
    m = store.create_migration(model="det", source="d1", reason="slo_violation",
                               prediction={"p95_before_ms": 90.0, "p95_after_ms": 20.0}, now=T0, **kw)
    assert (m.state, m.revision, m.source, m.from_node, m.to_node, m.target_had, m.timeouts, m.prediction) == (
        "pending", 0, "d1", "d1", "cloud1", False, timeouts, {"p95_before_ms": 90.0, "p95_after_ms": 20.0})
    with pytest.raises(Conflict, match=f"migration {m.id} of det for d1 is pending"):
        store.create_migration(model="det", source="d1", reason=None, now=T0, **kw)
    other = store.create_migration(model="det", source="d2", reason=None, now=T0 + 1, **kw)  # another workload
    third = store.create_migration(model="cls", source="d1", reason=None, now=T0 + 2, **kw)
    m2 = store.update_migration(m.id, 0, fields={"state": "deploying", "step_started_at": T0 + 3,
                                                 "deadline": T0 + 33}, now=T0 + 3)
    assert (m2.state, m2.revision, m2.updated_at, m2.deadline) == ("deploying", 1, T0 + 3, T0 + 33)
    with pytest.raises(Conflict, match="revision 1, not 0"):
        store.update_migration(m.id, 0, fields={"state": "switching"}, now=T0 + 4)
    with pytest.raises(NotFound):
        store.update_migration(999, 0, fields={}, now=T0)
    with pytest.raises(ValueError, match="revision"):
        store.update_migration(m.id, 1, fields={"revision": 7}, now=T0)
    assert store.get_migration(m.id).revision == 1  # the failed updates changed nothing
    m3 = store.update_migration(m.id, 1, fields={"state": "reverted", "failure": "deploy_timeout",
                                                 "detail": "slow", "finished_at": T0 + 40}, now=T0 + 40)
    assert (m3.state, m3.failure, m3.finished_at, m3.revision) == ("reverted", "deploy_timeout", T0 + 40, 2)
    again = store.create_migration(model="det", source="d1", reason=None, now=T0 + 41, **kw)  # finished: a new one
    with pytest.raises(Conflict, match="second migration"):
        store.update_migration(m.id, 2, fields={"state": "deploying"}, now=T0 + 42)
    assert [x.id for x in store.list_migrations()] == [again.id, third.id, other.id, m.id]
    active = ("pending", "deploying", "switching", "unloading", "reverting")
    assert [x.id for x in store.list_migrations(states=active, model="det")] == [again.id, other.id]
    assert [x.id for x in store.list_migrations(limit=1)] == [again.id]
    with pytest.raises(NotFound, match="no migration 999"):
        store.get_migration(999)


def test_all_assignments_across_devices(store: Store) -> None:
    store.add_group("g", ("d1", "d2"), now=T0)
    store.set_assignments({"d2": {"det": A("d2", "1.0", route="d1")}, "d1": {"det": A("d1", "1.0"),
                                                                          "cls": A("d1", "3.0", "cls")}}, now=T0)
    assert store.all_assignments() == [A("d1", "3.0", "cls"), A("d1", "1.0"), A("d2", "1.0", route="d1")]
    assert store.all_assignments("det") == [A("d1", "1.0"), A("d2", "1.0", route="d1")]


def test_a_database_from_before_migrations_gets_the_table_on_open(url: str) -> None:
    s = Store.open(url)
    s.register_device("d1", now=T0)
    s.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE migrations"))
    engine.dispose()
    s = Store.open(url)  # create_all adds it; nothing else changes (no schema version bump)
    try:
        assert s.list_migrations() == [] and [d.id for d in s.list_devices()] == ["d1"]
    finally:
        s.close()


# -- ingest -------------------------------------------------------------------------------------------


def test_telemetry_is_idempotent_with_deltas_and_rollups(store: Store, url: str) -> None:
    s1 = tel(1, models={"det": ("1.0", 10, 1, 20.0)})
    assert store.add_telemetry("d1", s1, now=T0 + 1)
    assert not store.add_telemetry("d1", s1, now=T0 + 2)  # redelivered: counted once
    assert store.add_telemetry("d1", tel(2, models={"det": ("1.0", 25, 1, 30.0)}), now=T0 + 3)
    # The device restarts: counters start again, the whole count is new.
    assert store.add_telemetry("d1", tel(3, boot="b2", models={"det": ("1.0", 4, 2, 10.0)}), now=T0 + 4)
    assert store.add_telemetry("d1", tel(4, boot="b2", models={"det": ("1.0", 9, 2, None)}), now=T0 + 5)
    got = [(r["seq"], r["calls"], r["errors"]) for r in rows(url, schema.telemetry_models, "seq")]
    assert got == [(1, 10, 1), (2, 15, 0), (3, 4, 2), (4, 5, 0)]
    [roll] = store.rollups("det")
    assert (roll["calls"], roll["errors"], roll["samples"]) == (34, 3, 4)
    assert roll["p95_weighted"] == pytest.approx(10 * 20 + 15 * 30 + 4 * 10)
    assert roll["hour"] == int(T0 // 3600)
    d = store.get_device("d1")  # registered by its telemetry
    assert d.last_telemetry is not None and d.last_telemetry["seq"] == 4 and d.last_seen == T0 + 5
    assert store.counts()["telemetry"] == 4
    assert [x["seq"] for x in store.recent_telemetry(device_id="d1", limit=2)] == [4, 3]
    assert store.recent_telemetry()[0]["device_id"] == "d1" and store.recent_telemetry()[0]["received_at"] == T0 + 5


def test_late_sample_is_stored_and_rebases_its_successor(store: Store, url: str) -> None:
    samples = stream(6, reboot_at=4)
    for seq in (1, 3, 6, 2, 5, 4):  # 2 lands between held 1 and 3; 5 and 4 after 6
        assert store.add_telemetry("d1", samples[seq - 1], now=T0 + 100)
    got = {(r["seq"], r["model"]): (r["calls"], r["errors"]) for r in rows(url, schema.telemetry_models, "seq")}
    assert got == expected_deltas(samples)
    assert store.get_device("d1").last_telemetry["seq"] == 6  # type: ignore[index]
    want = expected_deltas(samples)
    total = sum(v[0] for (_, name), v in want.items() if name == "det")
    assert sum(r["calls"] for r in store.rollups("det")) == total


def test_any_arrival_order_gives_the_in_order_result(store: Store, url: str) -> None:
    samples = stream(60, reboot_at=25, seed=7)
    order = samples + samples[10:30]  # with redeliveries
    random.Random(11).shuffle(order)
    stored = sum(store.add_telemetry("d1", s, now=T0) for s in order)
    assert stored == 60
    want = expected_deltas(samples)
    got = {(r["seq"], r["model"]): (r["calls"], r["errors"]) for r in rows(url, schema.telemetry_models, "seq")}
    assert got == want
    for name, version in (("det", "1.0"), ("cls", "3.1")):
        per_hour: dict[int, int] = {}
        for s in samples:
            hour = int((T0 + s["seq"] * 60.0) // 3600)
            per_hour[hour] = per_hour.get(hour, 0) + want[(s["seq"], name)][0]
        assert {r["hour"]: r["calls"] for r in store.rollups(name)} == per_hour
        assert all(r["version"] == version and r["samples"] > 0 for r in store.rollups(name))


def test_batches_give_the_one_by_one_result(store: Store, url: str) -> None:
    """``ingest_many`` (the daemon's path) in random batches of shuffled reports with
    redeliveries, births and events mixed in stores exactly what one-by-one arrival in seq
    order would: the same deltas, rollups, newest sample, and each report new exactly once."""
    rnd = random.Random(5)
    streams = {f"d{k}": stream(30, reboot_at=12 + k, seed=k) for k in range(3)}
    reports = [Report("telemetry", dev, sample, T0 + sample["seq"]) for dev, samples in streams.items()
               for sample in samples]
    reports += [Report("state", dev, birth("b1", 1), T0) for dev in streams]
    reports += [Report("event", dev, event(k), T0 + k) for dev in streams for k in (1, 2)]
    unique = len(reports)
    reports += rnd.sample(reports, 25)  # redeliveries
    rnd.shuffle(reports)
    got_new = 0
    while reports:
        n = rnd.randint(1, 40)
        batch, reports = reports[:n], reports[n:]
        got_new += sum(store.ingest_many(batch))
    assert got_new == unique
    held = rows(url, schema.telemetry_models, "device_id", "seq", "model")
    for dev, samples in streams.items():
        got = {(r["seq"], r["model"]): (r["calls"], r["errors"]) for r in held if r["device_id"] == dev}
        assert got == expected_deltas(samples), dev
        d = store.get_device(dev)
        assert d.online and d.last_telemetry is not None and d.last_telemetry["seq"] == 30
    want_calls = sum(v[0] for samples in streams.values() for (_, name), v in expected_deltas(samples).items()
                     if name == "det")
    assert sum(r["calls"] for r in store.rollups("det")) == want_calls
    assert sum(r["samples"] for r in store.rollups("det")) == 90
    assert store.counts()["telemetry"] == 90 and store.counts()["events"] == 6


def test_ingest_many_is_all_or_nothing(store: Store, url: str) -> None:
    good = Report("telemetry", "d1", tel(1, models={"det": ("1.0", 5, 0, 9.0)}), T0)
    written_first = Report("event", "d0", event(1), T0)  # device order: d0's event is written first
    broken = Report("event", "d9", {"seq": 1}, T0)  # no step: the write fails after it
    with pytest.raises(KeyError):
        store.ingest_many([good, broken, written_first])
    assert store.counts()["telemetry"] == 0 and store.counts()["events"] == 0
    assert rows(url, schema.telemetry_models) == [] and store.rollups("det") == []
    assert rows(url, schema.devices) == []
    with pytest.raises(ValueError, match="report kind"):
        store.ingest_many([good, Report("gossip", "d1", {}, T0)])
    assert store.counts()["telemetry"] == 0
    assert store.ingest_many([good, good]) == [True, False]  # a duplicate inside one batch
    assert store.ingest_many([]) == []


def test_model_window_and_latency_percentiles(store: Store) -> None:
    store.add_telemetry("d1", tel(1, at=T0, models={"det": ("2.0", 100, 5, 10.0), "cls": ("1.0", 3, 0, None)}), now=T0)
    store.add_telemetry("d1", tel(2, at=T0 + 60, models={"det": ("2.0", 400, 5, 20.0)}), now=T0)
    store.add_telemetry("d2", tel(1, at=T0 + 30, models={"det": ("2.0", 100, 50, 40.0)}), now=T0)
    store.add_telemetry("d3", tel(1, at=T0 + 30, models={"det": ("1.0", 7, 0, 1.0)}), now=T0)
    w = store.model_window("det", "2.0", since=T0)
    assert (w.calls, w.errors, w.samples) == (500, 55, 3)
    assert w.p95_ms == pytest.approx((100 * 10 + 300 * 20 + 100 * 40) / 500)
    assert w.error_rate == pytest.approx(55 / 500)
    w = store.model_window("det", "2.0", devices=["d1"], since=T0, until=T0 + 60)
    assert (w.calls, w.errors, w.samples, w.p95_ms) == (100, 5, 1, 10.0)
    assert store.model_window("det", "2.0", devices=[], since=T0).calls == 0
    assert store.model_window("det", "9.9", since=T0).p95_ms is None
    assert store.model_window("det", "2.0", devices=[f"x{i}" for i in range(1200)] + ["d2"], since=T0).calls == 100
    pct = store.latency_percentiles(since=T0)
    assert set(pct) == {("det", "2.0"), ("det", "1.0")}
    assert pct[("det", "2.0")] == {"p50": 20.0, "p95": pytest.approx(38.0), "p99": pytest.approx(39.6)}
    assert store.latency_percentiles(since=T0 + 3600) == {}


def test_events_are_idempotent(store: Store) -> None:
    assert store.add_event("d1", event(1), now=T0)
    assert not store.add_event("d1", event(1), now=T0 + 1)
    assert store.add_event("d1", event(2, step="rolled_back", reason="health_check_failed"), now=T0 + 2)
    assert store.add_event("d2", event(1, model="cls"), now=T0 + 3)
    assert [(e["device_id"], e["seq"]) for e in store.recent_events()] == [("d2", 1), ("d1", 2), ("d1", 1)]
    assert [e["seq"] for e in store.recent_events(device_id="d1", limit=1)] == [2]
    assert [e["device_id"] for e in store.recent_events(model="cls")] == ["d2"]
    assert [e["seq"] for e in store.recent_events(since=T0 + 2)] == [1, 2]
    ev = store.recent_events(device_id="d1")[0]
    assert (ev["step"], ev["reason"], ev["received_at"]) == ("rolled_back", "health_check_failed", T0 + 2)
    assert store.counts()["events"] == 3


def test_expire_keeps_rollups(store: Store, url: str) -> None:
    for seq in range(1, 5):
        store.add_telemetry("d1", tel(seq, models={"det": ("1.0", seq * 10, 0, 5.0)}), now=T0 + seq)
        store.add_event("d1", event(seq), now=T0 + seq)
    assert store.expire_telemetry(before=T0 + 3) == 2 + 2 + 2  # telemetry, telemetry_models, events
    assert [r["seq"] for r in rows(url, schema.telemetry, "seq")] == [3, 4]
    assert [r["seq"] for r in rows(url, schema.telemetry_models, "seq")] == [3, 4]
    assert store.counts()["events"] == 2
    assert store.rollups("det")[0]["calls"] == 40
    # The newest sample is remembered on the device: the next delta is still right.
    store.expire_telemetry(before=T0 + 100)
    store.add_telemetry("d1", tel(5, models={"det": ("1.0", 55, 0, 5.0)}), now=T0 + 200)
    assert rows(url, schema.telemetry_models, "seq")[0]["calls"] == 15
    assert store.rollups("det")[0]["calls"] == 55


# -- commands, audit, counters --------------------------------------------------------------------------


def test_commands_and_replies(store: Store) -> None:
    store.register_device("d1", now=T0)
    seqs = [store.next_command("d1", "ping", {}, issued_by="alice", now=T0 + i).seq for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    cmd = store.get_command("d1", 3)
    assert (cmd.name, cmd.state, cmd.issued_by, cmd.issued_at, cmd.reply) == ("ping", "sent", "alice", T0 + 2, None)
    assert store.record_reply("d1", reply(3), now=T0 + 10)
    assert not store.record_reply("d1", reply(3, ok=False), now=T0 + 11)  # redelivered / second reply
    assert store.get_command("d1", 3).state == "ok" and store.get_command("d1", 3).replied_at == T0 + 10
    assert store.record_reply("d1", reply(4, ok=False), now=T0 + 12)
    assert store.get_command("d1", 4).state == "failed"
    assert not store.record_reply("d1", reply(99), now=T0)
    assert not store.record_reply("d1", {"ok": False, "error": {"type": "malformed"}}, now=T0)  # no seq
    with pytest.raises(NotFound):
        store.get_command("d1", 99)
    with pytest.raises(NotFound, match="registered"):
        store.next_command("ghost", "ping", {}, issued_by="a", now=T0)


def test_audit_counts_and_size(store: Store) -> None:
    store.audit("alice", "deploy", "group:g", {"version": "2.0"}, now=T0)
    store.audit("bob", "abort", now=T0 + 1)
    assert [(a["actor"], a["action"], a["target"], a["detail"]) for a in store.list_audit()] == [
        ("bob", "abort", None, None), ("alice", "deploy", "group:g", {"version": "2.0"})]
    assert len(store.list_audit(limit=1)) == 1
    store.apply_state("d1", birth("b", 1), now=T0)
    store.register_device("d2", now=T0)
    store.create_rollout(model="det", version="2.0", target="all", plan={}, steps=[], created_by="a", now=T0)
    c = store.counts()
    assert (c["devices"], c["online"], c["rollouts"]["pending"], c["rollouts"]["aborted"]) == (2, 1, 1, 0)
    assert store.size_bytes() > 0  # type: ignore[operator]


# -- concurrency and durability (SQLite) -------------------------------------------------------------


def test_two_stores_ingesting_the_same_stream_store_it_once(url: str) -> None:
    Store.open(url).close()
    samples = stream(80, reboot_at=40, seed=5)
    orders = [samples, list(reversed(samples))]
    stores = [Store.open(url) for _ in orders]
    errors: list[BaseException] = []

    def ingest(s: Store, order: list[dict[str, Any]]) -> None:
        try:
            for x in order:
                s.add_telemetry("d1", x, now=T0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(s, o)) for s, o in zip(stores, orders)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for s in stores:
        s.close()
    assert not errors
    got = {(r["seq"], r["model"]): (r["calls"], r["errors"]) for r in rows(url, schema.telemetry_models, "seq")}
    assert got == expected_deltas(samples)


_WRITER = """
import sys
from tests.unit.test_controller_store import Store, tel
s = Store.open(sys.argv[1])
for seq in range(1, 100000):
    s.add_telemetry("d1", tel(seq, models={"det": ("1.0", seq, 0, 1.0)}), now=float(seq))
    print(f"acked {seq}", flush=True)
"""


def test_acknowledged_writes_survive_kill_9(url: str) -> None:
    Store.open(url).close()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) >= 40:
                break
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    acked += [int(line.split()[1]) for line in out.splitlines() if line.startswith("acked ")]
    assert len(acked) >= 40, err
    s = Store.open(url)
    try:
        held = {r["seq"] for r in rows(url, schema.telemetry, "seq")}
        assert set(acked) <= held
        assert s.rollups("det")[0]["calls"] == max(held)  # the rollup committed with each row
    finally:
        s.close()


# The behaviours the PostgreSQL module runs again (it imports these by name).
CORE = [
    "test_open_is_idempotent_and_keeps_data", "test_open_refuses_a_newer_schema_and_a_missing_one",
    "test_devices_and_groups", "test_apply_state_birth_death_and_stale_will", "test_touch_only_moves_last_seen_forward",
    "test_releases", "test_upload_out_of_order_with_a_duplicate_part_round_trips", "test_upload_errors",
    "test_put_blob_and_empty_blob", "test_set_assignments_generations", "test_rollouts_cas_and_one_active_per_model",
    "test_telemetry_is_idempotent_with_deltas_and_rollups", "test_late_sample_is_stored_and_rebases_its_successor",
    "test_any_arrival_order_gives_the_in_order_result", "test_model_window_and_latency_percentiles",
    "test_events_are_idempotent", "test_expire_keeps_rollups", "test_commands_and_replies",
    "test_audit_counts_and_size", "test_batches_give_the_one_by_one_result", "test_ingest_many_is_all_or_nothing",
    "test_migrations_cas_and_one_active_per_workload", "test_all_assignments_across_devices",
]
