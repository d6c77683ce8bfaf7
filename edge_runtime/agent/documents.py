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

Roots of trust (``offer_root``) arrive on ``fleet/v1/trust/root/{version}``, retained, in
whatever order the broker sends them. The gate holds root N; for each root it is sent:

    claimed version <= N    ignored (a re-delivery of the chain it walked): no event
    N + 1                   ``update_root``; accepted -> persisted (``TrustStore.save``)
                            before the gate moves, then any held N + 2, N + 3, ... in turn;
                            refused -> the rejection, nothing changes
    > N + 1                 held in memory (at most ``MAX_PENDING_ROOTS`` versions ahead,
                            the newest delivery per version) until the missing one arrives

The claimed version is read from the payload *before* any signature is checked, only to
decide where to hold it; ``update_root`` verifies everything when its turn comes. The held
roots are not persisted: they are retained on the broker and come again on the next
connect. A desired state refused before a rotation (signed by keys the old root does not
name) is kept, and ``retry_refused_desired`` offers it again once the root has moved.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from edge_runtime.durable import atomic_write_bytes, crashpoint, remove_stale_temps
from edge_runtime.protocol.dsse import Envelope, EnvelopeError
from edge_runtime.protocol.messages import LIMITS, Command, DesiredState
from edge_runtime.protocol.trust import Outcome, Reason, Rejection, TrustedState, Verified
from edge_runtime.protocol.trust_store import TrustStore

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.dsse"
MAX_PENDING_ROOTS = 32  # versions ahead of the trusted one held while a gap is filled
MAX_ROOT_BYTES = LIMITS["root"]
# Refusals a newer root can turn into an acceptance: keys it adds, a threshold it lowers,
# an expired root it replaces. The others (rollback, wrong_device, malformed, ...) stay.
_ROOT_MAY_FIX = frozenset({Reason.UNKNOWN_KEY, Reason.THRESHOLD, Reason.EXPIRED})


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


