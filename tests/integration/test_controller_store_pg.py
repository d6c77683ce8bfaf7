"""The controller's store on a real PostgreSQL (a throwaway cluster from ``tests/pg.py``):
the core behaviours of the SQLite suite again, then what only several replicas sharing one
database can break -- concurrent ingest of the same stream, concurrent assignment changes,
concurrent command seqs, concurrent rollout creation.

Skipped when PostgreSQL's initdb is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from controller import schema
from controller.store import Assignment, Conflict, Store, StoreUnavailable
from tests.pg import PgCluster, free_port, pg_cluster, pg_url  # noqa: F401 - fixtures
from tests.unit import test_controller_store as base
from tests.unit.test_controller_store import T0, expected_deltas, rows, stream

# The SQLite suite's core tests, collected here again with ``url`` pointing at PostgreSQL.
for _name in base.CORE:
    globals()[_name] = getattr(base, _name)
store = base.store  # the same fixture, over this module's url


@pytest.fixture(scope="session")
def ctl_template(pg_cluster: PgCluster) -> str:  # noqa: F811
    """A database holding the controller's tables, copied for each test (faster than create_all)."""
    name = f"ctl_template_{uuid.uuid4().hex[:8]}"
    Store.open(pg_cluster.create_database(name)).close()
    return name


@pytest.fixture
def url(pg_cluster: PgCluster, ctl_template: str) -> Iterator[str]:  # noqa: F811
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield pg_cluster.create_database(name, template=ctl_template)
    pg_cluster.drop_database(name)


def test_a_fresh_database_gets_the_schema(pg_url: str) -> None:  # noqa: F811
    s = Store.open(pg_url)
    try:
        assert s.counts()["devices"] == 0
        assert "postgresql+psycopg://" in s.url
    finally:
        s.close()


def _together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released at once; re-raise the first failure."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def replicas(url: str) -> Iterator[list[Store]]:
    """Two Store objects (two engines, two pools): two controller replicas."""
    Store.open(url).close()
    stores = [Store.open(url), Store.open(url)]
    yield stores
    for s in stores:
        s.close()


def test_replicas_opening_a_fresh_database_together_create_the_schema_once(pg_url: str) -> None:  # noqa: F811
    stores = _together(3, lambda i: Store.open(pg_url))
    try:
        stores[0].register_device("d1", now=T0)
        assert [d.id for d in stores[2].list_devices()] == ["d1"]
    finally:
        for s in stores:
            s.close()


def test_unreachable_server_is_unavailable_naming_the_url_without_password() -> None:
    port = free_port()
    with pytest.raises(StoreUnavailable) as info:
        Store.open(f"postgresql+psycopg://ctl:s3cret@127.0.0.1:{port}/fleet")
    msg = str(info.value)
    assert f"127.0.0.1:{port}/fleet" in msg and "s3cret" not in msg and "PostgreSQL is running" in msg


def test_two_replicas_ingest_the_same_500_samples_once(replicas: list[Store], url: str) -> None:
    samples = stream(500, reboot_at=230, seed=3)
    shuffled = samples[:]
    random.Random(4).shuffle(shuffled)
    orders = [samples, shuffled]
    stored = _together(2, lambda i: sum(replicas[i].add_telemetry("d1", s, now=T0) for s in orders[i]))
    assert sum(stored) == 500  # each sample taken in by exactly one replica
    assert [r["seq"] for r in rows(url, schema.telemetry, "seq")] == list(range(1, 501))
    want = expected_deltas(samples)
    got = {(r["seq"], r["model"]): (r["calls"], r["errors"]) for r in rows(url, schema.telemetry_models, "seq")}
    assert got == want
    for name in ("det", "cls"):
        roll = replicas[0].rollups(name)
        assert sum(r["calls"] for r in roll) == sum(v[0] for (_, n), v in want.items() if n == name)
        assert sum(r["errors"] for r in roll) == sum(v[1] for (_, n), v in want.items() if n == name)
        assert sum(r["samples"] for r in roll) == 500
    assert replicas[1].get_device("d1").last_telemetry["seq"] == 500  # type: ignore[index]


def test_concurrent_set_assignments_give_distinct_generations(replicas: list[Store]) -> None:
    replicas[0].register_device("d1", now=T0)
    seen: list[int] = []
    for round_ in range(5):
        gens = _together(2, lambda i: replicas[i].set_assignments(
            {"d1": {"det": Assignment(device_id="d1", model="det", version=f"{round_}.{i}")}}, now=T0)["d1"])
        assert gens[0] != gens[1]
        seen += gens
    assert sorted(seen) == list(range(1, 11))
    assert replicas[0].get_desired("d1").generation == 10  # type: ignore[union-attr]


def test_concurrent_next_command_never_repeats_a_seq(replicas: list[Store]) -> None:
    replicas[0].register_device("d1", now=T0)
    results = _together(4, lambda i: [
        replicas[i % 2].next_command("d1", "ping", {}, issued_by=f"r{i}", now=T0).seq for _ in range(25)])
    seqs = [x for r in results for x in r]
    assert sorted(seqs) == list(range(1, 101))
    assert all(r == sorted(r) for r in results)  # each replica's own seqs only grow


def test_concurrent_create_rollout_lets_one_win(replicas: list[Store]) -> None:
    def create(i: int) -> Any:
        try:
            return replicas[i].create_rollout(model="det", version=f"2.{i}", target="all", plan={}, steps=[],
                                              created_by=f"r{i}", now=T0)
        except Conflict as exc:
            return exc
    for _ in range(3):
        out = _together(2, create)
        assert sum(isinstance(x, Conflict) for x in out) == 1
        won = next(x for x in out if not isinstance(x, Conflict))
        replicas[0].update_rollout(won.id, won.revision, fields={"state": "aborted"}, steps={}, now=T0)


def test_concurrent_apply_state_and_ingest_for_one_device(replicas: list[Store], url: str) -> None:
    """Births, Wills and telemetry interleaved from two replicas: no deadlock, the final
    state is the newest birth's."""
    def work(i: int) -> None:
        s = replicas[i]
        for k in range(1, 21):
            s.apply_state("d1", base.birth(f"b{k}", k), now=T0 + k)
            s.apply_state("d1", base.death(f"b{k - 1}", k - 1), now=T0 + k)  # stale Will of the previous
            s.add_telemetry("d1", base.tel(k * 2 + i, boot=f"b{k}", models={"det": ("1.0", 5, 0, 1.0)}), now=T0)
    _together(2, work)
    d = replicas[0].get_device("d1")
    assert (d.online, d.boot_id, d.bd_seq) == (True, "b20", 20)
    assert len(rows(url, schema.telemetry, "seq")) == 40


def test_size_bytes_is_the_database_size(replicas: list[Store], url: str) -> None:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        want = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
    engine.dispose()
    assert abs(replicas[0].size_bytes() - want) < 1 << 20  # type: ignore[operator]
