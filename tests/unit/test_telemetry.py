"""Telemetry collector on a real engine serving a real model."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_runtime.agent import telemetry as tm
from edge_runtime.agent.telemetry import TelemetryCollector
from edge_runtime.engine import Engine
from edge_runtime.errors import InputError
from edge_runtime.protocol import messages


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(model_files: dict[str, Path]) -> Engine:
    e = Engine(pool_size=2)
    e.swap("tiny", "1", model_files["tiny_v1"])
    return e


def _predict(engine: Engine, zoo: dict[str, Any], n: int) -> None:
    for i in range(n):
        engine.predict("tiny", zoo["tiny_v1"].sample_inputs(seed=i))


def test_deltas_rate_percentiles(engine: Engine, zoo: dict[str, Any], tmp_path: Path) -> None:
    _predict(engine, zoo, 3)  # before the collector: baseline, not part of the first interval
    clock = Clock()
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="dev-1", clock=clock)
    _predict(engine, zoo, 7)
    with pytest.raises(InputError):
        engine.predict("tiny", {"nope": 1})
    clock.now += 2.0
    t = col.collect(1)
    assert col.last_deltas["tiny"] == tm.ModelDelta(calls=7, errors=1, elapsed_s=2.0)
    fig = t.models["tiny"]
    assert (fig.calls, fig.errors, fig.version) == (10, 1, "1")  # cumulative on the wire
    assert fig.rate == pytest.approx(3.5)
    assert fig.demand_rate == pytest.approx(3.5)  # every call came from this device's own callers
    assert fig.p50_ms is not None and 0 < fig.p50_ms <= fig.p95_ms <= fig.p99_ms
    assert fig.service_ms is not None and fig.service_ms > 0
    assert fig.utilisation is not None and fig.utilisation >= 0
    assert t.uptime_s == pytest.approx(2.0)

    clock.now += 5.0
    t2 = col.collect(2)
    assert col.last_deltas["tiny"] == tm.ModelDelta(calls=0, errors=0, elapsed_s=5.0)
    fig2 = t2.models["tiny"]
    assert (fig2.calls, fig2.rate, fig2.p50_ms, fig2.p99_ms) == (10, 0.0, None, None)

    _predict(engine, zoo, 4)
    clock.now += 0.5
    t3 = col.collect(3)
    assert col.last_deltas["tiny"].calls == 4 and t3.models["tiny"].rate == pytest.approx(8.0)
    assert t3.models["tiny"].p95_ms is not None


def test_zero_elapsed_gives_zero_rate(engine: Engine, zoo: dict[str, Any], tmp_path: Path) -> None:
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="d", clock=Clock())
    _predict(engine, zoo, 2)
    fig = col.collect(0).models["tiny"]
    assert fig.rate == 0.0 and fig.calls == 2 and fig.utilisation is None


def test_encode_decode_round_trip(engine: Engine, zoo: dict[str, Any], tmp_path: Path) -> None:
    clock = Clock()
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="d", clock=clock,
                             interval_s=10.0, boot_id="5f1c0e7a9b2d4c38")
    _predict(engine, zoo, 5)
    clock.now += 10
    t = col.collect(42, broker_rtt_ms=3.25, outbox_depth=4, outbox_dropped=2)
    back = messages.decode("telemetry", messages.encode(t))
    assert back == t
    assert (back.seq, back.broker_rtt_ms, back.boot_id, back.interval_s) == (42, 3.25, "5f1c0e7a9b2d4c38", 10.0)
    assert (back.outbox.depth, back.outbox.dropped) == (4, 2)
    assert back.at.tzinfo is not None


def test_system_figures_sane(engine: Engine, tmp_path: Path) -> None:
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="d")
    sum(i * i for i in range(200_000))  # some CPU between the priming and the sample
    s = col.collect(1).system
    cores = psutil.cpu_count() or 1
    assert 0 <= s.cpu_percent <= 100 * cores
    assert s.rss_bytes is not None and s.rss_bytes > 0
    assert s.disk_free_bytes is not None and s.disk_free_bytes > 0
    assert s.memory_total_bytes > 0 and 0 < s.memory_available_bytes <= s.memory_total_bytes
    assert s.load_1m is not None and s.load_1m >= 0


def test_missing_data_dir_uses_nearest_parent(engine: Engine, tmp_path: Path) -> None:
    col = TelemetryCollector(engine, data_dir=tmp_path / "not" / "yet", device_id="d")
    assert (col.collect(1).system.disk_free_bytes or 0) > 0


def _raise() -> Any:
    raise OSError("no hwmon")


@pytest.mark.parametrize("fake", [_raise, lambda: {}, lambda: {"coretemp": []}], ids=["raises", "empty", "no-readings"])
def test_no_temperature_sensor(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Any) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", fake, raising=False)
    t = TelemetryCollector(engine, data_dir=tmp_path, device_id="d").collect(1)
    assert t.system.temperature_c is None


def test_no_sensors_function(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)  # e.g. macOS / Windows
    assert TelemetryCollector(engine, data_dir=tmp_path, device_id="d").collect(1).system.temperature_c is None


def test_temperature_picks_cpu_sensor(monkeypatch: pytest.MonkeyPatch) -> None:
    S = namedtuple("S", "label current high critical")
    sensors = {
        "nvme": [S("Composite", 70.0, 80.0, 90.0)],
        "acpitz": [S("", 30.0, None, None)],
        "coretemp": [S("Package id 0", 48.0, 80, 100), S("Core 0", 51.5, 80, 100), S("Core 1", float("nan"), 80, 100)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: sensors, raising=False)
    assert tm.temperature() == 51.5
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {"cpu_thermal": [S("", 999.0, None, None)],
                                                                 "gpu_thermal": [S("", 44.0, None, None)]},
                        raising=False)
    assert tm.temperature() == 44.0  # out-of-range readings are ignored
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {"iwlwifi_1": [S("", 39.0, None, None)]}, raising=False)
    assert tm.temperature() == 39.0  # no CPU-like sensor: any sensor is better than none


def test_model_unloaded_or_vanishing(engine: Engine, zoo: dict[str, Any], tmp_path: Path,
                                     model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="d", clock=clock)
    _predict(engine, zoo, 2)
    engine.unload("tiny")
    clock.now += 1
    assert col.collect(1).models == {}
    # listed by names() but gone by the time the snapshot is read
    engine.swap("other", "2", model_files["tiny_v1"])
    real_models = engine.models
    monkeypatch.setattr(engine, "models", lambda: [m for m in real_models() if m.name != "other"])
    assert "other" not in col.collect(2).models
    monkeypatch.setattr(engine, "models", lambda: (_ for _ in ()).throw(RuntimeError("torn down")))
    assert col.collect(3).models == {}
    monkeypatch.setattr(engine, "models", real_models)
    # back again: the two calls made before the unload count in the interval they are first reported
    engine.swap("tiny", "3", model_files["tiny_v1"])
    clock.now += 1
    t = col.collect(4)
    assert t.models["tiny"].calls == 2 and col.last_deltas["tiny"].calls == 2 and t.models["tiny"].version == "3"


def test_bad_rtt_dropped_not_raised(engine: Engine, tmp_path: Path) -> None:
    col = TelemetryCollector(engine, data_dir=tmp_path, device_id="d")
    assert col.collect(1, broker_rtt_ms=float("nan")).broker_rtt_ms is None
    assert col.collect(2, broker_rtt_ms=-1.0).broker_rtt_ms is None
