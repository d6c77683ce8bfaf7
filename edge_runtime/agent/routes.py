"""Where each model's calls go: ``local`` or an executor node. Persisted, so a restarted
device keeps forwarding as the controller last decided even before it is reachable.

    DATA_DIR/agent/routes.json   {"format": 1, "routes": {model: node id}}   (only non-local)

Only the table lives here; forwarding calls to a node is the remote-inference layer's job.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from edge_runtime.durable import atomic_write_json, remove_stale_temps
from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import LOCAL

log = logging.getLogger(__name__)
ROUTES_FORMAT = 1


class RouteTable:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)  # a write a crash interrupted
        self._lock = threading.Lock()
        self._routes: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        try:
            doc = json.loads(self.path.read_bytes())
            routes = doc["routes"] if doc.get("format") == ROUTES_FORMAT else None
            if not isinstance(routes, dict):
                raise ValueError(f"expected format {ROUTES_FORMAT} with a routes object")
            return {str(k): topics.check_id(v, "node id") for k, v in routes.items()
                    if topics.valid_id(k) and v != LOCAL}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring unreadable %s (%s): every model is served locally until the controller routes it",
                      self.path, exc)
            return {}

    def all(self) -> dict[str, str]:
        """Model → node, for every model not served locally."""
        with self._lock:
            return dict(self._routes)

    def get(self, name: str) -> str:
        with self._lock:
            return self._routes.get(name, LOCAL)

    def set(self, name: str, target: str) -> None:
        """Route ``name`` to ``target`` (``local`` removes the entry); durable on return.

        Raises:
            OSError: the write failed; the table is unchanged.
        """
        with self._lock:
            new = dict(self._routes)
            if target == LOCAL:
                new.pop(name, None)
            else:
                new[name] = target
            if new != self._routes:
                atomic_write_json(self.path, {"format": ROUTES_FORMAT, "routes": new})
                self._routes = new


__all__ = ["RouteTable"]
