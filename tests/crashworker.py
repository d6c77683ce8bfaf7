"""The process the store crash tests SIGKILL (tests/integration/test_store_crash.py).

    python tests/crashworker.py cycle DATA_DIR MODELS_DIR   one install/activate/rollback/install cycle
    python tests/crashworker.py loop  DATA_DIR MODELS_DIR   the cycle forever (killed from outside)
    python tests/crashworker.py recover DATA_DIR            start-up recovery; prints its actions as JSON

It dies where ``EDGEFLEET_CRASH_AT`` says (``edge_runtime.durable.crashpoint``), or when the
test kills it. With ``EDGEFLEET_CRASH_TRACE`` set, ``cycle`` also writes ``#op KIND OLD NEW``
into the trace before each operation, so the test can tell which operation the N-th crash
point belongs to. ``loop`` prints ``ready`` once, then ``op KIND OLD NEW`` before and ``done``
after each operation, flushed, so a test that kills it knows what was in flight.

MODELS_DIR holds ``1.tflite`` … ``3.tflite`` (good versions), ``9.tflite`` (a version whose
health check fails) and ``9.health.npz`` (that check).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from edge_runtime.engine import Engine
from edge_runtime.errors import HealthCheckFailed
from edge_runtime.health import HealthCheck
from edge_runtime.installer import Installer
from edge_runtime.store import ModelStore

NAME = "kws"
GOOD = ("1", "2", "3")
BAD = "9"

Op = tuple[str, str, str, Callable[[], object]]


def open_installer(data_dir: str) -> Installer:
    return Installer(ModelStore(data_dir), Engine(pool_size=1))


def cycle_ops(inst: Installer, models: Path) -> list[Op]:
    """install a spare version → activate the old one → roll back → a failing install.

    Each op is (kind, version active before, version active after if it succeeds, run).
    Kinds: ``install`` (a good version), ``switch`` (activate or rollback), ``install_bad``
    (its health check fails, so the old version must stay).
    """
    model = inst.store.model(NAME)
    cur = model.active
    assert cur is not None
    spare = next(v for v in GOOD if v not in model.versions)
    bad_health = HealthCheck.load(models / f"{BAD}.health.npz")

    def install_bad() -> None:
        try:
            inst.install_file(NAME, BAD, models / f"{BAD}.tflite", health=bad_health)
        except HealthCheckFailed:
            return
        raise AssertionError("the bad version passed its health check")

    return [
        ("install", cur, spare, lambda: inst.install_file(NAME, spare, models / f"{spare}.tflite")),
        ("switch", spare, cur, lambda: inst.activate_version(NAME, cur)),
        ("switch", cur, spare, lambda: inst.rollback(NAME)),
        ("install_bad", spare, spare, install_bad),
    ]


def run_cycle(data_dir: str, models: Path) -> None:
    inst = open_installer(data_dir)
    trace = os.environ.get("EDGEFLEET_CRASH_TRACE")
    for kind, old, new, run in cycle_ops(inst, models):
        if trace:
            with open(trace, "a", encoding="utf-8") as f:
                f.write(f"#op {kind} {old} {new}\n")
        run()


def run_loop(data_dir: str, models: Path) -> None:
    inst = open_installer(data_dir)
    print("ready", flush=True)
    while True:
        for kind, old, new, run in cycle_ops(inst, models):
            print(f"op {kind} {old} {new}", flush=True)
            run()
            print("done", flush=True)


def run_recover(data_dir: str) -> None:
    actions = open_installer(data_dir).recover()
    print(json.dumps([a.to_dict() for a in actions]), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "recover":
        run_recover(argv[1])
    elif len(argv) >= 3 and argv[0] == "cycle":
        run_cycle(argv[1], Path(argv[2]))
    elif len(argv) >= 3 and argv[0] == "loop":
        run_loop(argv[1], Path(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
