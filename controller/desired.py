"""Desired state: from the store's assignments to signed, retained documents on the wire.

``DesiredPublisher`` owns one job: for a device, build its ``messages.DesiredState`` from
``assignments`` + ``releases`` at the device's current generation, sign it with the deploy
role (``signing.sign_desired``), remember the envelope in the store and publish it
retained on ``topics.desired(device)``. It re-signs a document before it expires (a
device refuses an expired one, and a device that reconnects after a week must still find
a valid one), and re-publishes everything after a (re)connect because brokers forget
retained messages (DESIGN.md, "Brokers forget"). A device treats a document with the
generation it already holds as benign, so publishing again is always safe.

After ``fleetctl keys rotate`` the controller calls ``reload()``: the deploy keys of the new
``root.json`` replace the cached ones (between two documents, under the lock). A stored
document is only "fresh" while it carries a signature by every deploy key in use, so the
next publish of each -- ``republish_all`` right after the new root itself went out on
``fleet/v1/trust/root/{version}``, or the minute sweep if that publish failed -- re-signs
it with the new keys. (A replica still holding the old keys would sign it back: update the
key directory of every replica.)

Signing and publishing happen outside store transactions; ``record_signed`` ignores a
document for a generation that has since moved on, so two replicas racing cannot leave
an old generation as "the" signed document.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller import signing
from controller.keys import KeyDir
from controller.store import DesiredRecord, NotFound, Store
from edge_runtime.protocol import dsse, messages, topics
from edge_runtime.protocol.dsse import Envelope
from edge_runtime.protocol.signed import Target

__all__ = ["DesiredPublisher", "build_desired"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]  # (topic, payload): retained, QoS 1; raises on failure


def build_desired(store: Store, device_id: str, generation: int, *, issued_at: datetime,
                  valid_for: timedelta) -> messages.DesiredState:
    """The desired state of ``device_id`` at ``generation`` from its assignments.

    Raises:
        NotFound: an assignment names a release that does not exist (a bug upstream: a
            release is never deleted while assigned).
    """
    models: dict[str, messages.ModelSpec] = {}
    for a in store.assignments(device_id):
        release = store.get_release(a.model, a.version)
        manifest = messages.ModelManifest.model_validate(release.manifest)
        models[a.model] = messages.ModelSpec(version=a.version, manifest=manifest, route=a.route, install=a.install)
    return messages.DesiredState(
        target=Target(device=device_id), generation=generation, models=models,
        issued_at=issued_at, expires=issued_at + valid_for,
    )


class DesiredPublisher:
    """Sign and publish devices' desired state. Thread-safe; see the module docstring."""

    def __init__(self, store: Store, keydir: KeyDir, publish: Publish, *, clock: Callable[[], float],
                 valid_for: timedelta = signing.VALIDITY["desired"], passphrase: Optional[str] = None) -> None:
        self.store = store
        self.keydir = keydir
        self.publish_fn = publish
        self.clock = clock
        self.valid_for = valid_for
        self.passphrase = passphrase
        self.signed = 0
        self.published = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._keys: Optional[list[Ed25519PrivateKey]] = None  # deploy keys: loaded once, then by reload()
        self._kids: Optional[frozenset[str]] = None  # their keyids

    def publish(self, device_id: str, *, resign: bool = False) -> Optional[int]:
        """Publish the device's current desired document, signing a new one when the stored
        one is for an older generation, missing, expiring within half its validity, or
        ``resign``. Returns the generation published, None when the device has none
        (never assigned anything) or publishing failed (logged, counted; the next sweep or
        reconnect tries again)."""
        record = self.store.get_desired(device_id)
        if record is None:
            return None
        try:
            envelope = self._current(record, resign=resign)
            self.publish_fn(topics.desired(device_id), envelope)
        except NotFound as exc:
            self.failures += 1
            log.error("desired state of %s cannot be built: %s", device_id, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - MQTT errors: the next sweep retries
            self.failures += 1
            log.warning("desired state of %s (generation %d) not published: %s", device_id, record.generation, exc)
            return None
        self.published += 1
        return record.generation

    def publish_many(self, device_ids: Iterable[str], *, resign: bool = False) -> int:
        """Publish each; returns how many went out."""
        return sum(1 for d in device_ids if self.publish(d, resign=resign) is not None)

    def republish_all(self, *, resign: bool = False) -> int:
        """Every device's document (after a connect: the broker may have forgotten them;
        ``resign`` after the deploy keys changed)."""
        return self.publish_many((r.device_id for r in self.store.list_desired()), resign=resign)

    def reload(self) -> bool:
        """Load the deploy keys ``root.json`` names now; True when they differ from the ones
        in use (each document is re-signed at its next publish). On an error the old keys
        stay in use.

        Raises:
            NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt: from the key directory.
        """
        keys = self.keydir.signing_keys("deploy", passphrase=self.passphrase)
        kids = frozenset(_keyids(keys))
        with self._lock:
            old = self._kids
            self._keys, self._kids = keys, kids
        return old != kids

    def refresh_expiring(self) -> int:
        """Re-sign and publish documents past half their validity; returns how many."""
        now = self.clock()
        return self.publish_many(r.device_id for r in self.store.list_desired() if not self._fresh(r, now))

    # -- inside ---------------------------------------------------------------------------

    def _current(self, record: DesiredRecord, *, resign: bool) -> bytes:
        now = self.clock()
        if not resign and self._fresh(record, now):
            return record.envelope.encode()  # type: ignore[union-attr]
        issued = datetime.fromtimestamp(int(now), timezone.utc)
        body = build_desired(self.store, record.device_id, record.generation, issued_at=issued, valid_for=self.valid_for)
        envelope: Envelope = signing.sign_body(body, "desired", self._deploy_keys())
        payload = envelope.to_json()
        self.signed += 1
        self.store.record_signed(record.device_id, record.generation, payload.decode(), signed_at=now,
                                 expires_at=body.expires.timestamp())
        return payload

    def _fresh(self, record: DesiredRecord, now: float) -> bool:
        """The stored document is for the current generation, within the first half of its
        validity, and signed by the deploy keys in use."""
        return (record.envelope is not None and record.signed_generation == record.generation
                and record.expires_at is not None
                and record.expires_at - now >= self.valid_for.total_seconds() / 2
                and self._signed_by_current_keys(record.envelope))

    def _signed_by_current_keys(self, envelope: str) -> bool:
        current = self._current_keyids()
        try:
            signed = {sig["keyid"] for sig in json.loads(envelope)["signatures"]}
        except (ValueError, KeyError, TypeError):
            return False  # not an envelope we can read: sign a new one
        return current <= signed

    def _deploy_keys(self) -> list[Ed25519PrivateKey]:
        with self._lock:
            if self._keys is None:
                self._keys = self.keydir.signing_keys("deploy", passphrase=self.passphrase)
                self._kids = frozenset(_keyids(self._keys))
            return self._keys

    def _current_keyids(self) -> frozenset[str]:
        self._deploy_keys()
        with self._lock:
            assert self._kids is not None
            return self._kids


def _keyids(keys: Iterable[Ed25519PrivateKey]) -> set[str]:
    return {dsse.keyid(k.public_key()) for k in keys}
