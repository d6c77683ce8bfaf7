"""The device's one-shot commands (agent/commands.py): each handler over recording hooks,
replies that always encode within the reply limit, and failures as not-ok replies."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Optional

import pytest

from edge_runtime.agent import commands
from edge_runtime.agent.commands import RESTART_EXIT_CODE, CommandHooks, RecentLog, run_command
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import messages
from edge_runtime.protocol.messages import COMMANDS, Command, Reply, SetConfigArgs
from tests import trustkit
from tests.trustkit import T0

RECEIVED = T0 + timedelta(seconds=3)
SHA = "ab" * 32


def make_command(name: str, args: Optional[dict[str, Any]] = None, seq: int = 4) -> Command:
    return Command.model_validate(trustkit.doc_body("command", seq=seq, name=name, args=args or {}))


class Hooks:
    """Records every call; ``fail`` names hooks that raise."""

    def __init__(self, *, log_lines: Optional[list[str]] = None, fail: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.lines = log_lines if log_lines is not None else ["one", "two", "three"]
        self.fail = fail

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise EdgeRuntimeError(f"{name} broke")

    def cancel(self, sha256: Optional[str], model: Optional[str]) -> list[str]:
        self._call("cancel", sha256, model)
        return [sha256 or SHA]

    def diagnostics(self) -> dict[str, Any]:
        self._call("diagnostics")
        return {"state": {"generation": 3}, "transfers": [], "outbox": {"depth": 2}}

    def set_config(self, args: SetConfigArgs) -> dict[str, Any]:
        self._call("set_config", args)
        return {k: v for k, v in args.model_dump().items() if v is not None}

    def restart(self, reason: Optional[str]) -> None:
        self._call("restart", reason)

    def recent_log(self, n: int) -> list[str]:
        self._call("recent_log", n)
        return self.lines[-n:] if n else []

    def hooks(self) -> CommandHooks:
        return CommandHooks(cancel=self.cancel, diagnostics=self.diagnostics, set_config=self.set_config,
                            restart=self.restart, recent_log=self.recent_log)


def run(name: str, args: Optional[dict[str, Any]] = None, hooks: Optional[Hooks] = None) -> Reply:
    reply = run_command(make_command(name, args), (hooks or Hooks()).hooks(), now=RECEIVED)
    # Every reply goes on the wire: it must encode and decode to itself.
    assert messages.decode("reply", messages.encode(reply)) == reply
    return reply


ARGS: dict[str, dict[str, Any]] = {
    "ping": {},
    "cancel": {"model": "kws"},
    "diagnostics": {"log_lines": 2},
    "set-config": {"log_level": "debug"},
    "restart": {"reason": "test"},
}


def test_every_command_name_has_a_handler() -> None:
    assert set(ARGS) == set(COMMANDS)
    for name in COMMANDS:
        reply = run(name, ARGS[name])
        assert reply.ok, (name, reply.error)
        assert (reply.seq, reply.command, reply.at) == (4, name, RECEIVED)


def test_ping_returns_pong_with_both_times() -> None:
    reply = run("ping")
    assert reply.ok and reply.error is None
    assert reply.result == {"pong": True, "issued_at": T0.isoformat(), "received_at": RECEIVED.isoformat()}


@pytest.mark.parametrize("args,expected", [({"sha256": SHA}, (SHA, None)), ({"model": "kws"}, (None, "kws"))])
def test_cancel_passes_sha_or_model_through(args: dict[str, Any], expected: tuple[Any, ...]) -> None:
    hooks = Hooks()
    reply = run("cancel", args, hooks)
    assert hooks.calls == [("cancel", expected)]
    assert reply.result == {"cancelled": [SHA]}


def test_diagnostics_carries_state_and_the_requested_log_lines() -> None:
    hooks = Hooks(log_lines=[f"line {i}" for i in range(10)])
    reply = run("diagnostics", {"log_lines": 3}, hooks)
    assert ("recent_log", (3,)) in hooks.calls
    assert reply.result["state"] == {"generation": 3}
    assert reply.result["outbox"] == {"depth": 2}
    assert reply.result["log"] == ["line 7", "line 8", "line 9"]
    assert reply.result["log_truncated"] is False


@pytest.mark.parametrize("char", ["x", "é", "\u20ac", "\U0001f600", "\x01"], ids=["ascii", "latin", "euro", "emoji", "ctrl"])
def test_diagnostics_trims_the_log_to_fit_the_reply_keeping_the_newest(char: str) -> None:
    lines = [f"{i:04d} " + char * 495 for i in range(1000)]
    hooks = Hooks(log_lines=lines)
    reply = run("diagnostics", {"log_lines": 1000}, hooks)
    encoded = messages.encode(reply)
    assert len(encoded) <= 64 * 1024
    assert len(encoded) <= messages.LIMITS["reply"]
    log = reply.result["log"]
    assert reply.result["log_truncated"] is True
    assert 0 < len(log) < 1000
    assert log == lines[-len(log):]  # the newest, in order
    assert log[-1].startswith("0999 ")


def test_diagnostics_with_zero_lines() -> None:
    reply = run("diagnostics", {"log_lines": 0})
    assert reply.result["log"] == [] and reply.result["log_truncated"] is False


def test_set_config_returns_what_was_applied() -> None:
    hooks = Hooks()
    reply = run("set-config", {"telemetry_interval_s": 30, "log_level": "warning"}, hooks)
    assert hooks.calls[0][0] == "set_config"
    applied_args = hooks.calls[0][1][0]
    assert isinstance(applied_args, SetConfigArgs)
    assert (applied_args.telemetry_interval_s, applied_args.log_level) == (30, "warning")
    assert reply.result == {"applied": {"telemetry_interval_s": 30.0, "log_level": "warning"}}


def test_restart_calls_the_hook_with_its_reason() -> None:
    hooks = Hooks()
    reply = run("restart", {"reason": "new config"}, hooks)
    assert hooks.calls == [("restart", ("new config",))]
    assert reply.ok and reply.result == {"restarting": True, "exit_code": RESTART_EXIT_CODE}
    assert RESTART_EXIT_CODE == 75


@pytest.mark.parametrize("name,hook", [("cancel", "cancel"), ("diagnostics", "diagnostics"),
                                       ("set-config", "set_config"), ("restart", "restart")])
def test_a_hook_that_raises_becomes_a_not_ok_reply(name: str, hook: str) -> None:
    reply = run(name, ARGS[name], Hooks(fail=frozenset({hook})))
    assert reply.ok is False
    assert reply.error is not None
    assert reply.error.type == EdgeRuntimeError.code
    assert f"{hook} broke" in reply.error.message
    assert reply.result == {}
    assert (reply.seq, reply.command) == (4, name)


def test_a_foreign_exception_is_internal() -> None:
    def boom(sha256: Optional[str], model: Optional[str]) -> list[str]:
        raise KeyError("nope")

    h = Hooks()
    hooks = CommandHooks(cancel=boom, diagnostics=h.diagnostics, set_config=h.set_config, restart=h.restart,
                         recent_log=h.recent_log)
    reply = run_command(make_command("cancel", {"model": "kws"}), hooks, now=RECEIVED)
    assert reply.ok is False and reply.error is not None and reply.error.type == "internal"
    assert "nope" in reply.error.message


def test_recent_log_keeps_the_last_lines_capped() -> None:
    handler = RecentLog(capacity=5)
    logger = logging.getLogger("edgefleet.test.recentlog")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        for i in range(8):
            logger.info("message %d", i)
        logger.debug("below the handler's level")
        logger.info("x" * 2000)
    finally:
        logger.removeHandler(handler)
    tail = handler.tail(10)
    assert len(tail) == 5
    assert [line.split(": ", 1)[1] for line in tail[:4]] == [f"message {i}" for i in range(4, 8)]
    assert all(len(line) <= 500 for line in tail)
    assert handler.tail(2) == tail[-2:]
    assert handler.tail(0) == []


def test_max_reply_bytes_is_under_the_wire_limit() -> None:
    assert commands.MAX_REPLY_BYTES < messages.LIMITS["reply"]
