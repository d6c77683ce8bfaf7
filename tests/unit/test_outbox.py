"""The on-disk outbox (edge_runtime/agent/outbox.py): order, bounds, acks, draining, seqs, crashes.

Time never comes from the wall clock here: the rate test drives ``drain`` with a fake clock
and a fake pause, the threaded tests wait on events, and the crash tests kill a subprocess
after it has printed a chosen number of acknowledged writes (or at a named crash point).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.agent.outbox import Item, Outbox, OutboxBusy

REPO = Path(__file__).resolve().parents[2]
BIG = 1 << 30


def open_ob(path: Path, *, max_items: int = 1000, max_bytes: int = BIG, **kw: float) -> Outbox:
    return Outbox(path, max_items=max_items, max_bytes=max_bytes, **kw)


@pytest.fixture
def ob(tmp_path: Path):
    box = open_ob(tmp_path / "outbox.db")
    yield box
    box.close()


# -- order, bounds, acks -------------------------------------------------------------------------


def test_items_come_back_in_order_with_their_fields(ob: Outbox) -> None:
    ids = [ob.append(f"t/{i}", bytes([i]) * i, qos=i % 3, retain=i == 2) for i in range(1, 6)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    items = ob.peek(10)
    assert [(it.id, it.topic, it.payload, it.qos, it.retain) for it in items] == [
        (ids[i - 1], f"t/{i}", bytes([i]) * i, i % 3, i == 2) for i in range(1, 6)
    ]
    assert all(isinstance(it, Item) and it.created_at > 0 for it in items)
    assert [it.id for it in ob.peek(2)] == ids[:2]
    assert (ob.depth, ob.bytes, ob.dropped) == (5, 15, 0)


def test_count_bound_drops_the_oldest_and_counts_persistently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    with caplog.at_level(logging.WARNING, logger="edge_runtime.agent.outbox"):
        with open_ob(path, max_items=3) as ob:
            ids = [ob.append("t", b"%d" % i) for i in range(7)]
            assert [it.id for it in ob.peek(10)] == ids[-3:]
            assert (ob.depth, ob.dropped) == (3, 4)
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1  # one warning per stretch of drops
    with open_ob(path, max_items=3) as ob:
        assert (ob.depth, ob.dropped) == (3, 4)
        assert ob.append("t", b"x") == ids[-1] + 1  # ids keep growing after a reopen
        assert ob.dropped == 5


def test_byte_bound_drops_the_oldest_and_refuses_a_payload_that_cannot_fit(ob: Outbox, tmp_path: Path) -> None:
    with open_ob(tmp_path / "b.db", max_bytes=10) as box:
        a = box.append("t", b"aaaa")
        b = box.append("t", b"bbbb")
        c = box.append("t", b"cccccc")  # 14 bytes: a goes
        assert [it.id for it in box.peek(10)] == [b, c] and (box.bytes, box.dropped) == (10, 1)
        d = box.append("t", b"d" * 10)  # b and c both go
        assert [it.id for it in box.peek(10)] == [d] and (box.bytes, box.dropped) == (10, 3)
        with pytest.raises(ValueError, match="exceeds"):
            box.append("t", b"e" * 11)
        assert [it.id for it in box.peek(10)] == [d] and box.dropped == 3  # nothing changed
        assert box.append("t", b"") > d


def test_ack_is_idempotent(ob: Outbox) -> None:
    ids = [ob.append("t", b"12345") for _ in range(4)]
    assert ob.ack([ids[0], ids[2]]) == 2
    assert ob.ack([ids[0], ids[2]]) == 0
    assert ob.ack([ids[2], 999_999]) == 0
    assert ob.ack([]) == 0
    assert [it.id for it in ob.peek(10)] == [ids[1], ids[3]]
    assert (ob.depth, ob.bytes, ob.dropped) == (2, 10, 0)  # acked items are not "dropped"


def test_bad_arguments_are_refused(ob: Outbox, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ob.append("t", b"x", qos=3)
    with pytest.raises(ValueError):
        ob.append("", b"x")
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", max_items=0, max_bytes=1)
    with pytest.raises(ValueError):
        ob.drain(lambda item: None, max_per_s=0, stop=threading.Event())
    assert ob.depth == 0


# -- draining ------------------------------------------------------------------------------------


class FakeTime:
    """A clock that moves only when ``pause`` is called; records every pause."""

    def __init__(self, stop: threading.Event) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []
        self.stop = stop

    def clock(self) -> float:
        return self.now

    def pause(self, seconds: float) -> bool:
        assert seconds > 0
        self.pauses.append(seconds)
        self.now += seconds
        return self.stop.is_set()


def test_drain_stops_at_a_failing_publish_and_resumes_without_loss_or_duplication(ob: Outbox) -> None:
    ids = [ob.append("t", b"%d" % i) for i in range(10)]
    got: list[int] = []
    stop = threading.Event()
    fake = FakeTime(stop)

    def flaky(item: Item) -> None:
        if len(got) == 4:
            raise ConnectionError("broker gone")
        got.append(item.id)

    with pytest.raises(ConnectionError):
        ob.drain(flaky, max_per_s=1000, stop=stop, clock=fake.clock, wait=fake.pause)
    assert got == ids[:4]
    assert [it.id for it in ob.peek(10)] == ids[4:]  # the failed item stays, at the head

    n = ob.drain(lambda it: got.append(it.id), max_per_s=1000, stop=stop, until_empty=True,
                 clock=fake.clock, wait=fake.pause)
    assert n == 6 and got == ids and ob.depth == 0


def test_drain_is_paced_by_the_rate_bound_without_spinning(ob: Outbox) -> None:
    for i in range(25):
        ob.append("t", b"%d" % i)
    stop = threading.Event()
    fake = FakeTime(stop)
    at: list[float] = []
    n = ob.drain(lambda it: at.append(fake.now), max_per_s=10, stop=stop, until_empty=True,
                 clock=fake.clock, wait=fake.pause)
    assert n == 25
    assert len(fake.pauses) == 24  # one pause per item after the first: no polling
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(at, at[1:]))
    assert max(sum(1 for t in at if s <= t < s + 1.0) for s in at) <= 10  # any 1 s window
    assert at[-1] - at[0] == pytest.approx(2.4)


def test_drain_stops_when_asked_during_a_pause_and_keeps_the_rest(ob: Outbox) -> None:
    ids = [ob.append("t", b"x") for _ in range(5)]
    stop = threading.Event()
    fake = FakeTime(stop)
    got: list[int] = []

    def publish(item: Item) -> None:
        got.append(item.id)
        if len(got) == 2:
            stop.set()

    assert ob.drain(publish, max_per_s=5, stop=stop, clock=fake.clock, wait=fake.pause) == 2
    assert got == ids[:2] and [it.id for it in ob.peek(10)] == ids[2:]


def test_an_idle_drain_wakes_for_a_new_item_and_for_stop(ob: Outbox) -> None:
    stop, arrived = threading.Event(), threading.Event()
    got: list[bytes] = []

    def publish(item: Item) -> None:
        got.append(item.payload)
        arrived.set()

    t = threading.Thread(target=ob.drain, args=(publish,), kwargs={"max_per_s": 1000, "stop": stop, "idle_wait": 60})
    t.start()
    ob.append("t", b"late")
    assert arrived.wait(10), "the idle drain did not wake for an append"
    stop.set()
    ob.wake()
    t.join(10)
    assert not t.is_alive() and got == [b"late"] and ob.depth == 0


def test_several_appenders_and_one_drainer_deliver_every_item_once_in_order(ob: Outbox) -> None:
    threads, per = 4, 150
    total = threads * per
    stop, done = threading.Event(), threading.Event()
    delivered: list[Item] = []

    def publish(item: Item) -> None:
        delivered.append(item)
        if len(delivered) == total:
            done.set()

    errors: list[BaseException] = []

    def drainer() -> None:
        try:
            ob.drain(publish, max_per_s=1e6, stop=stop, idle_wait=0.05)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def appender(k: int) -> None:
        for i in range(per):
            ob.append(f"t/{k}", json.dumps([k, i]).encode())

    d = threading.Thread(target=drainer)
    d.start()
    workers = [threading.Thread(target=appender, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert done.wait(60), f"only {len(delivered)} of {total} delivered"
    stop.set()
    ob.wake()
    d.join(10)
    assert not d.is_alive() and not errors
    ids = [it.id for it in delivered]
    assert ids == sorted(set(ids)) and len(ids) == total  # in order, none twice
    for k in range(threads):  # each appender's items in its own order
        assert [json.loads(it.payload)[1] for it in delivered if it.topic == f"t/{k}"] == list(range(per))
    assert (ob.depth, ob.bytes, ob.dropped) == (0, 0, 0)


# -- seq -----------------------------------------------------------------------------------------


def test_seq_is_monotonic_per_stream_and_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with open_ob(path) as ob:
        assert [ob.next_seq("telemetry") for _ in range(3)] == [1, 2, 3]
        assert ob.next_seq("events") == 1
        item_id, seq = ob.append_seq("t", "telemetry", lambda s: json.dumps({"seq": s}).encode())
        assert seq == 4 and json.loads(ob.peek(1)[0].payload) == {"seq": 4}
    with open_ob(path, max_bytes=100) as ob:
        with pytest.raises(ValueError):  # a refused append does not consume its seq
            ob.append_seq("t", "telemetry", lambda s: b"x" * 101)
        assert ob.next_seq("telemetry") == 5
        assert ob.next_seq("events") == 2
        assert ob.append_seq("t", "telemetry", lambda s: b"%d" % s)[1] == 6


# -- corrupt and locked files --------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    junk = b"this is not sqlite\n" * 300
    path.write_bytes(junk)
    t0 = time.time()
    with caplog.at_level(logging.ERROR, logger="edge_runtime.agent.outbox"):
        ob = open_ob(path)
    with ob:
        assert ob.recovered_from is not None and ob.recovered_from.read_bytes() == junk
        assert ob.recovered_from.parent == tmp_path and "corrupt" in ob.recovered_from.name
        assert any("corrupt" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        assert ob.depth == 0 and ob.dropped == 0
        i = ob.append("t", b"fresh")
        assert ob.peek(1)[0].id == i
        assert ob.next_seq("telemetry") > int(t0 * 1000)  # nothing to salvage: seqs restart above the clock
    with open_ob(path) as again:
        assert again.recovered_from is None and again.depth == 1


def test_a_damaged_page_is_set_aside_and_no_seq_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with open_ob(path) as ob:
        for i in range(50):
            ob.append("t", os.urandom(200))
        seqs = [ob.next_seq("telemetry") for _ in range(7)]
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed into the main file
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:  # page 2: the outbox table's root
        f.seek(page)
        f.write(b"\xa5" * page)
    with open_ob(path) as ob:
        assert ob.recovered_from is not None
        assert ob.depth == 0
        assert ob.next_seq("telemetry") > seqs[-1]


def test_a_locked_file_raises_busy_quickly_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    open_ob(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        with pytest.raises(OutboxBusy):
            open_ob(path, open_timeout=0.2)
        assert time.monotonic() - start < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with open_ob(path) as ob:  # the lock gone, it opens, and the file was not set aside
        assert ob.recovered_from is None
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []


# -- crashes -------------------------------------------------------------------------------------

WORKER = r"""
import json, sys
from edge_runtime.agent.outbox import Outbox
mode, path, max_items = sys.argv[1], sys.argv[2], int(sys.argv[3])
ob = Outbox(path, max_items=max_items, max_bytes=1 << 30)
if mode == "steps":  # one of each write; EDGEFLEET_CRASH_AT kills it at a named point
    ob.next_seq("telemetry")
    ob.append("t", b"x")
    ob.ack([1])
    print("done", flush=True)
    sys.exit(0)
