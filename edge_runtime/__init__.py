"""edge_runtime: the device daemon. It runs TFLite models offline, serves them to local
applications, installs updates without losing a working model, and (later) talks to the
fleet controller over MQTT.

    engine/    interpreter backends, pools, input checks, hot swap
    store/     content-addressed blobs, persisted install state, quota, GC
    installer  the install state machine over store + engine (write state, then act)
    health     health checks a new version must pass before it serves
    api/       local REST (TF Serving shape) and the Unix-socket fast path
    runtime    wires store + engine + API into the serving daemon
    modelgen/  a pure-Python TFLite writer for tests, demos and benchmarks
"""

__version__ = "0.1.0"
