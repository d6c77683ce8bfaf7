"""Resumable artifact transfer in chunks: the device side of ``fleet/v1/artifacts/{sha}/req``.

A ``Transfer`` fills one part file (``Installer.begin_download``'s) with the bytes of one
artifact whose sha256 and size come from a signed manifest. It asks a ``ChunkSource`` for
byte ranges, keeps at most ``window`` requests in flight, re-requests a chunk whose answer
has not come within ``chunk_timeout`` (at most ``retries`` times), writes each answer at its
offset, and persists which chunks it holds so that a reconnect *or a restart* continues
where it stopped. Nothing here sleeps or starts a thread: the agent calls ``pump(now)``
from its loop and hands every received chunk to ``on_chunk`` / ``on_payload``.

Trust (DESIGN.md): the signed size bounds everything. A chunk reaching past it, or longer
than the chunk asked for at its offset, stops the transfer at once (``too_large``) before a
byte of it is written; a server that claims another size stops it too. When every chunk is
in, the part is hashed through ``trust.ArtifactCheck``: a mismatch removes the part and its
bitmap (``hash_mismatch``), a match leaves a verified part for ``install_downloaded``.

Persisted files (beside the part, so ``tmp/<token>.part`` gets ``tmp/<token>.part.bitmap``):

    PART            the artifact's bytes at their offsets (holes where chunks are missing)
    PART.bitmap     JSON, replaced atomically (``durable.atomic_write_bytes``):
                    {"format": 1, "sha256": hex, "size": n, "chunk_size": c,
                     "have": base64 of ceil(n/c) bits, bit i (LSB first in byte i//8) =
                     chunk i is written and fsynced}

Format history of ``PART.bitmap`` (``BITMAP_FORMAT``):
    1  first format.

Write policy. A chunk is ``os.pwrite``-n at its offset, not fsynced by itself. At a
*checkpoint* the part is fsynced, then the bitmap is replaced atomically: the bitmap on
disk never claims a byte that is not durable (a power cut loses at most the chunks since
the last checkpoint, which are fetched again; it never leaves a claimed hole that only the
final hash would catch). Checkpoints happen every ``checkpoint_bytes`` received, at most
``checkpoint_interval`` seconds after a chunk (in ``pump``), on ``suspend`` (the link
dropped), on failure, and on completion. Per-chunk fsyncs would cost three fsyncs per
64 KiB on SD cards for no gain a final sha256 check does not already give.

Threading: every public method takes one lock, so ``on_chunk`` may come from another
thread than ``pump``; the last chunk's caller also runs the sha256 pass (outside the lock),
so deliver chunks from the agent's worker, not from paho's network thread.

Errors (typed by what the caller does next)::

    EdgeRuntimeError
     └── TransferError          .reason in REASONS; .retryable: resume later, or report
          └── SourceUnavailable the source could not send a request (link down): transient
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from edge_runtime.durable import atomic_write_bytes, crashpoint, fsync_dir
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import MAX_ARTIFACT_BYTES, MAX_CHUNK_BYTES, ChunkRequest, ChunkResponse
from edge_runtime.store.layout import BITMAP_SUFFIX  # the one list of persisted names
from edge_runtime.protocol.trust import ArtifactCheck, ArtifactRef, Rejection

BITMAP_FORMAT = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_CHECKPOINT_BYTES = 1024 * 1024
_READ_BLOCK = 1024 * 1024


def bitmap_path(part_path: Union[str, os.PathLike[str]]) -> Path:
    """Where the chunk bitmap of ``part_path`` lives (``PART.bitmap``)."""
    p = Path(part_path)
    return p.with_name(p.name + BITMAP_SUFFIX)


# -- errors -----------------------------------------------------------------------------


class TransferError(EdgeRuntimeError):
    """A transfer stopped; ``reason`` says why (a token of ``messages.REASONS``, so an
    ``Event`` carries it as is).

    ``transfer_timeout``  a chunk went unanswered 1 + ``retries`` times       retryable
    ``transfer_failed``   the source or the disk failed, or the server refused  retryable
    ``artifact_not_found`` the server does not hold the artifact              retryable
    ``too_large``         a chunk or the server's size passes the signed size  fatal
    ``malformed``         a chunk shorter than the range asked for            fatal
    ``hash_mismatch``     all bytes in, sha256 differs (part removed)          fatal
    ``cancelled``         ``cancel()`` was called                              fatal
    """

    code = "transfer_failed"
    http_status = 502
    REASONS = ("transfer_timeout", "transfer_failed", "artifact_not_found", "too_large", "malformed",
               "hash_mismatch", "cancelled")
    _RETRYABLE = frozenset({"transfer_timeout", "transfer_failed", "artifact_not_found"})

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown TransferError reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """True when resuming later may succeed; False when the caller should report and drop it."""
        return self.reason in self._RETRYABLE

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reason": self.reason}


class SourceUnavailable(TransferError):
    """A request could not be sent (no connection): nothing was charged to the retry budget."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="transfer_failed")


