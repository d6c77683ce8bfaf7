"""The chunk server: answers ``fleet/v1/artifacts/{sha}/req`` with byte ranges of a blob.

``ArtifactServer.handle(payload)`` is the whole protocol, pure except for reading the blob
file: it decodes a ``ChunkRequest`` with ``messages.decode`` (whose model already insists
that ``reply_to`` is the requesting device's chunk inbox *for that sha256*, so the server
can only ever publish into a chunk inbox), checks it, reads the range and returns
``(reply_topic, EFC1 payload)`` for the caller to publish at QoS 1. The controller daemon
binds it to MQTT later (subscribe to ``topics.ARTIFACT_REQUESTS``, shared among replicas;
publish what ``handle`` returns).

Answers, by case (the device's ``Transfer`` acts on ``error.reason``):

    request                                  answer
    undecodable / over 2 KiB / bad reply_to  None (no trustworthy reply topic: dropped, counted)
    arrived on another sha's request topic   error  bad_request / malformed
    sha256 not held (lookup gives None,      error  artifact_not_found / artifact_not_found
      or the file is gone)
    length over ``max_chunk``                error  bad_request / too_large
    offset + length past the blob's size     error  bad_request / malformed   (no partial answers)
    the file cannot be read (I/O error)      error  unavailable               (the device retries)
    otherwise                                the bytes, with ``size`` = the blob's size

The server does not hash what it serves: the device trusts bytes only through the sha256
and size of the signed manifest (DESIGN.md, Trust).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import MAX_CHUNK_BYTES, ChunkRequest, ChunkResponse, ErrorInfo, ProtocolError

BlobLookup = Callable[[str], Optional[Union[str, "os.PathLike[str]"]]]


class ArtifactServerError(Exception):
    """Why one request got an error answer; ``code`` / ``reason`` go on the wire as
    ``ErrorInfo.type`` / ``reason``."""

    def __init__(self, code: str, reason: Optional[str], message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass
class ServerCounters:
    served: int = 0
    bytes_served: int = 0
    errors: int = 0
    dropped: int = 0  # undecodable requests: nowhere to answer


class ArtifactServer:
    """Serve byte ranges of blobs found by ``blob_lookup(sha256) -> path | None``."""

    def __init__(self, blob_lookup: BlobLookup, *, max_chunk: int = MAX_CHUNK_BYTES) -> None:
        """
        Raises:
            ValueError: ``max_chunk`` outside 1..``messages.MAX_CHUNK_BYTES``.
        """
        if not isinstance(max_chunk, int) or not 1 <= max_chunk <= MAX_CHUNK_BYTES:
            raise ValueError(f"max_chunk must be 1..{MAX_CHUNK_BYTES}, got {max_chunk!r}")
        self.blob_lookup = blob_lookup
        self.max_chunk = max_chunk
        self.counters = ServerCounters()
        self.last_dropped: Optional[ProtocolError] = None

    def handle(self, payload: bytes, *, topic: Optional[str] = None) -> Optional[tuple[str, bytes]]:
        """The answer to one request payload: ``(reply_topic, response_payload)``, or None
        when the payload is not a request we can answer at all (see the module table).
        ``topic``, if given, is the topic it arrived on; its sha256 must be the request's.

        Never raises for any payload (a blob_lookup that raises is answered ``unavailable``).
        """
        try:
            request = messages.decode("chunk_request", payload)
        except ProtocolError as exc:
            self.counters.dropped += 1
            self.last_dropped = exc
            return None
        response = self.respond(request, topic=topic)
        return request.reply_to, messages.encode(response)

    def respond(self, request: ChunkRequest, *, topic: Optional[str] = None) -> ChunkResponse:
        """The ``ChunkResponse`` for a decoded request (bytes or a typed error)."""
        try:
            data, size = self._read(request, topic)
        except ArtifactServerError as exc:
            self.counters.errors += 1
            return ChunkResponse.failure(request, ErrorInfo(type=exc.code, reason=exc.reason, message=str(exc)[:2000]))
        self.counters.served += 1
        self.counters.bytes_served += len(data)
        return ChunkResponse.answer(request, data, size=size)

    def _read(self, request: ChunkRequest, topic: Optional[str]) -> tuple[bytes, int]:
        sha = request.sha256
        if topic is not None:
            try:
                info = topics.parse(topic)
            except ValueError:
                info = None
            if info is None or info.kind != "artifact_req" or info.sha256 != sha:
                raise ArtifactServerError("bad_request", "malformed",
                                          f"request for {sha[:12]} arrived on {topic!r}")
        if request.length > self.max_chunk:
            raise ArtifactServerError("bad_request", "too_large",
                                      f"length {request.length} exceeds this server's {self.max_chunk}")
        try:
            path = self.blob_lookup(sha)
        except Exception as exc:  # a store error is the server's trouble, not the device's
            raise ArtifactServerError("unavailable", None, f"lookup of {sha[:12]} failed: {exc}") from exc
        if path is None:
            raise ArtifactServerError("artifact_not_found", "artifact_not_found", f"no artifact {sha}")
        try:
            fd = os.open(Path(path), os.O_RDONLY)
        except FileNotFoundError:
            raise ArtifactServerError("artifact_not_found", "artifact_not_found", f"no artifact {sha}") from None
        except OSError as exc:
            raise ArtifactServerError("unavailable", None, f"cannot open {sha[:12]}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size  # of the file we read, not of whatever the path names now
            end = request.offset + request.length
            if end > size:
                raise ArtifactServerError("bad_request", "malformed",
                                          f"bytes [{request.offset}, {end}) run past the artifact's {size} bytes")
            data = os.pread(fd, request.length, request.offset)
        except OSError as exc:
            raise ArtifactServerError("unavailable", None, f"cannot read {sha[:12]}: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) != request.length:
            raise ArtifactServerError("unavailable", None,
                                      f"short read of {sha[:12]}: {len(data)} of {request.length} bytes")
        return data, size


__all__ = ["ArtifactServer", "ArtifactServerError", "ServerCounters"]
