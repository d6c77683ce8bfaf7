"""The engine on the real interpreter (both backends: this module also runs in the legacy venv)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.engine import Engine, inspect_model, load_backend
from edge_runtime.engine.backends import Backend
from edge_runtime.errors import BackendUnavailable, InputError, ModelFileError, ModelNotFound
from tests.helpers import wait_until

pytestmark = pytest.mark.legacy


@pytest.fixture
def engine() -> Engine:
    return Engine(pool_size=2)


def test_backend_order_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = load_backend()
    assert backend.name in ("ai_edge_litert", "tflite_runtime")
    import os

    if os.environ.get("EDGEFLEET_BACKEND"):
        assert backend.name == os.environ["EDGEFLEET_BACKEND"]
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_backend("tensorflow")


def test_no_backend_names_both_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, *a: Any) -> Any:
        if name.startswith(("ai_edge_litert", "tflite_runtime")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)

    monkeypatch.delenv("EDGEFLEET_BACKEND", raising=False)
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(BackendUnavailable) as info:
        load_backend()
    assert "ai-edge-litert" in str(info.value) and "tflite-runtime" in str(info.value)


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v2", "tiny_int8", "multi_io"])
def test_outputs_match_numpy_reference(engine: Engine, zoo: dict[str, Any], model_files: dict[str, Path], name: str) -> None:
    built = zoo[name]
    engine.swap(name, "1", model_files[name])
    for seed in range(3):
        feeds = built.sample_inputs(seed=seed)
        got = engine.predict(name, feeds)
        want = built.reference(feeds)
        assert set(got) == set(want)
        for k in want:
            if want[k].dtype == np.int8:
                assert np.max(np.abs(got[k].astype(int) - want[k].astype(int))) <= 2
            else:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_metadata_describes_the_signature(engine: Engine, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    m = engine.swap("mio", "7", model_files["multi_io"])
    built = zoo["multi_io"]
    assert [s.name for s in m.signature.inputs] == list(built.inputs)
    assert [s.name for s in m.signature.outputs] == list(built.outputs)
    for spec in m.signature.inputs:
        assert spec.shape == tuple(built.inputs[spec.name][0])
    q = engine.swap("q", "1", model_files["tiny_int8"]).signature.inputs[0]
    assert q.dtype == np.int8 and q.scale > 0
    assert m.describe()["version"] == "7"


BAD_INPUTS = {
    "unknown name": ({"x": "ok", "bogus": "ok"}, "unknown input 'bogus'"),
    "missing name": ({}, "missing input 'x'"),
    "wrong shape": ({"x": np.zeros((16,), np.float32)}, "expected shape [1, 16], got [16]"),
    "wrong dtype": ({"x": np.zeros((1, 16), np.float64)}, "expected dtype float32, got float64"),
    "too many positional": ([np.zeros((1, 16), np.float32)] * 2, "got 2 tensors, expected 1"),
}


@pytest.mark.parametrize("feeds,message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_inputs_say_expected_and_got(engine: Engine, model_files: dict[str, Path], feeds: Any, message: str) -> None:
    engine.swap("tiny", "1", model_files["tiny_v1"])
    if isinstance(feeds, dict):
        feeds = {k: (np.zeros((1, 16), np.float32) if isinstance(v, str) else v) for k, v in feeds.items()}
    with pytest.raises(InputError) as info:
        engine.predict("tiny", feeds)
    assert message in str(info.value)
    assert "x float32[1, 16]" in str(info.value) or "expected" in str(info.value)
    assert engine.stats("tiny").errors == 1


def test_unnamed_tensor_for_multi_input_model(engine: Engine, model_files: dict[str, Path]) -> None:
    engine.swap("mio", "1", model_files["multi_io"])
    with pytest.raises(InputError, match="pass them by name"):
        engine.predict("mio", np.zeros((1, 8), np.float32))


def test_json_coercion_is_lossless_or_refused(engine: Engine, model_files: dict[str, Path]) -> None:
    engine.swap("tiny", "1", model_files["tiny_v1"])
    out = engine.predict("tiny", {"x": [[0.5] * 16]}, coerce=True)
    assert out["y"].shape == (1, 4)
    engine.swap("q", "1", model_files["tiny_int8"])
    with pytest.raises(InputError, match="fractional"):
        engine.predict("q", {"x": [[0.5] * 16]}, coerce=True)
    with pytest.raises(InputError, match=r"\[-128, 127\]"):
        engine.predict("q", {"x": [[300] * 16]}, coerce=True)
    with pytest.raises(InputError, match="numbers"):
        engine.predict("tiny", {"x": [["a"] * 16]}, coerce=True)


def test_unknown_model(engine: Engine) -> None:
    with pytest.raises(ModelNotFound, match="'nope'"):
        engine.predict("nope", {})


def _truncations(data: bytes) -> list[bytes]:
    # Cuts in the body. (A cut in the trailing padding can still parse on tflite-runtime;
    # the store's sha256 check is what refuses a short transfer.)
    return [data[:n] for n in (0, 7, 8, 64, len(data) // 3, len(data) // 2)]


def test_bad_files_are_refused_with_a_reason(engine: Engine, tmp_path: Path, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    (tmp_path / "text.tflite").write_bytes(b"this is plainly not a model file")
    with pytest.raises(ModelFileError) as info:
        inspect_model(str(tmp_path / "text.tflite"))
    assert info.value.reason == "not_tflite"
    with pytest.raises(ModelFileError) as info:
        engine.swap("text", "1", tmp_path / "text.tflite")
    assert info.value.reason == "not_tflite"
    for isolate in (True, False):
        with pytest.raises(ModelFileError) as info:
            inspect_model(str(model_files["custom"]), isolate=isolate)
        assert info.value.reason == "unresolved_op"
    assert engine.names() == []  # nothing was installed by any refused file


def test_truncated_files_are_refused_without_crashing_the_caller(tmp_path: Path, zoo: dict[str, Any]) -> None:
    """LiteRT verifies the flatbuffer and refuses every cut. tflite-runtime 2.14 does not: it
    reads past the end of the mapping and either SIGSEGVs (the isolated check turns that
    into ``interpreter_crash``) or, by luck of the bytes, loads garbage — which is why the
    store also checks the sha256 of every artifact. Either way the caller survives."""
    verifies = load_backend().name == "ai_edge_litert"
    for i, chunk in enumerate(_truncations(zoo["tiny_v1"].data)):
        p = tmp_path / f"cut{i}.tflite"
        p.write_bytes(chunk)
        try:
            inspect_model(str(p))
        except ModelFileError as exc:
            assert exc.reason in ("truncated", "invalid", "interpreter_crash"), (len(chunk), exc)
        else:
            assert not verifies and len(chunk) > 64, f"a {len(chunk)}-byte cut was accepted"


def test_isolated_check_agrees_with_the_in_process_one(model_files: dict[str, Path]) -> None:
    for name in ("tiny_v1", "tiny_int8", "multi_io"):
        assert inspect_model(str(model_files[name])) == inspect_model(str(model_files[name]), isolate=False)


def test_pool_serves_more_threads_than_interpreters(engine: Engine, zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    engine.swap("tiny", "1", model_files["tiny_v1"])
    built = zoo["tiny_v1"]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(40):
                feeds = built.sample_inputs(seed=seed * 100 + i)
                np.testing.assert_allclose(engine.predict("tiny", feeds)["y"], built.reference(feeds)["y"], rtol=1e-4, atol=1e-5)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert engine.stats("tiny").calls == 8 * 40


@contextlib.contextmanager
def stuck_invoke(interp: Any) -> Iterator[threading.Event]:
    """Make ``interp.invoke`` block until the block exits; yields the event set once a
    call is inside it (so a test knows that interpreter is busy, without sleeping)."""
    entered, release = threading.Event(), threading.Event()
    real_invoke = interp.invoke

    def stuck() -> None:
        entered.set()
        assert release.wait(30)
        real_invoke()

    interp.invoke = stuck
    try:
        yield entered
    finally:
        release.set()


class _GatedBackend:
    """Wraps the real backend; interpreter construction waits for ``gate`` (a slow load)."""

    def __init__(self, real: Backend) -> None:
        self.real = real
        self.name, self.version = real.name, real.version
        self.gate = threading.Event()
        self.entered = threading.Event()

    def interpreter(self, path: Any, *, num_threads: int = 1) -> Any:
        self.entered.set()
        assert self.gate.wait(30)
        return self.real.interpreter(path, num_threads=num_threads)


def test_calls_keep_flowing_while_a_new_version_loads(zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    real = load_backend()
    engine = Engine(backend=real, pool_size=2)
    engine.swap("tiny", "v1", model_files["tiny_v1"])
    gated = _GatedBackend(real)
    engine.backend = gated  # type: ignore[assignment]
    loader = threading.Thread(target=engine.swap, args=("tiny", "v2", model_files["tiny_v2"]))
    loader.start()
    assert gated.entered.wait(10)
    feeds = zoo["tiny_v1"].sample_inputs()
    before = engine.stats("tiny").calls
    for _ in range(25):  # the load is stuck: calls must still be answered, by v1
        version, out = engine.predict_versioned("tiny", feeds)
        assert version == "v1"
        np.testing.assert_allclose(out["y"], zoo["tiny_v1"].reference(feeds)["y"], rtol=1e-4, atol=1e-5)
    assert engine.stats("tiny").calls == before + 25
    gated.gate.set()
    loader.join(30)
    version, out = engine.predict_versioned("tiny", feeds)
    assert version == "v2"
    np.testing.assert_allclose(out["y"], zoo["tiny_v2"].reference(feeds)["y"], rtol=1e-4, atol=1e-5)


def test_in_flight_call_finishes_on_the_old_version(zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    engine = Engine(pool_size=1)
    old = engine.swap("tiny", "v1", model_files["tiny_v1"])
    feeds = zoo["tiny_v1"].sample_inputs()
    result: dict[str, Any] = {}
    with stuck_invoke(old.pool._all[0]) as in_invoke:
        caller = threading.Thread(target=lambda: result.update(zip(("version", "out"), engine.predict_versioned("tiny", feeds))))
        caller.start()
        assert in_invoke.wait(10)
        engine.swap("tiny", "v2", model_files["tiny_v2"])  # does not wait for the in-flight call
        assert engine.predict_versioned("tiny", feeds)[0] == "v2"
    caller.join(10)
    assert result["version"] == "v1"
    np.testing.assert_allclose(result["out"]["y"], zoo["tiny_v1"].reference(feeds)["y"], rtol=1e-4, atol=1e-5)


def test_hot_swap_under_concurrent_load_drops_nothing(zoo: dict[str, Any], model_files: dict[str, Path]) -> None:
    engine = Engine(pool_size=2)
    engine.swap("tiny", "v1", model_files["tiny_v1"])
    feeds = zoo["tiny_v1"].sample_inputs()
    want = {v: zoo[f"tiny_{v}"].reference(feeds)["y"] for v in ("v1", "v2")}
    stop = threading.Event()
    seen: dict[str, int] = {"v1": 0, "v2": 0}
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not stop.is_set():
                version, out = engine.predict_versioned("tiny", feeds)
                np.testing.assert_allclose(out["y"], want[version], rtol=1e-4, atol=1e-5)
                seen[version] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        version = "v2" if i % 2 == 0 else "v1"
        engine.swap("tiny", version, model_files[f"tiny_{version}"])
        target = engine.stats("tiny").calls + 4
        wait_until(lambda: engine.stats("tiny").calls >= target, what="calls after a swap")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert seen["v1"] > 0 and seen["v2"] > 0


def test_pool_grows_only_under_contention_and_never_makes_a_call_wait_for_a_busy_one(
    zoo: dict[str, Any], model_files: dict[str, Path]
) -> None:
    engine = Engine(pool_size=2)
    model = engine.swap("tiny", "v1", model_files["tiny_v1"])
    feeds = zoo["tiny_v1"].sample_inputs()
    for _ in range(20):  # sequential calls never contend: one interpreter is enough
        engine.predict("tiny", feeds)
    assert model.pool.count == 1
    with stuck_invoke(model.pool._all[0]) as in_invoke:
        blocked = threading.Thread(target=engine.predict, args=("tiny", feeds))
        blocked.start()
        assert in_invoke.wait(10)
        # The only interpreter is stuck: this call is served by one grown for it.
        np.testing.assert_allclose(engine.predict("tiny", feeds)["y"], zoo["tiny_v1"].reference(feeds)["y"], rtol=1e-4, atol=1e-5)
        assert model.pool.count == 2
    blocked.join(10)
    # A new version starts as large as the one it replaces has grown.
    assert engine.swap("tiny", "v2", model_files["tiny_v2"]).pool.count == 2


def test_json_values_beyond_float32_are_refused_not_turned_into_inf(engine: Engine, model_files: dict[str, Path]) -> None:
    engine.swap("tiny", "1", model_files["tiny_v1"])
    with pytest.raises(InputError, match="beyond the float32 range"):
        engine.predict("tiny", {"x": [[1e39] * 16]}, coerce=True)


def test_a_failed_growth_is_retried_later_not_forever_capped(model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.engine import pool as pool_mod

    engine = Engine(pool_size=3)
    model = engine.swap("tiny", "1", model_files["tiny_v1"])
    real = model.pool._backend
    calls = {"n": 0}

    class Flaky:
        name, version = real.name, real.version

        def interpreter(self, path: Any, *, num_threads: int = 1) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(24, "Too many open files")  # one transient failure
            return real.interpreter(path, num_threads=num_threads)

    model.pool._backend = Flaky()
    monkeypatch.setattr(pool_mod, "_GROWTH_RETRY_S", 0.0)
    zeros = {"x": np.zeros((1, 16), np.float32)}
    with stuck_invoke(model.pool._all[0]) as in_invoke:
        blocked = threading.Thread(target=engine.predict, args=("tiny", zeros))
        blocked.start()
        assert in_invoke.wait(10)
        # The first growth fails; this call waits, and the pool keeps its configured size.
        waiter = threading.Thread(target=engine.predict, args=("tiny", zeros))
        waiter.start()
        # The retry time is written (under the pool's lock) only once the failure is fully
        # handled; `calls` alone can be seen before the grower has even set `_growing`.
        wait_until(lambda: model.pool._retry_growth_at > 0 and not model.pool._growing, what="the failed growth")
        assert model.pool.size == 3
        # The next contended call grows it for real.
        third = threading.Thread(target=engine.predict, args=("tiny", zeros))
        third.start()
        wait_until(lambda: model.pool.count == 2, what="a retried growth")
    for t in (blocked, waiter, third):
        t.join(10)


# -- what the engine measures for placement ------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_service_ms_is_interpreter_time_while_latency_grows_with_the_queue(vision: tuple[Any, Path],
                                                                         tmp_path: Path) -> None:
    """N threads calling one interpreter at once: each call's latency includes its wait behind
    the others, its service time does not (the planner's M/M/c model adds the queueing itself,
    so a service time with the wait in it would count the queue twice). Ratios, not times: the
    single-thread figure is measured before and after the contended run, and the queue makes
    the median latency several service times long. Read through telemetry, as reported."""
    from edge_runtime.agent.telemetry import TelemetryCollector

    model, path = vision  # milliseconds per invoke: the interpreter's time dwarfs Python's
    engine = Engine(pool_size=1)  # one interpreter: concurrent calls queue for it
    engine.swap("vis", "1", path)
    feeds = model.sample_inputs()
    clock = _Clock()
    collector = TelemetryCollector(engine, data_dir=tmp_path, device_id="d", clock=clock)

    def interval(run: Any) -> Any:
        run()
        clock.now += 1.0
        return collector.collect(0).models["vis"]

    def alone() -> None:
        for _ in range(6):
            engine.predict("vis", feeds)

    threads, rounds = 6, 6
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(rounds):
                barrier.wait(60)  # every round, all of them call at once
                engine.predict("vis", feeds)
        except BaseException as exc:  # re-raised below
            errors.append(exc)
            barrier.abort()

    def contended() -> None:
        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not errors, errors[0]

    before = interval(alone)
    queued = interval(contended)
    after = interval(alone)
    assert engine.get("vis").pool.count == 1
    single = max(before.service_ms or 0.0, after.service_ms or 0.0)
    assert queued.service_ms is not None and queued.p50_ms is not None and single > 0
    # Latency: the wait behind up to N-1 calls; the median is several service times.
    assert queued.service_ms < 0.5 * queued.p50_ms, (queued, before, after)
    # Service time: what one call costs, about what it costs alone (2x: a noisy shared CPU).
    assert queued.service_ms < 2.0 * single, (queued, before, after)
    # Utilisation is the busy fraction from the service time: 36 calls in the 1 s interval.
    assert queued.utilisation == pytest.approx(queued.service_ms / 1e3 * threads * rounds)


def test_engine_stats_split_own_calls_from_calls_run_for_peers(model_files: dict[str, Path],
                                                               zoo: dict[str, Any]) -> None:
    engine = Engine(pool_size=1)
    loaded = engine.swap("tiny", "1", model_files["tiny_v1"])
    feeds = zoo["tiny_v1"].sample_inputs()
    peers = engine.for_peers()
    for _ in range(3):
        engine.predict("tiny", feeds)
    peers.predict_on(loaded, feeds)
    assert peers.predict_versioned("tiny", feeds)[0] == "1"
    np.testing.assert_allclose(peers.predict("tiny", feeds)["y"], zoo["tiny_v1"].reference(feeds)["y"],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        peers.predict("tiny", {"nope": feeds["x"]})
    stats = engine.stats("tiny")
    assert (stats.calls, stats.own_calls, stats.errors) == (6, 3, 1)
    assert len(stats.latencies_s) == len(stats.service_s) == 6
    assert all(0 < s <= t for s, t in zip(stats.service_s, stats.latencies_s))
    assert peers.stats("tiny") is stats and peers.get("tiny") is loaded  # everything else is the engine's
