"""``fleetctl demo`` as a user runs it (``make demo``): a subprocess, real broker, controller,
device agents and a cloud node underneath. It must tell the whole story -- the rollouts, then
a live migration to the cloud node and back under load with no failed call -- exit 0, and
leave nothing behind -- neither after a full run nor after Ctrl-C halfway.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

DEVICES = ["dev-1", "dev-2", "dev-3"]
CLOUD = "cloud-1"


def _env(tmp_path: Path) -> dict[str, str]:
    # TMPDIR: the demo's temp dir lands under tmp_path, so "nothing left" is checkable.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_RUNTIME_", "FLEETCTL_"))}
    env["TMPDIR"] = str(tmp_path)
    return env


def _demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", "demo", "--json", *args]


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the process group too: no grandchild survives
    except ProcessLookupError:
        pass
    else:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _assert_nothing_left(summary: dict[str, Any], tmp_path: Path) -> None:
    procs = summary["processes"]
    assert {p["name"] for p in procs} >= {"broker", "controller", *DEVICES}, procs  # cloud-1 too after a full run
    for p in procs:
        assert _gone(p["pid"]), f"{p['name']} (pid {p['pid']}) is still running"
        if p["port"]:
            assert _port_closed(p["port"]), f"{p['name']}'s port {p['port']} is still open"
    assert not Path(summary["dir"]).exists(), f"{summary['dir']} was not removed"
    if summary["socket_dir"]:  # short socket paths under /tmp when the temp dir's are too long
        assert not Path(summary["socket_dir"]).exists(), f"{summary['socket_dir']} was not removed"
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_the_demo_tells_the_whole_story_and_leaves_nothing_behind(tmp_path: Path) -> None:
    started = time.monotonic()
    run = subprocess.run(_demo(), capture_output=True, text=True, timeout=180, env=_env(tmp_path),
                         stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-8000:]}"
    summary = json.loads(run.stdout)
    assert summary["ok"] is True and summary["failure"] is None, summary
    assert all(c["ok"] for c in summary["checks"]), summary["checks"]

    r1, r2, r3 = summary["rollouts"]
    assert (r1["version"], r1["state"]) == ("1", "succeeded"), r1
    assert (r2["version"], r2["state"]) == ("2", "succeeded"), r2
    assert r2["counts"] == {"done": 3} and len(r2["canary"]) == 1, r2
    assert (r3["version"], r3["state"]) == ("3", "aborted"), r3
    assert "health_check_failed" in r3["reason"], r3
    assert r3["counts"] == {"reverted": 1, "pending": 2}, r3  # stopped at the canary; the others never touched

    assert [d["id"] for d in summary["devices"]] == DEVICES
    for d in summary["devices"]:
        assert d["online"] is True, d
        assert d["serving"] == "2" and d["models"] == {"tiny": "2"}, d
        assert d["predict_matches_v2"] is True, d
    canary = r3["canary"][0]
    steps = {d["id"]: d["last_step"] for d in summary["devices"]}
    assert steps[canary]["state"] == "reverted" and steps[canary]["reason"] == "health_check_failed", steps
    assert all(s["state"] == "pending" for d, s in steps.items() if d != canary), steps

    # the migration scene: dev-2's calls moved to cloud-1 and back under load, none failed
    mig = summary["migration"]
    assert (mig["source"], mig["cloud"], mig["model"]) == ("dev-2", CLOUD, "tiny"), mig
    there, back = mig["migrations"]
    assert (there["from_node"], there["to_node"], there["state"], there["failure"]) == ("dev-2", CLOUD, "done", None), \
        there
    assert (back["from_node"], back["to_node"], back["state"], back["failure"]) == (CLOUD, "dev-2", "done", None), back
    assert there["version"] == back["version"] == "2" and there["target_had"] is False, (there, back)
    for m in (there, back):
        assert m["calls_during"] > 0 and m["failed_during"] == 0, m
        assert 0 < m["duration_s"] < 60, m
    assert mig["failed_calls"] == 0 and mig["failures_sample"] == [], mig
    assert mig["by_kind"]["rest"] > 0 and mig["by_kind"]["fast"] > 0, mig
    assert mig["served_by"][CLOUD] >= 20 and mig["served_by"]["local"] >= 40, mig["served_by"]
    phases = {p["phase"]: p for p in mig["phases"]}
    assert list(phases) == ["before", "moving there", f"on {CLOUD}", "moving back", "after"], mig["phases"]
    assert phases["before"]["fast_path"][CLOUD] == 0 and phases["after"]["fast_path"][CLOUD] == 0, mig["phases"]
    assert all(isinstance(mig["p95_ms"][k], float) for k in ("before", "during", "on_cloud", "after")), mig["p95_ms"]
    assert summary["plan"] is not None and "error" not in summary["plan"], summary["plan"]

    names = [p["name"] for p in summary["processes"]]
    assert names == ["broker", "controller", *DEVICES, CLOUD], names
    assert all(p["exit_code"] == 0 for p in summary["processes"]), summary["processes"]  # clean SIGTERM stops
    _assert_nothing_left(summary, tmp_path)
    assert took < 120, f"the demo took {took:.0f}s"


@pytest.mark.parametrize("when", [
    "devices online",  # after the bring-up
    "load on dev-2",  # in the migration scene: cloud-1 up, the load generator running, the first move starting
])
def test_ctrl_c_halfway_stops_everything_and_removes_the_directory(tmp_path: Path, when: str) -> None:
    proc = subprocess.Popen(_demo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), stdin=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        seen = []
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            seen.append(line)
            if when in line or time.monotonic() > deadline:
                break
        assert when in seen[-1], "".join(seen)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the demo (its children have their own sessions)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"exit {proc.returncode}\n{''.join(seen)}{err[-6000:]}"
    summary = json.loads(out)
    assert summary["ok"] is False and summary["failure"] == {"error": "interrupted"}, summary
    if when.startswith("load"):
        assert CLOUD in {p["name"] for p in summary["processes"]}, summary["processes"]
        assert summary["migration"]["calls"] > 0, summary["migration"]  # the figures so far, load stopped
    _assert_nothing_left(summary, tmp_path)
