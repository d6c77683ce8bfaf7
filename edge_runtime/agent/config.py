"""The agent's configuration: one TOML file, ``EDGE_RUNTIME_*`` environment overrides, one
pydantic model, and errors that name the field.

``edge-runtime run --config PATH`` calls ``load_config(PATH)``. Every section is frozen and
refuses unknown keys, so a typo fails at start instead of being ignored. An example (also in
``firmware_scripts/edge-runtime.example.toml``)::

    device_id = "pi-kitchen-01"          # 1-64 of [A-Za-z0-9._-], starting with a letter/digit
    groups = ["kitchen", "canary"]       # group targets this device accepts (same id rule)
    tier = "edge"                        # "edge" or "cloud"
    accelerator = "auto"                 # "auto" (detect), "none", or a label such as "edgetpu"
    cores = 2                            # optional: CPU cores placement may use (default: detected)
    data_dir = "/var/lib/edge-runtime"   # store, trust state, outbox, transfers
    trust_root = "/etc/edge-runtime/root.json"  # optional: provisions the trust store if empty
    telemetry_interval_s = 10            # 0.1 .. 3600

    [broker]
    url = "mqtts://broker.example.net:8883"    # mqtt:// (port 1883) or mqtts:// (port 8883)
    ca_file = "/etc/edge-runtime/ca.pem"       # mqtts: ca_file, cert_file, key_file required
    cert_file = "/etc/edge-runtime/device.pem"
    key_file = "/etc/edge-runtime/device.key"
    username = "pi-kitchen-01"                 # optional
    password_file = "/etc/edge-runtime/broker.pass"   # or password = "..." (not both)
    keepalive_s = 30
    reconnect_initial_s = 1              # exponential backoff with full jitter ...
    reconnect_max_s = 60                 # ... capped here

    [api]                                # the local API: edge-runtime serve's options
    rest_enabled = true                  # false: the Unix socket only
    rest_host = "127.0.0.1"
    rest_port = 8501                     # omit the key to keep the default; 0 = any free port
    socket_path = "/run/edge-runtime/api.sock"   # default DATA_DIR/run/api.sock
    pool_size = 2
    num_threads = 1
    max_body_bytes = 67108864

    [store]
    quota_bytes = 1073741824             # default: no quota
    keep_previous = 1
    watch_interval_s = 0.5

    [limits]
    max_artifact_bytes = 536870912
    outbox_max_messages = 100000         # oldest dropped (and counted) past either bound
    outbox_max_bytes = 67108864
    outbox_drain_per_s = 50              # drain rate after a reconnect
    transfer_window = 8                  # chunk requests in flight
    chunk_size = 65536                   # 1 KiB .. 256 KiB
    chunk_timeout_s = 10
    chunk_retries = 5

    [remote]                             # remote inference (issue 6)
    deadline_ms = 500                    # a forwarded call's budget (REST X-Deadline-Ms / fast path deadline_ms override)
    max_pending = 256                    # forwarded calls awaiting an answer at once; past it: busy
    breaker_failures = 3                 # unanswered calls in a row before calls with a local copy ...
    breaker_open_s = 5                   # ... run locally at once for this long, then try the executor again
    fallback_events_per_min = 6          # fallback events per model and minute; the rest are counted
    executor_workers = 2                 # as an executor node: threads running other nodes' calls
    executor_queue = 32                  # calls waiting for a worker; past it they are refused as busy
    executor_queue_bytes = 67108864      # and past this many bytes of waiting tensors

``accelerator`` (top level) labels the node's accelerator for placement: ``"auto"`` (the
default) detects a Coral ``/dev/apex_0`` or a Jetson's ``/etc/nv_tegra_release``, ``"none"``
reports none, anything else (``"edgetpu"``, ``"cuda"``) is reported as written.

``cores`` (top level, optional, an integer from 1 to 4096) is what the birth reports as
``capabilities.cores``, the CPU cores the placement planner lets this node's models use.
Left out, it is detected: the CPUs this process may run on (``os.sched_getaffinity``, so
``taskset`` and systemd's ``CPUAffinity=`` count), else ``os.cpu_count()``. Set it where
detection cannot see the limit -- a container's CPU quota (``docker --cpus``, systemd's
``CPUQuota=``) -- or to keep cores back for other work on the board.

Paths are used as written (relative ones against the working directory, which is ``/``
under systemd): write them absolute.

Environment overrides win over the file. The variable for a field is ``EDGE_RUNTIME_``
plus its dotted path in upper case with ``__`` between levels: ``EDGE_RUNTIME_DEVICE_ID``,
``EDGE_RUNTIME_BROKER__URL``, ``EDGE_RUNTIME_API__REST_PORT`` (``env_name("api.rest_port")``).
A single ``_`` between levels works too when it names exactly one field, so
``EDGE_RUNTIME_BROKER_URL`` is ``broker.url``. Values are strings converted to the field's
type (``"8501"``, ``"true"``, ``"1.5"``); a list (``groups``) is comma-separated; an empty
value sets an optional field to unset. An ``EDGE_RUNTIME_*`` variable that names no field
is an error (a typo would otherwise be ignored), except the reserved ``RESERVED_ENV``.

Errors: everything wrong is one ``ConfigError`` (an ``EdgeRuntimeError``, fatal at start)
whose message names the file, each dotted field (and the variable when the value came
from the environment) and what was wrong; ``.problems`` has the same as data.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.9/3.10 with the tomli backport
    import tomli as tomllib  # type: ignore[no-redef]

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.mqtt import DEFAULT_PORTS, broker_address
from edge_runtime.protocol.messages import MAX_ARTIFACT_BYTES, MAX_CHUNK_BYTES
from edge_runtime.protocol.topics import check_id
from edge_runtime.runtime import ServeConfig

__all__ = [
    "AgentConfig", "ApiConfig", "BrokerConfig", "ConfigError", "ConfigProblem", "LimitsConfig",
    "RemoteConfig", "StoreConfig", "ENV_PREFIX", "RESERVED_ENV", "env_name", "load_config",
]

ENV_PREFIX = "EDGE_RUNTIME_"
RESERVED_ENV = frozenset({"EDGE_RUNTIME_CONFIG"})  # the config path itself, for the CLI
KiB = 1024
MiB = 1024 * KiB
_SHOW_INPUT = 60  # characters of a bad value quoted back in a message


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong: ``field`` is the dotted path (``broker.ca_file``, ``groups[1]``),
    ``variable`` the environment variable the value came from, if it did."""

    field: Optional[str]
    message: str
    variable: Optional[str] = None

    def __str__(self) -> str:
        if self.variable:
            where = f"{self.variable} ({self.field})" if self.field else self.variable
        else:
            where = self.field or "(config)"
        return f"{where}: {self.message}"


