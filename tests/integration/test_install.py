"""firmware_scripts/install.sh into a staging root (``--root``), run for real.

The wheel is built once per session (``pip wheel --no-deps`` of a copy of the sources, so
the checkout gets no ``build/``). The install is offline and dependency-free on purpose:
``--wheel W --no-deps``. The staging root has no network and no wheelhouse, and a venv
cannot borrow the test venv's packages (``--system-site-packages`` reaches the *base*
interpreter's, which has none). So the script's own code runs end to end — checks, user,
venv creation, pip from a wheel with ``--no-index``, config, state, unit, enable link,
idempotence, uninstall — and only pip's dependency resolution is left to pip. That the
installed entry point runs is shown by running it with the test venv's packages on
PYTHONPATH (edgefleet itself is imported from the staged venv).

Not covered here: useradd and systemctl on a live system (``--root`` never calls them).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "firmware_scripts" / "install.sh"
UNIT = "edge-runtime.service"
IS_ROOT = os.geteuid() == 0


def run_install(*args: str | os.PathLike[str], env: dict[str, str] | None = None, check: bool = True,
                ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=240, cwd="/")
    if check:
        assert proc.returncode == 0, f"install.sh {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def manifest(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every path under ``root``: (mode, uid, gid, size, mtime_ns, link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target)
    return out


def ids(root: Path) -> tuple[int, int]:
    """(uid, gid) of edgefleet in the staging root's passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == "edgefleet":
            return int(f[2]), int(f[3])
    raise AssertionError("no edgefleet user in etc/passwd")


def mode_owner(p: Path) -> tuple[int, int, int]:
    st = p.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edgefleet wheel, built from a copy of the sources. pyproject's build backend
    (setuptools >= 77) comes from the test venv when it has it, else pip fetches it."""
    src = tmp_path_factory.mktemp("wheel-src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("edge_runtime", "controller"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    isolation: list[str] = []
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            isolation = ["--no-build-isolation"]
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                           *isolation, "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (whl,) = out.glob("edgefleet-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A staging root after one install; (root, the script's output)."""
    root = tmp_path_factory.mktemp("root")
    proc = run_install("--root", root, "--wheel", wheel, "--no-deps", "--python", sys.executable)
    return root, proc.stdout


@pytest.fixture
def copy_of(installed: tuple[Path, str], tmp_path: Path) -> Iterator[Path]:
    """A private copy of the installed root (owners, modes and mtimes kept: ``cp -a``), for
    tests that change it."""
    dest = tmp_path / "root"
    subprocess.run(["cp", "-a", str(installed[0]), str(dest)], check=True, timeout=60)
    yield dest


# -- install ------------------------------------------------------------------------------


def test_installs_user_venv_config_state_and_enabled_unit(installed: tuple[Path, str], wheel: Path) -> None:
    root, out = installed
    uid, gid = ids(root)
    assert 100 <= uid <= 999 and 100 <= gid <= 999
    passwd = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("edgefleet:"))
    assert passwd.endswith(":/nonexistent:/usr/sbin/nologin"), passwd
    assert f"edgefleet:x:{gid}:" in (root / "etc/group").read_text().splitlines()
    if IS_ROOT:
        owner, svc, rootgrp = (0, 0), (uid, gid), (0, gid)
    else:  # no chown without root: the script says so and leaves our own ids
        assert "not root:" in out
        owner = svc = rootgrp = (os.getuid(), os.getgid())

    venv = root / "opt/edgefleet/venv"
    assert mode_owner(root / "opt/edgefleet") == (0o755, *owner)
    assert (venv / "bin/edge-runtime").is_file() and os.access(venv / "bin/edge-runtime", os.X_OK)
    version = wheel.name.split("-")[1]
    assert list(venv.glob(f"lib/python3*/site-packages/edgefleet-{version}.dist-info")), "edgefleet not in the venv"
    assert (venv / ".edgefleet-install").read_text().split() == [
        f"version={version}", "extra=litert", "deps=none", "system_site_packages=0"]

    conf = root / "etc/edge-runtime"
    assert mode_owner(conf) == (0o750, *rootgrp)
    assert mode_owner(conf / "config.toml") == (0o640, *rootgrp)
    example = (REPO / "firmware_scripts/edge-runtime.example.toml").read_bytes()
    assert (conf / "config.toml").read_bytes() == example
    assert (conf / "config.example.toml").read_bytes() == example

    assert mode_owner(root / "var/lib/edge-runtime") == (0o750, *svc)

    unit = root / "etc/systemd/system" / UNIT
    assert unit.read_bytes() == (REPO / "systemd" / UNIT).read_bytes()
    assert mode_owner(unit) == (0o644, *owner)
    link = root / "etc/systemd/system/multi-user.target.wants" / UNIT
    assert os.readlink(link) == f"/etc/systemd/system/{UNIT}"  # as `systemctl enable` makes it
    assert "WantedBy=multi-user.target" in unit.read_text()
    assert "not running systemctl daemon-reload" in out


