"""The console commands of ``fleetctl``. (being built: see issue 5)"""

from __future__ import annotations

from typing import Any


def add_cli(sub: Any, models: Any) -> None:
    """Register this part's ``fleetctl`` subcommands."""
