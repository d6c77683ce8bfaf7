"""The broker's subscription index (``controller.broker._SubscriptionTable``) against
amqtt 0.12.1's own linear walk: for any table and topic, ``route`` returns exactly the
filters ``Broker._matches`` accepts, in the table's order, with their subscribers.

Randomized over small alphabets so that the corner cases come up often: ``+`` and ``#``
at every level, ``$`` topics, empty levels, malformed filters (``a+``, ``#/a``: amqtt
matches nothing with them), ``$share/...`` filters (stored verbatim, matching only a
topic spelled the same way), topics holding wildcard characters (amqtt's internal
broadcasts are not checked). Seeds are fixed: a failure names its seed.
"""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace
from typing import Any

import pytest

amqtt_broker = pytest.importorskip("amqtt.broker")

from controller.broker import _SubscriptionTable  # noqa: E402

_LOGGER = SimpleNamespace(logger=logging.getLogger("test-broker-routing"))
LEVELS = ["a", "b", "", "$x", "+", "#", "a+", "fleet", "v1", "dev"]
TOPIC_LEVELS = ["a", "b", "", "$x", "$SYS", "fleet", "v1", "dev", "+", "#", "a+"]


def amqtt_matches(topic: str, topic_filter: str) -> bool:
    """amqtt's own decision (``Broker._matches`` only uses ``self.logger``)."""
    return bool(amqtt_broker.Broker._matches(_LOGGER, topic, topic_filter))  # type: ignore[arg-type]


def reference(table: dict[str, list[Any]], topic: str) -> list[tuple[str, list[Any]]]:
    """What amqtt's ``_run_broadcast`` walks: every filter in table order, kept if it matches."""
    return [(f, list(subs)) for f, subs in dict.items(table) if amqtt_matches(topic, f)]


def random_filter(rng: random.Random) -> str:
    n = rng.randint(1, 4)
    levels = [rng.choice(LEVELS) for _ in range(n)]
    if rng.random() < 0.15:
        levels = ["$share", rng.choice(["g", "ctl"]), *levels]
    return "/".join(levels)


def random_topic(rng: random.Random, filters: list[str]) -> str:
    if filters and rng.random() < 0.3:
        # a topic spelled like a filter: exact hits, and wildcard characters in topics
        return rng.choice(filters)
    return "/".join(rng.choice(TOPIC_LEVELS) for _ in range(rng.randint(1, 5)))


def check(table: _SubscriptionTable, topics: list[str], seed: int) -> None:
    for topic in topics:
        assert table.route(topic) == reference(table, topic), f"seed {seed}, topic {topic!r}, table {list(table)}"


@pytest.mark.parametrize("seed", range(40))
def test_route_finds_what_the_linear_walk_finds(seed: int) -> None:
    rng = random.Random(seed)
    filters = [random_filter(rng) for _ in range(rng.randint(0, 60))]
    table = _SubscriptionTable()
    for i, f in enumerate(filters):
        table.setdefault(f, []).append((f"s{i}", i % 3))
    check(table, [random_topic(rng, filters) for _ in range(300)], seed)


@pytest.mark.parametrize("seed", range(20))
def test_the_index_follows_every_change_to_the_table(seed: int) -> None:
    """The ways amqtt changes the table (``t[f] = []``, ``del t[f]``, ``clear()``) and the
    other dict mutators, interleaved; after each, routing equals the linear walk."""
    rng = random.Random(1000 + seed)
    pool = [random_filter(rng) for _ in range(30)]
    table = _SubscriptionTable()
    for step in range(300):
        op = rng.random()
        f = rng.choice(pool)
        if op < 0.45:
            if f not in table:
                table[f] = []
            table[f].append((f"s{step}", 1))
        elif op < 0.75:
            if f in table:
                del table[f]
        elif op < 0.80:
            table.pop(f, None)
        elif op < 0.85:
            table.update({g: [("u", 0)] for g in rng.sample(pool, 3)})
        elif op < 0.88 and table:
            table.popitem()
        elif op < 0.90:
            table.clear()
        elif op < 0.95:
            table[f] = [("replaced", 2)]  # an existing key keeps its place
        else:
            table |= {f: [("ior", 0)]}
        check(table, [random_topic(rng, pool) for _ in range(20)], seed)


CASES = {
    # name: (filters, topic, expected filters in order)
    "exact": (["a/b", "a/c"], "a/b", ["a/b"]),
    "plus": (["a/+", "+/b", "+/+", "+"], "a/b", ["a/+", "+/b", "+/+"]),
    "hash-matches-parent": (["a/#", "#", "a/b/#"], "a", ["a/#", "#"]),
    "hash-deep": (["a/#", "a/+/#", "a/b/c"], "a/b/c", ["a/#", "a/+/#", "a/b/c"]),
    "dollar-no-leading-wildcard": (["#", "+/x", "$x/#", "$x/+"], "$x/y", ["$x/#", "$x/+"]),
    "dollar-later-wildcard-ok": (["a/#"], "a/$x", ["a/#"]),
    "empty-levels": (["a/+/b", "a//b", "+/+/+"], "a//b", ["a/+/b", "a//b", "+/+/+"]),
    "malformed-match-nothing": (["a+", "#/a", "a/#/b", "a/b#"], "a/b", []),
    "shared-stored-verbatim": (["$share/g/fleet/v1/dev/+/telemetry"], "fleet/v1/dev/d1/telemetry", []),
    "table-order": (["+/b", "a/b", "#"], "a/b", ["+/b", "a/b", "#"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_named_cases(name: str) -> None:
    filters, topic, expected = CASES[name]
    table = _SubscriptionTable({f: [(f, 1)] for f in filters})
    got = [f for f, _ in table.route(topic)]
    assert got == expected
    assert got == [f for f, _ in reference(table, topic)]


def test_route_hands_out_copies_and_iteration_snapshots() -> None:
    """Routing ``await``s per subscriber: the lists it returns must not change under it;
    amqtt's own loops iterate snapshots of the keys and items (the connect-time crash)."""
    table = _SubscriptionTable({"a/+": [("s1", 1)]})
    routed = table.route("a/b")
    table["a/+"].append(("s2", 1))
    assert routed == [("a/+", [("s1", 1)])]
    assert [f for f, _ in table.route("a/b")] == ["a/+"] and table.route("a/b")[0][1] == [("s1", 1), ("s2", 1)]
    for f in table:  # would raise "dictionary changed size during iteration" on a plain dict
        table[f + "/x"] = []
    for f, _ in table.items():
        del table[f]
    assert dict(table) == {} and table.route("a/b") == [] and table.route("a/b/x") == []
