"""Prometheus metrics of ``fleetctl serve`` (``--metrics-port``), via prometheus-client.

Collected on scrape from what the daemon already holds — nothing here counts on its own:

    edgefleet_devices{state="online"|"offline"}            gauge, from the store
    edgefleet_rollouts{state}                              gauge, from the store
    edgefleet_ingest_messages_total{kind,result}           counter: stored | duplicate (per replica)
    edgefleet_ingest_rejected_total{reason}                counter
    edgefleet_ingest_received_total{kind}                  counter: decoded, stored or not yet
    edgefleet_ingest_backlog                               gauge: reports queued, not yet taken to store
    edgefleet_model_latency_ms{model,version,quantile}     gauge: p50/p95/p99 of devices' p95 over 5 min
    edgefleet_desired_published_total, edgefleet_commands_sent_total, edgefleet_api_calls_total{method},
    edgefleet_chunks_served_total, edgefleet_chunk_bytes_total
    edgefleet_up{instance}                                 1 while connected to the broker

The ingest rate is ``rate(edgefleet_ingest_messages_total[1m])``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["FleetCollector", "serve_metrics"]

log = logging.getLogger(__name__)
LATENCY_WINDOW_S = 300.0


class FleetCollector(Collector):
    """Reads the daemon's parts on every scrape. ``daemon`` has ``store``, ``ingest``,
    ``desired``, ``commands``, ``api``, ``artifacts`` (ArtifactService), ``instance``,
    ``connected`` and ``clock``."""

    def __init__(self, daemon: Any) -> None:
        self.d = daemon

    def collect(self) -> Iterator[Any]:
        d = self.d
        try:
            counts = d.store.counts()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB blinked
            log.warning("metrics: store counts unavailable: %s", exc)
            counts = None
        if counts is not None:
            g = GaugeMetricFamily("edgefleet_devices", "Devices known to the controller", labels=["state"])
            g.add_metric(["online"], counts["online"])
            g.add_metric(["offline"], counts["devices"] - counts["online"])
            yield g
            g = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
            for state, n in sorted(counts["rollouts"].items()):
                g.add_metric([state], n)
            yield g
        c = CounterMetricFamily("edgefleet_ingest_messages", "Device messages taken in by this replica",
                                labels=["kind", "result"])
        for kind, n in sorted(d.ingest.stored.items()):
            c.add_metric([kind, "stored"], n)
        for kind, n in sorted(d.ingest.duplicates.items()):
            c.add_metric([kind, "duplicate"], n)
        yield c
        c = CounterMetricFamily("edgefleet_ingest_rejected", "Device messages refused", labels=["reason"])
        for reason, n in sorted(d.ingest.rejected.items()):
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily("edgefleet_ingest_received", "Device reports decoded by this replica",
                                labels=["kind"])
        for kind, n in sorted(d.ingest.received.items()):
            c.add_metric([kind], n)
        yield c
        yield GaugeMetricFamily("edgefleet_ingest_backlog", "Device reports received and not yet stored",
                                value=d.writer.backlog)
        try:
            latency = d.store.latency_percentiles(since=d.clock() - LATENCY_WINDOW_S)
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: latency unavailable: %s", exc)
            latency = {}
        g = GaugeMetricFamily("edgefleet_model_latency_ms", "Per-model latency percentiles across devices (5 min)",
                              labels=["model", "version", "quantile"])
        for (model, version), qs in sorted(latency.items()):
            for q, value in sorted(qs.items()):
                g.add_metric([model, version, q], value)
        yield g
        yield _counter("edgefleet_desired_published", "Desired documents published", d.desired.published)
        yield _counter("edgefleet_commands_sent", "Commands sent", d.commands.sent)
        c = CounterMetricFamily("edgefleet_api_calls", "Console calls answered", labels=["method"])
        for method, n in sorted(d.api.calls.items()):
            c.add_metric([method], n)
        yield c
        yield _counter("edgefleet_chunks_served", "Artifact chunks answered", d.artifacts.answered)
        yield _counter("edgefleet_chunk_bytes", "Artifact chunk bytes published", d.artifacts.bytes_out)
        g = GaugeMetricFamily("edgefleet_up", "1 while this replica is connected to the broker", labels=["instance"])
        g.add_metric([d.instance], 1.0 if d.connected() else 0.0)
        yield g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def serve_metrics(daemon: Any, port: int, *, addr: str = "127.0.0.1") -> Callable[[], None]:
    """Serve /metrics on ``addr:port`` in a thread (port 0: any free one; the log line
    ``serving /metrics on http://ADDR:PORT/metrics`` names it); returns a function that stops it.

    Raises:
        OSError: the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(daemon))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("serving /metrics on http://%s:%d/metrics", addr, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop

