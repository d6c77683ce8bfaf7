"""The systemd units: what systemd itself says about them, and the device agent running
under the device unit's sandbox.

1. ``systemd-analyze verify`` accepts the three units with no warning. verify insists that
   ExecStart's binary exists, and /opt/edgefleet/venv is not on a CI machine, so each unit
   is verified as a copy whose /opt/edgefleet/venv/bin/ is this test venv's bin (same
   console scripts). systemd 252 (Debian 12) runs no systemd here: verify works offline.
2. ``systemd-analyze security --offline=true`` scores every unit at 3.0 or lower.
3. The restart back-off drop-in is valid where systemd >= 254 and only "unknown key" on
   252; the accelerator drop-in example (every line uncommented) verifies.
4. The sandbox, enforced by the kernel around the real agent: the unit's SystemCallFilter
   (expanded by ``systemd-analyze syscall-filter``) and SystemCallErrorNumber as a seccomp
   filter, RestrictAddressFamilies on socket(2), NoNewPrivileges, and MemoryDenyWriteExecute
   as the kernel's W^X switch (PR_SET_MDWE, Linux >= 6.3; systemd 252 does the same with
   seccomp). Under it the agent starts (READY=1), pings the watchdog, installs a signed
   model from the broker, answers REST and the fast path with a shared-memory region (memfd
   + mmap), reports telemetry (psutil), reloads on SIGHUP and exits 0 on SIGTERM.

Parts 1-4 skip, saying why, without systemd-analyze (`.ci/run` installs Debian's systemd
package); part 4 also without libseccomp or PR_SET_MDWE. The consistency checks at the end
(unit vs install.sh vs the example config) always run.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.api.client import FastPathClient
from tests.agentkit import AgentProcess, agent_command
from tests.integration.test_agent import NAME, Rig, manifests, rig, sample  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
UNITS = ["edge-runtime.service", "fleet-controller.service", "fleet-broker.service"]
INSTALLED_BIN = "/opt/edgefleet/venv/bin/"
MAX_EXPOSURE = 3.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd; .ci/run does)")


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def systemd_version() -> int:
    out = analyze("--version").stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return int(m.group(1))


def staged_unit(name: str, dest: Path) -> Path:
    """A copy of the unit whose ExecStart names this venv's console scripts."""
    dest.mkdir(parents=True, exist_ok=True)
    text = (UNITS_DIR / name).read_text()
    assert INSTALLED_BIN in text, f"{name}: ExecStart is not under {INSTALLED_BIN}"
    out = dest / name
    out.write_text(text.replace(INSTALLED_BIN, str(Path(sys.executable).parent) + "/"))
    return out


