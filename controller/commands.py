"""One-shot commands to devices: allocate a seq, sign, publish, wait for the reply.

``CommandSender.send`` records the command in the store (the seq only grows per device,
also across replicas), signs it with the command role (valid 5 minutes: a captured command
cannot be replayed later, and the device's seq floor refuses a replay sooner), publishes
it on ``topics.cmd(device)`` at QoS 1, never retained, and waits up to ``wait_s`` for the
reply. The reply is taken in by ``Ingest`` — possibly on another replica — so the waiter
is woken by ``on_reply`` when it lands here and otherwise finds it in the store.

The command keys are loaded at the first command and kept (an encrypted key costs a
key-derivation per load); ``reload()`` takes the ones a rotated ``root.json`` names, at the
moment the controller publishes that root to devices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller import signing
from controller.keys import KeyDir
from controller.store import CommandRecord, Store
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.signed import Target

__all__ = ["CommandSender"]

Publish = Callable[[str, bytes], None]  # (topic, payload) QoS 1, not retained; raises on failure
_POLL_S = 0.25  # how often a waiter looks in the store for a reply another replica took in


class CommandSender:
    """See the module docstring. Thread-safe."""

    def __init__(self, store: Store, keydir: KeyDir, publish: Publish, *, clock: Callable[[], float],
                 passphrase: Optional[str] = None) -> None:
        self.store = store
        self.keydir = keydir
        self.publish = publish
        self.clock = clock
        self.passphrase = passphrase
        self.sent = 0
        self._cond = threading.Condition()
        self._keys_lock = threading.Lock()
        self._keys: Optional[list[Ed25519PrivateKey]] = None

    def send(self, device_id: str, name: str, args: dict[str, Any], *, actor: str, wait_s: float) -> CommandRecord:
        """Send ``name(args)`` to the device; the record as it stands after ``wait_s`` (state
        "sent" when no reply came in time).

        Raises:
            ValueError: args that do not fit the command (checked before a seq is used).
            MqttError: the command could not be published.
        """
        messages.COMMAND_ARGS[name].model_validate(args)  # a bad argument costs no seq
        record = self.store.next_command(device_id, name, args, issued_by=actor, now=self.clock())
        body = signing.complete_body(
            "command", {"target": Target(device=device_id), "seq": record.seq, "name": name, "args": args},
            model=messages.Command,
        )
        envelope = signing.sign_body(body, "command", self._command_keys())
        self.publish(topics.cmd(device_id), envelope.to_json())
        self.sent += 1
        self.store.audit(actor, f"cmd.{name}", f"device:{device_id}", {"seq": record.seq, "args": args},
                         now=self.clock())
        return self.wait(device_id, record.seq, wait_s)

    def reload(self) -> None:
        """Load the command keys ``root.json`` names now; on an error the old ones stay.

        Raises:
            NotEnoughKeys, PassphraseError, KeyDirMissing, KeyDirCorrupt: from the key directory.
        """
        keys = self.keydir.signing_keys("command", passphrase=self.passphrase)
        with self._keys_lock:
            self._keys = keys

    def _command_keys(self) -> list[Ed25519PrivateKey]:
        with self._keys_lock:
            if self._keys is None:
                self._keys = self.keydir.signing_keys("command", passphrase=self.passphrase)
            return self._keys

    def wait(self, device_id: str, seq: int, wait_s: float) -> CommandRecord:
        deadline = self.clock() + wait_s
        while True:
            record = self.store.get_command(device_id, seq)
            remaining = deadline - self.clock()
            if record.reply is not None or remaining <= 0:
                return record
            with self._cond:
                self._cond.wait(min(remaining, _POLL_S))

    def on_reply(self) -> None:
        """A reply was taken in: wake the waiters (each re-reads its own command)."""
        with self._cond:
            self._cond.notify_all()
