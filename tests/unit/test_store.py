"""ModelStore, blobs, state and layout: behaviour on disk, without an interpreter."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edge_runtime import durable
from edge_runtime.errors import HashMismatch, QuotaExceeded, StoreBusy, StoreCorrupt, StoreError, VersionNotFound
from edge_runtime.store import ModelStore, StoreLayout, parse_state
from edge_runtime.store.state import InstallRecord, ModelState, StoreState, VersionRecord, with_active

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_blob(store: ModelStore, data: bytes) -> str:
    info = store.blobs.ingest_chunks([data], part=store.layout.tmp / f"t{sha(data)[:8]}.part")
    return info.sha256


def install_version(store: ModelStore, name: str, version: str, data: bytes) -> str:
    """Put ``data`` in as a blob and make it the active version, state only."""
    digest = add_blob(store, data)
    record = VersionRecord(sha256=digest, size=len(data), installed_at=T0)
    store.update_model(name, lambda m: with_active(m, version, keep_previous=store.keep_previous, record=record))
    return digest


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data")


# -- layout and state format ---------------------------------------------------------


def test_layout_names_every_file(tmp_path: Path) -> None:
    layout = StoreLayout.at(tmp_path)
    assert layout.state == tmp_path / "state.json"
    assert layout.lock == tmp_path / "lock"
    assert layout.blob("ab" * 32) == tmp_path / "blobs" / "sha256" / ("ab" * 32)
    assert layout.part("00ff00ff").parent == tmp_path / "tmp"
    for bad in ("../etc/passwd", "AB" * 32, "ab" * 31):
        with pytest.raises(ValueError):
            layout.blob(bad)


def test_new_store_is_empty_and_healthy(store: ModelStore) -> None:
    assert store.read() == StoreState()
    assert store.fsck() == []
    assert store.models() == []


def test_unknown_format_is_refused_clearly() -> None:
    with pytest.raises(StoreCorrupt, match=r"unknown state format 2; this runtime reads format 1 \(written by a newer"):
        parse_state(json.dumps({"format": 2, "revision": 0, "models": {}}).encode())
    with pytest.raises(StoreCorrupt, match="unknown state format None"):
        parse_state(b'{"models": {}}')
    with pytest.raises(StoreCorrupt, match="not valid JSON"):
        parse_state(b'{"format": 1, "rev')
    with pytest.raises(StoreCorrupt, match="invalid store state"):
        parse_state(json.dumps({"format": 1, "revision": 0, "models": {}, "surprise": 1}).encode())
    with pytest.raises(StoreCorrupt, match="invalid store state"):
        parse_state(
            json.dumps(
                {"format": 1, "models": {"m": {"install": {"version": "1", "token": "00aa00aa", "state": "exploded",
                                                            "started_at": "2025-01-01T00:00:00Z"}}}}
            ).encode()
        )


def test_corrupt_state_file_raises_on_read_and_fsck_reports_it(store: ModelStore) -> None:
    store.layout.state.write_bytes(b"\x00garbage")
    with pytest.raises(StoreCorrupt):
        store.read()
    problems = store.fsck()
    assert len(problems) == 1 and "not valid JSON" in problems[0]


def test_state_round_trips_and_revision_counts_writes(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    install_version(store, "kws", "2", b"two")
    state = store.read()
    assert state.revision == 2
    assert parse_state(store.layout.state.read_bytes()) == state
    assert state.models["kws"].active == "2" and state.models["kws"].previous == ["1"]
    store.update(lambda s: None)
    assert store.revision() == 3


# -- atomic writes --------------------------------------------------------------------


def test_a_change_that_raises_writes_nothing(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    before = store.layout.state.read_bytes()

    def boom(state: StoreState) -> None:
        state.models["kws"].active = None
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        store.update(boom)
    assert store.layout.state.read_bytes() == before


def test_an_inconsistent_state_is_never_written(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    before = store.layout.state.read_bytes()

    def dangle(state: StoreState) -> None:
        state.models["kws"].active = "9"  # no version record for 9

    with pytest.raises(StoreError, match="active version 9 has no version record"):
        store.update(dangle)
    assert store.layout.state.read_bytes() == before


def test_a_failed_rename_keeps_the_old_state_and_leaves_no_temp(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    install_version(store, "kws", "1", b"one")
    before = store.layout.state.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        install_version(store, "kws", "2", b"two")
    monkeypatch.undo()
    assert store.layout.state.read_bytes() == before
    assert store.layout.state_temps() == []


# -- blobs ------------------------------------------------------------------------------


def test_blob_is_named_by_its_hash_and_verified(store: ModelStore) -> None:
    digest = add_blob(store, b"hello model")
    assert digest == sha(b"hello model")
    assert store.blobs.has(digest) and store.blobs.list() == [digest]
    assert store.blobs.path(digest).read_bytes() == b"hello model"
    store.blobs.verify(digest, size=11)
    assert list(store.layout.tmp.iterdir()) == []


def test_hash_mismatch_states_expected_and_got_and_leaves_nothing(store: ModelStore) -> None:
    wrong = "0" * 64
    with pytest.raises(HashMismatch) as err:
        store.blobs.ingest_chunks([b"abc"], part=store.layout.part("0a0a0a0a"), expected_sha256=wrong)
    assert wrong in str(err.value) and sha(b"abc") in str(err.value)
    with pytest.raises(HashMismatch, match="expected 4 bytes, got 3"):
        store.blobs.ingest_chunks([b"abc"], part=store.layout.part("0a0a0a0a"), expected_size=4)
    assert store.blobs.list() == [] and list(store.layout.tmp.iterdir()) == []


def test_stream_past_expected_size_stops_at_once(store: ModelStore) -> None:
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        i = 0
        while True:
            pulled.append(i)
            i += 1
            yield b"x" * 100

    with pytest.raises(HashMismatch, match="past the expected 250 bytes"):
        store.blobs.ingest_chunks(endless(), part=store.layout.part("0b0b0b0b"), expected_size=250)
    assert len(pulled) == 3  # the third chunk crossed the limit; nothing more was read
    assert store.blobs.list() == [] and list(store.layout.tmp.iterdir()) == []


def test_partial_bytes_are_never_visible_as_a_blob(store: ModelStore) -> None:
    seen: list[list[str]] = []
    part = store.layout.part("0c0c0c0c")

    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            seen.append(store.blobs.list())
            yield b"y" * 10

    info = store.blobs.ingest_chunks(chunks(), part=part)
    assert seen == [[], [], []]
    assert store.blobs.list() == [info.sha256] and not part.exists()


def test_verify_finds_a_flipped_byte(store: ModelStore) -> None:
    digest = add_blob(store, b"weights" * 100)
    path = store.blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[123] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="damaged"):
        store.blobs.verify(digest)


# -- quota and gc -------------------------------------------------------------------------


def test_quota_counts_blobs_and_says_needed_vs_free(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "d", quota_bytes=1000)
    install_version(store, "kws", "1", b"a" * 600)
    assert store.free_bytes() == 400
    store.check_quota(400)
    with pytest.raises(QuotaExceeded, match="needs 401 bytes but only 400 of the 1000-byte quota are free"):
        store.check_quota(401)


def test_quota_check_collects_garbage_first(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "d", quota_bytes=1000)
    install_version(store, "kws", "1", b"a" * 300)
    orphan = add_blob(store, b"o" * 600)
    store.check_quota(600)  # fits only once the orphan is gone
    assert not store.blobs.has(orphan)
    assert store.free_bytes() == 700


def test_gc_keeps_active_previous_and_install_and_drops_the_rest(store: ModelStore) -> None:
    one = install_version(store, "kws", "1", b"one")
    two = install_version(store, "kws", "2", b"two")
    three = install_version(store, "kws", "3", b"three")  # keep_previous=1: 1 is dropped from the state
    orphan = add_blob(store, b"orphan")
    staged = add_blob(store, b"staged bytes")
    other = install_version(store, "vision", "1", b"eyes")
    token = "0d0d0d0d"
    rec = InstallRecord(version="4", token=token, sha256=staged, size=12, state="staged", started_at=T0)
    store.update_model("kws", lambda m: m.model_copy(update={"install": rec}))
    store.layout.part(token).write_bytes(b"owned")
    store.layout.health(token).write_bytes(b"owned")
    bitmap = store.layout.tmp / f"{token}.part.bitmap"  # a resumable transfer's chunk map
    bitmap.write_bytes(b"owned")
    (store.layout.tmp / "stale.part").write_bytes(b"stale")
    (store.layout.tmp / "stale.part.bitmap").write_bytes(b"stale")
    (store.layout.root / ".state.json.abc123.tmp").write_bytes(b"torn")

    report = store.gc()

    assert set(report.blobs) == {one, orphan}
    assert set(store.blobs.list()) == {two, three, staged, other}
    assert set(report.tmp) == {"stale.part", "stale.part.bitmap", ".state.json.abc123.tmp"}
    assert store.layout.part(token).exists() and store.layout.health(token).exists() and bitmap.exists()
    assert report.freed_bytes == len(b"one") + len(b"orphan") + 2 * len(b"stale") + len(b"torn")


def test_keep_previous_two_keeps_two(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "d", keep_previous=2)
    for v in "1234":
        install_version(store, "kws", v, f"bytes {v}".encode())
    model = store.model("kws")
    assert model.active == "4" and model.previous == ["3", "2"]
    assert set(model.versions) == {"4", "3", "2"}
    with pytest.raises(ValueError):
        ModelStore(tmp_path / "e", keep_previous=0)


# -- activate and rollback (state only) -------------------------------------------------


def test_rollback_swaps_with_previous_and_back(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    install_version(store, "kws", "2", b"two")
    assert store.rollback("kws") == "1"
    assert (store.model("kws").active, store.model("kws").previous) == ("1", ["2"])
    assert store.rollback("kws") == "2"
    assert (store.model("kws").active, store.model("kws").previous) == ("2", ["1"])
    assert set(store.model("kws").versions) == {"1", "2"}


def test_rollback_without_previous_is_version_not_found(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    before = store.layout.state.read_bytes()
    with pytest.raises(VersionNotFound, match="no previous version"):
        store.rollback("kws")
    with pytest.raises(VersionNotFound, match="no model 'nope'"):
        store.rollback("nope")
    with pytest.raises(VersionNotFound, match="no version 7"):
        store.version_path("kws", "7")
    with pytest.raises(VersionNotFound, match="not installed"):
        store.activate("kws", "7")
    assert store.layout.state.read_bytes() == before


def test_models_listing(store: ModelStore) -> None:
    install_version(store, "kws", "1", b"one")
    install_version(store, "kws", "2", b"two")
    [row] = store.models()
    d = row.to_dict()
    assert d["name"] == "kws" and d["active"] == "2" and d["previous"] == ["1"]
    assert d["versions"]["2"]["size"] == 3 and d["installing"] is None


# -- fsck ---------------------------------------------------------------------------------


def test_fsck_finds_a_flipped_byte_in_an_active_blob(store: ModelStore) -> None:
    digest = install_version(store, "kws", "1", b"weights" * 50)
    assert store.fsck() == []
    path = store.blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x80
    path.write_bytes(bytes(data))
    problems = store.fsck()
    assert any("model kws version 1" in p and "damaged" in p for p in problems), problems


def test_fsck_finds_missing_blob_strays_and_leftovers(store: ModelStore) -> None:
    digest = install_version(store, "kws", "1", b"one")
    store.blobs.delete(digest)
    (store.layout.blobs / "half-written").write_bytes(b"??")
    (store.layout.tmp / "x.part").write_bytes(b"")
    (store.layout.root / ".state.json.q1.tmp").write_bytes(b"")
    rec = InstallRecord(version="2", token="0e0e0e0e", state="downloading", started_at=T0)
    store.update_model("kws", lambda m: m.model_copy(update={"install": rec}))
    text = "\n".join(store.fsck())
    assert "model kws version 1: blob" in text and "missing" in text
    assert "half-written: not a blob" in text
    assert "x.part: stale partial file" in text
    assert "torn state write" in text
    assert "interrupted in state 'downloading'" in text


def test_fsck_reports_a_blob_whose_name_lies(store: ModelStore) -> None:
    fake = "f" * 64
    store.blobs.path(fake).write_bytes(b"not f's")
    assert any(fake in p and "damaged" in p for p in store.fsck())


# -- the lock between processes -------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from edge_runtime.store import ModelStore
    store = ModelStore(sys.argv[1])
    with store.lock():
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def test_two_processes_contend_on_the_lock(store: ModelStore) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(store.layout.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        contender = ModelStore(store.layout.root, lock_timeout=0.2)
        before = contender.layout.state.exists()
        with pytest.raises(StoreBusy, match=rf"locked by another process \(pid {holder.pid}\)"):
            contender.update(lambda s: None)
        with pytest.raises(StoreBusy):
            contender.gc()
        assert contender.layout.state.exists() == before
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        contender.update(lambda s: None)  # free again
        assert contender.revision() == 1
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_lock_is_reentrant_within_one_store(store: ModelStore) -> None:
    with store.lock():
        with store.lock():
            store.update(lambda s: None)
        assert store.holds_lock()
    assert not store.holds_lock()
    assert store.revision() == 1


def test_a_second_store_object_in_one_process_is_also_excluded(store: ModelStore) -> None:
    other = ModelStore(store.layout.root, lock_timeout=0.05)
    with store.lock():
        with pytest.raises(StoreBusy):
            other.update(lambda s: None)
    other.update(lambda s: None)


def test_model_state_defaults_are_independent() -> None:
    a, b = ModelState(), ModelState()
    a.previous.append("1")
    assert b.previous == []