def directives(name: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in the unit, in order (comments dropped)."""
    out = []
    for line in (UNITS_DIR / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def directive(name: str, key: str) -> list[str]:
    return [v for k, v in directives(name) if k == key]


# -- 1-3. systemd-analyze ------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_verify_accepts_the_unit_without_warnings(unit: str, tmp_path: Path) -> None:
    path = staged_unit(unit, tmp_path)
    proc = analyze("verify", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Only our unit's lines count: a host may have complaints about its own units.
    ours = [line for line in proc.stderr.splitlines() if unit in line or str(tmp_path) in line]
    assert ours == [], "\n".join(ours)


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_3(unit: str) -> None:
    proc = analyze("security", "--offline=true", "--no-pager", str(UNITS_DIR / unit))
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", proc.stdout)
    assert m, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    score = float(m.group(1))
    failing = [line for line in proc.stdout.splitlines() if line.startswith("✗")]
    print(f"{unit}: exposure {score}\n" + "\n".join(failing))
    assert score <= MAX_EXPOSURE, f"{unit} scores {score} > {MAX_EXPOSURE}:\n" + "\n".join(failing)


@needs_analyze
def test_restart_backoff_dropin_is_valid_on_254_and_ignored_on_older(tmp_path: Path) -> None:
    unit = staged_unit("edge-runtime.service", tmp_path)
    dropin_dir = tmp_path / "edge-runtime.service.d"
    dropin_dir.mkdir()
    shutil.copy(UNITS_DIR / "edge-runtime.service.d/restart-backoff.conf", dropin_dir)
    proc = analyze("verify", str(unit), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "edge-runtime" in line]
    if systemd_version() >= 254:
        assert ours == [], "\n".join(ours)
    else:  # install.sh installs it only on >= 254; older systemd ignores exactly these keys
        assert len(ours) == 2 and all("Unknown key" in line for line in ours), "\n".join(ours)
        assert "RestartSteps" in ours[0] and "RestartMaxDelaySec" in ours[1]


@needs_analyze
def test_accelerator_dropin_example_verifies(tmp_path: Path) -> None:
    unit = staged_unit("edge-runtime.service", tmp_path)
    dropin_dir = tmp_path / "edge-runtime.service.d"
    dropin_dir.mkdir()
    text = (UNITS_DIR / "edge-runtime.service.d/accelerators.conf.example").read_text()
    # Every commented-out directive switched on (the Jetson and both Coral parts at once).
    enabled = re.sub(r"^# ([A-Z][A-Za-z]+=)", r"\1", text, flags=re.M)
    assert enabled.count("DeviceAllow=") >= 4
    (dropin_dir / "accelerators.conf").write_text(enabled)
    proc = analyze("verify", str(unit), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "edge-runtime" in line or "accelerators" in line]
    assert ours == [], "\n".join(ours)


# -- 4. the agent inside the unit's sandbox ------------------------------------------------

# Runs in the child: NoNewPrivileges, W^X, seccomp from a JSON policy, then exec. Exit 125
# (with the reason on stderr) when this kernel or libc cannot apply a part.
LAUNCHER = r'''
import ctypes, ctypes.util, json, os, sys
policy = json.load(open(sys.argv[1]))
argv = sys.argv[2:]
def fail(what):
    sys.stderr.write("sandbox: %s\n" % what); sys.exit(125)
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:                      # PR_SET_NO_NEW_PRIVS
    fail("PR_SET_NO_NEW_PRIVS: errno %d" % ctypes.get_errno())
if policy["mdwe"] and libc.prctl(65, 1, 0, 0, 0) != 0:   # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    fail("PR_SET_MDWE (Linux >= 6.3): errno %d" % ctypes.get_errno())
name = ctypes.util.find_library("seccomp")
if not name:
    fail("libseccomp not found")
sc = ctypes.CDLL(name)
sc.seccomp_init.restype = ctypes.c_void_p
sc.seccomp_init.argtypes = [ctypes.c_uint32]
sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
sc.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
sc.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                      ctypes.POINTER(ArgCmp)]
sc.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
ctx = sc.seccomp_init(ERRNO | policy["errno"])
families = policy["families"]
for syscall in policy["allow"]:
    nr = sc.seccomp_syscall_resolve_name(syscall.encode())
    if nr < 0:
        continue  # not on this architecture
    if syscall == "socket" and families is not None:
        for family in families:                           # socket(family, ...): arg 0 == family
            cmp = ArgCmp(0, 4, family, 0)                 # SCMP_CMP_EQ
            if sc.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) != 0:
                fail("seccomp rule for socket(%d)" % family)
    elif sc.seccomp_rule_add(ctx, ALLOW, nr, 0) != 0:
        fail("seccomp rule for %s" % syscall)
if sc.seccomp_load(ctx) != 0:
    fail("seccomp_load")
os.execv(argv[0], argv)
'''

FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
ERRNOS = {"EPERM": 1, "EACCES": 13}


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every @group and its members."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def unit_policy(unit: str = "edge-runtime.service") -> dict[str, Any]:
    """The seccomp policy systemd would build from the unit: the first SystemCallFilter= is
    an allow list, each ~ line removes from it."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if item.startswith("@"):
            out: set[str] = set()
            for member in groups[item]:
                out |= expand(member)
            return out
        return {item}

    allow: set[str] | None = None
    for value in directive(unit, "SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= expand(item)
        if allow is None:
            assert not deny, "the unit's first SystemCallFilter= must be an allow list"
            allow = names
        elif deny:
            allow -= names
        else:
            allow |= names
    assert allow, "no SystemCallFilter= in the unit"
    (errno_name,) = directive(unit, "SystemCallErrorNumber")
    (families,) = directive(unit, "RestrictAddressFamilies")
    assert directive(unit, "NoNewPrivileges") == ["yes"]
    return {
        "allow": sorted(allow),
        "errno": ERRNOS[errno_name],
        "families": [FAMILIES[f] for f in families.split()],
        "mdwe": directive(unit, "MemoryDenyWriteExecute") == ["yes"],
    }


@pytest.fixture
def broker(amqtt_broker: Any) -> Any:
    """One broker is enough here (the agent's broker matrix is test_agent's)."""
    return amqtt_broker


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The launcher's argv prefix; skips when the sandbox cannot be applied here."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed: the unit's syscall groups cannot be expanded")
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed (Debian: libseccomp2, a dependency of systemd)")
    d = tmp_path_factory.mktemp("sandbox")
    (d / "launch.py").write_text(LAUNCHER)
    (d / "policy.json").write_text(json.dumps(unit_policy()))
    prefix = [sys.executable, str(d / "launch.py"), str(d / "policy.json")]
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=60)
    if probe.returncode == 125:
        pytest.skip(f"cannot apply the unit's sandbox here: {probe.stderr.strip()}")
    assert probe.returncode == 0, probe.stderr
    return prefix


def test_sandbox_refuses_what_the_unit_forbids(sandbox: list[str]) -> None:
    """The launcher really applies the unit's rules (else the agent test proves nothing)."""
    code = (
        "import mmap, os, socket\n"
        "def refused(f):\n"
        "    try: f()\n"
        "    except OSError as e: return e.errno\n"
        "    return 0\n"
        "print(refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),\n"
        "      refused(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),\n"
        "      refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),\n"
        "      refused(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),\n"
        "      refused(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),\n"
        "      refused(lambda: os.close(os.memfd_create('x')))\n"
        ")\n"
    )
    proc = subprocess.run([*sandbox, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wx, nice, netlink, packet, inet, memfd = map(int, proc.stdout.split())
    assert wx != 0, "a writable+executable mapping was allowed (MemoryDenyWriteExecute)"
    assert nice == 1, "setpriority (@resources) was allowed"
    assert netlink != 0 and packet != 0, "a socket family outside RestrictAddressFamilies was allowed"
    assert inet == 0 and memfd == 0


def test_agent_runs_inside_the_units_sandbox(sandbox: list[str], rig: Rig, zoo: dict[str, Any]) -> None:  # noqa: F811
    agent = AgentProcess(rig.config, notify=rig.notify, argv=[*sandbox, *agent_command(rig.config)],
                         env_extra={"WATCHDOG_USEC": "2000000"})  # systemd sets it from WatchdogSec
    rig.stack.enter_context(agent)
    rig.agent = agent
    agent.wait_ready(60)
    rig.notify.wait_for("WATCHDOG=1", 30)
    rig.wait_birth()

    rig.reconcile(1, "1", timeout=60)  # download over MQTT, verify, store, load, health-check
    rig.wait_serving("1")              # REST
    x, refs = rig.sample
    with FastPathClient(str(rig.short / "api.sock"), shm_threshold=0) as client:  # memfd + mmap
        out = client.predict(NAME, {"x": x})["y"]
        assert client._region is not None, "the fast path did not use shared memory"
    assert np.allclose(out, refs["1"], atol=1e-4, rtol=1e-4)
    rig.obs.wait_for(lambda o: o.telemetry, 30, what="telemetry from the sandboxed agent")

    reload_at = time.monotonic()
    os.kill(agent.pid, signal.SIGHUP)
    rig.notify.wait_for("RELOADING=1", 30, after=reload_at)
    rig.notify.wait_for("READY=1", 30, after=reload_at)
    assert agent.terminate() == 0, agent.log_text()
    denied = [line for line in agent.log_text().splitlines()
              if "Operation not permitted" in line or "Permission denied" in line]
    assert denied == [], "the sandbox refused something the agent tried:\n" + "\n".join(denied)


# -- consistency: unit, installer, example config ------------------------------------------


def test_device_unit_agrees_with_install_sh_and_the_example_config() -> None:
    unit = "edge-runtime.service"
    script = (REPO / "firmware_scripts/install.sh").read_text()
    example = (REPO / "firmware_scripts/edge-runtime.example.toml").read_text()
    user = re.search(r"^SERVICE_USER=(\S+)", script, re.M)
    assert user and directive(unit, "User") == [user.group(1)] and directive(unit, "Group") == [user.group(1)]
    (exec_start,) = directive(unit, "ExecStart")
    assert exec_start.startswith(INSTALLED_BIN + "edge-runtime run --config /etc/edge-runtime/config.toml")
    assert "VENV=$PREFIX/venv" in script and "PREFIX=/opt/edgefleet" in script
    assert directive(unit, "Type") == ["notify"] and directive(unit, "NotifyAccess") == ["main"]
    (watchdog,) = directive(unit, "WatchdogSec")
    assert int(watchdog) >= 10
    # The example config's paths are the directories systemd makes for the unit.
    assert directive(unit, "StateDirectory") == ["edge-runtime"]
    assert 'data_dir = "/var/lib/edge-runtime"' in example
    assert directive(unit, "RuntimeDirectory") == ["edge-runtime"]
    assert 'socket_path = "/run/edge-runtime/api.sock"' in example
    assert directive(unit, "ConfigurationDirectory") == ["edge-runtime"]
    # Restart on failure and on the signed `restart` command (75), never on a bad config (78).
    assert directive(unit, "Restart") == ["on-failure"]
    assert directive(unit, "RestartForceExitStatus") == ["75"]
    assert directive(unit, "RestartPreventExitStatus") == ["78"]
    from edge_runtime.agent.commands import RESTART_EXIT_CODE
    from edge_runtime.commands import EX_CONFIG

    assert (RESTART_EXIT_CODE, EX_CONFIG) == (75, 78)