# -- the network edge ---------------------------------------------------------------------


class ChunkSource(ABC):
    """Where chunk requests go. One method; the base checks the range against the chunk
    limit and wraps any foreign error as ``SourceUnavailable``. Answers do not come back
    from ``request``: the binding hands them to ``Transfer.on_chunk`` / ``on_payload``."""

    max_chunk: int = MAX_CHUNK_BYTES

    def request(self, sha256: str, offset: int, length: int) -> None:
        """Ask for bytes ``[offset, offset + length)`` of artifact ``sha256``.

        Raises:
            ValueError: a bad sha256 or range (the caller's bug).
            SourceUnavailable: the request could not be sent.
        """
        topics.check_sha256(sha256)
        if not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        if not (isinstance(length, int) and 1 <= length <= self.max_chunk):
            raise ValueError(f"length must be 1..{self.max_chunk}, got {length!r}")
        try:
            self._send(sha256, offset, length)
        except TransferError:
            raise
        except Exception as exc:  # the binding's errors (socket, paho, queue) are all "could not send"
            raise SourceUnavailable(f"could not request [{offset}, {offset + length}) of {sha256[:12]}: "
                                    f"{type(exc).__name__}: {exc}") from exc

    @abstractmethod
    def _send(self, sha256: str, offset: int, length: int) -> None:
        """Send one request; any exception means it was not sent."""


class PublishingChunkSource(ChunkSource):
    """The MQTT form: a ``ChunkRequest`` (reply topic = this device's chunk inbox for the
    artifact) published on ``topics.artifact_request(sha256)`` through ``publish(topic,
    payload)`` -- the MQTT wrapper's publish, or a queue's append in tests."""

    def __init__(self, device_id: str, publish: Callable[[str, bytes], Any]) -> None:
        self.device_id = topics.check_id(device_id, "device id")
        self._publish = publish
        self._prefix = secrets.token_hex(4)
        self._n = 0
        self._lock = threading.Lock()

    def _send(self, sha256: str, offset: int, length: int) -> None:
        with self._lock:
            self._n += 1
            request_id = f"{self._prefix}-{self._n}"
        req = ChunkRequest(request_id=request_id, sha256=sha256, offset=offset, length=length,
                           reply_to=topics.chunk_inbox(self.device_id, sha256))
        self._publish(topics.artifact_request(sha256), messages.encode(req))


# -- progress and state -------------------------------------------------------------------


class State(str, enum.Enum):
    NEW = "new"
    RUNNING = "running"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Progress:
    """One progress report: ``bytes_done`` of ``size`` are on disk."""

    sha256: str
    bytes_done: int
    size: int
    chunks_done: int
    chunks_total: int
    state: str

    @property
    def fraction(self) -> float:
        return 1.0 if self.size == 0 else self.bytes_done / self.size


@dataclass
class Counters:
    requested: int = 0  # requests sent (first tries and retries)
    retried: int = 0  # requests for a chunk asked for before (timeouts and resends after suspend)
    timeouts: int = 0
    received: int = 0  # chunks written
    duplicates: int = 0  # chunks we already held
    ignored: int = 0  # other sha, unaligned offset, undecodable payload, stray error
    bytes_received: int = 0  # bytes written (duplicates excluded)
    checkpoints: int = 0
    resumed_chunks: int = 0  # chunks found on disk by resume()


# -- the transfer -------------------------------------------------------------------------


