"""fleetctl console commands without a broker: argument types, the parser's params, tables
for every row shape of ``apispec``, health specs computed with the engine, params checks."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from controller import apiclient, console
from controller.cli import build_parser, main
from edge_runtime.errors import EdgeRuntimeError, InputError
from edge_runtime.protocol import messages

# -- argument types ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendered tables are as wide as a pipe gets, whatever $COLUMNS the runner has."""
    monkeypatch.setenv("COLUMNS", "250")


@pytest.mark.parametrize("text,seconds", [
    ("90", 90.0), ("0", 0.0), ("1.5", 1.5), ("60s", 60.0), ("5m", 300.0), ("1h", 3600.0), ("1.5h", 5400.0),
    ("1h30m", 5400.0), ("250ms", 0.25), ("2d", 172800.0), (" 10S ", 10.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert console.duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "m5", "-3", "5m 3s", "1h-30m", "nan", "inf", "5mm"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        console.duration(text)


@pytest.mark.parametrize("text,value", [("10%", 10.0), ("10", 10.0), ("0", 0.0), ("100%", 100.0), ("2.5 %", 2.5)])
def test_percentages(text: str, value: float) -> None:
    assert console.percent(text) == value


@pytest.mark.parametrize("text", ["101%", "-1", "ten", "%", "nan"])
def test_bad_percentages(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        console.percent(text)


def test_gates_can_be_switched_off_and_latency_may_exceed_100() -> None:
    assert console.optional_percent("off") is None and console.optional_percent("3%") == 3.0
    assert console.regression_percent("250%") == 250.0 and console.regression_percent("none") is None
    with pytest.raises(argparse.ArgumentTypeError):
        console.optional_percent("250%")


@pytest.mark.parametrize("text,value", [("25,50,100", [25.0, 50.0, 100.0]), ("10%,100%", [10.0, 100.0]), ("100", [100.0])])
def test_waves(text: str, value: list[float]) -> None:
    assert console.waves(text) == value


@pytest.mark.parametrize("text", ["", "50,25", "0,100", "25,25", "a,b", "10,200"])
def test_bad_waves(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        console.waves(text)


@pytest.mark.parametrize("text,value", [
    ("all", "all"), ("dev-1", "device:dev-1"), ("device:dev-1", "device:dev-1"), ("group:lab", "group:lab"),
    ("all.x", "device:all.x"),
])
def test_targets(text: str, value: str) -> None:
    assert console.target(text) == value


@pytest.mark.parametrize("text", ["group:", "node:x", "device:a/b", "-dev", "group:a+b", "a b", ""])
def test_bad_targets(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        console.target(text)


def test_model_at_version() -> None:
    assert console.model_version("vision@2.1+rc1") == ("vision", "2.1+rc1")
    for bad in ("vision", "vision@", "@2", "vi/sion@2", "vision@2@3"):
        with pytest.raises(argparse.ArgumentTypeError):
            console.model_version(bad)


def test_deploy_params_from_the_command_line() -> None:
    args = build_parser().parse_args([
        "deploy", "vision@2", "--to", "cam-1", "--canary", "10%", "--waves", "25,50,100", "--soak", "2m",
        "--max-failures", "5", "--max-error-rate", "off", "--max-latency-regression", "150%", "--step-timeout", "1h",
    ])
    assert console.deploy_params(args) == {
        "model": "vision", "version": "2", "to": "device:cam-1", "canary_pct": 10.0, "waves": [25.0, 50.0, 100.0],
        "soak_s": 120.0, "max_failures_pct": 5.0, "max_error_rate_pct": None, "max_latency_regression_pct": 150.0,
        "step_timeout_s": 3600.0,
    }
    # Unset options are left to the server's defaults; the params still validate.
    args = build_parser().parse_args(["deploy", "vision@2", "--to", "all"])
    params = console.deploy_params(args)
    assert params == {"model": "vision", "version": "2", "to": "all"}
    assert apiclient.validate_params("deploy", params)["waves"] == [100.0]


@pytest.mark.parametrize("argv", [
    ["deploy", "vision", "--to", "all"], ["deploy", "vision@2", "--to", "node:x"], ["deploy", "vision@2"],
    ["deploy", "vision@2", "--to", "all", "--canary", "200%"], ["deploy", "vision@2", "--to", "all", "--soak", "forever"],
    ["rollout", "show", "0"], ["cmd", "set-config", "dev-1"], ["cmd", "ping", "bad/id"], ["top", "--interval", "0"],
    ["devices", "--timeout", "0"], ["telemetry", "tail", "--count", "0"], ["models", "push", "f", "--name", "x"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_every_command_has_json_and_connection_options() -> None:
    parser = build_parser()
    for argv in (["models", "ls"], ["devices"], ["device", "show", "d"], ["device", "add", "d"], ["group", "ls"],
                 ["group", "add", "g", "d"], ["group", "rm", "g"], ["deploy", "m@1", "--to", "all"], ["rollout", "ls"],
                 ["rollout", "show", "1"], ["rollout", "pause", "1"], ["rollout", "resume", "1"], ["rollout", "abort", "1"],
                 ["cmd", "ping", "d"], ["cmd", "diagnostics", "d"], ["cmd", "restart", "d"], ["telemetry", "tail"],
                 ["top"], ["audit"], ["models", "push", "f", "--name", "m", "--version", "1"]):
        args = parser.parse_args([*argv, "--json", "--broker", "mqtt://h:1", "--username", "u",
                                  "--password-file", "p", "--timeout", "3s"])
        assert args.json and args.broker == "mqtt://h:1" and args.timeout == 3.0 and callable(args.fn), argv


def test_connection_options_default_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("FLEETCTL_BROKER", "mqtt://broker.example:1884")
    monkeypatch.setenv("FLEETCTL_USERNAME", "ops")
    monkeypatch.setenv("FLEETCTL_PASSWORD_FILE", str(pw))
    api = console.connect(build_parser().parse_args(["devices"]))
    assert (api.url, api.username, api.password, api.timeout) == ("mqtt://broker.example:1884", "ops", "s3cret", 10.0)
    monkeypatch.delenv("FLEETCTL_BROKER")
    assert console.connect(build_parser().parse_args(["devices"])).url == apiclient.DEFAULT_BROKER
    monkeypatch.setenv("FLEETCTL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(console.ConsoleError, match="password file"):
        console.connect(build_parser().parse_args(["devices"]))


def test_tls_options_and_their_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from controller.ca import FleetCA

    ca = FleetCA.init(tmp_path / "ca")
    files = ca.write(ca.issue("ops-alice", "operator"), tmp_path / "pki")
    args = build_parser().parse_args(["devices", "--broker", "mqtts://b:8883", "--tls-ca", str(ca.ca_file),
                                      "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])])
    api = console.connect(args)
    assert (api.ca_file, api.cert_file, api.key_file) == (str(ca.ca_file), str(files["cert"]), str(files["key"]))
    assert api.client_id == "ops-alice"  # the identity a mutual-TLS broker takes from the certificate
    monkeypatch.setenv("FLEETCTL_BROKER", "mqtts://b:8883")
    monkeypatch.setenv("FLEETCTL_TLS_CA", str(ca.ca_file))
    monkeypatch.setenv("FLEETCTL_TLS_CERT", str(files["cert"]))
    monkeypatch.setenv("FLEETCTL_TLS_KEY", str(files["key"]))
    assert console.connect(build_parser().parse_args(["devices"])).cert_file == str(files["cert"])
    monkeypatch.delenv("FLEETCTL_TLS_KEY")
    with pytest.raises(console.ConsoleError, match="go together"):
        console.connect(build_parser().parse_args(["devices"]))
    monkeypatch.delenv("FLEETCTL_TLS_CERT")
    with pytest.raises(console.ConsoleError, match="not mqtts"):
        console.connect(build_parser().parse_args(["devices", "--broker", "mqtt://b:1883"]))
    with pytest.raises(console.ConsoleError, match="no such file"):
        console.connect(build_parser().parse_args(["devices", "--tls-ca", str(tmp_path / "missing.pem")]))


def test_unreadable_password_file_is_an_error_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--password-file", str(tmp_path / "nope"), "--json"]) == 1
    cap = capsys.readouterr()
    assert "fleetctl: cannot read the password file" in cap.err
    assert '"invalid_argument"' in cap.out


def test_console_states_match_the_rollout_machine() -> None:
    from controller import rollout

    assert console.ACTIVE_ROLLOUT_STATES == rollout.ACTIVE_STATES
    assert set(rollout.ROLLOUT_STATES) - set(rollout.ACTIVE_STATES) == {"succeeded", "aborted"}


# -- params are checked before anything is sent ---------------------------------------


def test_invalid_params_are_value_errors_and_runtime_errors() -> None:
    with pytest.raises(ValueError, match="devices.show: id"):
        apiclient.validate_params("devices.show", {"id": "a/b"})
    with pytest.raises(apiclient.InvalidParams, match="unknown API method"):
        apiclient.validate_params("devices.explode", {})
    with pytest.raises(EdgeRuntimeError):
        apiclient.validate_params("deploy", {"model": "m", "version": "1", "to": "all", "surprise": 1})
    assert apiclient.validate_params("audit.list", {}) == {"limit": 50}


def test_client_ids_fit_the_topic_rule() -> None:
    ids = {apiclient.new_client_id() for _ in range(20)}
    assert len(ids) == 20
    for cid in ids:
        assert cid.startswith("fleetctl-") and messages.topics.valid_id(cid)
    with pytest.raises(ValueError):
        apiclient.ApiClient(client_id="bad/id")


# -- tables for every row shape ---------------------------------------------------------

NOW = datetime.now(timezone.utc)
ISO = (NOW - timedelta(hours=3, minutes=30)).isoformat()  # "3h ago" for the next half hour

DEVICE = {"id": "cam-1", "online": True, "tier": "edge", "groups": ["lab", "north"], "models": {"vision": "2"},
          "generation": 7, "desired_generation": 8, "last_seen": ISO, "runtime_version": "0.9.1"}
DEVICE_NULLS = {k: None for k in DEVICE} | {"id": "cam-2", "groups": [], "models": {}}
RELEASE = {"model": "vision", "version": "2", "sha256": "ab" * 32, "size": 123456, "created_at": ISO,
           "created_by": "ops", "inputs": ["image float32[1, 32, 32, 3]"], "outputs": ["probs float32[1, 10]"],
           "health": True}
STEP = {"device_id": "cam-1", "wave": 0, "state": "done", "previous_version": "1", "started_at": ISO,
        "finished_at": ISO, "reason": None, "detail": None}
ROLLOUT = {"id": 3, "model": "vision", "version": "2", "target": "group:lab", "state": "running", "wave": 1,
           "waves": 3, "plan": {"canary_pct": 10.0, "waves": [50.0, 100.0]}, "counts": {"done": 2, "updating": 1},
           "reason": None, "figures": {"error_rate_pct": 0.1}, "created_at": ISO, "updated_at": ISO,
           "finished_at": None, "created_by": "ops"}
TOP = {"id": "cam-1", "online": False, "tier": "edge", "models": {"vision": "2", "kws": "1"},
       "p95_ms": {"vision": 12.345}, "cpu_percent": 37.5, "memory_percent": 61.0, "last_seen": ISO}
AUDIT = {"at": ISO, "actor": "ops", "action": "deploy", "target": "group:lab", "detail": "vision@2"}


def render(*items: Any) -> str:
    out = Console(record=True, width=250, color_system=None)
    for item in items:
        out.print(item)
    return out.export_text()


def test_devices_table() -> None:
    text = render(console.devices_table([DEVICE, DEVICE_NULLS]))
    for piece in ("cam-1", "online", "edge", "lab, north", "vision@2", "7/8", "3h ago", "0.9.1", "cam-2", "-/-"):
        assert piece in text


def test_releases_table() -> None:
    text = render(console.releases_table([RELEASE]))
    for piece in ("vision", "120.6 KiB", "abababababab", "image float32[1, 32, 32, 3]", "probs float32[1, 10]", "yes", "ops"):
        assert piece in text


def test_rollout_tables() -> None:
    text = render(console.rollouts_table([ROLLOUT]))
    for piece in ("3", "vision@2", "group:lab", "running", "1/3", "done 2, updating 1"):
        assert piece in text
    text = render(*console.rollout_detail({**ROLLOUT, "steps": [STEP, {**STEP, "device_id": "cam-9", "state": "failed",
                                                                       "reason": "health_check_failed"}]}))
    for piece in ("rollout 3: vision@2 -> group:lab", "canary_pct=10", "error_rate_pct=0.1", "cam-9", "failed",
                  "health_check_failed", "previous"):
        assert piece in text


def test_device_detail_renders_every_section() -> None:
    result = {"device": DEVICE, "assignments": {"vision": "2"}, "desired": {"generation": 8, "models": {"vision": "2"}},
              "events": [{"seq": 4, "at": ISO, "step": "active", "model": "vision", "version": "2"}],
              "telemetry": [{"seq": 9, "device_id": "cam-1", "received_at": ISO}], "steps": [STEP]}
    text = render(*console.device_detail(result))
    for piece in ("device cam-1", "desired 8", "assignments", "vision", "events", "active", "telemetry", "steps", "done"):
        assert piece in text
    assert "events" not in render(*console.device_detail({"device": DEVICE, "events": []}))


def test_groups_top_audit_and_cmd_tables() -> None:
    assert "lab" in render(console.groups_table({"lab": ["cam-1", "cam-2"]}))
    text = render(console.top_table([TOP]))
    for piece in ("cam-1", "offline", "vision@2", "kws@1", "12.3 ms", "38%", "61%", "3h ago"):
        assert piece in text
    text = render(console.audit_table([AUDIT]))
    assert "deploy" in text and "vision@2" in text and NOW.strftime("%Y-%m-%d") in text
    text = render(*console.cmd_detail({"device": "cam-1", "seq": 5, "name": "ping", "state": "answered",
                                       "reply": {"ok": True, "result": {"rtt_ms": 3.5}}}))
    assert "ping (seq 5)" in text and "rtt_ms" in text and "3.5" in text
    assert "none yet" in render(*console.cmd_detail({"device": "d", "seq": 1, "name": "ping", "state": "sent",
                                                     "reply": None}))


def test_time_formats() -> None:
    assert console.fmt_ago(None) == "-" and console.fmt_time(None) == "-"
    assert console.fmt_ago((NOW - timedelta(hours=3)).isoformat(), now=NOW) == "3h ago"
    assert console.fmt_ago(NOW.timestamp() - 120, now=NOW) == "2m ago"
    assert console.fmt_time(0) == "1970-01-01 00:00:00"
    assert console.fmt_time("not a time") == "not a time"


def test_telemetry_line() -> None:
    t = messages.Telemetry(seq=12, at=NOW, interval_s=10, system=messages.SystemFigures(
        cpu_percent=25.0, memory_total_bytes=1000, memory_available_bytes=250),
        models={"vision": messages.ModelFigures(version="2", calls=40, p95_ms=7.25)})
    line = console.telemetry_line("cam-1", t)
    assert "cam-1" in line and "seq=12" in line and "cpu=25%" in line and "mem=75%" in line
    assert "vision@2:40calls/p95=7.2ms" in line


# -- health specs from samples, computed with the engine ------------------------------


def test_health_spec_from_samples(zoo: dict[str, Any], model_files: dict[str, Path], tmp_path: Path) -> None:
    from controller.cli import inspect_file

    model, path = zoo["multi_io"], model_files["multi_io"]
    sig = inspect_file(path)["signature"]
    inputs = model.sample_inputs(seed=3)
    np.save(tmp_path / "a.npy", inputs["a"])
    np.save(tmp_path / "b.npy", inputs["b"].astype(np.float64))  # a lossless conversion is fine
    for samples in ([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                    [f"b={tmp_path / 'b.npy'}", f"a={tmp_path / 'a.npy'}"],
                    [f"b={tmp_path / 'b.npy'}", str(tmp_path / "a.npy")]):
        spec = messages.HealthSpec.model_validate(console.health_spec(path, sig, samples))
        assert spec.inputs["b"].to_array().dtype == np.float32
        reference = model.reference(inputs)
        for name, want in reference.items():
            np.testing.assert_allclose(spec.expected[name].to_array(), want, rtol=1e-5, atol=1e-6)
    assert console.health_spec(path, sig, []) is None


def test_health_spec_refusals(model_files: dict[str, Path], tmp_path: Path) -> None:
    from controller.cli import inspect_file

    path = model_files["multi_io"]
    sig = inspect_file(path)["signature"]
    np.save(tmp_path / "a.npy", np.zeros((1, 8), np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "junk.npy").write_text("nope")
    a = str(tmp_path / "a.npy")
    with pytest.raises(console.ConsoleError, match="no sample for input b"):
        console.health_spec(path, sig, [a])
    with pytest.raises(console.ConsoleError, match="more --health-sample files"):
        console.health_spec(path, sig, [a, a, a])
    with pytest.raises(console.ConsoleError, match="no input 'c'"):
        console.health_spec(path, sig, [f"c={a}", a])
    with pytest.raises(console.ConsoleError, match="given twice"):
        console.health_spec(path, sig, [f"a={a}", f"a={a}"])
    with pytest.raises(console.ConsoleError, match="cannot read"):
        console.health_spec(path, sig, [a, str(tmp_path / "junk.npy")])
    with pytest.raises(InputError):
        console.health_spec(path, sig, [a, str(tmp_path / "wrong.npy")])


def test_models_push_refuses_a_bad_file_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.tflite"
    bad.write_text("not a model")
    # The broker URL points nowhere: the file check comes first, so the error is about the file.
    assert main(["models", "push", str(bad), "--name", "m", "--version", "1", "--broker", "mqtt://127.0.0.1:1",
                 "--json"]) == 1
    cap = capsys.readouterr()
    assert '"not_tflite"' in cap.out and cap.err.startswith("fleetctl: ")
