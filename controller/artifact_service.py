"""The chunk server on MQTT: binds ``artifacts.ArtifactServer`` to ``fleet/v1/artifacts/+/req``.

``ArtifactService`` owns exactly one thing: the subscription to the request topic (shared
among controller replicas when a ``share_group`` is given) and the publishing of what
``ArtifactServer.handle`` answers. It does not own the MQTT client (the caller connects
and disconnects it), the blobs (``ArtifactServer``'s ``blob_lookup`` finds them) or any
retry logic: a request whose answer could not be queued is counted and logged, and the
device's ``Transfer`` asks again after its ``chunk_timeout``.

    client = MqttClient(MqttConfig(url=..., client_id="ctl-1"))
    client.connect(timeout=5)
    service = ArtifactService(client, ArtifactServer(DirectoryLookup(blob_dir)), share_group="ctl")
    service.start()      # subscribes now (if connected) and after every reconnect
    ...
    service.stop()

Threads: the handler runs on the client's dispatcher thread, one request at a time, and
queues each answer at QoS 1 there without waiting for its PUBACK (``publish(wait=False)``:
paho re-sends it until acknowledged, and the device re-asks a chunk it did not get anyway).
Waiting made every chunk one broker round trip, serially, on the thread every other
handler shares: 200 devices fetching 1 MB at once queued requests past the devices'
chunk timeout, their retries queued more, and the rollout collapsed. Counters are updated
only on that thread; read them anywhere.

Counters (for tests and the benchmark):

    requests          request messages received (decodable or not)
    answered          answers queued for publishing (bytes or a typed error)
    publish_failures  answers that could not be queued (no session, client closed)
    served_offsets    Counter of (sha256, offset) answered *with bytes*: how often each
                      chunk went out, so a test can assert none was fetched twice beyond retries
    bytes_out         payload bytes of every answer queued (EFC1 header + data)
    subscribe_failures connects after which the subscription could not be made

Undecodable requests are dropped (no trustworthy reply topic); ``server.counters.dropped``
counts them.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Union

from controller.artifacts import ArtifactServer
from edge_runtime.mqtt import Message, MqttClient, MqttError
from edge_runtime.protocol import topics

__all__ = ["ArtifactService", "DirectoryLookup"]

log = logging.getLogger(__name__)

_CHUNK_PREFIX = struct.Struct("<4sI")  # messages.CHUNK_MAGIC's prefix: magic, header length


class DirectoryLookup:
    """A ``BlobLookup`` over one directory of blobs named by their hex sha256:
    ``lookup(sha)`` is ``<dir>/<sha>`` if that file exists, else None."""

    def __init__(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        self.directory = Path(directory)

    def __call__(self, sha256: str) -> Optional[Path]:
        try:
            topics.check_sha256(sha256)
        except ValueError:
            return None  # never a path outside the directory
        path = self.directory / sha256
        return path if path.is_file() else None


class ArtifactService:
    """Answer chunk requests arriving through ``client`` with ``server``. See the module docstring."""

    def __init__(
        self,
        client: MqttClient,
        server: ArtifactServer,
        *,
        share_group: Optional[str] = None,
        publish_timeout: Optional[float] = None,
    ) -> None:
        """``publish_timeout`` bounds the wait for the request subscription's SUBACK
        (default: the client's ``operation_timeout``); answers are never waited for.

        Raises:
            ValueError: a bad ``share_group``.
        """
        self.client = client
        self.server = server
        self.filter = topics.shared(share_group, topics.ARTIFACT_REQUESTS) if share_group else topics.ARTIFACT_REQUESTS
        self.publish_timeout = publish_timeout
        self.requests = 0
        self.answered = 0
        self.publish_failures = 0
        self.subscribe_failures = 0
        self.bytes_out = 0
        self.served_offsets: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._remove: Optional[Callable[[], None]] = None
        self._hooked = False  # the client has no way to remove a connect hook: it checks _remove

    @property
    def running(self) -> bool:
        return self._remove is not None

    def start(self) -> None:
        """Handle requests from now on: subscribe at QoS 1 now if the client is connected,
        and again after every (re)connect. Idempotent.

        Raises:
            MqttError: the client is connected but the subscription failed now (refused,
                timed out); later reconnects still try again.
        """
        with self._lock:
            if self._remove is not None:
                return
            self._remove = self.client.add_handler(self.filter, self._on_request)
            if not self._hooked:
                self.client.add_connect_hook(self._on_connect)
                self._hooked = True
        if self.client.is_connected:
            self._subscribe()

    def stop(self) -> None:
        """Stop answering: remove the handler and unsubscribe if connected. Idempotent."""
        with self._lock:
            remove, self._remove = self._remove, None
        if remove is None:
            return
        remove()
        if self.client.is_connected:
            try:
                self.client.unsubscribe([self.filter])
            except (MqttError, RuntimeError) as exc:
                log.debug("unsubscribe from %s failed: %s", self.filter, exc)

    def _subscribe(self) -> None:
        self.client.subscribe([(self.filter, 1)], timeout=self.publish_timeout)

    def _on_connect(self, _session_present: bool) -> None:
        if self._remove is None:
            return
        try:
            self._subscribe()
        except (MqttError, RuntimeError) as exc:
            self.subscribe_failures += 1
            log.error("artifact service: cannot subscribe to %s after a connect: %s", self.filter, exc)

    def _on_request(self, msg: Message) -> None:
        self.requests += 1
        try:
            answer = self.server.handle(msg.payload, topic=msg.topic)
        except Exception:  # handle() promises not to raise; a bug must not kill the service
            log.exception("artifact server failed on a request from %s", msg.topic)
            return
        if answer is None:
            log.debug("dropped an undecodable chunk request on %s: %s", msg.topic, self.server.last_dropped)
            return
        reply_topic, payload = answer
        try:  # queued, not waited for: paho re-sends it until the PUBACK; the device re-asks anyway
            self.client.publish(reply_topic, payload, qos=1, wait=False)
        except Exception as exc:  # noqa: BLE001 - NotConnected, or closed client: the device retries
            self.publish_failures += 1
            log.warning("artifact service: answer to %s not published: %s", reply_topic, exc)
            return
        self.answered += 1
        self.bytes_out += len(payload)
        served = _served_chunk(payload)
        if served is not None:
            self.served_offsets[served] += 1


def _served_chunk(payload: bytes) -> Optional[tuple[str, int]]:
    """(sha256, offset) of an EFC1 answer carrying bytes; None for an error answer."""
    try:
        _magic, head_len = _CHUNK_PREFIX.unpack_from(payload)
        header = json.loads(payload[_CHUNK_PREFIX.size:_CHUNK_PREFIX.size + head_len])
    except (struct.error, ValueError):
        return None
    if header.get("error") is not None or not header.get("length"):
        return None
    return str(header["sha256"]), int(header["offset"])

