"""The on-disk outbox: telemetry and events wait here until the broker has them.

One SQLite file in WAL mode. ``append`` is durable when it returns; the outbox is bounded
by item count and payload bytes, and when a new item would break a bound the *oldest*
items go and a persisted ``dropped`` counter says how many. ``drain`` publishes in id
order at a bounded rate and removes an item only after ``publish`` returned for it, so a
failed publish (or a crash between publish and ack) delivers that item again: at least
once, in order; the controller drops repeats by ``seq``.

Durability: ``synchronous=FULL``. In WAL mode ``NORMAL`` already survives a SIGKILL of
the process (a commit is in the OS page cache), but not a power cut: the last commits can
roll back. For queued items that costs a little telemetry; for ``next_seq`` it would hand
out a ``seq`` twice after the cut, and a repeated ``seq`` is a silent duplicate-or-loss
at the controller. One fsync per commit is cheap at telemetry rates (one append per
interval, a few events, drain acks bounded by ``max_per_s``).

``next_seq(stream)`` counters live in the same file and never go back: a value is
consumed once its commit returns, even if the process dies before using it (a gap, never
a repeat). ``append_seq`` takes the seq and queues the item in one transaction (no gap).

Start-up is never blocked for long: a locked file raises ``OutboxBusy`` after
``open_timeout`` seconds; a corrupt file (not a database, failed ``quick_check``, unknown
format) is renamed aside with its ``-wal``/``-shm`` (``<name>.corrupt-<UTC time>``), an
error is logged, ``recovered_from`` names the aside copy, and a fresh outbox starts. The
fresh outbox starts every seq stream above both what could be read from the aside copy
and the current Unix time in milliseconds, so a seq is not reused even then (unless the
wall clock is behind and nothing could be read).

Errors::

    EdgeRuntimeError
     └── OutboxError       an SQLite failure (I/O error, disk full, cannot open the file)
          └── OutboxBusy   another connection holds the file locked past the timeout (retry)

Thread-safe: one connection, one lock; ``publish`` runs without the lock, so appenders
never wait for the broker.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Union

from edge_runtime.durable import crashpoint, fsync_dir
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

OUTBOX_FORMAT = 1  # PRAGMA user_version; history: 1 = outbox, counters, seqs tables
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SCHEMA = (
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",  # AUTOINCREMENT: an id is never reused, even after every row was acked
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE seqs (stream TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO counters (name, value) VALUES ('dropped', 0), ('seq_floor', 0)",
    f"PRAGMA user_version={OUTBOX_FORMAT}",
)


class OutboxError(EdgeRuntimeError):
    """The outbox's SQLite file failed (I/O, disk full, cannot open)."""

    code = "outbox_error"


class OutboxBusy(OutboxError):
    """Another connection held the outbox file locked for longer than the timeout."""

    code = "outbox_busy"


class _Corrupt(Exception):
    pass


