"""The device's signed one-shot commands: what each does and the ``Reply`` it sends.

Trust (signature, target, ``seq`` floor) is ``documents.DocumentGate``'s; by the time a
command reaches ``run_command`` its seq is durable as the floor, so it runs at most once.
Each command is a small function over ``CommandHooks`` -- the few things of the agent a
command may touch -- so they are tested without a broker or a daemon.

    ping         {"pong": true, "issued_at", "received_at"}: the controller's round trip
    cancel       abort transfers (by sha256 or model): {"cancelled": [sha256...]}
    diagnostics  {"state": ..., "transfers": [...], "outbox": {...}, "log": [recent lines]}
    set-config   telemetry interval / log level, for this run (the config file stays the
                 truth across restarts): {"applied": {...}}
    restart      reply first, then exit cleanly with ``RESTART_EXIT_CODE`` so that systemd
                 (``RestartForceExitStatus=75``) starts it again
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from edge_runtime.protocol.messages import (
    CancelArgs,
    Command,
    DiagnosticsArgs,
    ErrorInfo,
    Reply,
    RestartArgs,
    SetConfigArgs,
)

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the unit restarts on it
MAX_REPLY_BYTES = 60 * 1024  # under the reply kind's 64 KiB limit, with room for the envelope


@dataclass(frozen=True)
class CommandHooks:
    """What commands may do to the agent."""

    cancel: Callable[[Optional[str], Optional[str]], list[str]]  # (sha256, model) -> cancelled sha256s
    diagnostics: Callable[[], dict[str, Any]]
    set_config: Callable[[SetConfigArgs], dict[str, Any]]
    restart: Callable[[Optional[str]], None]
    recent_log: Callable[[int], list[str]]


def run_command(command: Command, hooks: CommandHooks, *, now: Optional[datetime] = None) -> Reply:
    """Run one accepted command; never raises (a failure is a not-ok ``Reply``)."""
    received = now or datetime.now(timezone.utc)
    try:
        result = _RUN[command.name](command, hooks, received)
    except Exception as exc:
        log.exception("command %s (seq %d) failed", command.name, command.seq)
        return Reply(seq=command.seq, command=command.name, ok=False, error=ErrorInfo.of(exc), at=received)
    return Reply(seq=command.seq, command=command.name, ok=True, result=result, at=received)


def _ping(command: Command, hooks: CommandHooks, received: datetime) -> dict[str, Any]:
    return {"pong": True, "issued_at": command.issued_at.isoformat(), "received_at": received.isoformat()}


def _cancel(command: Command, hooks: CommandHooks, received: datetime) -> dict[str, Any]:
    args = command.args
    assert isinstance(args, CancelArgs)
    return {"cancelled": hooks.cancel(args.sha256, args.model)}


def _diagnostics(command: Command, hooks: CommandHooks, received: datetime) -> dict[str, Any]:
    args = command.args
    assert isinstance(args, DiagnosticsArgs)
    result = hooks.diagnostics()
    lines = hooks.recent_log(args.log_lines)
    # Newest lines are the useful ones: drop from the oldest until the reply fits.
    base = len(json.dumps(result, default=str))
    budget = MAX_REPLY_BYTES - base - 512
    kept: list[str] = []
    for line in reversed(lines):
        cost = len(json.dumps(line)) + 1
        if cost > budget:
            break
        kept.append(line)
        budget -= cost
    result["log"] = kept[::-1]
    result["log_truncated"] = len(kept) < len(lines)
    return json.loads(json.dumps(result, default=str))  # plain JSON values only


def _set_config(command: Command, hooks: CommandHooks, received: datetime) -> dict[str, Any]:
    args = command.args
    assert isinstance(args, SetConfigArgs)
    return {"applied": hooks.set_config(args)}


def _restart(command: Command, hooks: CommandHooks, received: datetime) -> dict[str, Any]:
    args = command.args
    assert isinstance(args, RestartArgs)
    hooks.restart(args.reason)
    return {"restarting": True, "exit_code": RESTART_EXIT_CODE}


_RUN: dict[str, Callable[[Command, CommandHooks, datetime], dict[str, Any]]] = {
    "ping": _ping,
    "cancel": _cancel,
    "diagnostics": _diagnostics,
    "set-config": _set_config,
    "restart": _restart,
}


class RecentLog(logging.Handler):
    """The last ``capacity`` log lines of the process, for ``diagnostics``."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)[:500]
        except Exception:  # a bad log call must not break logging
            return
        with self._guard:
            self._lines.append(line)

    def tail(self, n: int) -> list[str]:
        with self._guard:
            return list(self._lines)[-n:] if n > 0 else []


__all__ = ["CommandHooks", "RESTART_EXIT_CODE", "RecentLog", "run_command"]