class Transfer:
    """One artifact into one part file. See the module docstring for the protocol.

    ``clock`` is a monotonic clock in seconds (``pump()`` without ``now`` reads it);
    ``on_progress`` is called (outside the lock) at start, every ``progress_step`` of the
    size, and at the end.
    """

    def __init__(
        self,
        part_path: Union[str, os.PathLike[str]],
        sha256: str,
        size: int,
        *,
        source: ChunkSource,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window: int = 8,
        chunk_timeout: float = 10.0,
        retries: int = 5,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Optional[Callable[[Progress], None]] = None,
        progress_step: float = 0.05,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        checkpoint_interval: float = 1.0,
    ) -> None:
        """A fresh transfer: any part and bitmap already at ``part_path`` are discarded by
        ``start()``. Use ``Transfer.resume`` to continue one.

        Raises:
            ValueError: a bad sha256, size or setting.
        """
        self.sha256 = topics.check_sha256(sha256)
        if not isinstance(size, int) or not 0 <= size <= MAX_ARTIFACT_BYTES:
            raise ValueError(f"size must be 0..{MAX_ARTIFACT_BYTES}, got {size!r}")
        if not isinstance(chunk_size, int) or not 1 <= chunk_size <= min(MAX_CHUNK_BYTES, source.max_chunk):
            raise ValueError(f"chunk_size must be 1..{min(MAX_CHUNK_BYTES, source.max_chunk)}, got {chunk_size!r}")
        if window < 1 or retries < 0 or chunk_timeout <= 0 or checkpoint_bytes < 0 or checkpoint_interval < 0:
            raise ValueError("window >= 1, retries >= 0, chunk_timeout > 0, checkpoints >= 0")
        self.part_path = Path(part_path)
        self.bitmap_path = bitmap_path(self.part_path)
        self.size = size
        self.chunk_size = chunk_size
        self.n_chunks = -(-size // chunk_size)
        self.window = window
        self.chunk_timeout = chunk_timeout
        self.retries = retries
        self.source = source
        self.clock = clock
        self.on_progress = on_progress
        self.progress_step = progress_step
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_interval = checkpoint_interval

        self.counters = Counters()
        self.state = State.NEW
        self.error: Optional[TransferError] = None
        self.finished = threading.Event()  # set on DONE or FAILED
        self._lock = threading.RLock()
        self._have = bytearray(-(-self.n_chunks // 8))
        self._have_count = 0
        self._inflight: dict[int, float] = {}  # chunk -> when requested
        self._timeouts: dict[int, int] = {}  # chunk -> timeouts so far
        self._asked: set[int] = set()  # chunks requested at least once by this object
        self._queue: deque[int] = deque()  # missing chunks not in flight, in request order
        self._fd: Optional[int] = None
        self._resume = False
        self._dirty_bytes = 0
        self._dirty_since: Optional[float] = None
        self._next_progress = 0.0

    @classmethod
    def resume(cls, part_path: Union[str, os.PathLike[str]], sha256: str, size: int, **kwargs: Any) -> Transfer:
        """The transfer of ``part_path`` continued from its persisted bitmap (after a
        reconnect or a restart); ``start()`` then requests only the chunks not on disk. A
        missing, unreadable or foreign bitmap (other sha256, size or chunk size) starts
        over from nothing. Same arguments as the constructor.

        Raises:
            ValueError: as the constructor.
        """
        t = cls(part_path, sha256, size, **kwargs)
        t._resume = True
        return t

    # -- properties ---------------------------------------------------------------------

    @property
    def bytes_done(self) -> int:
        with self._lock:
            return self._bytes_held()

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def missing(self) -> list[int]:
        """Indexes of the chunks not on disk yet."""
        with self._lock:
            return [i for i in range(self.n_chunks) if not self._held(i)]

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    # -- driving ------------------------------------------------------------------------

    def start(self, now: Optional[float] = None) -> None:
        """Open the part (fresh, or resumed from the bitmap) and send the first window.

        Raises:
            TransferError: the part could not be opened (``transfer_failed``), or it was
                already complete and failed verification (``hash_mismatch``).
            RuntimeError: started twice.
        """
        with self._lock:
            if self.state is not State.NEW:
                raise RuntimeError(f"transfer already {self.state.value}")
            try:
                self._open()
            except OSError as exc:
                self._fail_locked(TransferError(f"cannot open {self.part_path}: {exc}", reason="transfer_failed"))
                raise self.error from exc  # type: ignore[misc]
            self.state = State.RUNNING
            self._queue.extend(i for i in range(self.n_chunks) if not self._held(i))
        self._report()
        if self._complete():
            self._finish()
        else:
            self.pump(now)
        if self.error is not None:
            raise self.error

    def pump(self, now: Optional[float] = None) -> None:
        """Re-request timed-out chunks, fill the window, checkpoint when due. Call it from
        the agent loop (every ``chunk_timeout / 4`` or so) and after a reconnect. A failure
        is recorded in ``error`` (and ``finished`` set), not raised."""
        now = self.clock() if now is None else now
        with self._lock:
            if self.state is not State.RUNNING:
                return
            for index, sent in sorted(self._inflight.items()):
                if now - sent < self.chunk_timeout:
                    continue
                del self._inflight[index]
                self.counters.timeouts += 1
                count = self._timeouts.get(index, 0) + 1
                self._timeouts[index] = count
                if count > self.retries:
                    offset, length = self.chunk_range(index)
                    self._fail_locked(TransferError(
                        f"chunk [{offset}, {offset + length}) unanswered after {count} requests "
                        f"of {self.chunk_timeout:g} s", reason="transfer_timeout"))
                    return
                self._queue.appendleft(index)
            while len(self._inflight) < self.window and self._queue:
                index = self._queue[0]
                if self._held(index) or index in self._inflight:
                    self._queue.popleft()
                    continue
                offset, length = self.chunk_range(index)
                try:
                    self.source.request(self.sha256, offset, length)
                except SourceUnavailable:
                    break  # link down: try again next pump, nothing charged
                self._queue.popleft()
                self._inflight[index] = now
                self.counters.requested += 1
                if index in self._asked:
                    self.counters.retried += 1
                self._asked.add(index)
            if self._dirty_since is not None and now - self._dirty_since >= self.checkpoint_interval:
                self._checkpoint_quietly()

    def suspend(self) -> None:
        """The link dropped: forget what is in flight (answers that still arrive are
        accepted), charge no retries, checkpoint. The next ``pump`` asks again."""
        with self._lock:
            if self.state is not State.RUNNING:
                return
            self._queue.extendleft(sorted(self._inflight, reverse=True))
            self._inflight.clear()
            self._checkpoint_quietly()

    def cancel(self) -> None:
        """Stop for good (reason ``cancelled``); the part and bitmap stay for the caller's cleanup."""
        with self._lock:
            if self.state in (State.NEW, State.RUNNING):
                self._fail_locked(TransferError("transfer cancelled", reason="cancelled"))

    def close(self) -> None:
        """Checkpoint (if running) and release the file; the transfer can be resumed later
        by a new ``Transfer.resume``."""
        with self._lock:
            if self.state is State.RUNNING:
                self._checkpoint_quietly()
            self._close_fd()

    def wait(self, timeout: Optional[float] = None) -> Path:
        """The verified part file once the transfer is done.

        Raises:
            TransferError: it failed.
            TimeoutError: not finished within ``timeout`` seconds.
        """
        if not self.finished.wait(timeout):
            raise TimeoutError(f"transfer of {self.sha256[:12]} still running")
        if self.error is not None:
            raise self.error
        return self.part_path

    def discard(self) -> None:
        """Remove the part and the bitmap (after ``install_downloaded`` took the bytes, or
        to give up on a transfer)."""
        with self._lock:
            self._close_fd()
            _remove(self.part_path, self.bitmap_path)

    # -- receiving ----------------------------------------------------------------------

    def on_payload(self, payload: bytes) -> None:
        """A payload received on this artifact's chunk inbox: decoded with
        ``messages.decode("chunk")``; undecodable bytes are counted and ignored."""
        try:
            response = messages.decode("chunk", payload)
        except messages.ProtocolError:
            with self._lock:
                self.counters.ignored += 1
            return
        self.on_chunk(response)

    def on_chunk(self, response: ChunkResponse, data: Optional[bytes] = None) -> None:
        """One answer from the chunk server (``data`` defaults to ``response.data``).

        Another sha256, an offset that is not a chunk start, a chunk already held, a
        stray error: ignored and counted. Past the signed size, longer than the chunk at
        its offset, or a server size above the signed one: ``too_large``, at once.
        """
        data = response.data if data is None else data
        with self._lock:
            if self.state is not State.RUNNING or response.sha256 != self.sha256:
                self.counters.ignored += 1
                return
            offset, n = response.offset, len(data)
            if response.error is not None:
                self._on_error(response)
                return
            if offset + n > self.size or (response.size is not None and response.size > self.size):
                claimed = f", server size {response.size}" if response.size is not None else ""
                self._fail_locked(TransferError(
                    f"chunk [{offset}, {offset + n}){claimed} passes the signed size {self.size}",
                    reason="too_large"))
                return
            if response.size is not None and response.size < self.size:
                # The server holds other bytes than were signed: its fault, not the artifact's,
                # so retryable (another replica or a fixed store may serve it right).
                self._fail_locked(TransferError(
                    f"server holds {response.size} bytes, the manifest signed {self.size}", reason="transfer_failed"))
                _remove(self.part_path, self.bitmap_path)
                return
            index, rem = divmod(offset, self.chunk_size)
            if rem or index >= self.n_chunks:  # not the start of a chunk (an empty one at the end)
                self.counters.ignored += 1
                return
            expected = self.chunk_range(index)[1]
            if n != expected:
                reason = "too_large" if n > expected else "malformed"
                self._fail_locked(TransferError(
                    f"chunk at {offset} has {n} bytes, {expected} were asked for", reason=reason))
                return
            if self._held(index):
                self.counters.duplicates += 1
                return
            try:
                self._write(offset, data)
            except OSError as exc:
                self._fail_locked(TransferError(f"cannot write {self.part_path}: {exc}", reason="transfer_failed"))
                return
            self._set_held(index)
            self._inflight.pop(index, None)
            self.counters.received += 1
            self.counters.bytes_received += n
            self._dirty_bytes += n
            if self._dirty_since is None:
                self._dirty_since = self.clock()
            if self.checkpoint_bytes == 0 or self._dirty_bytes >= self.checkpoint_bytes:
                self._checkpoint_quietly()
            complete = self._complete()
            report = complete or self._bytes_held() >= self._next_progress
        if complete:
            self._finish()
        elif report:
            self._report()

    # -- inside -------------------------------------------------------------------------

    def _on_error(self, response: ChunkResponse) -> None:
        index, rem = divmod(response.offset, self.chunk_size)
        if rem or index not in self._inflight:
            self.counters.ignored += 1  # an answer to nothing we wait for
            return
        err = response.error
        assert err is not None
        if err.type in ("internal", "unavailable"):
            return  # the server may manage next time: let the timeout re-request it
        reason = "artifact_not_found" if "artifact_not_found" in (err.type, err.reason) else "transfer_failed"
        self._fail_locked(TransferError(f"chunk server refused [{response.offset}, ...): {err.type}"
                                        f"{'/' + err.reason if err.reason else ''}: {err.message}", reason=reason))

    def _open(self) -> None:
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        loaded = self._load_bitmap() if self._resume else None
        if loaded is None:
            # Fresh: the old bitmap goes first, so a crash never pairs it with a new part.
            _remove(self.bitmap_path)
            self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fsync(self._fd)
            self._persist_bitmap()
            return
        self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        on_disk = os.fstat(self._fd).st_size
        if on_disk > self.size:
            os.ftruncate(self._fd, self.size)
            on_disk = self.size
        self._have[:] = loaded
        for i in range(self.n_chunks):
            if self._held(i):
                offset, length = self.chunk_range(i)
                if offset + length > on_disk:  # claimed but not there: fetch it again
                    self._have[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                else:
                    self._have_count += 1
        self.counters.resumed_chunks = self._have_count

    def _load_bitmap(self) -> Optional[bytearray]:
        try:
            doc = json.loads(self.bitmap_path.read_bytes())
            if (doc.get("format") != BITMAP_FORMAT or doc.get("sha256") != self.sha256
                    or doc.get("size") != self.size or doc.get("chunk_size") != self.chunk_size):
                return None
            have = bytearray(base64.b64decode(doc["have"], validate=True))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return None
        if len(have) != len(self._have):
            return None
        if self.n_chunks % 8:  # bits past the last chunk must be clear
            have[-1] &= (1 << (self.n_chunks % 8)) - 1
        return have

    def _persist_bitmap(self) -> None:
        doc = {"format": BITMAP_FORMAT, "sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size,
               "have": base64.b64encode(bytes(self._have)).decode("ascii")}
        atomic_write_bytes(self.bitmap_path, json.dumps(doc, sort_keys=True).encode() + b"\n", mode=0o600)

    def _checkpoint(self) -> None:
        """fsync the part, then persist the bitmap: the bitmap never claims undurable bytes."""
        if self._fd is None:
            return
        os.fsync(self._fd)
        crashpoint("transfer.before_bitmap")
        self._persist_bitmap()
        self.counters.checkpoints += 1
        self._dirty_bytes = 0
        self._dirty_since = None

    def _checkpoint_quietly(self) -> None:
        try:
            self._checkpoint()
        except OSError as exc:
            self._fail_locked(TransferError(f"cannot persist {self.bitmap_path}: {exc}", reason="transfer_failed"))

    def _write(self, offset: int, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def _finish(self) -> None:
        """All chunks are in: checkpoint, hash the part through ArtifactCheck, settle."""
        with self._lock:
            if self.state is not State.RUNNING:
                return
            self.state = State.VERIFYING
            self._inflight.clear()
            try:
                self._checkpoint()
            except OSError as exc:
                self._fail_locked(TransferError(f"cannot persist {self.bitmap_path}: {exc}", reason="transfer_failed"))
                return
        check = ArtifactCheck(ArtifactRef(self.sha256, self.size))
        try:
            with open(self.part_path, "rb") as f:
                while block := f.read(_READ_BLOCK):
                    check.update(block)
            check.finish()
        except (Rejection, OSError) as exc:
            with self._lock:
                self._fail_locked(TransferError(f"{self.part_path}: {exc}", reason="hash_mismatch"))
                self._close_fd()
                _remove(self.part_path, self.bitmap_path)
            return
        with self._lock:
            self.state = State.DONE
            self._close_fd()
        self.finished.set()
        self._report()

    def _fail_locked(self, error: TransferError) -> None:
        if self.state in (State.DONE, State.FAILED):
            return
        if self.state is State.RUNNING and self._fd is not None and error.reason != "hash_mismatch":
            try:
                self._checkpoint()  # keep what we have for a later resume
            except OSError:
                pass
        self.state = State.FAILED
        self.error = error
        self._inflight.clear()
        self._queue.clear()
        self._close_fd()
        self.finished.set()

    def _report(self) -> None:
        if self.on_progress is None:
            return
        with self._lock:
            done = self._bytes_held()
            step = max(1, int(self.size * self.progress_step)) if self.progress_step > 0 else 1
            self._next_progress = (done // step + 1) * step
            progress = Progress(self.sha256, done, self.size, self._have_count, self.n_chunks, self.state.value)
        self.on_progress(progress)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _held(self, i: int) -> bool:
        return bool(self._have[i >> 3] & (1 << (i & 7)))

    def _set_held(self, i: int) -> None:
        self._have[i >> 3] |= 1 << (i & 7)
        self._have_count += 1

    def _complete(self) -> bool:
        return self._have_count == self.n_chunks

    def _bytes_held(self) -> int:
        if self.n_chunks and self._held(self.n_chunks - 1):
            return (self._have_count - 1) * self.chunk_size + self.chunk_range(self.n_chunks - 1)[1]
        return self._have_count * self.chunk_size


def _remove(*paths: Path) -> None:
    """Unlink each path (missing is fine), then fsync their directory once."""
    removed = False
    for p in paths:
        try:
            p.unlink()
            removed = True
        except FileNotFoundError:
            pass
    if removed:
        fsync_dir(paths[0].parent)


__all__ = [
    "BITMAP_FORMAT", "ChunkSource", "Counters", "Progress", "PublishingChunkSource", "SourceUnavailable",
    "State", "Transfer", "TransferError", "bitmap_path",
]
