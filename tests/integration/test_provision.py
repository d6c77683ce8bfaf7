"""Device provisioning as an operator runs it: ``fleetctl provision`` as a real subprocess
writes a bundle whose config the agent's own loader accepts, whose certificate chains to the
fleet CA and whose broker password the users file verifies; ``provision-apply.sh --root``
installs it with the right modes; ``--register`` puts the device and its groups in a real
controller (``fleetctl serve`` + the embedded broker, subprocesses)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from controller.apiclient import ApiClient
from controller.ca import FleetCA, read_ledger
from controller.credentials import UserDB
from edge_runtime.agent.config import load_config
from tests.fleetkit import ControllerProcess, make_keys

REPO = Path(__file__).resolve().parents[2]
APPLY = REPO / "firmware_scripts" / "provision-apply.sh"
BROKER = "mqtts://broker.fleet.test:8883"


def fleetctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, cwd=REPO,
                         stdin=subprocess.DEVNULL, timeout=120, check=False)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_remapped(config: Path, files_dir: Path, tmp: Path) -> Any:
    """The agent's loader on ``config`` with each /etc/edge-runtime/ path read from ``files_dir``."""
    text = config.read_text().replace('"/etc/edge-runtime/', f'"{files_dir}/')
    check = tmp / "check.toml"
    check.write_text(text)
    return load_config(check, env={})


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Path]:
    FleetCA.init(tmp_path / "ca")
    return {"ca": tmp_path / "ca", "keys": make_keys(tmp_path / "keys"), "users": tmp_path / "broker" / "users.json"}


def provision_args(fleet: dict[str, Path], device: str, out: Path, *extra: str) -> list[str]:
    return ["provision", device, "--group", "kitchen", "--group", "canary", "--out", str(out), "--broker", BROKER,
            "--ca", str(fleet["ca"]), "--keys", str(fleet["keys"]), *extra]


