"""Pure pieces of the agent daemon (the daemon itself runs in tests/integration/test_agent*.py)."""

from __future__ import annotations

from edge_runtime.agent.eventlimit import EventLimiter as _RejectionLimiter


def test_rejection_events_are_capped_per_minute_and_the_rest_counted() -> None:
    lim = _RejectionLimiter(per_min=3)
    allowed = [lim.allow(100.0 + i * 0.1, "bad_signature")[0] for i in range(10)]
    assert allowed == [True] * 3 + [False] * 7
    assert lim.overdue(110.0) == 0  # the minute is not over
    # the next allowed event, a minute later, carries the count
    assert lim.allow(161.0, "malformed") == (True, 7)
    assert lim.overdue(300.0) == 0


def test_a_flood_that_stops_inside_its_minute_is_reported_once_the_minute_ends() -> None:
    lim = _RejectionLimiter(per_min=1)
    lim.allow(0.0, "malformed")
    for _ in range(5):
        lim.allow(1.0, "wrong_device")
    assert lim.overdue(30.0) == 0
    assert lim.overdue(60.5) == 5 and lim.last_reason == "wrong_device"
    assert lim.overdue(200.0) == 0  # reported once