@dataclass(frozen=True)
class Item:
    """One queued message. ``id`` orders the outbox and is never reused."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float


Payload = Union[bytes, bytearray, memoryview]


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc).lower()
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text or "busy" in text


def _wrap(exc: sqlite3.Error, what: str) -> OutboxError:
    if _is_busy(exc):
        return OutboxBusy(f"outbox {what}: file is locked by another connection ({exc})")
    return OutboxError(f"outbox {what} failed: {exc}")


class Outbox:
    """A bounded, durable FIFO of MQTT messages plus persisted ``seq`` counters.

    Raises (constructor):
        OutboxBusy: the file stayed locked for ``open_timeout`` seconds.
        OutboxError: the file cannot be opened or created, or is corrupt and cannot be
            renamed (a corrupt file is otherwise set aside and a fresh outbox starts).
        ValueError: a bound is not positive.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        max_items: int,
        max_bytes: int,
        open_timeout: float = 2.0,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"outbox bounds must be positive (max_items={max_items}, max_bytes={max_bytes})")
        self.path = Path(path)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._timeout = open_timeout
        self._lock = threading.Lock()
        self._nonempty = threading.Condition(self._lock)
        self.recovered_from: Optional[Path] = None  # the corrupt file set aside at open, if any
        try:
            self._db, counts = self._connect()
        except _Corrupt as why:
            try:
                aside = self._set_aside()
            except OSError as exc:
                raise OutboxError(f"outbox {self.path} is corrupt ({why}) and cannot be moved aside: {exc}") from exc
            log.error("outbox %s is corrupt (%s); moved aside to %s, starting a fresh outbox", self.path, why, aside)
            self.recovered_from = aside
            self._db, counts = self._connect(seq_seed=self._salvage_seqs(aside))
        self._depth, self._bytes, self._dropped = counts
        self._warned = False

    # -- opening --------------------------------------------------------------------------

    def _connect(self, seq_seed: Optional[dict[str, int]] = None) -> tuple[sqlite3.Connection, tuple[int, int, int]]:
        """Open, check and (if new) create the file. Raises _Corrupt, OutboxBusy, OutboxError."""
        db: Optional[sqlite3.Connection] = None
        try:
            db = sqlite3.connect(str(self.path), timeout=self._timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if version == 0 and tables == 0:
                    for statement in _SCHEMA:  # not executescript: it would COMMIT first
                        db.execute(statement)
                    if seq_seed is not None:  # a fresh file after a corrupt one: never reuse a seq
                        floor = max([int(time.time() * 1000), *seq_seed.values()])
                        db.execute("UPDATE counters SET value=? WHERE name='seq_floor'", (floor,))
                        db.executemany("INSERT INTO seqs (stream, value) VALUES (?, ?)", list(seq_seed.items()))
                elif version != OUTBOX_FORMAT:
                    raise _Corrupt(f"unknown outbox format {version}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _Corrupt(f"quick_check: {'; '.join(str(r[0]) for r in check[:3])}")
            depth, nbytes = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
            dropped = db.execute("SELECT value FROM counters WHERE name='dropped'").fetchone()[0]
            return db, (int(depth), int(nbytes), int(dropped))
        except _Corrupt:
            if db is not None:
                db.close()
            raise
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            raise _wrap(exc, f"open of {self.path}") from exc
        except sqlite3.DatabaseError as exc:  # SQLITE_NOTADB, SQLITE_CORRUPT
            if db is not None:
                db.close()
            raise _Corrupt(str(exc)) from exc

    def _set_aside(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, aside)
        for suffix in _SIDE_FILES:
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.replace(side, f"{aside}{suffix}")
        fsync_dir(self.path.parent)
        return aside

    @staticmethod
    def _salvage_seqs(aside: Path) -> dict[str, int]:
        """Best effort: the seq counters the corrupt file still yields (empty if none)."""
        try:
            db = sqlite3.connect(str(aside), timeout=0.1)
            try:
                return {str(s): int(v) for s, v in db.execute("SELECT stream, value FROM seqs")}
            finally:
                db.close()
        except Exception as exc:  # anything: the file is corrupt, this is a salvage attempt
            log.warning("outbox: could not read seq counters from %s (%s); seqs restart above the clock", aside, exc)
            return {}

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the caller holds the lock. sqlite errors become OutboxError."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                crashpoint(f"outbox.{what}.before_commit")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _wrap(exc, what) from exc
        crashpoint(f"outbox.{what}.after_commit")

    def append(self, topic: str, payload: Payload, *, qos: int = 1, retain: bool = False) -> int:
        """Queue one message; durable when this returns. Returns its id.

        If the outbox would then hold more than ``max_items`` items or ``max_bytes`` payload
        bytes, the oldest items are removed and counted in ``dropped``.

        Raises:
            ValueError: bad qos, empty topic, or a payload larger than ``max_bytes``.
            OutboxError: the write failed; nothing was queued.
        """
        return self._append(topic, lambda _seq: payload, None, qos=qos, retain=retain)[0]

    def append_seq(
        self, topic: str, stream: str, build: Callable[[int], Payload], *, qos: int = 1, retain: bool = False
    ) -> tuple[int, int]:
        """Take the next ``seq`` of ``stream``, build the payload with it, queue it: one commit.

        Returns (id, seq). ``build`` runs under the outbox lock: keep it to serialising.

        Raises:
            ValueError, OutboxError: as ``append``; on either, the seq is not consumed.
        """
        item_id, seq = self._append(topic, build, stream, qos=qos, retain=retain)
        assert seq is not None
        return item_id, seq

    def _append(
        self, topic: str, build: Callable[[int], Payload], stream: Optional[str], *, qos: int, retain: bool
    ) -> tuple[int, Optional[int]]:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        if not topic:
            raise ValueError("empty topic")
        with self._nonempty:
            with self._tx("append") as db:
                seq = self._bump_seq(db, stream) if stream is not None else None
                data = bytes(build(seq if seq is not None else 0))
                if len(data) > self.max_bytes:
                    raise ValueError(f"payload of {len(data)} bytes exceeds the outbox bound of {self.max_bytes}")
                cur = db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, created_at) VALUES (?, ?, ?, ?, ?)",
                    (topic, data, qos, int(retain), time.time()),
                )
                item_id = int(cur.lastrowid or 0)
                depth, nbytes, dropped = self._depth + 1, self._bytes + len(data), 0
                if depth > self.max_items or nbytes > self.max_bytes:
                    last = 0
                    rows = db.execute("SELECT id, length(payload) FROM outbox ORDER BY id")
                    for oid, size in rows:  # the new item is never reached: it fits on its own
                        if depth <= self.max_items and nbytes <= self.max_bytes:
                            break
                        last, depth, nbytes, dropped = oid, depth - 1, nbytes - size, dropped + 1
                    rows.close()
                    db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
                    db.execute("UPDATE counters SET value = value + ? WHERE name='dropped'", (dropped,))
            self._depth, self._bytes, self._dropped = depth, nbytes, self._dropped + dropped
            if dropped:  # one warning per stretch of drops (until the next ack), then debug
                level = logging.DEBUG if self._warned else logging.WARNING
                log.log(level, "outbox full: dropped the %d oldest item(s) (%d in all)", dropped, self._dropped)
                self._warned = True
            self._nonempty.notify_all()
            return item_id, seq

    def next_seq(self, stream: str) -> int:
        """The next value of a persisted counter (1, 2, …); never returned twice, even across a crash.

        Raises:
            OutboxError: the write failed; no value was consumed.
        """
        with self._lock:
            with self._tx("seq") as db:
                seq = self._bump_seq(db, stream)
            return seq

    @staticmethod
    def _bump_seq(db: sqlite3.Connection, stream: str) -> int:
        db.execute(
            "INSERT OR IGNORE INTO seqs (stream, value) SELECT ?, value FROM counters WHERE name='seq_floor'",
            (stream,),
        )
        db.execute("UPDATE seqs SET value = value + 1 WHERE stream=?", (stream,))
        return int(db.execute("SELECT value FROM seqs WHERE stream=?", (stream,)).fetchone()[0])

    def ack(self, ids: Iterable[int]) -> int:
        """Remove delivered items (ids already gone are ignored). Returns how many were removed.

        Raises:
            OutboxError: the write failed; nothing was removed (they will be delivered again).
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            removed = freed = 0
            with self._tx("ack") as db:
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    n, size = db.execute(
                        f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE id IN ({marks})", chunk
                    ).fetchone()
                    db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                    removed, freed = removed + n, freed + size
            self._depth -= removed
            self._bytes -= freed
            self._warned = False
            return removed

    # -- reading --------------------------------------------------------------------------

    def peek(self, n: int) -> list[Item]:
        """The ``n`` oldest items, oldest first, without removing them.

        Raises:
            OutboxError: the read failed.
        """
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload, qos, retain, created_at FROM outbox ORDER BY id LIMIT ?", (n,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise _wrap(exc, "peek") from exc
        return [Item(int(i), t, bytes(p), int(q), bool(r), float(c)) for i, t, p, q, r, c in rows]

    @property
    def depth(self) -> int:
        """Items waiting."""
        with self._lock:
            return self._depth

    @property
    def bytes(self) -> int:
        """Payload bytes waiting."""
        with self._lock:
            return self._bytes

    @property
    def dropped(self) -> int:
        """Items removed by the bounds since the file was created (persisted)."""
        with self._lock:
            return self._dropped

    # -- draining -------------------------------------------------------------------------

    def drain(
        self,
        publish: Callable[[Item], None],
        *,
        max_per_s: float,
        stop: threading.Event,
        until_empty: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wait: Optional[Callable[[float], bool]] = None,
        idle_wait: float = 0.5,
    ) -> int:
        """Publish items oldest first, at most ``max_per_s`` a second; ack each after ``publish`` returns.

        Runs until ``stop`` is set (checked between items; an idle drain notices within
        ``idle_wait`` s, or at once after ``wake()``) or, with ``until_empty``, until
        nothing is left. Pacing sleeps through ``wait(seconds) -> stop requested`` (default
        ``stop.wait``), so it never spins. Returns the number of items delivered.

        Raises:
            Exception: whatever ``publish`` raised; that item and all after it stay queued.
            OutboxError: reading or acking failed.
            ValueError: ``max_per_s`` is not positive.
        """
        if max_per_s <= 0:
            raise ValueError(f"max_per_s must be positive, not {max_per_s!r}")
        pause = wait if wait is not None else stop.wait
        interval = 1.0 / max_per_s
        next_at = clock()
        delivered = 0
        while not stop.is_set():
            head = self.peek(1)
            if not head:
                if until_empty:
                    break
                with self._nonempty:
                    if self._depth == 0:
                        self._nonempty.wait(idle_wait)
                continue
            delay = next_at - clock()
            if delay > 0:
                pause(delay)
                continue  # re-check stop, and the head: the bound may have dropped it meanwhile
            now = clock()
            publish(head[0])
            self.ack([head[0].id])
            delivered += 1
            next_at = now + interval
        return delivered

    def wake(self) -> None:
        """Wake an idle ``drain`` now (call after setting its ``stop``)."""
        with self._nonempty:
            self._nonempty.notify_all()

    def close(self) -> None:
        with self._nonempty:
            self._db.close()
            self._nonempty.notify_all()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