class ConfigError(EdgeRuntimeError):
    """The configuration cannot be used; the daemon must not start (fatal, fix the file)."""

    code = "config_error"

    def __init__(self, message: str, *, source: Optional[str] = None, problems: tuple[ConfigProblem, ...] = ()) -> None:
        super().__init__(message)
        self.source = source
        self.problems = problems

    @property
    def field(self) -> Optional[str]:
        """The dotted path of the first problem, if it has one."""
        return self.problems[0].field if self.problems else None


class _FieldError(ValueError):
    """A model validator's complaint about one field of its model (so the error names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# -- field types --------------------------------------------------------------------------


def _id(value: str) -> str:
    return check_id(value, "id")


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path


Id = Annotated[str, AfterValidator(_id)]
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    """Where the MQTT broker is and how to authenticate to it."""

    url: str
    ca_file: Optional[ExistingFile] = None
    cert_file: Optional[ExistingFile] = None
    key_file: Optional[ExistingFile] = None
    username: Optional[str] = Field(default=None, min_length=1, max_length=256)
    password: Optional[SecretStr] = None
    password_file: Optional[ExistingFile] = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_initial_s: float = Field(default=1.0, gt=0, le=300)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a broker URL ({exc}): expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"scheme {parts.scheme!r} not supported: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if not parts.hostname:
            raise ValueError("no host: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not belong in the URL: use broker.username and broker.password_file")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a broker URL has no path, query or fragment: expected mqtt://HOST[:PORT]")
        if port == 0:
            raise ValueError("port 0 is not a broker port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        tls_files = ("ca_file", "cert_file", "key_file")
        if self.tls:
            for name in tls_files:
                if getattr(self, name) is None:
                    raise _FieldError(name, "required for an mqtts:// broker URL (TLS with a client certificate)")
        else:
            for name in tls_files:
                if getattr(self, name) is not None:
                    raise _FieldError(name, "set for a plain mqtt:// URL, which does not use TLS: use mqtts://")
        if self.password is not None and self.password_file is not None:
            raise _FieldError("password_file", "set together with broker.password: use one of them")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise _FieldError("username", "required when a password is set (MQTT sends a password only with a user name)")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise _FieldError("reconnect_max_s", f"{self.reconnect_max_s} is below reconnect_initial_s ({self.reconnect_initial_s})")
        return self

    @property
    def tls(self) -> bool:
        return broker_address(self.url)[2]

    @property
    def host(self) -> str:
        return broker_address(self.url)[0]

    @property
    def port(self) -> int:
        return broker_address(self.url)[1]

    def password_value(self) -> Optional[str]:
        """The password, read from ``password_file`` (one line; the trailing newline is not
        part of it) when that is how it is given.

        Raises:
            ConfigError: the password file can no longer be read.
        """
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            problem = ConfigProblem("broker.password_file", f"cannot read {self.password_file}: {exc}")
            raise ConfigError(str(problem), problems=(problem,)) from None


_SERVE = ServeConfig.model_fields


class ApiConfig(_Section):
    """The local API; the same names, defaults and bounds as ``runtime.ServeConfig``."""

    rest_enabled: bool = True  # false: the Unix socket only (TOML has no null for rest_port)
    rest_host: str = _SERVE["rest_host"].default
    rest_port: Optional[int] = Field(default=_SERVE["rest_port"].default, ge=0, le=65535)  # 0: any free port
    socket_path: Optional[Path] = None  # default: DATA_DIR/run/api.sock
    pool_size: int = Field(default=_SERVE["pool_size"].default, ge=1, le=64)
    num_threads: int = Field(default=_SERVE["num_threads"].default, ge=1, le=64)
    backend: Optional[str] = None  # default: LiteRT, else tflite_runtime
    max_body_bytes: int = Field(default=_SERVE["max_body_bytes"].default, gt=0)


class StoreConfig(_Section):
    """The model store; the same names, defaults and bounds as ``runtime.ServeConfig``."""

    quota_bytes: Optional[int] = Field(default=None, gt=0)
    keep_previous: int = Field(default=_SERVE["keep_previous"].default, ge=1, le=16)
    watch_interval_s: float = Field(default=_SERVE["watch_interval_s"].default, gt=0, le=60)


class LimitsConfig(_Section):
    """Bounds on what the agent accepts, keeps and asks for."""

    max_artifact_bytes: int = Field(default=512 * MiB, ge=1, le=MAX_ARTIFACT_BYTES)
    outbox_max_messages: int = Field(default=100_000, ge=10, le=10_000_000)
    outbox_max_bytes: int = Field(default=64 * MiB, ge=64 * KiB, le=4096 * MiB)
    outbox_drain_per_s: float = Field(default=50.0, gt=0, le=10_000)
    transfer_window: int = Field(default=8, ge=1, le=256)
    chunk_size: int = Field(default=64 * KiB, ge=1 * KiB, le=MAX_CHUNK_BYTES)
    chunk_timeout_s: float = Field(default=10.0, gt=0, le=600)
    chunk_retries: int = Field(default=5, ge=0, le=100)


class RemoteConfig(_Section):
    """Remote inference: this runtime as a caller (calls routed to another node) and as an
    executor node (other nodes' calls to the models it serves)."""

    deadline_ms: int = Field(default=500, ge=1, le=600_000)  # a forwarded call's budget unless the call sets one
    max_pending: int = Field(default=256, ge=1, le=100_000)  # forwarded calls awaiting an answer at once
    breaker_failures: int = Field(default=3, ge=1, le=1000)  # consecutive unanswered calls before ...
    breaker_open_s: float = Field(default=5.0, gt=0, le=3600)  # ... calls with a local copy skip the executor this long
    fallback_events_per_min: int = Field(default=6, ge=1, le=600)  # per model; the rest are counted
    executor_workers: int = Field(default=2, ge=1, le=64)  # threads running other nodes' calls
    executor_queue: int = Field(default=32, ge=1, le=100_000)  # calls waiting for a worker; past it: busy
    executor_queue_bytes: int = Field(default=64 * MiB, ge=64 * KiB, le=4096 * MiB)  # their tensors, at most


class AgentConfig(_Section):
    """Everything ``edge-runtime run`` needs, validated before anything starts."""

    device_id: Id
    groups: tuple[Id, ...] = Field(default=(), max_length=64)
    tier: Literal["edge", "cloud"] = "edge"
    data_dir: Path
    trust_root: Optional[ExistingFile] = None
    telemetry_interval_s: float = Field(default=10.0, ge=0.1, le=3600)
    broker: BrokerConfig
    api: ApiConfig = ApiConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    remote: RemoteConfig = RemoteConfig()
    # "auto": detected; "none": no accelerator; anything else labels it ("edgetpu", "cuda").
    accelerator: str = Field(default="auto", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # CPU cores for placement (capabilities.cores); None: detected (see the module docstring).
    cores: Optional[int] = Field(default=None, ge=1, le=4096)

    def accelerator_label(self, detect: Any) -> Optional[str]:
        """What birth reports as ``capabilities.accelerator``: ``detect()`` for ``auto``,
        None for ``none``, else the configured label."""
        if self.accelerator == "auto":
            return detect()
        return None if self.accelerator == "none" else self.accelerator

    def core_count(self, detect: Any) -> int:
        """What birth reports as ``capabilities.cores``: the configured ``cores``, else
        ``detect()`` (kept within 1 .. 4096)."""
        if self.cores is not None:
            return self.cores
        return min(4096, max(1, int(detect() or 1)))

    @field_validator("cores", mode="before")
    @classmethod
    def _whole_cores(cls, value: Any) -> Any:
        if isinstance(value, bool):  # TOML true would otherwise read as 1
            raise ValueError(f"expected a whole number of CPU cores (>= 1), got {str(value).lower()}")
        return value

    @field_validator("groups")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for group in value:
            if group in seen:
                raise ValueError(f"group {group!r} listed twice")
            seen.add(group)
        return value

    @field_validator("data_dir")
    @classmethod
    def _dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"not a directory: {value}")
        return value

    def serve_config(self) -> ServeConfig:
        """The serving daemon's config for the same data dir, API and store settings."""
        api = self.api.model_dump(exclude={"rest_enabled"})
        if not self.api.rest_enabled:
            api["rest_port"] = None
        return ServeConfig(data_dir=self.data_dir, **api, **self.store.model_dump())


# -- loading ------------------------------------------------------------------------------


def to_toml(data: Mapping[str, Any]) -> str:
    """A config as TOML text (what ``load_config`` reads): top-level keys, then one
    ``[section]`` per mapping value. For tools that write configs (the demo, tests); a
    value TOML cannot hold here raises TypeError."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for table, values in data.items():
        if isinstance(values, Mapping):
            lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def env_name(dotted: str) -> str:
    """The canonical environment variable for a dotted field: ``api.rest_port`` →
    ``EDGE_RUNTIME_API__REST_PORT``."""
    return ENV_PREFIX + "__".join(dotted.split(".")).upper()


def load_config(path: Union[str, os.PathLike[str]], env: Optional[Mapping[str, str]] = None) -> AgentConfig:
    """Read the TOML file at ``path``, apply ``EDGE_RUNTIME_*`` overrides from ``env``
    (default ``os.environ``), validate.

    Raises:
        ConfigError: the file cannot be read or parsed, a variable names no field, or a
            value is invalid; the message names the file, the dotted field, the variable
            (for an override) and what is wrong.
    """
    env = os.environ if env is None else env
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})", source=source) from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", source=source) from None

    from_env: dict[tuple[str, ...], str] = {}
    problems: list[ConfigProblem] = []
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in RESERVED_ENV:
            continue
        paths = _resolve(AgentConfig, variable[len(ENV_PREFIX):].lower())
        if len(paths) != 1:
            what = "names no setting" if not paths else "is ambiguous between " + ", ".join(".".join(p) for p in paths)
            problems.append(ConfigProblem(None, f"{what} (e.g. EDGE_RUNTIME_BROKER__URL for broker.url)", variable))
            continue
        _set(data, paths[0], _from_env(AgentConfig, paths[0], env[variable]))
        from_env[paths[0]] = variable
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problem(error, from_env) for error in exc.errors())
    else:
        if not problems:
            return config
    lines = [str(p) for p in problems]
    message = f"{source}: {lines[0]}" if len(lines) == 1 else f"{source}: {len(lines)} problems:\n  " + "\n  ".join(lines)
    raise ConfigError(message, source=source, problems=tuple(problems))


def _section(annotation: Any) -> Optional[type[BaseModel]]:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _resolve(model: type[BaseModel], key: str) -> list[tuple[str, ...]]:
    """Every leaf field path that ``key`` (lower case; ``__`` between levels, or ``_`` where
    that is unambiguous) can name in ``model``."""
    head, sep, rest = key.partition("__")
    found: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if head == name:
            if sub is None and not sep:
                found.append((name,))
            elif sub is not None and sep:
                found.extend((name, *p) for p in _resolve(sub, rest))
        elif sub is not None and head.startswith(name + "_"):
            found.extend((name, *p) for p in _resolve(sub, head[len(name) + 1:] + sep + rest))
    return found


def _from_env(model: type[BaseModel], path: tuple[str, ...], value: str) -> Any:
    """An environment string as the input for the field at ``path``: comma-split for a
    list, ``None`` for an empty value of an optional field, else the string (pydantic
    converts it)."""
    for name in path[:-1]:
        model = _section(model.model_fields[name].annotation)  # type: ignore[assignment]
    annotation = model.model_fields[path[-1]].annotation
    if value.strip() == "" and type(None) in typing.get_args(annotation):
        return None
    if typing.get_origin(annotation) is tuple:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        if not isinstance(data.get(name), dict):
            data[name] = {}
        data = data[name]
    data[path[-1]] = value


def _dotted(loc: tuple[Union[str, int], ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[Union[str, int], ...]) -> Optional[type[BaseModel]]:
    model: Optional[type[BaseModel]] = AgentConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _section(model.model_fields[part].annotation)
    return model


def _problem(error: Any, from_env: dict[tuple[str, ...], str]) -> ConfigProblem:
    """One pydantic error as a ``ConfigProblem``: the dotted field, a plain message, the
    variable if the value came from the environment; a secret value is never quoted."""
    loc: tuple[Union[str, int], ...] = tuple(error["loc"])
    kind, message = error["type"], error["msg"]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        loc = (*loc, cause.field)
    if kind == "value_error":
        message = str(cause) if cause is not None else message.removeprefix("Value error, ")
    elif kind == "missing":
        message = "required, not set"
    elif kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else ""
        message = f"unknown key{f' (expected one of: {allowed})' if allowed else ''}"
    else:
        value = error.get("input")
        if not isinstance(value, (dict, list)) and not any("password" in str(p) for p in loc):
            shown = repr(value)
            message += f" (got {shown if len(shown) <= _SHOW_INPUT else shown[:_SHOW_INPUT] + '...'})"
    variable = next((v for p, v in from_env.items() if tuple(loc[: len(p)]) == p), None)
    return ConfigProblem(_dotted(loc) or None, message, variable)
