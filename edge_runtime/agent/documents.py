"""The agent's gate for signed documents: verify through the trust object, persist, hand on.

``trust.TrustedState`` decides and ``trust_store.TrustStore`` persists the floors; this
module adds what the *agent* must remember on top: the desired-state document it accepted,
so that a device restarted while its broker is down (or a broker that forgot its retained
messages, as amqtt does on restart) still reconciles towards it. It is the only place the
agent touches the trust state, behind one lock, so a desired state and a command arriving
on two threads never race each other's floor.

Files (under ``DATA_DIR/agent``):

    desired.dsse   the accepted desired state, exactly the signed envelope bytes received,
                   replaced atomically. Written *before* the floor moves: a crash between
                   the two leaves a document above the floor, which is simply accepted again
                   at the next start. The other order could leave the floor above every
                   document the device holds, and a restart offline would have nothing.

At start-up the stored document is verified again: ``ALREADY_CURRENT`` (its generation is
the floor) is the normal case, and expiry is deliberately not checked there -- expiry
guards *accepting* a document, and an offline device keeps running what it accepted. A
stored document below the floor (it cannot normally happen) is dropped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from edge_runtime.durable import atomic_write_bytes, crashpoint, remove_stale_temps
from edge_runtime.protocol.messages import Command, DesiredState
from edge_runtime.protocol.trust import Outcome, Rejection, TrustedState, Verified
from edge_runtime.protocol.trust_store import TrustStore

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.dsse"


@dataclass(frozen=True)
class DesiredOutcome:
    """What a received desired-state document did: ``accepted`` (a new generation to
    reconcile), ``current`` (the generation already held: nothing to do) or ``rejected``
    (``rejection`` says why; nothing changed)."""

    outcome: str
    desired: Optional[DesiredState] = None
    rejection: Optional[Rejection] = None
    digest: Optional[str] = None


@dataclass(frozen=True)
class CommandOutcome:
    """``accepted`` (run it: its seq is now the floor), ``current`` (a re-delivery of the
    last command: do not run it again) or ``rejected``."""

    outcome: str
    command: Optional[Command] = None
    rejection: Optional[Rejection] = None


class DocumentGate:
    """The device's trust state plus the accepted desired state, moved forward together."""

    def __init__(self, data_dir: Path, trust_store: TrustStore, state: TrustedState) -> None:
        self.dir = Path(data_dir) / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DESIRED_FILE
        for name in remove_stale_temps(self.path):
            log.info("removed %s, left by a write a crash interrupted", name)
        self._store = trust_store
        self._state = state
        self._lock = threading.Lock()
        self.desired: Optional[DesiredState] = None

    @property
    def trusted(self) -> TrustedState:
        return self._state

    def load_desired(self, now: datetime) -> Optional[DesiredState]:
        """Re-read the stored desired state (start-up). Never raises for a bad file: it is
        logged and ignored, and the device waits for the broker to send one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s (%s); waiting for the controller's desired state", self.path, exc)
            return None
        result = self.offer_desired(data, now, persist=False)
        if result.outcome == "rejected":
            assert result.rejection is not None
            log.warning("the stored desired state is no longer acceptable (%s: %s); ignoring it",
                        result.rejection.reason.value, result.rejection)
            return None
        return self.desired

    def offer_desired(self, data: bytes, now: datetime, *, persist: bool = True) -> DesiredOutcome:
        """Verify a received desired-state envelope and, if it is new, make it durable.

        Raises:
            OSError: persisting failed; nothing moved (the document will come again).
        """
        with self._lock:
            try:
                verified: Verified[DesiredState] = self._state.verify_desired(data, now, body_model=DesiredState)
            except Rejection as rejection:
                return DesiredOutcome("rejected", rejection=rejection)
            body = verified.body
            if verified.outcome is Outcome.ALREADY_CURRENT:
                if self.desired is not None and self.desired.generation == body.generation:
                    return DesiredOutcome("current", body, digest=verified.digest)
                # The floor is this generation but we hold no document for it (a crash
                # between the floor and the file, or a start-up): adopt it.
                if persist:
                    atomic_write_bytes(self.path, data, mode=0o600)
                self.desired = body
                return DesiredOutcome("accepted", body, digest=verified.digest)
            if persist:
                atomic_write_bytes(self.path, data, mode=0o600)
                crashpoint("agent.desired.saved")
            self._store.save(verified.state)
            crashpoint("agent.desired.floor")
            self._state = verified.state
            self.desired = body
            return DesiredOutcome("accepted", body, digest=verified.digest)

    def offer_command(self, data: bytes, now: datetime) -> CommandOutcome:
        """Verify a command; an accepted one has its seq persisted as the floor *before* it
        runs, so it runs at most once even across a crash.

        Raises:
            OSError: persisting the floor failed; the command must not run.
        """
        with self._lock:
            try:
                verified: Verified[Command] = self._state.verify_command(data, now, body_model=Command)
            except Rejection as rejection:
                return CommandOutcome("rejected", rejection=rejection)
            if verified.outcome is Outcome.ALREADY_CURRENT:
                return CommandOutcome("current", verified.body)
            self._store.save(verified.state)
            crashpoint("agent.command.floor")
            self._state = verified.state
            return CommandOutcome("accepted", verified.body)


__all__ = ["CommandOutcome", "DESIRED_FILE", "DesiredOutcome", "DocumentGate"]