def test_installed_entry_point_runs_from_the_staged_venv(installed: tuple[Path, str], tmp_path: Path) -> None:
    """The console script and the package are the staged venv's; the dependencies come
    from the test venv (``--no-deps``)."""
    root, _ = installed
    venv = root / "opt/edgefleet/venv"
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    proc = subprocess.run([str(venv / "bin/edge-runtime"), "--version"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("edge-runtime ")
    proc = subprocess.run([str(venv / "bin/python"), "-c", "import edge_runtime.agent.daemon as d; print(d.__file__)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout


def test_second_run_changes_nothing(installed: tuple[Path, str], wheel: Path, copy_of: Path) -> None:
    root = copy_of
    before = manifest(root)
    proc = run_install("--root", root, "--wheel", wheel, "--no-deps", "--python", sys.executable)
    assert manifest(root) == before
    assert "is installed in" in proc.stdout and "pip install" not in proc.stdout
    assert "kept " in proc.stdout and "config.toml" in proc.stdout


def test_operator_config_is_never_overwritten(installed: tuple[Path, str], wheel: Path, copy_of: Path) -> None:
    root = copy_of
    cfg = root / "etc/edge-runtime/config.toml"
    cfg.write_text('device_id = "pi-garage-7"\n')
    os.chmod(cfg, 0o600)
    run_install("--root", root, "--wheel", wheel, "--no-deps", "--python", sys.executable)
    assert cfg.read_text() == 'device_id = "pi-garage-7"\n'
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600


def test_changed_unit_is_rewritten_and_changed_modes_repaired(installed: tuple[Path, str], wheel: Path,
                                                               copy_of: Path) -> None:
    root = copy_of
    unit = root / "etc/systemd/system" / UNIT
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    os.chmod(root / "var/lib/edge-runtime", 0o777)
    (root / "etc/systemd/system/multi-user.target.wants" / UNIT).unlink()
    run_install("--root", root, "--wheel", wheel, "--no-deps", "--python", sys.executable)
    assert unit.read_bytes() == (REPO / "systemd" / UNIT).read_bytes()
    assert stat.S_IMODE((root / "var/lib/edge-runtime").stat().st_mode) == 0o750
    assert (root / "etc/systemd/system/multi-user.target.wants" / UNIT).is_symlink()


# -- uninstall ----------------------------------------------------------------------------


def test_uninstall_keeps_state_and_config(copy_of: Path) -> None:
    root = copy_of
    (root / "var/lib/edge-runtime/store.json").write_text("{}")
    cfg = (root / "etc/edge-runtime/config.toml").read_bytes()
    proc = run_install("--root", root, "--uninstall")
    assert not (root / "opt/edgefleet").exists()
    assert not (root / "etc/systemd/system" / UNIT).exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants" / UNIT).is_symlink()
    assert "edgefleet:" not in (root / "etc/passwd").read_text()
    assert "edgefleet:" not in (root / "etc/group").read_text()
    assert (root / "var/lib/edge-runtime/store.json").read_text() == "{}"
    assert (root / "etc/edge-runtime/config.toml").read_bytes() == cfg
    assert "kept /var/lib/edge-runtime and /etc/edge-runtime" in proc.stdout
    # Twice is fine too.
    run_install("--root", root, "--uninstall")


def test_uninstall_purge_removes_state_and_config(copy_of: Path) -> None:
    root = copy_of
    run_install("--root", root, "--uninstall", "--purge")
    for gone in ("opt/edgefleet", "var/lib/edge-runtime", "etc/edge-runtime", f"etc/systemd/system/{UNIT}"):
        assert not (root / gone).exists(), gone


# -- checks -------------------------------------------------------------------------------


def fake_bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """An environment whose PATH starts with a dir of fake commands (name -> sh body)."""
    d = tmp_path / "fakebin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(0o755)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("fakes", "expected"),
    [
        ({"uname": 'echo armv6l'}, "architecture armv6l is not supported: the TFLite interpreter wheels exist for "
                                   "aarch64 armv7l x86_64"),
        ({"python3": 'echo "3.8 64"'}, "python3 is Python 3.8; edgefleet needs Python >= 3.9"),
        ({"python3": 'case "$2" in *ensurepip*) exit 1;; esac; echo "3.11 64"'},
         "python3 has no venv/ensurepip module: apt-get install python3-venv (or python3.11-venv)"),
    ],
    ids=["arch-armv6l", "python-3.8", "no-venv-module"],
)
def test_checks_name_what_is_missing_and_change_nothing(fakes: dict[str, str], expected: str, tmp_path: Path,
                                                        wheel: Path) -> None:
    root = tmp_path / "root"
    proc = run_install("--root", root, "--wheel", wheel, env=fake_bin(tmp_path, **fakes), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"install.sh: missing: {expected}" in proc.stderr, proc.stderr
    assert "nothing was changed" in proc.stderr
    assert list(root.iterdir()) == []


def test_every_problem_is_named_at_once(tmp_path: Path, wheel: Path) -> None:
    env = fake_bin(tmp_path, uname="echo mips", python3='echo "3.7 64"')
    proc = run_install("--root", tmp_path / "root", "--wheel", wheel, env=env, check=False)
    assert proc.returncode == 1
    missing = [line for line in proc.stderr.splitlines() if line.startswith("install.sh: missing:")]
    assert len(missing) == 2 and "mips" in missing[0] and "3.7" in missing[1], proc.stderr


def test_32bit_python_on_a_64bit_kernel_installs_for_armv7l(tmp_path: Path, wheel: Path) -> None:
    """Raspberry Pi OS 32-bit on a Pi 4 reports aarch64; the default backend becomes
    tflite-runtime (ai-edge-litert has no armv7l wheels). Stops at pip: the fake python
    cannot make a venv, which is as far as this case needs to go."""
    env = fake_bin(tmp_path, uname="echo aarch64", python3='echo "3.11 32"')
    proc = run_install("--root", tmp_path / "root", "--wheel", wheel, env=env, check=False)
    assert "32-bit (armv7l) Python on a 64-bit kernel" in proc.stdout, proc.stdout + proc.stderr


def test_min_python_matches_pyproject() -> None:
    requires = re.search(r'^requires-python\s*=\s*">=\s*([0-9.]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    script = re.search(r"^MIN_PYTHON=([0-9.]+)", SCRIPT.read_text(), re.M)
    assert requires and script and requires.group(1) == script.group(1)


@pytest.mark.parametrize(
    "args", [["--bogus"], ["--purge"], ["--extra", "cuda"], ["--wheel", "/nonexistent.whl"], ["--root"]],
    ids=["unknown", "purge-alone", "bad-extra", "missing-wheel", "root-no-value"],
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    proc = run_install(*args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("install.sh: "), proc.stderr


def test_help_is_the_header() -> None:
    proc = run_install("--help")
    assert "--root DIR" in proc.stdout and "--uninstall" in proc.stdout and "set -euo" not in proc.stdout


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
