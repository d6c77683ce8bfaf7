"""Shared fixtures: real .tflite files written by modelgen, free ports, subprocess helpers."""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.brokers import amqtt_broker, broker, mosquitto_broker  # noqa: F401 - broker fixtures for every module
from tests.helpers import free_port, runtime_cmd, wait_until  # noqa: F401 - re-exported for tests

REPO = Path(__file__).resolve().parents[1]

# Tests stop the demo and amqtt with SIGINT, as Ctrl-C does. A suite started in the
# background of a non-interactive shell (``make test &``) inherits SIGINT ignored, and an
# ignored signal stays ignored across exec: those processes would never see it. Python's
# own handler is reset to the default in every child, so installing it here is enough.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The legacy venv is a device's environment (tflite-runtime, NumPy < 2) without the
# controller's packages (SQLAlchemy, rich, amqtt, ...). There, a test module that cannot be
# imported for want of one of them is not collected: decided by importing it, so a new
# controller test needs no list kept up to date here.
_DEVICE_ONLY = importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("rich") is None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> Optional[bool]:
    if not _DEVICE_ONLY or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    try:
        module = ".".join(collection_path.resolve().relative_to(REPO).with_suffix("").parts)
    except ValueError:
        return None
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        return True if missing and missing not in ("controller", "edge_runtime", "tests") else None
    except (Exception, pytest.skip.Exception):  # anything else (a module-level skip too): pytest reports it
        return None
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs bounded versions; EDGEFLEET_SLOW=1 (make bench) runs the slow ones too."""
    if os.environ.get("EDGEFLEET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set EDGEFLEET_SLOW=1 (make bench) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def zoo(models_dir: Path) -> dict[str, Any]:
    """Built models by name; each has .data, .save(path), .reference(inputs), .sample_inputs()."""
    from edge_runtime.modelgen import zoo as z

    return {
        "tiny_v1": z.tiny_mlp(seed=0),
        "tiny_v2": z.tiny_mlp(seed=0, version_bias=0.5),
        "tiny_int8": z.tiny_mlp_int8(seed=0),
        "multi_io": z.multi_io(seed=0),
        "custom": z.custom_op_model(),
    }


@pytest.fixture(scope="session")
def model_files(zoo: dict[str, Any], models_dir: Path) -> dict[str, Path]:
    return {name: m.save(models_dir / f"{name}.tflite") for name, m in zoo.items()}


@pytest.fixture(scope="session")
def vision(models_dir: Path) -> tuple[Any, Path]:
    from edge_runtime.modelgen import zoo as z

    model = z.vision_net(seed=0)
    return model, model.save(models_dir / "vision.tflite")


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start subprocesses that are always killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.Popen(cmd, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