@dataclass(frozen=True)
class RootOutcome:
    """What one received root did. ``rotated``: the versions applied, in order (the gate
    went from ``from_version`` through each); ``rejections``: roots refused on the way (the
    offered one, or a held one whose turn came); ``waiting``: versions held for a gap;
    ``ignored``: the offered root was at or below the trusted version."""

    from_version: int
    rotated: tuple[int, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    waiting: tuple[int, ...] = ()
    ignored: bool = False


def claimed_root_version(data: bytes) -> Optional[int]:
    """The ``version`` a root envelope's payload claims, unverified; None when the bytes
    are not an envelope with such a payload (``update_root`` then says why)."""
    import json

    try:
        payload = json.loads(Envelope.from_json(bytes(data), max_bytes=MAX_ROOT_BYTES).payload)
    except (EnvelopeError, ValueError, TypeError, RecursionError):
        return None
    version = payload.get("version") if isinstance(payload, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else None


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
        self._pending_roots: dict[int, bytes] = {}  # version -> envelope bytes, above N + 1
        self._refused_desired: Optional[bytes] = None  # the last desired document refused
        self._desired_root: Optional[int] = None  # the root version the stored file last verified under

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
                if persist and rejection.reason in _ROOT_MAY_FIX:
                    self._refused_desired = bytes(data)
                return DesiredOutcome("rejected", rejection=rejection)
            if persist:
                self._refused_desired = None
            body = verified.body
            root_version = self._state.root.version
            if verified.outcome is Outcome.ALREADY_CURRENT:
                if self.desired is not None and self.desired.generation == body.generation:
                    if persist and self._desired_root is not None and self._desired_root < root_version:
                        # The same generation re-signed after a rotation: keep *these* bytes, so
                        # the file verifies under the root the device now holds at its next start.
                        atomic_write_bytes(self.path, data, mode=0o600)
                        self._desired_root = root_version
                    return DesiredOutcome("current", body, digest=verified.digest)
                # The floor is this generation but we hold no document for it (a crash
                # between the floor and the file, or a start-up): adopt it.
                if persist:
                    atomic_write_bytes(self.path, data, mode=0o600)
                self.desired = body
                self._desired_root = root_version
                return DesiredOutcome("accepted", body, digest=verified.digest)
            if persist:
                atomic_write_bytes(self.path, data, mode=0o600)
                crashpoint("agent.desired.saved")
            self._store.save(verified.state)
            crashpoint("agent.desired.floor")
            self._state = verified.state
            self.desired = body
            self._desired_root = root_version
            return DesiredOutcome("accepted", body, digest=verified.digest)

    def retry_refused_desired(self, now: datetime) -> Optional[DesiredOutcome]:
        """Offer again the last desired document that was refused (after a rotation: it may
        be signed by keys only the new root names); None when there is none.

        Raises:
            OSError: as ``offer_desired``.
        """
        with self._lock:
            data = self._refused_desired
        if data is None:
            return None
        return self.offer_desired(data, now)

    def offer_root(self, data: bytes, *, topic_version: Optional[int] = None) -> RootOutcome:
        """Take a root of trust received from the controller (see the module docstring).

        ``topic_version`` is the version its topic names; a payload that claims another is
        refused as ``malformed`` (a publisher bug: the chain would be filed wrongly).

        Raises:
            OSError: persisting a verified root failed; the gate still holds the root it had
                (the root comes again with the next connect).
        """
        with self._lock:
            current = self._state.root.version
            claimed = claimed_root_version(data)
            if claimed is not None and topic_version is not None and claimed != topic_version:
                rejection = Rejection(Reason.MALFORMED, f"a root claiming v{claimed} on the topic of v{topic_version}",
                                      kind="root")
                return RootOutcome(current, rejections=(rejection,))
            if claimed is not None and claimed <= current:
                return RootOutcome(current, ignored=True)
            if claimed is not None and claimed > current + 1:
                if claimed > current + MAX_PENDING_ROOTS:
                    log.warning("root v%d is more than %d versions ahead of v%d; dropped (it comes again on the "
                                "next connect)", claimed, MAX_PENDING_ROOTS, current)
                else:
                    self._pending_roots[claimed] = bytes(data)
                return RootOutcome(current, waiting=tuple(sorted(self._pending_roots)))
            # N + 1, or bytes whose version cannot be read: update_root decides (and says why).
            rotated: list[int] = []
            rejections: list[Rejection] = []
            candidate: Optional[bytes] = bytes(data)
            while candidate is not None:
                try:
                    verified = self._state.update_root(candidate, max_bytes=MAX_ROOT_BYTES)
                except Rejection as rejection:
                    rejections.append(rejection)
                    break
                if verified.outcome is not Outcome.ACCEPTED:  # pragma: no cover - claimed was N + 1
                    break
                self._store.save(verified.state)  # durable before the gate moves (or raises: nothing moved)
                crashpoint("agent.root.saved")
                self._state = verified.state
                rotated.append(verified.body.version)
                version = verified.body.version
                for stale in [v for v in self._pending_roots if v <= version]:
                    del self._pending_roots[stale]
                candidate = self._pending_roots.pop(version + 1, None)
            if rotated:
                self._recheck_held_desired()
            return RootOutcome(current, tuple(rotated), tuple(rejections), tuple(sorted(self._pending_roots)))

    def _recheck_held_desired(self) -> None:
        """After a rotation: does the stored desired state still verify under the new root?
        If its signing keys left the deploy role it stays in force (it was accepted, and the
        device never drops what it runs) but would be refused at the next start; the
        controller re-signs it after a rotation, and ``offer_desired`` then stores the new
        bytes. Called with the lock held."""
        if self.desired is None:
            return
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        try:
            self._state.verify_desired(data, self._state.floors.highest_time_seen, body_model=DesiredState)
        except Rejection as rejection:
            log.info("the desired state held (generation %d) does not verify under root v%d (%s); it stays in force "
                     "until the controller sends it signed by the new keys", self.desired.generation,
                     self._state.root.version, rejection.reason.value)
            return
        self._desired_root = self._state.root.version

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


__all__ = ["CommandOutcome", "DESIRED_FILE", "DesiredOutcome", "DocumentGate", "MAX_PENDING_ROOTS", "RootOutcome",
           "claimed_root_version"]
