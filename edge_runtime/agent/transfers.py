"""The agent's running artifact transfers: one ``Transfer`` per sha256, fed and pumped.

``transfer.Transfer`` moves the bytes of one artifact; this module keeps the set of them for
the agent: it starts one per ``Fetch`` (or resumes one found at start-up), routes every
payload from a chunk inbox to the transfer of that sha256, pumps them all from the agent's
loop, suspends them when the link drops, cancels them on command, and hands back the ones
that finished for the installer to take over. It also remembers failed artifacts for a
while (``backoff``), so a chunk server that does not hold an artifact is not asked again on
every loop: the planner sees such an artifact as still in transfer.

Threads: payloads arrive on the MQTT dispatcher thread, ``pump`` runs on the agent loop;
one lock guards the table, and every ``Transfer`` has its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edge_runtime.agent.backoff import Backoff
from edge_runtime.agent.transfer import ChunkSource, Progress, State, Transfer, TransferError
from edge_runtime.protocol import topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferSettings:
    chunk_size: int = 64 * 1024
    window: int = 8
    chunk_timeout: float = 10.0
    retries: int = 5
    retry_initial_s: float = 5.0  # after a retryable failure, wait this long (doubling) ...
    retry_max_s: float = 300.0  # ... up to this, before the planner may fetch it again


@dataclass
class Job:
    """One artifact being fetched for one model version."""

    name: str
    version: str
    sha256: str
    size: int
    transfer: Transfer


class Transfers:
    """Every running transfer of the device, by sha256."""

    def __init__(
        self,
        source: ChunkSource,
        settings: TransferSettings,
        *,
        on_progress: Optional[Callable[[Job, Progress], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.settings = settings
        self.on_progress = on_progress
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._failures: dict[str, tuple[float, int]] = {}  # sha -> (retry not before, failures so far)
        self._lock = threading.Lock()

    # -- starting -----------------------------------------------------------------------

    def start(self, name: str, version: str, sha256: str, size: int, part: Path, *, resume: bool) -> Job:
        """Start (or resume from its bitmap) the transfer of ``sha256`` into ``part``.

        Raises:
            TransferError: the part could not be opened, or a resumed part was complete and
                failed its hash (the caller abandons the download).
            ValueError: a transfer of this sha256 is already running (a caller bug).
        """
        s = self.settings
        kwargs: dict[str, Any] = dict(source=self.source, chunk_size=s.chunk_size, window=s.window,
                                      chunk_timeout=s.chunk_timeout, retries=s.retries, clock=self.clock,
                                      progress_step=0.1)
        transfer = Transfer.resume(part, sha256, size, **kwargs) if resume else Transfer(part, sha256, size, **kwargs)
        job = Job(name, version, sha256, size, transfer)
        transfer.on_progress = lambda p: self._progress(job, p)
        with self._lock:
            if sha256 in self._jobs:
                raise ValueError(f"a transfer of {sha256[:12]} is already running")
            self._jobs[sha256] = job
        try:
            transfer.start()
        except TransferError:
            pass  # recorded on the transfer; ``finished()`` hands it back as failed
        return job

    def _progress(self, job: Job, progress: Progress) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(job, progress)
            except Exception:  # reporting must not break a transfer
                log.exception("progress report failed")

    # -- feeding ------------------------------------------------------------------------

    def on_payload(self, topic: str, payload: bytes) -> bool:
        """A payload from a chunk inbox; False when no transfer of that sha256 runs."""
        try:
            sha = topics.parse(topic).sha256
        except ValueError:
            return False
        with self._lock:
            job = self._jobs.get(sha or "")
        if job is None:
            return False
        job.transfer.on_payload(payload)
        return True

    def pump(self) -> None:
        """Re-request timed-out chunks and fill every window (the agent loop calls this)."""
        now = self.clock()
        for job in self.jobs():
            job.transfer.pump(now)

    def suspend(self) -> None:
        """The link dropped: forget what is in flight, checkpoint (no retries charged)."""
        for job in self.jobs():
            job.transfer.suspend()

    def cancel(self, *, sha256: Optional[str] = None, model: Optional[str] = None) -> list[Job]:
        """Cancel the transfer of an artifact, or every transfer for a model; returns them."""
        hit = [j for j in self.jobs() if (sha256 is not None and j.sha256 == sha256)
               or (model is not None and j.name == model)]
        for job in hit:
            job.transfer.cancel()
        return hit

    # -- results ------------------------------------------------------------------------

    def finished(self) -> list[Job]:
        """Take the jobs that ended (done or failed) out of the table. A retryable failure
        starts the artifact's back-off; a success or a final failure clears it."""
        out: list[Job] = []
        now = self.clock()
        with self._lock:
            for sha, job in list(self._jobs.items()):
                if not job.transfer.finished.is_set():
                    continue
                del self._jobs[sha]
                out.append(job)
                err = job.transfer.error
                if err is not None and err.retryable:
                    _, count = self._failures.get(sha, (0.0, 0))
                    delay = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s).ceiling(count)
                    self._failures[sha] = (now + delay, count + 1)
                else:
                    self._failures.pop(sha, None)
        return out

    def busy(self) -> set[str]:
        """sha256 of every artifact in transfer or waiting out its back-off: the planner
        must not start another ``Fetch`` of these."""
        now = self.clock()
        with self._lock:
            for sha, (until, _) in list(self._failures.items()):
                if until <= now:
                    del self._failures[sha]
            return set(self._jobs) | set(self._failures)

    def retry_due(self) -> Optional[float]:
        """Seconds until the next back-off ends (None: nothing waits)."""
        with self._lock:
            if not self._failures:
                return None
            return max(0.0, min(u for u, _ in self._failures.values()) - self.clock())

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def running(self) -> bool:
        return any(j.transfer.state is State.RUNNING for j in self.jobs())

    def close(self) -> None:
        """Checkpoint and release every part (shutdown); they resume at the next start."""
        for job in self.jobs():
            job.transfer.close()


__all__ = ["Job", "TransferSettings", "Transfers"]
