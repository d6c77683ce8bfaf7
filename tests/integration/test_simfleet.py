"""The simulated fleet (tests/simfleet.py) against real brokers, amqtt and Mosquitto.

20 simulated devices at 5 Hz for about 3 s: every telemetry seq each device had
acknowledged reaches a plain subscriber exactly once and in a gapless range; the births are
retained (a subscriber arriving afterwards reads all 20, online, with capabilities); a
device whose TCP connection drops without DISCONNECT is marked offline by its Will, and
that offline state is retained.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.protocol import messages, topics
from tests.helpers import wait_until
from tests.simfleet import RawSubscriber, SimFleet

N = 20
HZ = 5.0
SECONDS = 3.0


def states(sub: RawSubscriber) -> dict[str, messages.DeviceState]:
    """The newest state per device that ``sub`` (keep=True) received."""
    out = {}
    for topic, payload in list(sub.messages):
        if payload:
            out[topics.parse(topic).device] = messages.decode("state", payload)
    return out


def test_every_seq_once_births_retained_will_on_abrupt_close(broker: Any) -> None:
    with RawSubscriber(broker.url) as telemetry:
        fleet = SimFleet(broker.url, N, prefix="t", telemetry_hz=HZ)
        try:
            fleet.start()
            # ~3 s of telemetry, measured by what was sent rather than by sleeping
            wait_until(lambda: all(d.stats.sent >= HZ * SECONDS for d in fleet.devices.values()),
                       timeout=SECONDS * 5, what="3 s of telemetry from every device")
            fleet.stop_telemetry()
            assert fleet.wait_acked(15), fleet.stats()
            wait_until(lambda: telemetry.unique >= fleet.acked, timeout=15,
                       what=f"{fleet.acked} acknowledged samples at the subscriber")

            assert telemetry.duplicates == 0 and telemetry.malformed == 0
            assert telemetry.unique == fleet.acked == fleet.sent
            for device, (first, last, sent, acked) in fleet.seq_ranges().items():
                assert sent == acked >= HZ * SECONDS
                assert telemetry.seqs[device] == set(range(first, last + 1)), device  # strictly increasing, no gap

            # births are retained: a subscriber that comes afterwards reads every one
            with RawSubscriber(broker.url, topics.all_devices("state"), decode=False, keep=True) as late:
                wait_until(lambda: len(states(late)) == N, timeout=10, what="20 retained births")
                born = states(late)
                assert set(born) == set(fleet.ids)
                assert all(s.online and s.capabilities is not None and s.runtime_version for s in born.values())
                assert all("sim-model" in s.models for s in born.values())

                # an abrupt close: the broker publishes the Will (offline, same bd_seq)
                victim = fleet.ids[0]
                bd_seq = born[victim].bd_seq
                fleet.abort(victim)
                wait_until(lambda: not states(late)[victim].online, timeout=15 if broker.name == "amqtt" else 5,
                           what="the Will of the aborted device")
                will = states(late)[victim]
                assert will.bd_seq == bd_seq and will.boot_id == born[victim].boot_id
            with RawSubscriber(broker.url, topics.state(victim), decode=False, keep=True) as again:
                wait_until(lambda: victim in states(again), timeout=10, what="the retained Will")
                assert states(again)[victim].online is False
                assert fleet.stats()["connected"] == N - 1
        finally:
            fleet.close()