print("ready", flush=True)
i = 0
while True:  # mode "loop": until killed; each line is a write that append() acknowledged
    i += 1
    if i % 2:
        item_id, seq = ob.append_seq("t", "telemetry", lambda s: json.dumps({"seq": s}).encode())
    else:
        seq = ob.next_seq("telemetry")
        item_id = ob.append("t", json.dumps({"seq": seq}).encode())
    print(item_id, seq, flush=True)
"""

# Mender-style: the crash point → (items left after reopen, next seq after reopen).
CRASH_TABLE = {
    "outbox.seq.before_commit": (0, 1),  # the seq was never handed out: it may be given again
    "outbox.seq.after_commit": (0, 2),  # handed out: never again
    "outbox.append.before_commit": (0, 2),
    "outbox.append.after_commit": (1, 2),  # acknowledged: it survives
    "outbox.ack.before_commit": (1, 2),  # published but not acked: delivered again (at least once)
    "outbox.ack.after_commit": (0, 2),
}


def run_steps(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WORKER, "steps", str(path), "10"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, **env})


def test_the_crash_table_covers_every_crash_point(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    clean = run_steps(tmp_path / "clean.db", {"EDGEFLEET_CRASH_TRACE": str(trace)})
    assert clean.returncode == 0, clean.stderr
    assert set(trace.read_text().split()) == set(CRASH_TABLE)
    with open_ob(tmp_path / "clean.db") as ob:
        assert (ob.depth, ob.next_seq("telemetry")) == (0, 2)


@pytest.mark.parametrize("point", sorted(CRASH_TABLE))
def test_sigkill_at_each_crash_point(tmp_path: Path, point: str) -> None:
    path = tmp_path / "outbox.db"
    killed = run_steps(path, {"EDGEFLEET_CRASH_AT": f"{point}:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    depth, seq = CRASH_TABLE[point]
    with open_ob(path) as ob:
        assert ob.recovered_from is None
        assert ob.depth == depth
        assert ob.next_seq("telemetry") == seq


def test_sigkill_at_random_moments_loses_no_acknowledged_write_and_reuses_no_seq(tmp_path: Path) -> None:
    path, max_items = tmp_path / "outbox.db", 60
    rng = random.Random(4)
    printed: list[tuple[int, int]] = []  # (id, seq) of every acknowledged write, in order, across runs
    for run in range(14):
        proc = subprocess.Popen([sys.executable, "-c", WORKER, "loop", str(path), str(max_items)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        for _ in range(rng.choice([0, 1, rng.randrange(2, 120)])):  # kill while it writes, after k acks
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            item_id, seq = map(int, line.split())
            printed.append((item_id, seq))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        # a line the kill cut short was never acknowledged: only complete lines count
        printed += [tuple(map(int, line.split())) for line in proc.stdout.read().split("\n")[:-1]]  # type: ignore[misc]
        proc.stdout.close()
        proc.stderr.close()

        with open_ob(path, max_items=max_items) as ob:
            assert ob.recovered_from is None, run
            present = {it.id: json.loads(it.payload)["seq"] for it in ob.peek(10_000)}
            assert len(present) == ob.depth <= max_items
            if not present:
                continue
            lo, hi = min(present), max(present)
            assert sorted(present) == list(range(lo, hi + 1)), run  # only the oldest ever go
            assert ob.dropped + ob.depth == hi, run  # every committed append is queued or counted dropped
            for item_id, seq in printed:
                assert item_id in present and present[item_id] == seq or item_id < lo, (run, item_id)
            assert list(present.values()) == sorted(set(present.values())), run
    seqs = [s for _, s in printed]
    assert seqs == sorted(set(seqs)), "a seq was repeated or went backwards"
    assert len(printed) > 50
    with open_ob(path, max_items=max_items) as ob:
        assert ob.dropped > 0  # the bound was exercised
        assert ob.next_seq("telemetry") > seqs[-1]
