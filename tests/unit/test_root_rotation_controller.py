"""The controller's side of root rotation, over a real key directory and SQLite store and
without a broker: ``RootWatcher`` notices ``root.json`` moving and lists the chain;
``DesiredPublisher.reload`` / ``CommandSender.reload`` take the new keys, and documents
signed by keys that left the role are re-signed at their next publish; the daemon
publishes every root >= 2 before any desired document."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from controller.commands import CommandSender
from controller.daemon import Controller, ServeConfig
from controller.desired import DesiredPublisher
from controller.keys import KeyDir
from controller.roots import RootWatcher
from controller.store import Assignment, ReleaseRecord, Store
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.trust import Reason, Rejection, TrustedState
from tests.agentkit import manifest_for
from tests.fleetkit import make_keys
from tests.unit.test_controller_parts import T0, Clock

@pytest.fixture
def parts(tmp_path: Path, model_files: dict[str, Path]) -> Any:
    keys = KeyDir(make_keys(tmp_path / "keys"))
    store = Store.open(f"sqlite:///{tmp_path / 'ctl.db'}")
    manifest = manifest_for(model_files["tiny_v1"], "kws", "1")
    for dev in ("dev-1", "dev-2"):
        store.register_device(dev, now=T0)
    store.add_release(ReleaseRecord(model="kws", version="1", sha256=manifest["sha256"], size=manifest["size"],
                                    manifest=manifest, envelope="{}", created_at=T0, created_by="test"))
    store.set_assignments({d: {"kws": Assignment(d, "kws", "1")} for d in ("dev-1", "dev-2")}, now=T0)
    yield keys, store
    store.close()


def device(keys: KeyDir, version: int = 1, device_id: str = "dev-1") -> TrustedState:
    """A device provisioned with root v1 that walked the chain up to ``version``."""
    state = TrustedState.bootstrap(keys.history_file(1).read_bytes(), device_id=device_id)
    for v in range(2, version + 1):
        state = state.update_root(keys.history_file(v).read_bytes()).state
    return state


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# -- RootWatcher -----------------------------------------------------------------------------


def test_watcher_reports_a_new_version_once_and_ignores_rewrites(parts: Any) -> None:
    keys, _ = parts
    watcher = RootWatcher(keys)
    assert watcher.poll() == 1 and watcher.version == 1
    assert watcher.poll() is None
    root = keys.path / "root.json"
    data = root.read_bytes()
    root.write_bytes(data)  # rewritten, same root
    os.utime(root, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert watcher.poll() is None
    keys.rotate(replace={"deploy": 1})
    assert watcher.poll() == 2 and watcher.poll() is None
    watcher.forget()
    assert watcher.poll() == 2


def test_watcher_lists_every_root_from_v2_exactly_as_written(parts: Any) -> None:
    keys, _ = parts
    watcher = RootWatcher(keys)
    assert watcher.envelopes(1) == []
    keys.rotate(replace={"deploy": 1})
    keys.rotate(replace={"command": 1})
    keys.rotate()
    chain = watcher.envelopes(4)
    assert [v for v, _ in chain] == [2, 3, 4]
    assert all(data == keys.history_file(v).read_bytes() for v, data in chain)
    # a lost history file is skipped (devices behind it wait); a misfiled one is not published
    keys.history_file(3).unlink()
    (keys.path / "root.4.json").write_bytes(keys.history_file(2).read_bytes())
    assert [v for v, _ in watcher.envelopes(4)] == [2]


def test_watcher_survives_an_unreadable_root(parts: Any) -> None:
    keys, _ = parts
    watcher = RootWatcher(keys)
    assert watcher.poll() == 1
    (keys.path / "root.json").write_bytes(b"not an envelope")
    assert watcher.poll() is None and watcher.version == 1


# -- reloading keys --------------------------------------------------------------------------


def test_desired_documents_are_resigned_with_the_new_deploy_keys(parts: Any) -> None:
    keys, store = parts
    sent: list[tuple[str, bytes]] = []
    publisher = DesiredPublisher(store, keys, lambda t, p: sent.append((t, p)), clock=Clock())
    assert publisher.publish("dev-1") == 1
    old_doc = sent[-1][1]
    assert device(keys).verify_desired(old_doc, now_utc()).accepted

    keys.rotate(replace={"deploy": 1})
    assert publisher.publish("dev-1") == 1 and sent[-1][1] == old_doc  # not reloaded yet: old keys
    assert publisher.reload() is True
    assert publisher.reload() is False  # the same keys again
    signed = publisher.signed
    assert publisher.republish_all() == 2 and publisher.signed == signed + 2
    new_doc = dict(sent)[topics.desired("dev-1")]
    v2 = device(keys, 2)
    assert v2.verify_desired(new_doc, now_utc()).accepted
    with pytest.raises(Rejection) as refused:
        v2.verify_desired(old_doc, now_utc())
    assert refused.value.reason is Reason.UNKNOWN_KEY
    with pytest.raises(Rejection) as not_yet:  # a device still on v1 needs the root first
        device(keys).verify_desired(new_doc, now_utc())
    assert not_yet.value.reason is Reason.UNKNOWN_KEY
    # once re-signed, a publish sends the stored document again
    signed = publisher.signed
    assert publisher.publish("dev-1") == 1 and publisher.signed == signed
    assert publisher.refresh_expiring() == 0


def test_a_rotation_that_keeps_the_deploy_keys_resigns_nothing(parts: Any) -> None:
    keys, store = parts
    publisher = DesiredPublisher(store, keys, lambda t, p: None, clock=Clock())
    publisher.republish_all()
    keys.rotate(replace={"command": 1})
    assert publisher.reload() is False
    signed = publisher.signed
    assert publisher.republish_all() == 2 and publisher.signed == signed


def test_commands_are_signed_with_the_reloaded_command_keys(parts: Any) -> None:
    keys, store = parts
    sent: list[tuple[str, bytes]] = []
    sender = CommandSender(store, keys, lambda t, p: sent.append((t, p)), clock=Clock())
    sender.send("dev-1", "ping", {}, actor="t", wait_s=0)
    keys.rotate(replace={"command": 1})
    sender.send("dev-1", "ping", {}, actor="t", wait_s=0)  # cached keys until reload()
    sender.reload()
    sender.send("dev-1", "ping", {}, actor="t", wait_s=0)
    docs = [p for _, p in sent]
    v1, v2 = device(keys), device(keys, 2)
    assert v1.verify_command(docs[1], now_utc(), body_model=messages.Command).accepted
    assert v2.verify_command(docs[2], now_utc(), body_model=messages.Command).accepted
    with pytest.raises(Rejection) as refused:
        v2.verify_command(docs[1], now_utc())
    assert refused.value.reason is Reason.UNKNOWN_KEY


# -- the daemon: roots before documents -----------------------------------------------------


def test_the_controller_publishes_the_roots_before_the_documents_they_introduce(parts: Any, tmp_path: Path) -> None:
    keys, store = parts
    db = f"sqlite:///{tmp_path / 'ctl.db'}"  # the fixture's database
    ctl = Controller(ServeConfig(broker="mqtt://127.0.0.1:1", db=db, keys=keys.path, data=tmp_path / "data",
                                 instance="t"))
    out: list[tuple[str, bytes]] = []
    ctl._publish_retained = lambda topic, payload: out.append((topic, payload))  # type: ignore[method-assign]
    ctl.desired.publish_fn = ctl._publish_retained
    try:
        ctl._watch_root()
        assert not ctl._republish_pending.is_set()  # nothing changed since start
        ctl._republish()  # what a connect does
        assert sorted(t for t, _ in out) == [topics.desired("dev-1"), topics.desired("dev-2")]  # no root >= 2 yet
        out.clear()

        keys.rotate(replace={"deploy": 1})
        keys.rotate(replace={"deploy": 1})
        ctl._watch_root()
        assert ctl._republish_pending.is_set() and ctl._keys_version == 3
        ctl._republish()
        names = [t for t, _ in out]
        assert names[:2] == [topics.trust_root(2), topics.trust_root(3)]
        assert sorted(names[2:]) == [topics.desired("dev-1"), topics.desired("dev-2")]
        assert out[0][1] == keys.history_file(2).read_bytes()
        v3 = device(keys, 3)
        assert v3.verify_desired(dict(out)[topics.desired("dev-1")], now_utc()).accepted
    finally:
        ctl.store.close()


def test_keys_that_cannot_be_loaded_announce_nothing(parts: Any, tmp_path: Path) -> None:
    keys, _ = parts
    ctl = Controller(ServeConfig(broker="mqtt://127.0.0.1:1", db=f"sqlite:///{tmp_path / 'ctl.db'}",
                                 keys=keys.path, data=tmp_path / "data", instance="t"))
    try:
        keys.rotate(replace={"deploy": 1})
        for key in keys.keys_dir.glob("deploy-*.key"):
            key.unlink()  # the new deploy key kept offline: nothing can sign for v2
        ctl._watch_root()
        assert ctl._keys_version == 1 and not ctl._republish_pending.is_set()
    finally:
        ctl.store.close()
