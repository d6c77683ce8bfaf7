"""controller.artifact_service on real brokers: a device-side ``Transfer`` fetches a real
artifact through the service; junk on the request topic is dropped and the service keeps
answering. Every wait is a deadline poll. One case runs the service against a recording
client instead: answers are queued (``publish(wait=False)``), never waited for."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.artifact_service import ArtifactService, DirectoryLookup
from controller.artifacts import ArtifactServer
from edge_runtime.agent.transfer import PublishingChunkSource, Transfer, TransferError
from edge_runtime.mqtt import Message, MqttClient, MqttConfig, NotConnected
from edge_runtime.protocol import messages, topics
from tests.helpers import wait_until

DEVICE = "dev-art-1"
CHUNK = 64 * 1024


@pytest.fixture
def blobs(tmp_path: Path) -> tuple[Path, bytes, str]:
    d = tmp_path / "blobs"
    d.mkdir()
    data = os.urandom(300 * 1024 + 123)  # 5 chunks, the last one short
    sha = hashlib.sha256(data).hexdigest()
    (d / sha).write_bytes(data)
    return d, data, sha


@pytest.fixture
def clients(broker) -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []

    def make(client_id: str) -> MqttClient:
        c = MqttClient(MqttConfig(url=broker.url, client_id=client_id, keepalive=5,
                                  reconnect_min_delay=0.05, reconnect_max_delay=0.3))
        made.append(c)
        c.connect(timeout=5)
        return c

    yield [make("ctl-art"), make(DEVICE)]
    for c in made:
        c.disconnect(timeout=5)


def fetch(device: MqttClient, tmp_path: Path, sha: str, size: int, name: str = "a") -> Transfer:
    """Run one real transfer through the broker to the end (done or failed)."""
    source = PublishingChunkSource(DEVICE, lambda t, p: device.publish(t, p, qos=1, timeout=5))
    transfer = Transfer(tmp_path / f"{name}.part", sha, size, source=source, chunk_size=CHUNK, window=4,
                        chunk_timeout=2.0, retries=3)
    remove = device.add_handler(topics.chunk_inbox(DEVICE, sha), lambda m: transfer.on_payload(m.payload))
    try:
        device.subscribe([(topics.chunk_inbox(DEVICE, sha), 1)], timeout=5)
        transfer.start()

        def finished() -> bool:
            transfer.pump()
            return transfer.finished.is_set()

        wait_until(finished, timeout=30, what=f"transfer of {sha[:12]}")
    finally:
        remove()
    return transfer


def test_a_device_transfer_gets_the_right_bytes(broker, clients, blobs, tmp_path):
    ctl, device = clients
    blob_dir, data, sha = blobs
    service = ArtifactService(ctl, ArtifactServer(DirectoryLookup(blob_dir)))
    service.start()
    try:
        transfer = fetch(device, tmp_path, sha, len(data))
        assert transfer.wait(0) == tmp_path / "a.part"
        assert (tmp_path / "a.part").read_bytes() == data
        n_chunks = -(-len(data) // CHUNK)
        assert set(service.served_offsets) == {(sha, i * CHUNK) for i in range(n_chunks)}
        # each chunk went out once per request the device made for it (none beyond its retries)
        assert sum(service.served_offsets.values()) == transfer.counters.requested
        assert max(service.served_offsets.values()) <= 1 + transfer.retries
        assert service.answered == service.requests == transfer.counters.requested
        assert service.publish_failures == 0
        assert service.bytes_out > len(data)  # data plus one EFC1 header per chunk
        assert service.bytes_out - len(data) < 300 * n_chunks * max(service.served_offsets.values())
    finally:
        service.stop()


def test_malformed_requests_are_dropped_and_the_service_keeps_serving(broker, clients, blobs, tmp_path):
    ctl, device = clients
    blob_dir, data, sha = blobs
    server = ArtifactServer(DirectoryLookup(blob_dir))
    service = ArtifactService(ctl, server)
    service.start()
    try:
        req_topic = topics.artifact_request(sha)
        good = messages.ChunkRequest(request_id="r1", sha256=sha, offset=0, length=10,
                                     reply_to=topics.chunk_inbox(DEVICE, sha))
        bad_reply = messages.encode(good).replace(DEVICE.encode(), b"someone-else").replace(b"/inbox/chunk/", b"/x/")
        for junk in (b"", b"not json", b"{}", b"\xff" * 3000, bad_reply):
            device.publish(req_topic, junk, qos=1, timeout=5)
        wait_until(lambda: server.counters.dropped == 5, timeout=10, what="5 dropped requests")
        assert service.requests == 5 and service.answered == 0 and not service.served_offsets

        # an artifact the server does not hold: a typed error answer, no bytes counted
        missing = hashlib.sha256(b"nothing").hexdigest()
        with pytest.raises(TransferError) as err:
            fetch(device, tmp_path, missing, 1000, name="missing").wait(0)
        assert err.value.reason == "artifact_not_found"
        assert not service.served_offsets

        transfer = fetch(device, tmp_path, sha, len(data))
        assert (tmp_path / "a.part").read_bytes() == data
        assert transfer.done
        assert service.publish_failures == 0
    finally:
        service.stop()


def test_stop_removes_the_handler_and_start_resubscribes_after_a_broker_restart(broker, clients, blobs, tmp_path):
    ctl, device = clients
    blob_dir, data, sha = blobs
    service = ArtifactService(ctl, ArtifactServer(DirectoryLookup(blob_dir)))
    service.start()
    service.start()  # idempotent: still one handler
    broker.restart()  # the broker forgets every subscription; the connect hook re-subscribes
    wait_until(lambda: ctl.connects >= 2 and device.connects >= 2, timeout=20, what="both clients back")
    transfer = fetch(device, tmp_path, sha, len(data))
    assert transfer.done and (tmp_path / "a.part").read_bytes() == data
    assert service.answered == transfer.counters.requested  # one handler: one answer per request
    service.stop()
    service.stop()
    before = service.requests
    seen = ctl.queue(topics.ARTIFACT_REQUESTS)  # a plain observer on the same client
    ctl.subscribe([(topics.ARTIFACT_REQUESTS, 1)], timeout=5)
    device.publish(topics.artifact_request(sha), b"junk", qos=1, timeout=5)
    assert seen.get(timeout=5).payload == b"junk"  # delivered to the client, not to the stopped service
    assert service.requests == before


class RecordingClient:
    """The slice of ``MqttClient`` the service uses; records every publish, or refuses it
    with ``NotConnected`` while ``down``."""

    is_connected = True

    def __init__(self) -> None:
        self.handlers: list = []
        self.published: list[tuple[str, bytes, dict]] = []
        self.down = False

    def add_handler(self, topic_filter, handler):
        self.handlers.append(handler)
        return lambda: self.handlers.remove(handler)

    def add_connect_hook(self, hook) -> None:
        pass

    def subscribe(self, filters, *, timeout=None):
        return [q for _, q in filters]

    def unsubscribe(self, filters) -> None:
        pass

    def publish(self, topic, payload=b"", **kw) -> None:
        if self.down:
            raise NotConnected("down")
        self.published.append((topic, payload, kw))


def test_answers_are_queued_at_qos1_without_waiting_and_counted_as_queued(blobs):
    blob_dir, data, sha = blobs
    client = RecordingClient()
    service = ArtifactService(client, ArtifactServer(DirectoryLookup(blob_dir)))  # type: ignore[arg-type]
    service.start()
    req_topic, inbox = topics.artifact_request(sha), topics.chunk_inbox(DEVICE, sha)

    def ask(rid: str, offset: int) -> None:
        req = messages.ChunkRequest(request_id=rid, sha256=sha, offset=offset, length=CHUNK, reply_to=inbox)
        client.handlers[0](Message(topic=req_topic, payload=messages.encode(req), qos=1, retain=False))

    ask("r1", 0)
    ask("r2", CHUNK)
    assert [(t, kw) for t, _, kw in client.published] == [(inbox, {"qos": 1, "wait": False})] * 2
    got = messages.decode("chunk", client.published[1][1])
    assert (got.request_id, got.offset, got.data) == ("r2", CHUNK, data[CHUNK:2 * CHUNK])
    assert service.requests == service.answered == 2 and service.publish_failures == 0
    assert service.served_offsets == {(sha, 0): 1, (sha, CHUNK): 1}
    assert service.bytes_out == sum(len(p) for _, p, _ in client.published)

    client.down = True  # no session: not queued, counted as a failure, nothing served
    ask("r3", 2 * CHUNK)
    assert service.requests == 3 and service.answered == 2 and service.publish_failures == 1
    assert (sha, 2 * CHUNK) not in service.served_offsets
    service.stop()
    assert not client.handlers
