"""Exponential backoff with full jitter: every delay in [0, min(cap, initial * 2**n)], the
window doubles up to the cap, reset starts over, and a seeded random repeats exactly."""

from __future__ import annotations

import random

import pytest

from edge_runtime.agent.backoff import Backoff


class Extreme:
    """A random source that always answers one end of the interval."""

    def __init__(self, end: str) -> None:
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return b if self.end == "high" else a


def test_delays_stay_within_bounds() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1))
    for n in range(200):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**n)


def test_window_doubles_then_caps() -> None:
    backoff = Backoff(1.0, 60.0, rng=Extreme("high"))
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    low = Backoff(1.0, 60.0, rng=Extreme("low"))
    assert [low.next_delay() for _ in range(3)] == [0, 0, 0]  # full jitter reaches zero


def test_jitter_spreads_over_the_whole_window() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(7))
    for _ in range(3):
        backoff.next_delay()
    samples = []
    for _ in range(2000):
        backoff.attempts = 3  # window [0, 8]
        samples.append(backoff.next_delay())
    assert min(samples) < 0.5 and max(samples) > 7.5
    assert 3.5 < sum(samples) / len(samples) < 4.5  # uniform: mean = cap / 2


def test_reset_starts_over() -> None:
    backoff = Backoff(2.0, 100.0, rng=Extreme("high"))
    assert [backoff.next_delay() for _ in range(4)] == [2, 4, 8, 16]
    assert backoff.attempts == 4
    backoff.reset()
    assert backoff.attempts == 0 and backoff.next_delay() == 2


def test_seeded_random_is_deterministic() -> None:
    a = Backoff(1.0, 60.0, rng=random.Random(42))
    b = Backoff(1.0, 60.0, rng=random.Random(42))
    first = [a.next_delay() for _ in range(20)]
    assert first == [b.next_delay() for _ in range(20)]
    assert len(set(first)) == 20  # jittered, not constant
    other = Backoff(1.0, 60.0, rng=random.Random(43))
    assert first != [other.next_delay() for _ in range(20)]


def test_many_attempts_do_not_overflow() -> None:
    backoff = Backoff(1.0, 60.0, rng=Extreme("high"))
    backoff.attempts = 5000
    assert backoff.next_delay() == 60.0
    assert backoff.ceiling(1023) == 60.0 and backoff.ceiling(0) == 1.0


def test_default_random_source_works() -> None:
    backoff = Backoff(0.1, 1.0)
    assert all(0.0 <= backoff.next_delay() <= 1.0 for _ in range(50))


@pytest.mark.parametrize("initial, maximum", [(0, 1), (-1, 1), (2, 1), (float("nan"), 1)])
def test_bad_arguments(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum)
