"""The agent's config: a valid file loads; every bad value is one ConfigError naming the
file, the dotted field and (for an override) the variable; environment overrides win."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from edge_runtime.agent import config as c
from edge_runtime.agent.config import AgentConfig, ConfigError, load_config
from edge_runtime.runtime import ServeConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "firmware_scripts" / "edge-runtime.example.toml"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ca.pem", "device.pem", "device.key", "root.json", "broker.pass"):
        out[name] = tmp_path / name
        out[name].write_text("secret-pass\n" if name == "broker.pass" else "x")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    """A TOML file of ``data`` (top-level scalars, then one table per dict)."""
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in table.items())
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tls_config(tmp_path: Path, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "device_id": "pi-kitchen-01",
        "groups": ["kitchen", "canary"],
        "tier": "edge",
        "data_dir": str(tmp_path / "data"),
        "trust_root": str(files["root.json"]),
        "telemetry_interval_s": 5,
        "broker": {
            "url": "mqtts://broker.example.net",
            "ca_file": str(files["ca.pem"]),
            "cert_file": str(files["device.pem"]),
            "key_file": str(files["device.key"]),
            "username": "pi-kitchen-01",
            "password_file": str(files["broker.pass"]),
        },
        "api": {"rest_port": 9000, "pool_size": 3},
        "limits": {"chunk_size": 32768},
    }


def minimal(tmp_path: Path) -> dict[str, Any]:
    return {"device_id": "dev-1", "data_dir": str(tmp_path / "data"), "broker": {"url": "mqtt://localhost"}}


def fails(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    message = str(info.value)
    assert str(path) in message
    assert "pydantic" not in message and "Traceback" not in message and "errors.pydantic.dev" not in message
    return info.value


# -- valid --------------------------------------------------------------------------------


def test_valid_tls_config_loads(tmp_path: Path, files: dict[str, Path]) -> None:
    cfg = load_config(write(tmp_path, tls_config(tmp_path, files)), env={})
    assert cfg.device_id == "pi-kitchen-01" and cfg.groups == ("kitchen", "canary")
    assert cfg.broker.tls and cfg.broker.host == "broker.example.net" and cfg.broker.port == 8883
    assert cfg.broker.password_value() == "secret-pass"
    assert "secret-pass" not in repr(cfg)
    assert cfg.limits.chunk_size == 32768 and cfg.telemetry_interval_s == 5
    serve = cfg.serve_config()
    assert isinstance(serve, ServeConfig)
    assert (serve.data_dir, serve.rest_port, serve.pool_size) == (tmp_path / "data", 9000, 3)
    with pytest.raises(Exception):
        cfg.device_id = "other"  # type: ignore[misc]  # frozen


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal(tmp_path)), env={})
    assert cfg.telemetry_interval_s == 10.0 and cfg.tier == "edge" and cfg.groups == ()
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("localhost", 1883, False)
    assert cfg.broker.password_value() is None
    assert (cfg.broker.reconnect_initial_s, cfg.broker.reconnect_max_s) == (1.0, 60.0)
    # The API and store sections default exactly like `edge-runtime serve`.
    assert cfg.serve_config() == ServeConfig(data_dir=tmp_path / "data")


def test_rest_disabled_maps_to_no_rest_port(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"api": {"rest_enabled": False}}
    assert load_config(write(tmp_path, data), env={}).serve_config().rest_port is None


@pytest.mark.parametrize("section", [c.ApiConfig, c.StoreConfig])
def test_api_and_store_fields_mirror_serve_config(section: type[BaseModel]) -> None:
    serve = ServeConfig.model_fields
    for name, field in section.model_fields.items():
        if name == "rest_enabled":
            continue
        assert name in serve, name
        assert field.default == serve[name].default, name
        assert [repr(m) for m in field.metadata] == [repr(m) for m in serve[name].metadata], name


def test_example_file_is_complete_and_valid(tmp_path: Path) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    # Every key of the schema appears in the example, documented.
    for name, field in AgentConfig.model_fields.items():
        section = c._section(field.annotation)
        if section is None:
            # cores: optional, detected when unset (a commented line, like quota_bytes)
            assert name in data or (name == "cores" and "\n# cores = " in EXAMPLE.read_text()), name
        else:
            missing = set(section.model_fields) - set(data[name]) - {"password", "quota_bytes", "backend"}
            assert not missing, (name, missing)
    # With its files present, it loads.
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        target = tmp_path / Path(data["broker"][key]).name
        target.write_text("x")
        data["broker"][key] = str(target)
    (tmp_path / "root.json").write_text("{}")
    data["trust_root"] = str(tmp_path / "root.json")
    data["data_dir"] = str(tmp_path / "data")
    assert load_config(write(tmp_path, data), env={}).device_id == "pi-kitchen-01"


# -- bad values: each names its dotted field ----------------------------------------------

BAD: dict[str, tuple[str, Any, str, str]] = {
    # name: (dotted key, value, expected field in the error, words in the message)
    "wrong type int": ("api.pool_size", "two", "api.pool_size", "valid integer"),
    "wrong type list": ("groups", "kitchen", "groups", "valid tuple"),
    "out of bounds": ("api.rest_port", 70000, "api.rest_port", "65535"),
    "telemetry too fast": ("telemetry_interval_s", 0.01, "telemetry_interval_s", "greater than or equal"),
    "chunk too big": ("limits.chunk_size", 1024 * 1024, "limits.chunk_size", "less than or equal"),
    "unknown top key": ("colour", "blue", "colour", "unknown key"),
    "unknown nested key": ("limits.chunk_sise", 3, "limits.chunk_sise", "chunk_size"),
    "bad device id slash": ("device_id", "pi/1", "device_id", "[A-Za-z0-9._-]"),
    "bad device id wildcard": ("device_id", "#", "device_id", "invalid id"),
    "bad device id long": ("device_id", "a" * 65, "device_id", "1-64"),
    "bad group id": ("groups", ["ok", "no+pe"], "groups[1]", "no+pe"),
    "duplicate group": ("groups", ["a", "a"], "groups", "twice"),
    "bad tier": ("tier", "fog", "tier", "'edge' or 'cloud'"),
    "bad scheme": ("broker.url", "http://x", "broker.url", "scheme 'http'"),
    "no host": ("broker.url", "mqtt://", "broker.url", "no host"),
    "credentials in url": ("broker.url", "mqtt://u:p@h", "broker.url", "credentials"),
    "bad port": ("broker.url", "mqtt://h:99999", "broker.url", "out of range"),
    "tls file on plain mqtt": ("broker.ca_file", "@CA", "broker.ca_file", "mqtts://"),
    "password without user": ("broker.password", "pw", "broker.username", "required when a password"),
    "missing trust root": ("trust_root", "/nonexistent/root.json", "trust_root", "file not found"),
    "trust root a directory": ("trust_root", "@DIR", "trust_root", "not a regular file"),
    "data dir is a file": ("data_dir", "@CA", "data_dir", "not a directory"),
    "reconnect max below initial": ("broker.reconnect_max_s", 0.5, "broker.reconnect_max_s", "below"),
    "missing device id": ("device_id", None, "device_id", "required"),
    "cores zero": ("cores", 0, "cores", "greater than or equal to 1"),
    "cores too many": ("cores", 5000, "cores", "less than or equal to 4096"),
    "cores fractional": ("cores", 1.5, "cores", "valid integer"),
    "cores a word": ("cores", "two", "cores", "valid integer"),
    "cores a boolean": ("cores", True, "cores", "whole number of CPU cores"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_value_names_its_field(case: str, tmp_path: Path, files: dict[str, Path]) -> None:
    key, value, field, words = BAD[case]
    data = minimal(tmp_path)
    value = {"@CA": str(files["ca.pem"]), "@DIR": str(tmp_path)}.get(value, value) if isinstance(value, str) else value
    *parents, leaf = key.split(".")
    table = data
    for p in parents:
        table = table.setdefault(p, {})
    if value is None:
        del table[leaf]
    else:
        table[leaf] = value
    error = fails(write(tmp_path, data))
    assert error.field == field
    assert f"{field}: " in str(error) and words in str(error)
    assert len(error.problems) == 1, error.problems


def test_mqtts_without_ca_names_ca_file(tmp_path: Path, files: dict[str, Path]) -> None:
    data = tls_config(tmp_path, files)
    del data["broker"]["ca_file"]
    error = fails(write(tmp_path, data))
    assert error.field == "broker.ca_file" and "required for an mqtts://" in str(error)


def test_mqtts_with_missing_cert_file_names_it(tmp_path: Path, files: dict[str, Path]) -> None:
    data = tls_config(tmp_path, files)
    data["broker"]["cert_file"] = str(tmp_path / "gone.pem")
    error = fails(write(tmp_path, data))
    assert error.field == "broker.cert_file" and f"file not found: {tmp_path / 'gone.pem'}" in str(error)


def test_password_and_password_file_together(tmp_path: Path, files: dict[str, Path]) -> None:
    data = tls_config(tmp_path, files)
    data["broker"]["password"] = "hunter2"
    error = fails(write(tmp_path, data))
    assert error.field == "broker.password_file" and "hunter2" not in str(error)


def test_a_bad_password_value_is_never_quoted(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["broker"] |= {"username": "u", "password": 123456789}
    error = fails(write(tmp_path, data))
    assert error.field == "broker.password" and "123456789" not in str(error)


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"tier": "fog", "api": {"pool_size": 0}}
    error = fails(write(tmp_path, data))
    assert {p.field for p in error.problems} == {"tier", "api.pool_size"}
    assert "2 problems" in str(error)


def test_missing_file_unreadable_toml_and_bad_utf8(tmp_path: Path) -> None:
    error = fails(tmp_path / "nope.toml")
    assert "cannot read" in str(error) and error.source == str(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "x\n')
    assert "not valid TOML" in str(fails(bad)) and "line 1" in str(fails(bad))
    bad.write_bytes(b'device_id = "\xff"\n')
    assert "not UTF-8" in str(fails(bad))


# -- environment overrides ----------------------------------------------------------------


def test_env_overrides_win_over_the_file(tmp_path: Path, files: dict[str, Path]) -> None:
    path = write(tmp_path, tls_config(tmp_path, files))
    env = {
        "EDGE_RUNTIME_DEVICE_ID": "pi-hall-02",  # top level
        "EDGE_RUNTIME_BROKER__URL": "mqtts://other.example.net:9883",  # nested, canonical
        "EDGE_RUNTIME_API_REST_PORT": "9100",  # nested, single underscore
        "EDGE_RUNTIME_LIMITS__CHUNK_TIMEOUT_S": "2.5",  # a section absent from the file
        "EDGE_RUNTIME_GROUPS": "hall, canary,",  # a list, comma-separated
        "EDGE_RUNTIME_TRUST_ROOT": "",  # empty: unset an optional field
        "EDGE_RUNTIME_CONFIG": "/ignored",  # reserved for the CLI
        "PATH": "/usr/bin",  # not ours
    }
    cfg = load_config(path, env=env)
    assert cfg.device_id == "pi-hall-02"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.ca_file) == ("other.example.net", 9883, files["ca.pem"])
    assert cfg.api.rest_port == 9100 and cfg.api.pool_size == 3  # the rest of the section stays
    assert cfg.limits.chunk_timeout_s == 2.5 and cfg.limits.chunk_size == 32768
    assert cfg.groups == ("hall", "canary") and cfg.trust_root is None


def test_brief_style_broker_url_variable(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal(tmp_path)), env={"EDGE_RUNTIME_BROKER_URL": "mqtt://10.0.0.5:1884"})
    assert (cfg.broker.host, cfg.broker.port) == ("10.0.0.5", 1884)


def test_env_can_supply_a_field_missing_from_the_file(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    del data["device_id"]
    assert load_config(write(tmp_path, data), env={"EDGE_RUNTIME_DEVICE_ID": "from-env"}).device_id == "from-env"


@pytest.mark.parametrize(
    "variable, value, field, words",
    [
        ("EDGE_RUNTIME_API__REST_PORT", "http", "api.rest_port", "valid integer"),
        ("EDGE_RUNTIME_BROKER_URL", "ftp://x", "broker.url", "scheme 'ftp'"),
        ("EDGE_RUNTIME_DEVICE_ID", "a b", "device_id", "invalid id"),
        ("EDGE_RUNTIME_GROUPS", "ok,bad/group", "groups[1]", "bad/group"),
        ("EDGE_RUNTIME_TELEMETRY_INTERVAL_S", "0", "telemetry_interval_s", "greater than or equal"),
    ],
)
def test_bad_env_value_names_the_variable(tmp_path: Path, variable: str, value: str, field: str, words: str) -> None:
    error = fails(write(tmp_path, minimal(tmp_path)), env={variable: value})
    assert error.problems[0].variable == variable and error.field == field
    assert f"{variable} ({field}): " in str(error) and words in str(error)


def test_unknown_env_variable_is_an_error(tmp_path: Path) -> None:
    error = fails(write(tmp_path, minimal(tmp_path)), env={"EDGE_RUNTIME_BROKER__URI": "mqtt://x"})
    assert error.problems[0].variable == "EDGE_RUNTIME_BROKER__URI" and "names no setting" in str(error)
    # A section itself cannot be set from one variable.
    error = fails(write(tmp_path, minimal(tmp_path)), env={"EDGE_RUNTIME_BROKER": "mqtt://x"})
    assert "names no setting" in str(error)


def test_every_field_has_an_unambiguous_variable() -> None:
    def leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        out = []
        for name, field in model.model_fields.items():
            sub = c._section(field.annotation)
            out += leaves(sub, (*prefix, name)) if sub else [(*prefix, name)]
        return out

    for path in leaves(AgentConfig):
        canonical = c.env_name(".".join(path))
        single = c.ENV_PREFIX + "_".join(path).upper()
        for variable in (canonical, single):
            assert c._resolve(AgentConfig, variable[len(c.ENV_PREFIX):].lower()) == [path], variable
    assert c.env_name("api.rest_port") == "EDGE_RUNTIME_API__REST_PORT"


# -- cores: what the birth reports to the placement planner -------------------------------------


def test_cores_configured_else_detected(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal(tmp_path)), env={})
    assert cfg.cores is None and cfg.core_count(lambda: 6) == 6  # not set: detected
    assert cfg.core_count(lambda: 0) == 1 and cfg.core_count(lambda: None) == 1  # never below 1
    pinned = load_config(write(tmp_path, minimal(tmp_path) | {"cores": 2}), env={})
    assert pinned.cores == 2 and pinned.core_count(lambda: 6) == 2
    assert load_config(write(tmp_path, minimal(tmp_path)), env={"EDGE_RUNTIME_CORES": "3"}).core_count(lambda: 6) == 3
    error = fails(write(tmp_path, minimal(tmp_path)), env={"EDGE_RUNTIME_CORES": "0"})
    assert error.field == "cores" and "EDGE_RUNTIME_CORES (cores)" in str(error)


def test_detected_cores_follow_the_affinity_mask() -> None:
    """What taskset / systemd CPUAffinity= leave the process (the birth test in
    tests/integration/test_placement_figures.py starts a node pinned to one CPU)."""
    import os

    from edge_runtime.agent.daemon import detect_cores

    if not hasattr(os, "sched_getaffinity"):
        assert detect_cores() == (os.cpu_count() or 1)
        return
    assert detect_cores() == len(os.sched_getaffinity(0)) >= 1
