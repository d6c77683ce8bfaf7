"""The MQTT agent: session, reconcile, transfers, telemetry, outbox."""
