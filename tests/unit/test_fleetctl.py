"""fleetctl models inspect: the engine's verdict on a file, as a release would record it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from controller.cli import main


def test_inspect_reports_digest_and_signature(model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = model_files["multi_io"]
    assert main(["models", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["size"] == path.stat().st_size
    assert [t["name"] for t in info["signature"]["inputs"]] == ["a", "b"]


@pytest.mark.parametrize("name,reason", [("custom", "unresolved_op"), ("text", "not_tflite")])
def test_inspect_refuses_bad_files(name: str, reason: str, model_files: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = model_files.get(name) or tmp_path / "x.tflite"
    if name == "text":
        path.write_text("not a model")
    assert main(["models", "inspect", str(path), "--json"]) == 1
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["error"]["reason"] == reason
