"""The I/O edge of the root of trust: the one file that holds the trusted root and the floors.

``trust.TrustedState`` decides; this module reads and writes what it decided, and nothing
else (python-tuf's ``Updater`` to its ``TrustedMetadataSet``). The agent's loop is::

    store = TrustStore(data_dir)
    state = store.load(device_id=..., groups=...)
    verified = state.verify_desired(data, now)   # raises trust.Rejection: nothing to persist
    store.save(verified.state)                   # durable *before* the device acts on it
    state = verified.state

Files (under the device data dir):

    DATA_DIR/trust/state.json                 the root envelope and the floors, one JSON object,
                                              replaced atomically (durable.atomic_write_json)
    DATA_DIR/trust/.state.json.<random>.tmp   a write in flight; a SIGKILL before its rename
                                              leaves one behind; ``clean_stale`` removes it

The root and the floors live in *one* file on purpose: a rotation changes both, and one
rename moves them together, so a crash leaves the old pair or the new pair, never a new root
with old floors. Crash points: ``trust.save.begin``, the two of ``atomic_write_bytes``
(``atomic_write.before_rename``, ``atomic_write.after_rename``), ``trust.save.done``.

Format history of ``state.json`` (``FORMAT``):
    1  ``{"format": 1, "root": <DSSE envelope of root.json>, "floors": <trust.Floors>}``

Errors (all ``EdgeRuntimeError``; what the caller does next):

    TrustStoreError
     ├── NotProvisioned     no trust state yet: provision the device with its root.json
     ├── AlreadyProvisioned provisioning again would replace the root of trust: refused
     └── TrustStoreCorrupt  the file is unreadable or does not verify: re-provision (fatal)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from edge_runtime.durable import atomic_write_json, crashpoint, fsync_dir, remove_stale_temps
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.dsse import Envelope, EnvelopeError
from edge_runtime.protocol.trust import MAX_BYTES, Floors, Rejection, TrustedState

FORMAT = 1
FORMAT_HISTORY: dict[int, str] = {1: "root envelope + floors (root_version, generation, seq, highest_time_seen)"}
TRUST_DIR = "trust"
STATE_FILE = "state.json"
MAX_STATE_BYTES = 4 * MAX_BYTES  # a root envelope plus floors, re-indented; far below this


class TrustStoreError(EdgeRuntimeError):
    code = "trust_store_error"


class NotProvisioned(TrustStoreError):
    code = "not_provisioned"


class AlreadyProvisioned(TrustStoreError):
    code = "already_provisioned"


class TrustStoreCorrupt(TrustStoreError):
    code = "trust_store_corrupt"


class TrustStore:
    """Load and save one device's trust state, only ever forward."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir) / TRUST_DIR
        self.path = self.dir / STATE_FILE
        # The state last read or written: ``save`` refuses anything that does not cover it.
        self._current: Optional[TrustedState] = None

    def exists(self) -> bool:
        return self.path.is_file()

    def provision(
        self, root_json: bytes, *, device_id: str, groups: frozenset[str] | set[str] = frozenset(), replace: bool = False
    ) -> TrustedState:
        """Install the root of trust from a ``root.json`` (a DSSE envelope of a ``Root``
        signed by a threshold of its own root keys) and persist it with fresh floors.

        ``replace=True`` is for a deliberate factory reset only: it forgets the floors.

        Raises:
            trust.Rejection: the root.json does not verify (nothing is written).
            AlreadyProvisioned: a trust state exists and ``replace`` is False.
            OSError: the write failed; the previous file (if any) is intact.
        """
        if self.exists() and not replace:
            raise AlreadyProvisioned(f"{self.path} exists; provisioning again would replace the root of trust")
        state = TrustedState.bootstrap(root_json, device_id=device_id, groups=groups)
        self._write(state)
        self._current = state
        return state

    def load(self, *, device_id: str, groups: frozenset[str] | set[str] = frozenset()) -> TrustedState:
        """Read the persisted state (the root is re-verified against itself).

        Raises:
            NotProvisioned: there is no trust state.
            TrustStoreCorrupt: the file is not what ``save`` writes, or its root does not verify.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            raise NotProvisioned(f"no trust state at {self.path}: provision the device with its root.json") from None
        except OSError as exc:
            raise TrustStoreCorrupt(f"cannot read {self.path}: {exc}") from exc
        if len(data) > MAX_STATE_BYTES:
            raise TrustStoreCorrupt(f"{self.path} is larger than {MAX_STATE_BYTES} bytes")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT or set(obj) != {"format", "root", "floors"}:
                raise ValueError(f"expected format {FORMAT} with keys format, root, floors")
            envelope = Envelope.from_dict(obj["root"])
            floors = Floors.model_validate(obj["floors"])
            state = TrustedState.restore(envelope, floors, device_id=device_id, groups=groups)
        except (ValueError, RecursionError, EnvelopeError, ValidationError, Rejection) as exc:
            raise TrustStoreCorrupt(f"{self.path}: {exc}") from exc
        self._current = state
        return state

    def save(self, state: TrustedState) -> bool:
        """Persist ``state`` if it differs from the persisted one; True when it wrote.

        Call it with ``Verified.state`` after a verification passed and before acting on
        the document. An ``ALREADY_CURRENT`` result hands back the same state: no write.

        Raises:
            ValueError: ``state`` would move a floor backward, or replace the root at the same
                version with a different one (a caller bug: states come from ``trust``).
            RuntimeError: nothing was loaded or provisioned through this store yet.
            OSError: the write failed; the file on disk is the previous state.
        """
        current = self._current
        if current is None:
            raise RuntimeError("load() or provision() the trust store before save()")
        if state == current:
            return False
        if not state.floors.covers(current.floors):
            raise ValueError(f"refusing to persist floors {state.floors} behind {current.floors}")
        if state.root.version == current.root.version and state.root_envelope != current.root_envelope:
            raise ValueError(f"refusing to replace root v{state.root.version} with a different root of the same version")
        self._write(state)
        self._current = state
        return True

    def clean_stale(self) -> list[str]:
        """Remove temp files a killed write left behind; call at start-up, before any save
        (a temp of a write in flight in another process would be taken too).

        Raises:
            OSError: a temp could not be removed.
        """
        return remove_stale_temps(self.path)

    def _write(self, state: TrustedState) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir.parent)  # the new directory's entry must survive a power cut too
        record: dict[str, Any] = {"format": FORMAT, **state.record()}
        crashpoint("trust.save.begin")
        atomic_write_json(self.path, record, mode=0o644)
        crashpoint("trust.save.done")