def test_a_provisioned_bundle_validates_and_installs_with_the_right_modes(fleet: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = json.loads(fleetctl(*provision_args(fleet, "pi-01", out, "--users", str(fleet["users"]), "--json")).stdout)
    assert result["device_id"] == "pi-01" and result["groups"] == ["kitchen", "canary"] and result["registered"] is None
    names = {"config.toml", "device.pem", "device.key", "ca.pem", "root.json", "broker.pass"}
    assert {p.name for p in out.iterdir()} == names and set(result["files"]) == names
    assert mode(out) == 0o700 and mode(out / "device.key") == 0o600 and mode(out / "broker.pass") == 0o600
    assert not [p for p in tmp_path.iterdir() if "provision" in p.name]  # no staging directory left behind

    # The config is the agent's, as the device will read it.
    config = load_remapped(out / "config.toml", out, tmp_path)
    assert (config.device_id, config.groups, config.tier) == ("pi-01", ("kitchen", "canary"), "edge")
    assert str(config.data_dir) == "/var/lib/edge-runtime"
    assert str(config.api.socket_path) == "/run/edge-runtime/api.sock"  # the unit's RuntimeDirectory
    assert config.broker.url == BROKER and config.broker.tls and config.broker.username == "pi-01"
    raw = (out / "config.toml").read_text()
    for name in ("ca.pem", "device.pem", "device.key", "root.json", "broker.pass"):
        assert f'"/etc/edge-runtime/{name}"' in raw
    assert config.broker.password_value() == (out / "broker.pass").read_text().strip()

    # The certificate is the device's, from this CA; the root is the key directory's.
    cert = x509.load_pem_x509_certificate((out / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert (out / "ca.pem").read_bytes() == (fleet["ca"] / "ca.pem").read_bytes()
    PolicyBuilder().store(Store([ca_cert])).build_client_verifier().verify(cert, [])
    assert (out / "root.json").read_bytes() == (fleet["keys"] / "root.json").read_bytes()
    assert [(r["name"], r["serial"]) for r in read_ledger(fleet["ca"])] == [("pi-01", result["serial"])]

    # The broker knows it: the password in the bundle verifies as role device.
    users = UserDB.load(fleet["users"])
    assert users.verify("pi-01", (out / "broker.pass").read_text().strip()) == "device"

    # On the device: apply into a staging root, owned by root and the service group.
    group = grp.getgrgid(os.getgid()).gr_name
    root = tmp_path / "root"
    applied = subprocess.run(["sh", str(APPLY), str(out), "--root", str(root), "--group", group], capture_output=True,
                             text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "systemctl restart edge-runtime" in applied.stdout
    etc = root / "etc" / "edge-runtime"
    expected = {"config.toml": 0o644, "device.pem": 0o644, "ca.pem": 0o644, "root.json": 0o644,
                "device.key": 0o640, "broker.pass": 0o640}
    assert {p.name: mode(p) for p in etc.iterdir()} == expected
    for name in expected:
        assert (etc / name).read_bytes() == (out / name).read_bytes()
        if os.getuid() == 0:
            assert ((etc / name).stat().st_uid, (etc / name).stat().st_gid) == (0, os.getgid())
    assert load_remapped(etc / "config.toml", etc, tmp_path).device_id == "pi-01"

    # Applying again (a re-provisioned device) replaces the files and keeps the modes.
    again = subprocess.run(["sh", str(APPLY), str(out), "--root", str(root), "--group", "no-such-group-here"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("does not exist" in again.stdout) or ("not root" in again.stdout)
    assert {p.name: mode(p) for p in etc.iterdir()} == expected

    # A staging root made by install.sh --root has its own etc/group with the service group.
    staged = tmp_path / "staged"
    (staged / "etc").mkdir(parents=True)
    (staged / "etc" / "group").write_text("root:x:0:\nedgefleet:x:4242:\n")
    applied = subprocess.run(["sh", str(APPLY), str(out), "--root", str(staged)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    staged_etc = staged / "etc" / "edge-runtime"
    assert {p.name: mode(p) for p in staged_etc.iterdir()} == expected
    if os.getuid() == 0:
        assert {(staged_etc / name).stat().st_gid for name in expected} == {4242}
        assert staged_etc.stat().st_gid == 4242 and mode(staged_etc) == 0o750

    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(APPLY)], capture_output=True, text=True, timeout=60, check=False)
        assert lint.returncode == 0, lint.stdout


def test_provision_refuses_an_existing_bundle_unless_forced(fleet: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    fleetctl(*provision_args(fleet, "pi-01", out, "--users", str(fleet["users"])))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = fleetctl(*provision_args(fleet, "pi-01", out, "--users", str(fleet["users"])), check=False)
    assert refused.returncode == 1 and "not empty" in refused.stderr and "--force" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert len(read_ledger(fleet["ca"])) == 1

    # Re-provisioning with --force: a new certificate and password, no broker.pass when no --users.
    fleetctl(*provision_args(fleet, "pi-01", out, "--users", str(fleet["users"]), "--force"))
    assert (out / "device.pem").read_bytes() != first["device.pem"]
    users = UserDB.load(fleet["users"])
    assert users.verify("pi-01", first["broker.pass"].decode().strip()) is None
    assert users.verify("pi-01", (out / "broker.pass").read_text().strip()) == "device"
    fleetctl(*provision_args(fleet, "pi-01", out, "--force"))
    assert not (out / "broker.pass").exists()
    assert "password" not in (out / "config.toml").read_text()
    assert len(read_ledger(fleet["ca"])) == 3


REFUSALS: dict[str, tuple[list[str], str]] = {
    "bad device id": (["provision", "pi/01", "--group", "g"], "invalid device id"),
    "bad group": (["provision", "pi-01", "--group", "a b"], "invalid group"),
    "broker URL with a path": (["provision", "pi-01", "--group", "g", "--broker", "mqtts://h:8883/x"], "broker.url"),
    "broker URL with credentials": (["provision", "pi-01", "--group", "g", "--broker", "mqtts://u:p@h:8883"], "broker.url"),
    "no CA there": (["provision", "pi-01", "--group", "g", "--ca", "nowhere"], "fleetctl ca init"),
    "no key directory": (["provision", "pi-01", "--group", "g", "--keys", "nowhere"], "fleetctl keys init"),
    # --register's connection options are checked before anything is issued ("CAFILE": the fleet CA's ca.pem).
    "TLS options without --register": (["provision", "pi-01", "--group", "g", "--tls-ca", "CAFILE"], "--register URL"),
    "TLS files for a plain mqtt:// --register": (
        ["provision", "pi-01", "--group", "g", "--register", "mqtt://127.0.0.1:1", "--tls-ca", "CAFILE"], "not mqtts://"),
    "a --register certificate without its key": (
        ["provision", "pi-01", "--group", "g", "--register", "mqtts://127.0.0.1:1", "--tls-cert", "CAFILE"],
        "--tls-cert and --tls-key go together"),
    "a --register CA file that is missing": (
        ["provision", "pi-01", "--group", "g", "--register", "mqtts://127.0.0.1:1", "--tls-ca", "nowhere"],
        "no such file"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_provision_refuses_bad_requests_and_issues_nothing(fleet: dict[str, Path], tmp_path: Path, case: str) -> None:
    argv, match = REFUSALS[case]
    argv = [{"nowhere": str(tmp_path / "nowhere"), "CAFILE": str(fleet["ca"] / "ca.pem")}.get(a, a) for a in argv]
    defaults = {"--out": str(tmp_path / "bundle"), "--broker": BROKER, "--ca": str(fleet["ca"]),
                "--keys": str(fleet["keys"]), "--users": str(fleet["users"])}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    result = fleetctl(*argv, "--json", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert match in result.stderr
    assert "error" in json.loads(result.stdout)
    assert read_ledger(fleet["ca"]) == []
    assert not (tmp_path / "bundle").exists() and not fleet["users"].exists()
    assert not [p for p in tmp_path.iterdir() if "provision" in p.name]


def test_provision_refuses_a_name_another_role_holds_even_when_forced(fleet: dict[str, Path], tmp_path: Path) -> None:
    """A device named like a controller would get the controller's rights on a broker that
    takes the identity from the certificate (Mosquitto) or from the users file."""
    FleetCA.open(fleet["ca"]).issue("ctl-a", "controller")
    ledger = read_ledger(fleet["ca"])
    result = fleetctl(*provision_args(fleet, "ctl-a", tmp_path / "bundle", "--force", "--json"), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "ca_error" and error["reason"] == "name_taken", error
    assert read_ledger(fleet["ca"]) == ledger and not (tmp_path / "bundle").exists()

    users = UserDB(fleet["users"])
    users.add("ctl-b", "controller", "pw-of-ctl-b")
    users.save()
    before = fleet["users"].read_bytes()
    result = fleetctl(*provision_args(fleet, "ctl-b", tmp_path / "bundle", "--users", str(fleet["users"]), "--force"),
                      check=False)
    assert result.returncode == 1 and "is a controller in" in result.stderr, result.stdout + result.stderr
    assert fleet["users"].read_bytes() == before and read_ledger(fleet["ca"]) == ledger
    assert not (tmp_path / "bundle").exists()


def test_register_puts_the_device_and_its_groups_in_the_controller(fleet: dict[str, Path], tmp_path: Path,
                                                                   amqtt_broker: Any) -> None:
    with ControllerProcess(amqtt_broker.url, tmp_path / "ctl", fleet["keys"]) as ctl:
        ctl.wait_online()
        out = fleetctl(*provision_args(fleet, "pi-07", tmp_path / "bundle", "--register", amqtt_broker.url))
        assert "registered pi-07 in the controller with groups kitchen, canary" in out.stdout
        with ApiClient(amqtt_broker.url, timeout=20) as api:
            rows = {r["id"]: r for r in api.call("devices.list")}
            assert set(rows["pi-07"]["groups"]) == {"kitchen", "canary"}
            assert [r["id"] for r in api.call("devices.list", group="canary")] == ["pi-07"]
            assert "pi-07" in api.call("groups.list")["kitchen"]
        # Registering again (a re-provisioned device) is idempotent.
        again = json.loads(fleetctl(*provision_args(fleet, "pi-07", tmp_path / "bundle", "--register",
                                                    amqtt_broker.url, "--force", "--json")).stdout)
        assert again["registered"]["id"] == "pi-07" and set(again["registered"]["groups"]) == {"kitchen", "canary"}


def test_register_without_a_controller_keeps_the_bundle_and_says_how_to_register(fleet: dict[str, Path], tmp_path: Path,
                                                                                  amqtt_broker: Any) -> None:
    out = fleetctl(*provision_args(fleet, "pi-08", tmp_path / "bundle", "--register", amqtt_broker.url,
                                   "--timeout", "2"), check=False)
    assert out.returncode == 1
    assert "not registered" in out.stderr and "fleetctl device add pi-08 --group kitchen --group canary" in out.stderr
    assert (tmp_path / "bundle" / "config.toml").exists()
