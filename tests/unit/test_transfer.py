"""Chunked artifact transfer (agent/transfer.py) against the real chunk server
(controller/artifacts.py) over an in-memory queue that records every request.

No broker, no threads, no sleeps: a fake clock drives timeouts; the peer delivers what
the server answers when the test says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.artifacts import ArtifactServer
from edge_runtime.agent.transfer import (
    ChunkSource,
    Progress,
    PublishingChunkSource,
    SourceUnavailable,
    Transfer,
    TransferError,
    bitmap_path,
)
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ChunkRequest, ChunkResponse

DEVICE = "dev-1"
KiB = 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Peer:
    """The network between a Transfer and the real ArtifactServer: requests published by
    ``PublishingChunkSource`` queue here (every one recorded); ``serve`` hands each to the
    server and delivers the answer ``policy`` says how many times (0 = dropped)."""

    def __init__(self, server: ArtifactServer, device: str = DEVICE) -> None:
        self.server = server
        self.device = device
        self.queue: deque[tuple[str, bytes]] = deque()
        self.log: list[tuple[int, int]] = []  # (offset, length) of every request sent
        self.max_queued = 0
        self.down = False
        self.source = PublishingChunkSource(device, self._publish)

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        req = messages.decode("chunk_request", payload)
        assert topic == topics.artifact_request(req.sha256)
        self.log.append((req.offset, req.length))
        self.queue.append((topic, payload))
        self.max_queued = max(self.max_queued, len(self.queue))

    def serve(self, transfer: Transfer, policy: Callable[[ChunkRequest, int], int] = lambda req, n: 1,
              rng: Optional[random.Random] = None) -> None:
        batch = list(self.queue)
        self.queue.clear()
        if rng is not None:
            rng.shuffle(batch)
        for topic, payload in batch:
            req = messages.decode("chunk_request", payload)
            times = policy(req, self.requests_per_offset()[req.offset])
            answer = self.server.handle(payload, topic=topic)
            assert answer is not None
            reply_topic, response = answer
            assert reply_topic == topics.chunk_inbox(self.device, req.sha256)
            for _ in range(times):
                transfer.on_payload(response)

    def requests_per_offset(self) -> Counter[int]:
        return Counter(offset for offset, _ in self.log)


def artifact(tmp_path: Path, size: int, seed: int = 0) -> tuple[bytes, str, Path]:
    data = random.Random(seed).randbytes(size)
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return data, sha, blob


def server_for(*blobs: Path, max_chunk: int = messages.MAX_CHUNK_BYTES) -> ArtifactServer:
    by_sha = {b.name: b for b in blobs}
    return ArtifactServer(by_sha.get, max_chunk=max_chunk)


def drive(t: Transfer, peer: Peer, clock: FakeClock, *, policy: Callable[[ChunkRequest, int], int] = lambda r, n: 1,
          rng: Optional[random.Random] = None, step: float = 1.0, max_rounds: int = 100_000,
          between: Optional[Callable[[], None]] = None) -> None:
    """Start (unless started) and run rounds of serve -> tick -> pump until finished."""
    if t.state.value == "new":
        t.start()
    for _ in range(max_rounds):
        if t.finished.is_set():
            return
        assert len(t._inflight) <= t.window
        peer.serve(t, policy, rng)
        if between is not None:
            between()
        clock.advance(step)
        t.pump()
    raise AssertionError("transfer did not finish")


def make(tmp_path: Path, sha: str, size: int, peer: Peer, clock: FakeClock, *, resume: bool = False,
         **kw: object) -> Transfer:
    opts: dict[str, object] = dict(source=peer.source, chunk_size=64 * KiB, window=8, chunk_timeout=5.0,
                                   retries=3, clock=clock)
    opts.update(kw)
    factory = Transfer.resume if resume else Transfer
    return factory(tmp_path / "tmp" / "tok.part", sha, size, **opts)  # type: ignore[arg-type]


# -- the happy path -----------------------------------------------------------------------


def test_five_megabytes_transfer_and_verify(tmp_path: Path) -> None:
    size = 5 * 1024 * KiB + 123  # not a multiple of the chunk size
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    progress: list[Progress] = []
    t = make(tmp_path, sha, size, peer, clock, on_progress=progress.append)
    drive(t, peer, clock)

    assert t.wait(0) == t.part_path
    assert t.part_path.read_bytes() == data
    n = t.n_chunks
    assert n == 81
    assert peer.requests_per_offset() == Counter({i * 64 * KiB: 1 for i in range(n)})  # each chunk once
    assert peer.log[-1] == ((n - 1) * 64 * KiB, 123)
    c = t.counters
    assert (c.requested, c.received, c.duplicates, c.retried, c.bytes_received) == (n, n, 0, 0, size)
    assert peer.max_queued <= t.window == 8
    assert peer.server.counters.bytes_served == size
    # progress: from 0, rising, roughly every 5%, ending complete
    done = [p.bytes_done for p in progress]
    assert done[0] == 0 and done == sorted(done) and progress[-1].state == "done" and progress[-1].fraction == 1.0
    assert 15 <= len(progress) <= 25
    # the bitmap says everything is in
    doc = json.loads(bitmap_path(t.part_path).read_bytes())
    assert doc["format"] == 1 and doc["sha256"] == sha and doc["size"] == size
    assert base64.b64decode(doc["have"]) == bytes([0xFF] * 10 + [0x01])


def test_window_bounds_requests_in_flight(tmp_path: Path) -> None:
    size = 40 * 1024
    _, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=3)
    t.start()
    assert len(peer.log) == 3  # the first window, no more
    t.pump()
    assert len(peer.log) == 3  # nothing answered: still nothing more
    drive(t, peer, clock)
    assert peer.max_queued == 3
    assert t.done and len(peer.log) == 40


def test_empty_artifact(tmp_path: Path) -> None:
    _, sha, blob = artifact(tmp_path, 0)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, 0, peer, clock)
    t.start()
    assert t.done and peer.log == [] and t.part_path.read_bytes() == b""


# -- loss, duplicates, reordering ---------------------------------------------------------


def test_dropped_chunks_are_retried_after_the_timeout(tmp_path: Path) -> None:
    size = 20 * 1024
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=4, chunk_timeout=5.0, retries=3)
    dropped = {0, 5 * 1024, 13 * 1024}
    policy = lambda req, n: 0 if req.offset in dropped and n == 1 else 1  # noqa: E731 - first try of those lost

    t.start()
    peer.serve(t, policy)
    clock.advance(4.9)
    t.pump()
    assert 0 not in [o for o, _ in peer.log[4:]]  # not yet timed out: not asked again
    drive(t, peer, clock, policy=policy)

    assert t.part_path.read_bytes() == data
    per = peer.requests_per_offset()
    assert {o for o, k in per.items() if k > 1} == dropped and max(per.values()) == 2
    assert t.counters.retried == t.counters.timeouts == 3
    assert t.counters.requested == 20 + 3 and t.counters.received == 20


def test_chunk_unanswered_past_its_retries_fails_with_transfer_timeout(tmp_path: Path) -> None:
    size = 4 * 1024
    _, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=2, retries=2)
    drive(t, peer, clock, policy=lambda req, n: 0 if req.offset == 2048 else 1)
    with pytest.raises(TransferError) as info:
        t.wait(0)
    assert info.value.reason == "transfer_timeout" and info.value.retryable
    assert peer.requests_per_offset()[2048] == 3  # 1 + retries
    # what arrived is kept for a later resume
    assert t.part_path.exists() and bitmap_path(t.part_path).exists()


def test_duplicates_and_reordering_are_harmless(tmp_path: Path) -> None:
    size = 50 * 1024 + 7
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=6)
    drive(t, peer, clock, policy=lambda req, n: 2, rng=random.Random(1))
    assert t.part_path.read_bytes() == data
    n = t.n_chunks
    assert t.counters.received == n and t.counters.bytes_received == size
    assert t.counters.duplicates == n - 1  # the last chunk's twin arrives after completion: ignored
    assert t.counters.requested == n and max(peer.requests_per_offset().values()) == 1


def test_link_down_charges_no_retries_and_resumes_on_reconnect(tmp_path: Path) -> None:
    size = 16 * 1024
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=4, retries=0)
    t.start()
    peer.serve(t)  # 4 chunks in
    t.pump()  # 4 more asked
    peer.queue.clear()  # ... and lost with the connection
    peer.down = True
    t.suspend()
    for _ in range(10):  # a long outage: pumps send nothing and charge nothing
        clock.advance(60)
        t.pump()
    assert len(peer.log) == 8 and t.state.value == "running"
    peer.down = False
    drive(t, peer, clock)
    assert t.done and t.part_path.read_bytes() == data
    assert t.counters.retried == 4 and t.counters.timeouts == 0


def test_source_base_wraps_foreign_errors_and_checks_ranges() -> None:
    class Broken(ChunkSource):
        def _send(self, sha256: str, offset: int, length: int) -> None:
            raise OSError("socket closed")

    sha = "ab" * 32
    with pytest.raises(SourceUnavailable) as info:
        Broken().request(sha, 0, 10)
    assert info.value.reason == "transfer_failed" and isinstance(info.value.__cause__, OSError)
    for bad in [("AB" * 32, 0, 1), (sha, -1, 1), (sha, 0, 0), (sha, 0, messages.MAX_CHUNK_BYTES + 1)]:
        with pytest.raises(ValueError):
            Broken().request(*bad)


# -- trust: the signed size and sha256 ----------------------------------------------------


def _running(tmp_path: Path, size: int = 8 * 1024) -> tuple[Transfer, Peer, str]:
    _, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=2)
    t.start()
    peer.serve(t)
    assert t.counters.received == 2
    return t, peer, sha


@pytest.mark.parametrize(
    "name, response",
    [
        ("past_the_end", lambda sha: ChunkResponse(request_id="x", sha256=sha, offset=8 * 1024, length=1, data=b"z")),
        ("unaligned_past_the_end", lambda sha: ChunkResponse(request_id="x", sha256=sha, offset=8 * 1024 + 5,
                                                             length=3, data=b"zzz")),
        ("straddles_the_end", lambda sha: ChunkResponse(request_id="x", sha256=sha, offset=7 * 1024, length=2048,
                                                        data=b"z" * 2048)),
        ("longer_than_asked", lambda sha: ChunkResponse(request_id="x", sha256=sha, offset=2048, length=1500,
                                                        data=b"z" * 1500)),
        ("server_claims_more", lambda sha: ChunkResponse(request_id="x", sha256=sha, offset=2048, length=1024,
                                                         size=1 << 30, data=b"z" * 1024)),
    ],
)
def test_too_large_stops_the_transfer_at_once(tmp_path: Path, name: str, response: Callable[[str], ChunkResponse]) -> None:
    t, peer, sha = _running(tmp_path)
    asked = len(peer.log)
    t.on_payload(messages.encode(response(sha)))
    assert t.finished.is_set() and t.error is not None and t.error.reason == "too_large", name
    assert not t.error.retryable
    t.pump()
    peer.serve(t)  # answers still in flight change nothing
    assert len(peer.log) == asked and t.state.value == "failed"
    assert os.path.getsize(t.part_path) <= 8 * 1024 and t.counters.bytes_received == 2048


def test_shorter_chunk_is_malformed(tmp_path: Path) -> None:
    t, _, sha = _running(tmp_path)
    t.on_chunk(ChunkResponse(request_id="x", sha256=sha, offset=2048, length=10, data=b"z" * 10))
    assert t.error is not None and t.error.reason == "malformed"


def test_wrong_sha_unaligned_offsets_and_junk_are_ignored(tmp_path: Path) -> None:
    t, _, sha = _running(tmp_path)
    t.on_chunk(ChunkResponse(request_id="x", sha256="0" * 64, offset=2048, length=4, data=b"abcd"))
    t.on_chunk(ChunkResponse(request_id="x", sha256=sha, offset=2049, length=4, data=b"abcd"))
    t.on_payload(b"EFC1 not a chunk")
    t.on_payload(b"")
    t.on_chunk(ChunkResponse(request_id="x", sha256=sha, offset=8 * 1024, length=0))  # empty, at the end
    assert t.counters.ignored == 5 and t.error is None and t.state.value == "running"


def test_wrong_bytes_fail_with_hash_mismatch_and_remove_the_part(tmp_path: Path) -> None:
    size = 10 * 1024
    _, sha, _ = artifact(tmp_path, size, seed=1)
    evil = tmp_path / "evil"
    evil.write_bytes(random.Random(2).randbytes(size))  # right size, wrong bytes
    peer, clock = Peer(ArtifactServer(lambda s: evil if s == sha else None)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024)
    drive(t, peer, clock)
    with pytest.raises(TransferError) as info:
        t.wait(0)
    assert info.value.reason == "hash_mismatch" and not info.value.retryable
    assert not t.part_path.exists() and not bitmap_path(t.part_path).exists()


def test_server_without_the_artifact_fails_with_artifact_not_found(tmp_path: Path) -> None:
    peer, clock = Peer(ArtifactServer(lambda s: None)), FakeClock()
    t = make(tmp_path, "cd" * 32, 4096, peer, clock, chunk_size=1024)
    drive(t, peer, clock)
    assert t.error is not None and t.error.reason == "artifact_not_found" and t.error.retryable
    assert t.error.to_dict()["type"] == "transfer_failed"


# -- resume after a restart ---------------------------------------------------------------


def test_resume_after_restart_fetches_only_missing_chunks(tmp_path: Path) -> None:
    size = 5 * 1024 * KiB
    data, sha, blob = artifact(tmp_path, size, seed=3)
    peer, clock = Peer(server_for(blob)), FakeClock()
    first = make(tmp_path, sha, size, peer, clock)
    first.start()
    for _ in range(5):  # part way, with loss
        peer.serve(first, lambda req, n: 0 if req.offset == 3 * 64 * KiB else 1)
        clock.advance(1)
        first.pump()
    held_before = set(range(first.n_chunks)) - set(first.missing())
    assert 20 <= len(held_before) < first.n_chunks
    # the broker goes; the agent notices (checkpoint), then is stopped; chunks in flight are lost
    first.suspend()
    first.close()
    peer.queue.clear()

    second = make(tmp_path, sha, size, peer, clock, resume=True)  # a new process: a new object
    log_start = len(peer.log)
    drive(second, peer, clock)
    assert second.part_path.read_bytes() == data
    assert second.counters.resumed_chunks == len(held_before)
    offsets_after = [o for o, _ in peer.log[log_start:]]
    assert not {o // (64 * KiB) for o in offsets_after} & held_before  # never asked again
    assert len(offsets_after) == len(set(offsets_after))  # and each missing one once
    # over both lives: every chunk once, plus the retried ones (the lost chunk, the in-flight ones)
    per = peer.requests_per_offset()
    assert sum(per.values()) - len(per) == first.counters.retried + len(set(offsets_after) & set(
        o for o, _ in peer.log[:log_start]))
    assert set(per) == {i * 64 * KiB for i in range(second.n_chunks)}


def test_resume_after_kill_refetches_at_most_one_checkpoint(tmp_path: Path) -> None:
    size = 64 * 1024
    data, sha, blob = artifact(tmp_path, size, seed=4)
    peer, clock = Peer(server_for(blob)), FakeClock()
    first = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=4, checkpoint_bytes=8 * 1024,
                 checkpoint_interval=1000)
    first.start()
    for _ in range(5):
        peer.serve(first)
        first.pump()
    persisted = json.loads(bitmap_path(first.part_path).read_bytes())
    on_disk = {i for i in range(64) if base64.b64decode(persisted["have"])[i >> 3] >> (i & 7) & 1}
    assert on_disk and len(on_disk) < 20 == first.counters.received
    os.close(first._fd)  # type: ignore[arg-type]  # SIGKILL: no checkpoint, the object is gone
    peer.queue.clear()

    second = make(tmp_path, sha, size, peer, clock, resume=True, chunk_size=1024, window=4)
    log_start = len(peer.log)
    drive(second, peer, clock)
    assert second.part_path.read_bytes() == data
    asked_again = {o // 1024 for o, _ in peer.log[log_start:]}
    assert not asked_again & on_disk
    assert len(asked_again) == 64 - len(on_disk)  # the unpersisted ones (< 8 KiB worth) come again
    assert 20 - len(on_disk) < 8


def test_resume_completed_part_verifies_without_asking(tmp_path: Path) -> None:
    size = 3000
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    drive(make(tmp_path, sha, size, peer, clock, chunk_size=1024), peer, clock)
    asked = len(peer.log)
    again = make(tmp_path, sha, size, peer, clock, resume=True, chunk_size=1024)
    again.start()
    assert again.done and len(peer.log) == asked and again.part_path.read_bytes() == data


@pytest.mark.parametrize("damage", ["corrupt_json", "other_chunk_size", "other_sha", "part_truncated", "no_bitmap"])
def test_resume_distrusts_a_bitmap_that_does_not_fit(tmp_path: Path, damage: str) -> None:
    size = 8 * 1024
    data, sha, blob = artifact(tmp_path, size)
    peer, clock = Peer(server_for(blob)), FakeClock()
    first = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=8, checkpoint_bytes=0)
    first.start()
    peer.serve(first, lambda req, n: 1 if req.offset < 6 * 1024 else 0)  # chunks 0..5 in
    first.close()
    bm = bitmap_path(first.part_path)
    doc = json.loads(bm.read_bytes())
    if damage == "corrupt_json":
        bm.write_bytes(b"{not json")
    elif damage == "other_chunk_size":
        bm.write_text(json.dumps({**doc, "chunk_size": 512}))
    elif damage == "other_sha":
        bm.write_text(json.dumps({**doc, "sha256": "0" * 64}))
    elif damage == "part_truncated":
        os.truncate(first.part_path, 3 * 1024 + 10)  # chunks 3..5 claimed, not there
    else:
        bm.unlink()
    expect_kept = {"part_truncated": 3}.get(damage, 0)

    second = make(tmp_path, sha, size, peer, clock, resume=True, chunk_size=1024, window=8)
    drive(second, peer, clock)
    assert second.part_path.read_bytes() == data
    assert second.counters.resumed_chunks == expect_kept
    assert second.counters.received == 8 - expect_kept


# -- a property: any schedule of loss, duplication and reordering ---------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 6000),
    chunk_size=st.integers(64, 1024),
    window=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0, 0.5),
    dup=st.floats(0, 0.5),
)
def test_any_schedule_ends_with_the_right_bytes(size: int, chunk_size: int, window: int, seed: int,
                                                loss: float, dup: float) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data, sha, blob = artifact(tmp, size, seed=seed)
        peer, clock = Peer(server_for(blob)), FakeClock()
        t = make(tmp, sha, size, peer, clock, chunk_size=chunk_size, window=window, retries=50)
        drive(t, peer, clock, rng=rng,
              policy=lambda req, n: 0 if rng.random() < loss else (2 if rng.random() < dup else 1))
        assert t.wait(0).read_bytes() == data
        per = peer.requests_per_offset()
        assert sum(per.values()) == t.counters.requested == len(per) + t.counters.retried
        assert t.counters.retried == t.counters.timeouts  # no suspend here: every retry was a timeout
        assert peer.max_queued <= window


# -- the chunk server ---------------------------------------------------------------------


def _request(sha: str, offset: int, length: int, *, reply_to: Optional[str] = None) -> bytes:
    reply_to = reply_to or topics.chunk_inbox(DEVICE, sha)
    return json.dumps({"request_id": "r1", "sha256": sha, "offset": offset, "length": length,
                       "reply_to": reply_to}).encode()


def test_server_answers_a_range(tmp_path: Path) -> None:
    data, sha, blob = artifact(tmp_path, 10_000)
    server = server_for(blob)
    topic, payload = server.handle(_request(sha, 9000, 1000), topic=topics.artifact_request(sha))  # type: ignore[misc]
    assert topic == topics.chunk_inbox(DEVICE, sha)
    resp = messages.decode("chunk", payload)
    assert (resp.offset, resp.length, resp.size, resp.error, resp.data) == (9000, 1000, 10_000, None, data[9000:])
    assert server.counters.served == 1 and server.counters.bytes_served == 1000


@pytest.mark.parametrize(
    "case, offset, length, topic_sha, want_type, want_reason",
    [
        ("unknown_sha", 0, 10, None, "artifact_not_found", "artifact_not_found"),
        ("offset_past_end", 10_000, 1, None, "bad_request", "malformed"),
        ("range_past_end", 9_999, 2, None, "bad_request", "malformed"),
        ("over_max_chunk", 0, 4097, None, "bad_request", "too_large"),
        ("wrong_request_topic", 0, 10, "ef" * 32, "bad_request", "malformed"),
    ],
)
def test_server_refuses_bad_requests_with_typed_errors(tmp_path: Path, case: str, offset: int, length: int,
                                                       topic_sha: Optional[str], want_type: str,
                                                       want_reason: str) -> None:
    _, sha, blob = artifact(tmp_path, 10_000)
    server = server_for(blob, max_chunk=4096)
    if case == "unknown_sha":
        sha = "ab" * 32
    answer = server.handle(_request(sha, offset, length),
                           topic=topics.artifact_request(topic_sha or sha))
    assert answer is not None, case
    topic, payload = answer
    assert topic == topics.chunk_inbox(DEVICE, sha)
    resp = messages.decode("chunk", payload)
    assert resp.error is not None and (resp.error.type, resp.error.reason) == (want_type, want_reason), case
    assert resp.length == 0 and resp.data == b""
    assert server.counters.errors == 1 and server.counters.served == 0


@pytest.mark.parametrize(
    "case, payload",
    [
        ("not_json", b"\xff\x00"),
        ("too_large", b"{" + b" " * 4096 + b"}"),
        ("reply_to_other_sha", _request("ab" * 32, 0, 1, reply_to=topics.chunk_inbox(DEVICE, "cd" * 32))),
        ("reply_to_not_an_inbox", _request("ab" * 32, 0, 1, reply_to=topics.desired(DEVICE))),
        ("reply_to_wildcard", _request("ab" * 32, 0, 1, reply_to=f"fleet/v1/dev/+/inbox/chunk/{'ab' * 32}")),
        ("length_zero", _request("ab" * 32, 0, 0)),
        ("negative_offset", _request("ab" * 32, -1, 1)),
    ],
)
def test_server_drops_requests_it_cannot_answer(case: str, payload: bytes) -> None:
    looked_up: list[str] = []
    server = ArtifactServer(lambda s: looked_up.append(s))  # type: ignore[func-returns-value]
    assert server.handle(payload) is None, case
    assert looked_up == [] and server.counters.dropped == 1
    assert server.last_dropped is not None and server.last_dropped.reason in ("malformed", "too_large")


def test_server_io_failure_is_unavailable_and_the_device_retries(tmp_path: Path) -> None:
    size = 4096
    data, sha, blob = artifact(tmp_path, size)
    fail = {"n": 2}

    def flaky(s: str) -> Optional[Path]:
        if fail["n"]:
            fail["n"] -= 1
            raise OSError("disk hiccup")
        return blob if s == sha else None

    peer, clock = Peer(ArtifactServer(flaky)), FakeClock()
    t = make(tmp_path, sha, size, peer, clock, chunk_size=1024, window=4)
    drive(t, peer, clock)
    assert t.part_path.read_bytes() == data and t.counters.retried == 2
    with pytest.raises(ValueError):
        ArtifactServer(flaky, max_chunk=messages.MAX_CHUNK_BYTES + 1)
