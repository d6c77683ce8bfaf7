"""The console commands of ``fleetctl``: thin -- parse, call the controller (``apiclient``),
print. Every command takes ``--json`` (one JSON document on stdout, for scripts; ``telemetry
tail --json`` prints one object per line) and the connection options ``--broker URL``
($FLEETCTL_BROKER, default mqtt://127.0.0.1:1883), ``--username`` ($FLEETCTL_USERNAME),
``--password-file`` ($FLEETCTL_PASSWORD_FILE), for an ``mqtts://`` broker with mutual TLS
``--tls-ca``/``--tls-cert``/``--tls-key`` ($FLEETCTL_TLS_CA, $FLEETCTL_TLS_CERT,
$FLEETCTL_TLS_KEY: an operator certificate from ``fleetctl ca issue NAME --role operator``),
and ``--timeout S`` (default 10).

    fleetctl models push FILE --name N --version V [--health-sample [NAME=]x.npy ...] [--atol A] [--rtol R]
    fleetctl models ls [--model M]
    fleetctl devices [--group G]
    fleetctl device show ID
    fleetctl device add ID [--group G ...]
    fleetctl group add NAME DEVICE...
    fleetctl group rm NAME [DEVICE...]            (no devices: delete the group)
    fleetctl group ls
    fleetctl deploy MODEL@VERSION --to DEVICE|device:ID|group:NAME|all [--canary 10%] [--waves 25,50,100]
                    [--soak 60s] [--max-failures 5%] [--max-error-rate 1%|off] [--max-latency-regression 20%|off]
                    [--step-timeout 5m] [--wait [--interval S]]
    fleetctl rollout ls [--all]
    fleetctl rollout show ID [--watch [--interval S]]
    fleetctl rollout pause|resume ID [--reason TEXT]
    fleetctl rollout abort ID [--reason TEXT]
    fleetctl cmd ping|diagnostics|restart DEVICE [--wait S]    (diagnostics: --log-lines N; restart: --reason)
    fleetctl cmd set-config DEVICE [--telemetry-interval S] [--log-level L] [--wait S]
    fleetctl telemetry tail [--device ID] [--count N]          (straight from the broker)
    fleetctl top [--once] [--interval S]
    fleetctl audit [--limit N]
    fleetctl migrate MODEL --source DEVICE --to NODE [--deploy-timeout D] [--switch-timeout D] [--reason TEXT]
                     [--wait [--interval S]]
    fleetctl migrations ls [--all]
    fleetctl migrations show ID [--watch [--interval S]]
    fleetctl migrations abort ID [--reason TEXT]
    fleetctl plan [--apply] [--slo-ms MS]        (the placement planner's moves, p95 before/after)

Exit codes: 0 ok; 1 an error (``fleetctl: <message>`` on stderr, and with ``--json``
``{"error": {...}}`` on stdout -- ``cli.main`` does that for every ``EdgeRuntimeError``);
2 usage. Two outcomes are answers rather than errors but still exit 1: ``deploy --wait`` /
``rollout show --watch`` ending ``aborted`` (and ``migrate --wait`` / ``migrations show
--watch`` ending ``reverted`` or ``failed``), and a command the device answered ``ok:
false`` -- both print their row (``--json``: the row is the one document) and the reason
on stderr. Ctrl-C in a live view exits 130.

Human output is rich tables on stdout; progress bars (uploads, ``--wait``, ``--watch``)
go to stderr, so stdout stays clean for ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from controller.apiclient import DEFAULT_BROKER, ApiClient
from edge_runtime.console import emit_json, positive_int
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import messages, topics

# Rollout states that may still change (controller.rollout.ACTIVE_STATES; a unit test
# keeps the two equal without the console importing the controller's store).
ACTIVE_ROLLOUT_STATES = ("pending", "running", "paused")
# Likewise controller.migration.ACTIVE_STATES.
ACTIVE_MIGRATION_STATES = ("pending", "deploying", "switching", "unloading", "reverting")
DEFAULT_TIMEOUT = 10.0
LOG_LEVELS = ("debug", "info", "warning", "error")
PIPE_WIDTH = 250  # table width when stdout is not a terminal


class ConsoleError(EdgeRuntimeError):
    """A local problem with what the operator gave (an unreadable file, a sample that does
    not fit the model)."""

    code = "invalid_argument"


class RolloutAborted(EdgeRuntimeError):
    code = "rollout_aborted"


class MigrationReverted(EdgeRuntimeError):
    code = "migration_reverted"


class CommandFailed(EdgeRuntimeError):
    code = "command_failed"


# -- argument types (a bad value is a usage error: exit 2) -----------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds from ``90``, ``60s``, ``5m``, ``1h``, ``1.5h``, ``1h30m``, ``250ms``, ``2d``."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION_PART.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise argparse.ArgumentTypeError(f"expected a duration like 90, 60s, 5m, 1h or 1h30m, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration >= 0, got {text!r}")
    return value


def percent(text: str, *, maximum: float = 100.0) -> float:
    """A percentage from ``10%`` or ``10`` (0..``maximum``)."""
    t = text.strip()
    t = t[:-1].strip() if t.endswith("%") else t
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 10% or 10, got {text!r}") from None
    if not 0 <= value <= maximum:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and {maximum:g}, got {text!r}")
    return value


def optional_percent(text: str) -> Optional[float]:
    """``percent``, or ``off``/``none`` to switch the gate off (None)."""
    return None if text.strip().lower() in ("off", "none") else percent(text)


def regression_percent(text: str) -> Optional[float]:
    """A latency regression may exceed 100% (twice as slow = 100%); ``off`` disables it."""
    return None if text.strip().lower() in ("off", "none") else percent(text, maximum=10_000)


def waves(text: str) -> list[float]:
    """Cumulative wave sizes from ``25,50,100`` (``%`` allowed), strictly increasing."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected waves like 25,50,100, got {text!r}")
    values = [percent(p) for p in parts]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"waves are cumulative shares and must increase, got {text!r}")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"a wave must be more than 0%, got {text!r}")
    return values


