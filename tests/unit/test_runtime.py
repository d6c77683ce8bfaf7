"""The serving runtime: what it loads (plan_sync, pure) and how it survives a damaged store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.engine import Engine
from edge_runtime.errors import ModelUnavailable
from edge_runtime.installer import Installer
from edge_runtime.runtime import Runtime, ServeConfig, SyncStep, plan_sync
from edge_runtime.store import ModelStore
from edge_runtime.store.state import ModelState, StoreState, VersionRecord
from tests.helpers import wait_until

A, B = "a" * 64, "b" * 64


def _state(**models: tuple[str | None, dict[str, str]]) -> StoreState:
    now = datetime.now(timezone.utc)
    return StoreState(models={
        name: ModelState(active=active, versions={v: VersionRecord(sha256=sha, size=1, installed_at=now) for v, sha in versions.items()})
        for name, (active, versions) in models.items()
    })


PLAN_CASES: dict[str, tuple[StoreState, dict[str, tuple[str, str]], list[SyncStep]]] = {
    "empty": (_state(), {}, []),
    "new model": (_state(m=("1", {"1": A})), {}, [SyncStep("load", "m", "1", A)]),
    "already serving": (_state(m=("1", {"1": A})), {"m": ("1", A)}, []),
    "new version": (_state(m=("2", {"1": A, "2": B})), {"m": ("1", A)}, [SyncStep("load", "m", "2", B)]),
    "same version, other bytes": (_state(m=("1", {"1": B})), {"m": ("1", A)}, [SyncStep("load", "m", "1", B)]),
    "removed": (_state(), {"m": ("1", A)}, [SyncStep("unload", "m")]),
    "nothing active": (_state(m=(None, {"1": A})), {"m": ("1", A)}, [SyncStep("unload", "m")]),
}


@pytest.mark.parametrize("state,serving,want", list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_plan_sync(state: StoreState, serving: dict[str, tuple[str, str]], want: list[SyncStep]) -> None:
    assert plan_sync(state, serving) == want


@pytest.fixture
def data_dir(tmp_path: Path, model_files: dict[str, Path]) -> Path:
    installer = Installer(ModelStore(tmp_path / "data"), Engine(pool_size=1))
    installer.install_file("tiny", "1", model_files["tiny_v1"])
    installer.install_file("tiny", "2", model_files["tiny_v2"])
    return tmp_path / "data"


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Runtime] = []

    def make(data_dir: Path) -> Runtime:
        rt = Runtime(ServeConfig(data_dir=data_dir, rest_port=None, socket_path=tmp_path / "api.sock", watch_interval_s=0.05))
        rt.start()
        started.append(rt)
        return rt

    yield make
    for rt in started:
        rt.stop()


def _flip_byte(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _predicts_like(rt: Runtime, built: Any) -> bool:
    feeds = built.sample_inputs(seed=4)
    return bool(np.allclose(rt.engine.predict("tiny", feeds)["y"], built.reference(feeds)["y"], rtol=1e-4, atol=1e-5))


def test_damaged_active_blob_falls_back_to_the_previous_version(data_dir: Path, runtime_factory: Any, zoo: dict[str, Any]) -> None:
    store = ModelStore(data_dir)
    state_before = store.layout.state.read_bytes()
    _flip_byte(store.layout.blob(store.read().models["tiny"].versions["2"].sha256))
    rt = runtime_factory(data_dir)
    assert rt.engine.get("tiny").version == "1"
    assert _predicts_like(rt, zoo["tiny_v1"])
    assert store.layout.state.read_bytes() == state_before  # serving around damage changes nothing on disk


def test_no_usable_version_answers_503_with_the_reason(data_dir: Path, runtime_factory: Any) -> None:
    store = ModelStore(data_dir)
    for v in ("1", "2"):
        _flip_byte(store.layout.blob(store.read().models["tiny"].versions[v].sha256))
    rt = runtime_factory(data_dir)
    with pytest.raises(ModelUnavailable, match="damaged"):
        rt.engine.predict("tiny", {"x": np.zeros((1, 16), np.float32)})


def test_follows_changes_made_by_another_process(data_dir: Path, runtime_factory: Any, zoo: dict[str, Any]) -> None:
    rt = runtime_factory(data_dir)
    assert rt.engine.get("tiny").version == "2" and _predicts_like(rt, zoo["tiny_v2"])
    other = Installer(ModelStore(data_dir), Engine(pool_size=1))  # as `edge-runtime rollback` would
    other.rollback("tiny")
    wait_until(lambda: rt.engine.get("tiny").version == "1", what="the runtime to follow the rollback")
    assert _predicts_like(rt, zoo["tiny_v1"])

