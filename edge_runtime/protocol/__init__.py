"""The wire protocol, owned by the device side: topics, message models, DSSE envelopes, and
the root of trust. The controller imports it; nothing here does I/O."""
