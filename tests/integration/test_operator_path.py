"""The operator's whole path, every step a real command, ending in a device that installs a
signed model over mutual TLS (issue 7).

    fleetctl keys init                       the Ed25519 root of trust
    fleetctl ca init / ca issue              fleet CA; certificates for the broker (127.0.0.1),
                                             the controller and two operators
    fleetctl broker user add                 the controller's and the consoles' roles
    fleetctl broker mosquitto --tls-*        a TLS-only Mosquitto listener, run for real
    fleetctl serve --tls-*                   the controller, with its certificate
    fleetctl provision dev-1 --register ...  the device's bundle, registered over mTLS with an
                  --tls-ca/--tls-cert/...    operator certificate
    install.sh --root R --wheel W --no-deps  the runtime into a staging root
    provision-apply.sh BUNDLE --root R       the bundle into R/etc/edge-runtime
    R/opt/edgefleet/venv/bin/edge-runtime run --config R/etc/edge-runtime/config.toml

The agent is the *staged* venv's ``edge-runtime`` (its entry point and the edgefleet package
installed from the wheel). install.sh runs with ``--no-deps`` because the test has no
network (see tests/integration/test_install.py), so the staged venv has no third-party
packages; they come from the test venv's site-packages on ``PYTHONPATH``, which holds no
edgefleet of its own (the checkout is installed editable, through a ``.pth`` file that
``PYTHONPATH`` entries do not run). The test checks that the staged venv's package is the
one imported.

The bundle's config is left exactly as provisioned. Its absolute device paths
(``/etc/edge-runtime/...``, ``/var/lib/edge-runtime``) are redirected into R through the
documented ``EDGE_RUNTIME_*`` overrides (firmware_scripts/edge-runtime.example.toml); the
REST port and the API socket too, so the test runs beside others. Nothing else is
overridden: device id, groups, broker URL and TLS all come from the bundle.

The proof: Mosquitto logs the device's connection with the certificate's name as its user
name (the listener is TLS-only and requires a client certificate, so there is no other way
in); the controller lists dev-1 online in group lab; a signed model deployed to group lab is
installed and serves predictions equal to the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.apiclient import ApiClient
from tests.agentkit import AgentProcess, NotifyListener
from tests.brokers import free_port, mosquitto_binary
from tests.fleetkit import ControllerProcess, push_model
from tests.helpers import wait_until
from tests.integration.test_broker_tls import TlsBroker, served_version
from tests.integration.test_install import run_install, wheel  # noqa: F401 - the session's wheel fixture

REPO = Path(__file__).resolve().parents[2]
APPLY = REPO / "firmware_scripts" / "provision-apply.sh"
DEVICE, GROUP = "dev-1", "lab"
CONTROLLER = "ctl-a"
OPERATOR, PROVISIONER = "op-1", "op-provision"  # one certificate per simultaneous console (client id = CN)
WAIT = 30.0

pytestmark = pytest.mark.skipif(mosquitto_binary() is None,
                                reason="mosquitto binary not found (.ci/run installs Debian's mosquitto package)")


def fleetctl(*args: str | os.PathLike[str], cwd: Path) -> str:
    """``fleetctl ARGS`` as a subprocess in ``cwd``; its stdout (fails the test on a non-zero exit)."""
    out = subprocess.run([sys.executable, "-m", "controller.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert out.returncode == 0, f"fleetctl {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


def sh(*argv: str | os.PathLike[str]) -> str:
    """``argv`` run in ``/`` (as systemd runs the agent: the checkout is not on ``sys.path``)."""
    out = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120, check=False, cwd="/")
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for the agent's API socket (AF_UNIX paths stop at 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ef-op-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_install_provision_and_run_a_device_over_mutual_tls(tmp_path: Path, wheel: Path,  # noqa: F811
                                                            model_files: Any, zoo: Any, short_dir: Path) -> None:
    ops = tmp_path / "ops"  # the operator's working directory: fleetctl's defaults are relative to it
    ops.mkdir()
    port = free_port()
    broker_url = f"mqtts://127.0.0.1:{port}"

    # -- the operator's side: keys, CA, certificates, broker users --------------------------
    fleetctl("keys", "init", "--dir", "keys", cwd=ops)
    fleetctl("ca", "init", "--dir", "fleet-ca", cwd=ops)
    issued = ops / "issued"
    fleetctl("ca", "issue", "broker", "--role", "broker", "--host", "127.0.0.1", "--out", issued, cwd=ops)
    fleetctl("ca", "issue", CONTROLLER, "--role", "controller", "--out", issued, cwd=ops)
    for name in (OPERATOR, PROVISIONER):
        fleetctl("ca", "issue", name, "--role", "operator", "--out", issued, cwd=ops)
    ca_file = ops / "fleet-ca" / "ca.pem"
    users = ops / "broker" / "users.json"
    fleetctl("broker", "user", "add", CONTROLLER, "--role", "controller", "--users", users, cwd=ops)
    for name in (OPERATOR, PROVISIONER):
        fleetctl("broker", "user", "add", name, "--role", "console", "--users", users, cwd=ops)

    def tls(name: str) -> list[str]:
        return ["--tls-ca", str(ca_file), "--tls-cert", str(issued / f"{name}.pem"),
                "--tls-key", str(issued / f"{name}.key")]

    # As root Mosquitto switches to "mosquitto", which cannot read a private temp dir.
    conf = ops / "broker" / "mosquitto"
    fleetctl("broker", "mosquitto", "--users", users, "--out", conf, "--bind", f"127.0.0.1:{port}",
             "--run-as", pwd.getpwuid(os.geteuid()).pw_name, *tls("broker"), cwd=ops)
    # The start-up probe connects with an operator's certificate (duck-typing test_broker_tls's Pki).
    probe = ssl.create_default_context(cafile=str(ca_file))
    probe.load_cert_chain(str(issued / f"{OPERATOR}.pem"), str(issued / f"{OPERATOR}.key"))
    broker = TlsBroker("mosquitto", [mosquitto_binary() or "mosquitto", "-c", str(conf / "mosquitto.conf")],
                       types.SimpleNamespace(context=lambda _name: probe),  # type: ignore[arg-type]
                       port=port, workdir=conf)
    notify = NotifyListener()
    ctl: ControllerProcess | None = None
    agent: AgentProcess | None = None
    try:
        broker.start()
        ctl = ControllerProcess(broker_url, tmp_path / "ctl", ops / "keys", instance=CONTROLLER,
                                extra=tuple(tls(CONTROLLER)))
        with ApiClient(broker_url, timeout=20, ca_file=str(ca_file), cert_file=str(issued / f"{OPERATOR}.pem"),
                       key_file=str(issued / f"{OPERATOR}.key")) as api:
            assert api.client_id == OPERATOR

            def controller_online() -> bool:
                assert ctl is not None and ctl.alive, ctl.log_text()[-4000:] if ctl else ""
                return bool(api.controller and api.controller.online and api.controller.instance == CONTROLLER)

            wait_until(controller_online, timeout=WAIT, interval=0.1, what="fleetctl serve online over mTLS")

            # -- provisioning, registered through the console over mTLS ----------------------
            bundle = ops / "bundles" / DEVICE
            result = json.loads(fleetctl(
                "provision", DEVICE, "--group", GROUP, "--out", bundle, "--broker", broker_url,
                "--ca", "fleet-ca", "--keys", "keys", "--register", broker_url, *tls(PROVISIONER), "--json", cwd=ops))
            assert result["registered"]["id"] == DEVICE and result["registered"]["groups"] == [GROUP], result
            rows = {r["id"]: r for r in api.call("devices.list")}
            assert rows[DEVICE]["groups"] == [GROUP] and not rows[DEVICE]["online"]

            # -- the device: install the runtime, apply the bundle, start the agent ----------
            root = tmp_path / "root"
            run_install("--root", root, "--wheel", wheel, "--no-deps", "--python", sys.executable)
            sh("sh", APPLY, bundle, "--root", root)
            etc, state = root / "etc" / "edge-runtime", root / "var" / "lib" / "edge-runtime"
            config = etc / "config.toml"
            assert config.read_bytes() == (bundle / "config.toml").read_bytes()
            assert '"/etc/edge-runtime/device.key"' in config.read_text()  # the device's own paths, as shipped
            assert "username" not in config.read_text()  # no password user: the broker's name for it is the CN
            venv = root / "opt" / "edgefleet" / "venv"
            deps = {"PYTHONPATH": sysconfig.get_paths()["purelib"]}  # --no-deps: third-party packages only
            imported = sh("env", *(f"{k}={v}" for k, v in deps.items()), venv / "bin" / "python", "-c",
                          "import edge_runtime; print(edge_runtime.__file__)").strip()
            assert Path(imported).is_relative_to(venv), imported
            overrides = {
                "EDGE_RUNTIME_DATA_DIR": str(state),
                "EDGE_RUNTIME_TRUST_ROOT": str(etc / "root.json"),
                "EDGE_RUNTIME_BROKER__CA_FILE": str(etc / "ca.pem"),
                "EDGE_RUNTIME_BROKER__CERT_FILE": str(etc / "device.pem"),
                "EDGE_RUNTIME_BROKER__KEY_FILE": str(etc / "device.key"),
                "EDGE_RUNTIME_API__REST_PORT": str(free_port()),
                "EDGE_RUNTIME_API__SOCKET_PATH": str(short_dir / "api.sock"),
            }
            agent = AgentProcess(config, notify=notify, env_extra={**deps, **overrides},
                                 argv=[str(venv / "bin" / "edge-runtime"), "run", "--config", str(config)],
                                 log_path=tmp_path / "agent.log")
            agent.wait_ready(60)
            wait_until(lambda: any(d["id"] == DEVICE and d["online"] for d in api.call("devices.list")),
                       timeout=WAIT, interval=0.2, what=f"{DEVICE} online at the controller")

            # -- a signed model to group lab -------------------------------------------------
            push_model(api, model_files["tiny_v1"], "kws", "1")
            row = api.call("deploy", model="kws", version="1", to=f"group:{GROUP}", soak_s=0.5)
            final = wait_until(lambda: (lambda r: r if r["state"] in ("succeeded", "aborted") else None)(
                api.call("rollouts.show", id=row["id"])), timeout=60, interval=0.3, what="the rollout to finish")
            assert final["state"] == "succeeded", (final, agent.log_text()[-4000:])

        rest = f"http://127.0.0.1:{overrides['EDGE_RUNTIME_API__REST_PORT']}"
        assert served_version(rest, "kws") == "1"
        inputs = zoo["tiny_v1"].sample_inputs()
        body = json.dumps({"instances": inputs["x"].tolist()}).encode()
        req = urllib.request.Request(f"{rest}/v1/models/kws:predict", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            got = np.asarray(json.loads(r.read())["predictions"], np.float32)
        assert np.allclose(got, zoo["tiny_v1"].reference(inputs)["y"], atol=1e-4, rtol=1e-4)
        # The artifact is in the staging root's state directory (the data_dir override).
        digest = hashlib.sha256(model_files["tiny_v1"].read_bytes()).hexdigest()
        assert (state / "blobs" / "sha256" / digest).is_file(), sorted(str(p) for p in state.rglob("*"))
        # Mosquitto's user name is the certificate's name (use_identity_as_username on a
        # TLS-only listener that requires one): the device connected with its certificate.
        log = broker.log_tail(400)
        assert f"as {DEVICE} (" in log and f"u'{DEVICE}'" in log, log
    finally:
        if agent is not None:
            agent.__exit__(None, None, None)
        notify.close()
        if ctl is not None:
            ctl.__exit__(None, None, None)
        broker.close()