def target(text: str) -> str:
    """``all``, ``device:ID``, ``group:NAME``, or a bare device id (= ``device:ID``)."""
    kind, sep, name = text.partition(":")
    if not sep:
        if text == "all":
            return "all"
        kind, name = "device", text
    if kind not in ("device", "group") or not topics.valid_id(name):
        raise argparse.ArgumentTypeError(f"expected DEVICE, device:ID, group:NAME or all, got {text!r}")
    return f"{kind}:{name}"


def model_version(text: str) -> tuple[str, str]:
    """``MODEL@VERSION``."""
    model, sep, version = text.partition("@")
    if not sep or not topics.valid_id(model) or not re.fullmatch(messages.VERSION_PATTERN, version):
        raise argparse.ArgumentTypeError(f"expected MODEL@VERSION (e.g. vision@2), got {text!r}")
    return model, version


def ident(text: str) -> str:
    """A device, group or model id (the topic id rule)."""
    if not topics.valid_id(text):
        raise argparse.ArgumentTypeError(f"expected 1-64 characters of [A-Za-z0-9._-] starting with a letter or "
                                         f"digit, got {text!r}")
    return text


def version_arg(text: str) -> str:
    if not re.fullmatch(messages.VERSION_PATTERN, text):
        raise argparse.ArgumentTypeError(f"expected a version of [A-Za-z0-9._+-] (e.g. 2 or 1.4.0), got {text!r}")
    return text


