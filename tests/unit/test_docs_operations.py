"""docs/operations.md stays accurate to the code.

(a) Every typed reason and code an operator can meet is explained in the guide's
    reference section: the lists are read from the modules that define them (enums,
    tuples of tokens, ``code`` attributes, and the string literals the controller's ingest
    and rollout code count or record), never typed out here. A new reason in the code
    fails this test until the guide has a row for it.
(b) Every ``fleetctl ...`` / ``edge-runtime ...`` command line in the guide's code blocks
    names a subcommand path that exists: ``<path> --help`` exits 0. The paths are run
    through each CLI's own ``main`` in one subprocess per CLI (the same argv as
    ``python -m controller.cli <path> --help``; one interpreter start instead of one per
    path keeps the test to a few seconds).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the controller's modules need the full install")

from controller import apiclient, ingest, migration, rollout  # noqa: E402
from edge_runtime import errors  # noqa: E402
from edge_runtime.agent import transfer  # noqa: E402
from edge_runtime.protocol import messages, trust  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "operations.md"


def _guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The text under the Markdown heading ``heading`` (any level) up to the next heading
    of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*?)\s*$", line)
        if m and m.group(2) == heading:
            level = len(m.group(1))
            body = []
            for nxt in lines[i + 1:]:
                n = re.match(r"^(#+)\s", nxt)
                if n and len(n.group(1)) <= level:
                    break
                body.append(nxt)
            return "\n".join(body)
    raise AssertionError(f"docs/operations.md has no heading {heading!r}")


# -- (a) the codes, collected from the code ------------------------------------------------


def _literal_calls(module: object, predicate) -> set[str]:
    """String constants found by ``predicate(call_node)`` in ``module``'s source."""
    tree = ast.parse(inspect.getsource(module))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found |= predicate(node)
    return found


def _ingest_literal_reasons() -> set[str]:
    """``self._count(self.rejected, "<reason>")`` in controller/ingest.py."""

    def pick(call: ast.Call) -> set[str]:
        f = call.func
        if (isinstance(f, ast.Attribute) and f.attr == "_count" and len(call.args) == 2
                and isinstance(call.args[0], ast.Attribute) and call.args[0].attr == "rejected"
                and isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str)):
            return {call.args[1].value}
        return set()

    return _literal_calls(ingest, pick)


def _rollout_literal_reasons() -> set[str]:
    """``reason="<token>"`` keyword literals in controller/rollout.py (e.g. step_timeout)."""

    def pick(call: ast.Call) -> set[str]:
        return {k.value.value for k in call.keywords
                if k.arg == "reason" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)}

    return _literal_calls(rollout, pick)


def _codes_of(module: object, base: type) -> set[str]:
    """The ``code`` of every subclass of ``base`` defined in ``module`` (and of ``base``)."""
    out = set()
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__:  # type: ignore[attr-defined]
            out.add(obj.code)
    return out


CATEGORIES = {
    # heading in the guide -> what the code defines
    "Trust rejections": lambda: {r.value for r in trust.Reason},
    "Event steps": lambda: set(messages.STEPS),
    "Event reasons": lambda: set(messages.REASONS) | set(transfer.TransferError.REASONS),
    "Controller ingest rejections": lambda: set(messages.ProtocolError.REASONS) | _ingest_literal_reasons(),
    "Rollout and step states": lambda: (set(rollout.ROLLOUT_STATES) | set(rollout.STEP_STATES)
                                         | _rollout_literal_reasons()),
    "Migration states and failures": lambda: set(migration.STATES) | set(migration.FAILURES),
    "Console and API errors": lambda: set(messages.API_ERRORS) | _codes_of(apiclient, errors.EdgeRuntimeError),
    "Device runtime error codes": lambda: _codes_of(errors, errors.EdgeRuntimeError),
}


def test_the_collectors_find_something() -> None:
    # A refactor that renames what the collectors read must not make (a) pass vacuously.
    assert {"bad_signature", "malformed"} <= CATEGORIES["Trust rejections"]()
    assert {"bad_topic", "not_a_report"} <= _ingest_literal_reasons()
    assert "step_timeout" in _rollout_literal_reasons()
    assert {"controller_unavailable", "broker_unavailable"} <= _codes_of(apiclient, errors.EdgeRuntimeError)
    assert {"invalid_input", "model_not_found"} <= _codes_of(errors, errors.EdgeRuntimeError)


@pytest.mark.parametrize("heading", sorted(CATEGORIES))
def test_every_code_is_explained(heading: str) -> None:
    section = _section(_guide(), heading)
    rows = {m.group(1) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|", section, re.MULTILINE)}
    missing = sorted(CATEGORIES[heading]() - rows)
    assert not missing, f"docs/operations.md, section {heading!r}: no table row for {missing}"


# -- (b) the command lines ------------------------------------------------------------------

PROGRAMS = {"fleetctl": "controller.cli", "edge-runtime": "edge_runtime.cli"}
_WORD = re.compile(r"^[a-z][a-z-]*$")  # a subcommand name; placeholders are UPPER case or carry digits
_BLOCK = re.compile(r"^```(?:sh|bash|shell|console)\s*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _strip_prefix(words: list[str]) -> list[str]:
    """Drop ``VAR=value`` assignments and ``sudo [-u USER] [-E]`` before the program."""
    while words:
        if "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]
        elif words[0] in ("sudo", "exec"):
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[2:] if words[0] in ("-u", "-g") else words[1:]
        else:
            break
    return words


def command_paths(text: str) -> dict[str, set[tuple[str, ...]]]:
    """{program: {subcommand path}} for every command line in the shell code blocks."""
    found: dict[str, set[tuple[str, ...]]] = {p: set() for p in PROGRAMS}
    for block in _BLOCK.findall(text):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"^\$\s+", "", line)
            for segment in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                try:
                    words = shlex.split(segment)
                except ValueError:
                    words = segment.split()
                words = _strip_prefix(words)
                if not words or Path(words[0]).name not in PROGRAMS:
                    continue
                path = []
                for w in words[1:]:
                    if not _WORD.match(w):
                        break
                    path.append(w)
                found[Path(words[0]).name].add(tuple(path))
    return found


_DRIVER = """
import contextlib, io, json, sys
from {module} import main
out = {{}}
for path in json.loads(sys.argv[1]):
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            code = main(path + ["--help"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out[" ".join(path)] = [code, sink.getvalue()[-400:]]
print(json.dumps(out))
"""


def test_command_path_parser() -> None:
    text = "```sh\nsudo -u edgefleet /opt/edgefleet/venv/bin/edge-runtime models --data-dir /x\n" \
           "fleetctl keys rotate --dir keys/ \\\n    --replace deploy\nFLEETCTL_BROKER=x fleetctl device show pi-1\n" \
           "fleetctl ca issue dev-1 --role device | tee log\n```\n"
    assert command_paths(text) == {
        "fleetctl": {("keys", "rotate"), ("device", "show"), ("ca", "issue")},
        "edge-runtime": {("models",)},
    }


def test_every_command_line_names_an_existing_subcommand() -> None:
    paths = command_paths(_guide())
    assert len(paths["fleetctl"]) >= 10 and len(paths["edge-runtime"]) >= 1, paths
    failures = []
    for program, module in PROGRAMS.items():
        todo = sorted(list(p) for p in paths[program])
        proc = subprocess.run([sys.executable, "-c", _DRIVER.format(module=module), json.dumps(todo)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for path, (code, output) in sorted(results.items()):
            if code != 0:
                failures.append(f"{program} {path} --help exited {code}: {output.strip()}")
    assert not failures, "\n".join(failures)