def positive_seconds(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return value


# -- connection ---------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--broker", metavar="URL", help=f"MQTT broker (default $FLEETCTL_BROKER or {DEFAULT_BROKER})")
    g.add_argument("--username", metavar="NAME", help="MQTT user name (default $FLEETCTL_USERNAME)")
    g.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password (default $FLEETCTL_PASSWORD_FILE)")
    g.add_argument("--tls-ca", metavar="FILE", help="CA certificate of an mqtts:// broker (default $FLEETCTL_TLS_CA)")
    g.add_argument("--tls-cert", metavar="FILE",
                   help="client certificate for mutual TLS, e.g. an operator's (default $FLEETCTL_TLS_CERT)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (default $FLEETCTL_TLS_KEY)")
    g.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the broker and each answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    return p


def connect(args: argparse.Namespace) -> ApiClient:
    """An unconnected ``ApiClient`` from the connection options (env as defaults).

    Raises:
        ConsoleError: the password file cannot be read.
    """
    url = args.broker or os.environ.get("FLEETCTL_BROKER") or DEFAULT_BROKER
    username = args.username or os.environ.get("FLEETCTL_USERNAME") or None
    pw_file = args.password_file or os.environ.get("FLEETCTL_PASSWORD_FILE") or None
    password = None
    if pw_file:
        try:
            password = Path(pw_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConsoleError(f"cannot read the password file {pw_file} ({exc}); give a readable UTF-8 file") from None
    tls = {name: getattr(args, f"tls_{name}", None) or os.environ.get(f"FLEETCTL_TLS_{name.upper()}") or None
           for name in ("ca", "cert", "key")}
    if bool(tls["cert"]) != bool(tls["key"]):
        raise ConsoleError("--tls-cert and --tls-key go together: give both (or $FLEETCTL_TLS_CERT and "
                           "$FLEETCTL_TLS_KEY) or neither")
    if any(tls.values()) and not url.startswith("mqtts://"):
        raise ConsoleError(f"TLS files were given but the broker URL {url} is not mqtts://; use mqtts://HOST:8883")
    for name, path in tls.items():
        if path and not Path(path).is_file():
            raise ConsoleError(f"--tls-{name}: no such file {path}")
    return ApiClient(url, username=username, password=password, timeout=args.timeout, ca_file=tls["ca"],
                     cert_file=tls["cert"], key_file=tls["key"])


def _stdout() -> Any:
    """Rich on stdout; piped into a file or grep (no terminal, no $COLUMNS), tables get
    room rather than rich's 80 columns, so rows are not folded mid-word."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(width=PIPE_WIDTH)
    return out


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# -- formatting ---------------------------------------------------------------------


def _parse_time(value: Any) -> Optional[datetime]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    return None


def fmt_time(value: Any) -> str:
    """An ISO or epoch time as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` when absent."""
    if value is None:
        return "-"
    dt = _parse_time(value)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if dt else str(value)


def fmt_ago(value: Any, *, now: Optional[datetime] = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``; ``-`` when absent."""
    if value is None:
        return "-"
    dt = _parse_time(value)
    if dt is None:
        return str(value)
    secs = max(0.0, ((now or datetime.now(timezone.utc)) - dt).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def fmt_models(models: Optional[Mapping[str, Any]]) -> str:
    return ", ".join(f"{k}@{v if v is not None else '-'}" for k, v in (models or {}).items()) or "-"


def fmt_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _online(v: Any) -> str:
    return "[green]online[/]" if v else ("[red]offline[/]" if v is not None else "-")


def _table(title: Optional[str], headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for h in headers:
        t.add_column(h, overflow="fold")
    for row in rows:
        t.add_row(*[c if isinstance(c, str) else fmt(c) for c in row])
    return t


def devices_table(rows: list[dict[str, Any]]) -> Any:
    return _table(None, ["device", "state", "tier", "groups", "models", "generation", "last seen", "runtime"], [
        [r["id"], _online(r.get("online")), fmt(r.get("tier")), fmt(r.get("groups")), fmt_models(r.get("models")),
         f"{fmt(r.get('generation'))}/{fmt(r.get('desired_generation'))}", fmt_ago(r.get("last_seen")),
         fmt(r.get("runtime_version"))]
        for r in rows])


def releases_table(rows: list[dict[str, Any]]) -> Any:
    return _table(None, ["model", "version", "size", "sha256", "inputs", "outputs", "health", "created", "by"], [
        [r["model"], r["version"], fmt_size(r.get("size")), (r.get("sha256") or "-")[:12], "\n".join(r.get("inputs") or []),
         "\n".join(r.get("outputs") or []), fmt(r.get("health")), fmt_time(r.get("created_at")), fmt(r.get("created_by"))]
        for r in rows])


def fmt_counts(counts: Optional[Mapping[str, Any]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items() if v) or "-"


def _wave_text(r: Mapping[str, Any]) -> str:
    w, n = r.get("wave"), r.get("waves")
    n = len(n) if isinstance(n, (list, tuple)) else n
    return "-" if w is None else (f"{w}/{n}" if n is not None else str(w))


def _state(s: Any) -> str:
    color = {"succeeded": "green", "done": "green", "aborted": "red", "failed": "red", "paused": "yellow",
             "running": "cyan", "updating": "cyan", "reverting": "yellow", "reverted": "yellow",
             "deploying": "cyan", "switching": "cyan", "unloading": "cyan"}.get(s)
    return f"[{color}]{s}[/]" if color else fmt(s)


def rollouts_table(rows: list[dict[str, Any]]) -> Any:
    return _table(None, ["id", "model", "target", "state", "wave", "steps", "reason", "created", "finished"], [
        [str(r["id"]), f"{r['model']}@{r['version']}", fmt(r.get("target")), _state(r.get("state")), _wave_text(r),
         fmt_counts(r.get("counts")), fmt(r.get("reason")), fmt_time(r.get("created_at")), fmt_time(r.get("finished_at"))]
        for r in rows])


def steps_table(rows: list[dict[str, Any]]) -> Any:
    return _table("steps", ["device", "wave", "state", "previous", "started", "finished", "reason", "detail"], [
        [r["device_id"], fmt(r.get("wave")), _state(r.get("state")), fmt(r.get("previous_version")),
         fmt_time(r.get("started_at")), fmt_time(r.get("finished_at")), fmt(r.get("reason")), fmt(r.get("detail"))]
        for r in rows])


def rollout_detail(r: dict[str, Any]) -> list[Any]:
    """A rollout (``rollouts.show``) for people: its fields, then its steps."""
    head = _kv_table(f"rollout {r['id']}: {r['model']}@{r['version']} -> {r.get('target')}", {
        "state": _state(r.get("state")), "wave": _wave_text(r), "steps": fmt_counts(r.get("counts")),
        "reason": fmt(r.get("reason")), "plan": fmt(r.get("plan")), "figures": fmt(r.get("figures")),
        "created": f"{fmt_time(r.get('created_at'))} by {fmt(r.get('created_by'))}",
        "updated": fmt_time(r.get("updated_at")), "finished": fmt_time(r.get("finished_at")),
    })
    return [head] + ([steps_table(r["steps"])] if r.get("steps") else [])


def _kv_table(title: Optional[str], pairs: Mapping[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in pairs.items():
        t.add_row(str(k), v if isinstance(v, str) else fmt(v))
    return t


def _generic(title: str, value: Any) -> Any:
    """A table for a value of unknown shape: rows of dicts, a dict, or a scalar."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        headers = list(dict.fromkeys(k for v in value for k in v))
        return _table(title, headers, [[fmt(v.get(h)) if h not in ("at", "received_at", "started_at", "finished_at")
                                        else fmt_time(v.get(h)) for h in headers] for v in value])
    if isinstance(value, dict):
        return _kv_table(title, value)
    return _kv_table(title, {title: value if value not in ([], None) else "-"})


def device_detail(result: dict[str, Any]) -> list[Any]:
    """``devices.show`` for people: the device row as fields, then each section."""
    d = result.get("device") or {}
    out = [_kv_table(f"device {d.get('id')}", {
        "state": _online(d.get("online")), "tier": fmt(d.get("tier")), "groups": fmt(d.get("groups")),
        "models": fmt_models(d.get("models")),
        "generation": f"{fmt(d.get('generation'))} (desired {fmt(d.get('desired_generation'))})",
        "last seen": f"{fmt_ago(d.get('last_seen'))} ({fmt_time(d.get('last_seen'))})",
        "runtime": fmt(d.get("runtime_version")),
    })]
    for key in ("assignments", "desired", "steps", "events", "telemetry"):
        value = result.get(key)
        if value in (None, [], {}):
            continue
        out.append(steps_table(value) if key == "steps" and isinstance(value, list) else _generic(key, value))
    return out


def groups_table(groups: Mapping[str, list[str]]) -> Any:
    return _table(None, ["group", "devices", "members"], [[name, str(len(ids)), fmt(ids)] for name, ids in groups.items()])


def top_table(rows: list[dict[str, Any]], *, title: Optional[str] = None) -> Any:
    body = []
    for r in rows:
        models = r.get("models") or {}
        p95 = r.get("p95_ms") or {}
        names = list(dict.fromkeys([*models, *p95]))
        body.append([
            r["id"], _online(r.get("online")), fmt(r.get("tier")),
            "\n".join(f"{m}@{models.get(m) or '-'}" for m in names) or "-",
            "\n".join(f"{p95[m]:.1f} ms" if isinstance(p95.get(m), (int, float)) else "-" for m in names) or "-",
            _pct(r.get("cpu_percent")), _pct(r.get("memory_percent")), fmt_ago(r.get("last_seen")),
        ])
    return _table(title, ["device", "state", "tier", "models", "p95", "cpu", "memory", "last seen"], body)


def _pct(v: Any) -> str:
    return f"{v:.0f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def migrations_table(rows: list[dict[str, Any]]) -> Any:
    return _table(None, ["id", "model", "source", "from", "to", "state", "reason", "failure", "created", "finished"], [
        [str(r["id"]), f"{r['model']}@{r.get('version') or '-'}", fmt(r.get("source")), fmt(r.get("from_node")),
         fmt(r.get("to_node")), _state(r.get("state")), fmt(r.get("reason")), fmt(r.get("failure")),
         fmt_time(r.get("created_at")), fmt_time(r.get("finished_at"))]
        for r in rows])


def migration_detail(r: dict[str, Any]) -> list[Any]:
    """A migration (``migrations.show``) for people."""
    pred = r.get("prediction") or {}
    pairs = {
        "state": _state(r.get("state")), "model": f"{r['model']}@{r.get('version') or '-'}",
        "workload": f"{r.get('source')}: {r.get('from_node')} -> {r.get('to_node')}",
        "deployed": "no (the target had it)" if r.get("target_had") else "yes (by this migration)",
        "step deadline": fmt_time(r.get("deadline")), "reason": fmt(r.get("reason")),
        "predicted p95": f"{_ms(pred.get('p95_before_ms'))} -> {_ms(pred.get('p95_after_ms'))}" if pred else "-",
        "failure": fmt(r.get("failure")), "detail": fmt(r.get("detail")), "timeouts": fmt(r.get("timeouts")),
        "created": f"{fmt_time(r.get('created_at'))} by {fmt(r.get('created_by'))}",
        "updated": fmt_time(r.get("updated_at")), "finished": fmt_time(r.get("finished_at")),
    }
    return [_kv_table(f"migration {r['id']}", pairs)]


def _ms(v: Any) -> str:
    return f"{v:.1f} ms" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def plan_detail(result: dict[str, Any]) -> list[Any]:
    """``plan`` for people: the moves, then the fleet before and after."""
    moves = result.get("moves") or []
    out: list[Any] = []
    if moves:
        out.append(_table("moves", ["model", "source", "from", "to", "reason", "p95 before", "p95 after", "migration"], [
            [m["model"], m["source"], m["from_node"], m["to_node"], fmt(m.get("reason")), _ms(m.get("p95_before_ms")),
             _ms(m.get("p95_after_ms")),
             str(m["migration"]) if m.get("migration") is not None else (f"skipped: {m['skipped']}"
                                                                       if m.get("skipped") else "-")]
            for m in moves]))
    else:
        out.append("no moves: every workload stays where it is")
    out.append(_kv_table(None, {
        "SLO violations": f"{fmt(result.get('violations_before'))} -> {fmt(result.get('violations_after'))}",
        "peak utilisation": f"{_pct100(result.get('peak_utilisation_before'))} -> "
                            f"{_pct100(result.get('peak_utilisation_after'))}",
        "planned over": f"{fmt(result.get('workloads'))} workloads, {fmt(result.get('nodes'))} nodes "
                        f"({fmt(result.get('method'))})",
    }))
    return out


def _pct100(v: Any) -> str:
    return f"{v * 100:.0f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def audit_table(rows: list[dict[str, Any]]) -> Any:
    return _table(None, ["at", "actor", "action", "target", "detail"], [
        [fmt_time(r.get("at")), fmt(r.get("actor")), fmt(r.get("action")), fmt(r.get("target")), fmt(r.get("detail"))]
        for r in rows])


def cmd_detail(r: dict[str, Any]) -> list[Any]:
    reply = r.get("reply")
    pairs: dict[str, Any] = {"device": r.get("device"), "command": f"{r.get('name')} (seq {fmt(r.get('seq'))})",
                             "state": _state(r.get("state"))}
    out = []
    if isinstance(reply, dict):
        pairs["ok"] = fmt(reply.get("ok"))
        if reply.get("error"):
            pairs["error"] = fmt(reply["error"])
        out.append(_kv_table(None, pairs))
        if reply.get("result"):
            out.append(_generic("result", reply["result"]))
    else:
        pairs["reply"] = "none yet" if reply is None else fmt(reply)
        out.append(_kv_table(None, pairs))
    return out


def telemetry_line(device: str, t: messages.Telemetry) -> str:
    """One line per sample: time, device, seq, cpu, memory, per-model calls/p95."""
    s = t.system
    mem = 100.0 * (1 - s.memory_available_bytes / s.memory_total_bytes) if s.memory_total_bytes else None
    models = " ".join(f"{name}@{m.version or '-'}:{m.calls}calls/p95={'-' if m.p95_ms is None else f'{m.p95_ms:.1f}ms'}"
                      for name, m in t.models.items())
    mem_text = "-" if mem is None else f"{mem:.0f}%"
    return (f"{t.at.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} {device} seq={t.seq} "
            f"cpu={s.cpu_percent:.0f}% mem={mem_text}" + (f" {models}" if models else ""))


def _print(items: Iterable[Any]) -> None:
    out = _stdout()
    for item in items:
        out.print(item)


# -- commands -----------------------------------------------------------------------


def health_spec(path: Path, signature: dict[str, Any], samples: Sequence[str], *, atol: float = 1e-5,
                rtol: float = 1e-4) -> Optional[dict[str, Any]]:
    """The health block of a release: the samples (``x.npy`` in input order, or
    ``NAME=x.npy``) and the outputs the engine computes for them here.

    Raises:
        ConsoleError: unreadable samples, names that do not match the inputs, too big.
        InputError: a sample's shape or dtype does not fit its input.
    """
    if not samples:
        return None
    import numpy as np

    names = [t["name"] for t in signature["inputs"]]
    by_name: dict[str, Any] = {}
    positional = iter(n for n in names)
    for item in samples:
        name, sep, file = item.partition("=")
        if not sep or not file:
            name, file = "", item
        if not name:
            name = next((n for n in positional if n not in by_name), "")
            if not name:
                raise ConsoleError(f"more --health-sample files than the model's {len(names)} inputs ({', '.join(names)})")
        elif name not in names:
            raise ConsoleError(f"--health-sample {item!r}: the model has no input {name!r}; its inputs: {', '.join(names)}")
        if name in by_name:
            raise ConsoleError(f"--health-sample: input {name!r} given twice")
        try:
            by_name[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConsoleError(f"cannot read the health sample {file} as .npy ({exc})") from None
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConsoleError(f"--health-sample: no sample for input {', '.join(missing)}; give one per input, in input "
                           f"order ({', '.join(names)}) or as NAME=x.npy")
    from edge_runtime.engine import Engine

    loaded = Engine(pool_size=1).load("health-check", "0", path, warm_up=False)
    feeds = loaded.signature.feeds(by_name, coerce=True)  # lossless dtype conversion, shapes checked
    inputs = dict(zip(names, feeds))
    expected = loaded.predict(inputs)
    try:
        spec = messages.HealthSpec.of(inputs, expected, atol=atol, rtol=rtol)
    except ValueError as exc:
        raise ConsoleError(f"health samples unusable: {exc}") from None
    return spec.model_dump(mode="json", exclude_none=True)


def cmd_models_push(args: argparse.Namespace) -> int:
    from controller.cli import inspect_file

    info = inspect_file(args.file)  # ModelFileError for a bad file, before anything is sent
    health = health_spec(args.file, info["signature"], args.health_sample or [], atol=args.atol, rtol=args.rtol)
    with connect(args) as api:
        if args.json:
            release = api.upload(args.file, args.name, args.version, info["signature"], health)
        else:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=_stderr(), transient=True) as bar:
                task = bar.add_task(f"{args.name}@{args.version}", total=info["size"])
                release = api.upload(args.file, args.name, args.version, info["signature"], health,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    if args.json:
        emit_json(release)
    else:
        _print([releases_table([release])])
    return 0


def cmd_models_ls(args: argparse.Namespace) -> int:
    return _simple(args, "models.list", {"model": args.model}, lambda rows: [releases_table(rows)])


def _simple(args: argparse.Namespace, method: str, params: dict[str, Any], render: Any) -> int:
    with connect(args) as api:
        result = api.request(method, params)
    if args.json:
        emit_json(result)
    else:
        _print(render(result))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    return _simple(args, "devices.list", {"group": args.group}, lambda rows: [devices_table(rows)])


def cmd_device_show(args: argparse.Namespace) -> int:
    return _simple(args, "devices.show", {"id": args.id}, device_detail)


def cmd_device_add(args: argparse.Namespace) -> int:
    return _simple(args, "devices.add", {"id": args.id, "groups": args.group or []}, lambda r: [devices_table([r])])


def cmd_group_add(args: argparse.Namespace) -> int:
    return _simple(args, "groups.add", {"name": args.name, "devices": args.devices}, lambda g: [groups_table(g)])


def cmd_group_rm(args: argparse.Namespace) -> int:
    return _simple(args, "groups.rm", {"name": args.name, "devices": args.devices},
                   lambda g: [groups_table(g) if g else f"group {args.name} deleted"])


def cmd_group_ls(args: argparse.Namespace) -> int:
    return _simple(args, "groups.list", {}, lambda g: [groups_table(g) if g else "no groups"])


def deploy_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``deploy`` params from the command line (unset options: the server's defaults)."""
    model, version = args.release
    params: dict[str, Any] = {"model": model, "version": version, "to": args.to}
    for dest, key in (("canary", "canary_pct"), ("waves", "waves"), ("soak", "soak_s"),
                      ("max_failures", "max_failures_pct"), ("step_timeout", "step_timeout_s")):
        if getattr(args, dest) is not None:
            params[key] = getattr(args, dest)
    # These two take "off" (None = no gate), so "not given" is a sentinel instead of None.
    for dest, key in (("max_error_rate", "max_error_rate_pct"), ("max_latency_regression", "max_latency_regression_pct")):
        value = getattr(args, dest)
        if value is not _UNSET:
            params[key] = value
    return params


_UNSET = object()


def cmd_deploy(args: argparse.Namespace) -> int:
    with connect(args) as api:
        row = api.request("deploy", deploy_params(args))
        if args.wait:
            row = _follow(api, row, args)
    return _finish_rollout(args, row, following=args.wait)


def cmd_rollout_ls(args: argparse.Namespace) -> int:
    return _simple(args, "rollouts.list", {"all": args.all}, lambda rows: [rollouts_table(rows)])


def cmd_rollout_show(args: argparse.Namespace) -> int:
    with connect(args) as api:
        row = api.request("rollouts.show", {"id": args.id})
        if args.watch:
            row = _follow(api, row, args)
    return _finish_rollout(args, row, following=args.watch)


def _rollout_action(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        return _simple(args, f"rollouts.{action}", {"id": args.id, "reason": getattr(args, "reason", None)},
                       lambda r: [rollouts_table([r])])
    return run


def _follow(api: ApiClient, row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Poll ``rollouts.show`` until the rollout reaches a final state (progress on stderr)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def describe(r: dict[str, Any]) -> tuple[str, int, int]:
        counts = r.get("counts") or {}
        total = sum(int(v) for v in counts.values() if isinstance(v, int)) or 1
        settled = sum(int(counts.get(k, 0)) for k in ("done", "failed", "reverted"))
        text = f"rollout {r['id']} {r['model']}@{r['version']}: {r.get('state')}, wave {_wave_text(r)}"
        return text, settled, total

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_stderr(), transient=True, disable=args.json) as bar:
        text, done, total = describe(row)
        task = bar.add_task(text, total=total, completed=done)
        while row.get("state") in ACTIVE_ROLLOUT_STATES:
            time.sleep(args.interval)
            row = api.request("rollouts.show", {"id": row["id"]})
            text, done, total = describe(row)
            bar.update(task, description=text, completed=done, total=total)
    return row


def _finish_rollout(args: argparse.Namespace, row: dict[str, Any], *, following: bool) -> int:
    if args.json:
        emit_json(row)
    else:
        _print(rollout_detail(row) if "steps" in row else [rollouts_table([row])])
    if following and row.get("state") == "aborted":
        print(f"fleetctl: rollout {row['id']} aborted: {row.get('reason') or 'no reason given'}", file=sys.stderr)
        return 1
    return 0


def cmd_cmd(args: argparse.Namespace) -> int:
    name = args.cmd_name
    cmd_args: dict[str, Any] = {}
    if name == "diagnostics" and args.log_lines is not None:
        cmd_args["log_lines"] = args.log_lines
    elif name == "restart" and args.reason:
        cmd_args["reason"] = args.reason
    elif name == "set-config":
        if args.telemetry_interval is None and args.log_level is None:
            args.parser.error("set-config needs --telemetry-interval and/or --log-level")  # exit 2
        if args.telemetry_interval is not None:
            cmd_args["telemetry_interval_s"] = args.telemetry_interval
        if args.log_level is not None:
            cmd_args["log_level"] = args.log_level
    params = {"device": args.device, "name": name, "args": cmd_args, "wait_s": args.wait}
    with connect(args) as api:
        # The controller waits up to wait_s for the device: our own wait covers that too.
        result = api.request("cmd", params, timeout=args.timeout + args.wait)
    if args.json:
        emit_json(result)
    else:
        _print(cmd_detail(result))
    reply = result.get("reply") if isinstance(result, dict) else None
    if isinstance(reply, dict) and reply.get("ok") is False:
        err = reply.get("error") or {}
        print(f"fleetctl: {args.device} answered {name} with an error: {err.get('message') or err.get('type') or err}",
              file=sys.stderr)
        return 1
    return 0


def cmd_telemetry_tail(args: argparse.Namespace) -> int:
    filt = topics.telemetry(args.device) if args.device else topics.all_devices("telemetry")
    received: queue.Queue[Any] = queue.Queue()
    shown = 0
    try:
        with connect(args) as api:
            api.subscribe_live([filt], received.put)
            if not args.json:
                print(f"# telemetry from {api.url} ({filt}); Ctrl-C stops", file=sys.stderr)
            while args.count is None or shown < args.count:
                try:
                    msg = received.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    device = topics.parse(msg.topic).device
                    t = messages.decode("telemetry", msg.payload)
                except (ValueError, messages.ProtocolError) as exc:
                    print(f"# skipped an unreadable sample on {msg.topic}: {exc}", file=sys.stderr)
                    continue
                if args.json:
                    print(json.dumps({**t.model_dump(mode="json"), "device_id": device}, sort_keys=True), flush=True)
                else:
                    print(telemetry_line(device, t), flush=True)
                shown += 1
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    try:
        with connect(args) as api:
            rows = api.request("top", {})
            if args.json:
                emit_json(rows)
                return 0
            if args.once:
                _print([top_table(rows)])
                return 0
            from rich.live import Live

            def title() -> str:
                return f"fleetctl top  {api.url}  {datetime.now().strftime('%H:%M:%S')}  (every {args.interval:g}s, Ctrl-C quits)"

            with Live(top_table(rows, title=title()), console=_stdout(), auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(args.interval)
                    rows = api.request("top", {})
                    live.update(top_table(rows, title=title()), refresh=True)
    except KeyboardInterrupt:
        return 130


def cmd_audit(args: argparse.Namespace) -> int:
    return _simple(args, "audit.list", {"limit": args.limit}, lambda rows: [audit_table(rows)])


def migrate_params(args: argparse.Namespace) -> dict[str, Any]:
    timeouts = {k: v for k, v in (("deploy_s", args.deploy_timeout), ("switch_s", args.switch_timeout))
                if v is not None}
    params: dict[str, Any] = {"model": args.model, "source": args.source, "to": args.to}
    if timeouts:
        params["timeouts"] = timeouts
    if args.reason:
        params["reason"] = args.reason
    return params


def cmd_migrate(args: argparse.Namespace) -> int:
    with connect(args) as api:
        row = api.request("migrate", migrate_params(args))
        if args.wait:
            row = _follow_migration(api, row, args)
    return _finish_migration(args, row, following=args.wait)


def cmd_migrations_ls(args: argparse.Namespace) -> int:
    return _simple(args, "migrations.list", {"all": args.all}, lambda rows: [migrations_table(rows)])


def cmd_migrations_show(args: argparse.Namespace) -> int:
    with connect(args) as api:
        row = api.request("migrations.show", {"id": args.id})
        if args.watch:
            row = _follow_migration(api, row, args)
    return _finish_migration(args, row, following=args.watch)


def cmd_migrations_abort(args: argparse.Namespace) -> int:
    return _simple(args, "migrations.abort", {"id": args.id, "reason": args.reason}, migration_detail)


def cmd_plan(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"apply": args.apply}
    if args.slo_ms is not None:
        params["slo_ms"] = args.slo_ms
    return _simple(args, "plan", params, plan_detail)


_MIGRATION_STEPS = ("pending", "deploying", "switching", "unloading", "done")


def _follow_migration(api: ApiClient, row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Poll ``migrations.show`` until the migration is final (its steps on stderr)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def describe(r: dict[str, Any]) -> tuple[str, int]:
        state = r.get("state")
        done = _MIGRATION_STEPS.index(state) if state in _MIGRATION_STEPS else len(_MIGRATION_STEPS) - 1
        return (f"migration {r['id']} {r['model']} for {r.get('source')}: {r.get('from_node')} -> "
                f"{r.get('to_node')}: {state}"), done

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=_stderr(),
                  transient=True, disable=args.json) as bar:
        text, done = describe(row)
        task = bar.add_task(text, total=len(_MIGRATION_STEPS) - 1, completed=done)
        while row.get("state") in ACTIVE_MIGRATION_STATES:
            time.sleep(args.interval)
            row = api.request("migrations.show", {"id": row["id"]})
            text, done = describe(row)
            bar.update(task, description=text, completed=done)
    return row


def _finish_migration(args: argparse.Namespace, row: dict[str, Any], *, following: bool) -> int:
    if args.json:
        emit_json(row)
    else:
        _print(migration_detail(row))
    if following and row.get("state") in ("reverted", "failed"):
        print(f"fleetctl: migration {row['id']} {row['state']}: {row.get('failure') or '-'}"
              + (f" ({row['detail']})" if row.get("detail") else ""), file=sys.stderr)
        return 1
    return 0


# -- the parser ---------------------------------------------------------------------


def add_cli(sub: Any, models: Any) -> None:
    """Register this part's ``fleetctl`` subcommands."""
    common = _common()

    def add(parent: Any, name: str, fn: Any, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add(models, "push", cmd_models_push, "validate a model file, upload it and record a release")
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True, type=ident, help="model name")
    p.add_argument("--version", required=True, type=version_arg, help="release version")
    p.add_argument("--health-sample", action="append", metavar="[NAME=]X.npy",
                   help="a sample input for the health check: one per input in input order, or NAME=x.npy; the "
                        "expected outputs are computed here with the engine")
    p.add_argument("--atol", type=float, default=1e-5, help="health check absolute tolerance (default 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-4, help="health check relative tolerance (default 1e-4)")
    p = add(models, "ls", cmd_models_ls, "list releases")
    p.add_argument("--model", type=ident)

    p = add(sub, "devices", cmd_devices, "list devices")
    p.add_argument("--group", type=ident)
    device = sub.add_parser("device", help="one device").add_subparsers(dest="device_command", required=True)
    p = add(device, "show", cmd_device_show, "a device: state, assignments, desired state, events, telemetry")
    p.add_argument("id", type=ident)
    p = add(device, "add", cmd_device_add, "register a device (optionally in groups)")
    p.add_argument("id", type=ident)
    p.add_argument("--group", action="append", type=ident, metavar="G", help="a group to put it in (repeatable)")

    group = sub.add_parser("group", help="device groups").add_subparsers(dest="group_command", required=True)
    p = add(group, "add", cmd_group_add, "add devices to a group (creating it)")
    p.add_argument("name", type=ident)
    p.add_argument("devices", nargs="+", type=ident, metavar="DEVICE")
    p = add(group, "rm", cmd_group_rm, "remove devices from a group, or the group itself when no device is named")
    p.add_argument("name", type=ident)
    p.add_argument("devices", nargs="*", type=ident, metavar="DEVICE")
    add(group, "ls", cmd_group_ls, "list groups")

    p = add(sub, "deploy", cmd_deploy, "roll a release out in waves with health gates")
    p.add_argument("release", type=model_version, metavar="MODEL@VERSION")
    p.add_argument("--to", required=True, type=target, metavar="TARGET", help="DEVICE, device:ID, group:NAME or all")
    p.add_argument("--canary", type=percent, metavar="PCT", help="a canary wave first (e.g. 10%%)")
    p.add_argument("--waves", type=waves, metavar="PCTS", help="cumulative waves (e.g. 25,50,100; default 100)")
    p.add_argument("--soak", type=duration, metavar="DURATION", help="soak time per wave (e.g. 60s, 5m; default 60s)")
    p.add_argument("--max-failures", type=percent, metavar="PCT", help="abort above this share of failed devices (5%%)")
    p.add_argument("--max-error-rate", type=optional_percent, default=_UNSET, metavar="PCT|off",
                   help="abort above this error rate of the new version (default 1%%)")
    p.add_argument("--max-latency-regression", type=regression_percent, default=_UNSET, metavar="PCT|off",
                   help="abort when p95 latency regresses by more than this (default 20%%)")
    p.add_argument("--step-timeout", type=positive_seconds, metavar="DURATION", help="per-device deadline (default 5m)")
    p.add_argument("--wait", action="store_true", help="follow the rollout to its end; exit 1 if it aborts")
    p.add_argument("--interval", type=positive_seconds, default=2.0, metavar="S", help="poll interval for --wait")

    rollout = sub.add_parser("rollout", help="rollouts").add_subparsers(dest="rollout_command", required=True)
    p = add(rollout, "ls", cmd_rollout_ls, "list active rollouts")
    p.add_argument("--all", action="store_true", help="finished ones too")
    p = add(rollout, "show", cmd_rollout_show, "a rollout and its steps")
    p.add_argument("id", type=positive_int)
    p.add_argument("--watch", action="store_true", help="follow it to its end; exit 1 if it aborts")
    p.add_argument("--interval", type=positive_seconds, default=2.0, metavar="S", help="poll interval for --watch")
    for action, text in (("pause", "pause a rollout"), ("resume", "resume a paused rollout"),
                         ("abort", "abort a rollout: every updated device goes back to its previous version")):
        p = add(rollout, action, _rollout_action(action), text)
        p.add_argument("id", type=positive_int)
        if action != "resume":
            p.add_argument("--reason", metavar="TEXT")

    cmd = sub.add_parser("cmd", help="signed one-shot commands to a device").add_subparsers(dest="cmd_name", required=True)
    for name, text in (("ping", "is it there, and how fast does it answer"),
                       ("diagnostics", "system figures and recent log lines"),
                       ("restart", "restart the runtime"), ("set-config", "change runtime settings")):
        p = add(cmd, name, cmd_cmd, text)
        p.add_argument("device", type=ident)
        p.add_argument("--wait", type=duration, default=10.0, metavar="S",
                       help="how long the controller waits for the device's reply (default 10s, at most 300)")
        if name == "diagnostics":
            p.add_argument("--log-lines", type=int, metavar="N")
        elif name == "restart":
            p.add_argument("--reason", metavar="TEXT")
        elif name == "set-config":
            p.set_defaults(parser=p)
            p.add_argument("--telemetry-interval", type=positive_seconds, metavar="S")
            p.add_argument("--log-level", choices=LOG_LEVELS)

    telemetry = sub.add_parser("telemetry", help="device telemetry").add_subparsers(dest="telemetry_command",
                                                                                   required=True)
    p = add(telemetry, "tail", cmd_telemetry_tail, "live telemetry straight from the broker")
    p.add_argument("--device", type=ident)
    p.add_argument("--count", type=positive_int, metavar="N", help="stop after N samples")

    p = add(sub, "top", cmd_top, "live fleet view: devices, models, latency, CPU, memory")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--interval", type=positive_seconds, default=2.0, metavar="S")

    p = add(sub, "audit", cmd_audit, "who did what")
    p.add_argument("--limit", type=positive_int, default=50, metavar="N")

    p = add(sub, "migrate", cmd_migrate, "move a device's calls of a model to another executor, make-before-break")
    p.add_argument("model", type=ident, metavar="MODEL")
    p.add_argument("--source", required=True, type=ident, metavar="DEVICE", help="the device whose calls move")
    p.add_argument("--to", required=True, type=ident, metavar="NODE",
                   help="the executor (a cloud node, a peer, or the source itself to serve locally again)")
    p.add_argument("--deploy-timeout", type=positive_seconds, metavar="D",
                   help="how long the target may take to run the model (default 5m)")
    p.add_argument("--switch-timeout", type=positive_seconds, metavar="D",
                   help="how long the source may take to confirm the new route (default 2m)")
    p.add_argument("--reason", metavar="TEXT")
    p.add_argument("--wait", action="store_true", help="follow it to its end; exit 1 if it reverts or fails")
    p.add_argument("--interval", type=positive_seconds, default=1.0, metavar="S", help="poll interval for --wait")

    migrations = sub.add_parser("migrations", help="migrations").add_subparsers(dest="migrations_command",
                                                                               required=True)
    p = add(migrations, "ls", cmd_migrations_ls, "list active migrations")
    p.add_argument("--all", action="store_true", help="finished ones too")
    p = add(migrations, "show", cmd_migrations_show, "one migration")
    p.add_argument("id", type=positive_int)
    p.add_argument("--watch", action="store_true", help="follow it to its end; exit 1 if it reverts or fails")
    p.add_argument("--interval", type=positive_seconds, default=1.0, metavar="S", help="poll interval for --watch")
    p = add(migrations, "abort", cmd_migrations_abort, "revert a migration that has not switched yet")
    p.add_argument("id", type=positive_int)
    p.add_argument("--reason", metavar="TEXT")

    p = add(sub, "plan", cmd_plan, "the placement planner's moves over the fleet now (p95 before/after)")
    p.add_argument("--apply", action="store_true", help="start a migration for each move")
    p.add_argument("--slo-ms", type=float, metavar="MS", help="the p95 target to plan for (default: the controller's)")
