"""How fast the device verifies a typical signed desired state, on one core.

    python bench/trust.py [--json] [--quick]

A "typical" desired state: the trust header plus five models (name, version, manifest digest,
route, resource hints): about 1.6 KB as an envelope (``envelope_bytes`` in the report). ``TrustedState.verify_desired`` is
timed end to end (size, envelope JSON + base64, payloadType, Ed25519 over the PAE, pydantic
body, target, floor, expiry, the new state) at deploy threshold 1 and threshold 2 (2-of-3
keys, two signatures checked), then split into its parts: envelope parse, one signature,
body parse, and the rest. The process is pinned to one CPU first.

The last line of stdout is one JSON object (DESIGN.md's report shape); the target is the
issue's: >= 2,000 verifications/s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from edge_runtime.benchmark import report, target  # noqa: E402
from edge_runtime.protocol import dsse  # noqa: E402
from edge_runtime.protocol.signed import PAYLOAD_TYPES  # noqa: E402
from edge_runtime.protocol.trust import AnyDesired, TrustedState  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
NOW = T0 + timedelta(days=1)
DEVICE = "cam-0042"


def log(msg: str) -> None:
    print(f"[trust] {msg}", file=sys.stderr, flush=True)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu}"
    return "not pinned (no sched_setaffinity)"


def signed(kind: str, body: dict[str, Any], keys: list[Ed25519PrivateKey]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return dsse.sign(PAYLOAD_TYPES[kind], payload, keys).to_json()


def setup(deploy_threshold: int) -> tuple[TrustedState, bytes]:
    root_keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    deploy_keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    command_keys = [Ed25519PrivateKey.generate()]
    every = root_keys + deploy_keys + command_keys

    def ids(keys: list[Ed25519PrivateKey]) -> list[str]:
        return [dsse.keyid(k.public_key()) for k in keys]

    root = {
        "type": "root", "spec_version": "1.0", "version": 1, "issued_at": iso(T0), "expires": iso(T0 + timedelta(days=365)),
        "keys": {dsse.keyid(k.public_key()): {"keytype": "ed25519", "public": dsse.raw_public_key(k.public_key()).hex()}
                 for k in every},
        "roles": {"root": {"keyids": ids(root_keys), "threshold": 2},
                  "deploy": {"keyids": ids(deploy_keys), "threshold": deploy_threshold},
                  "command": {"keyids": ids(command_keys), "threshold": 1}},
    }
    state = TrustedState.bootstrap(signed("root", root, root_keys[:2]), device_id=DEVICE, groups={"cams", "eu-west"})
    models = [
        {"name": name, "version": f"{v}.0.{i}", "manifest": f"{i:02x}" * 32, "route": "local" if i % 2 else "peer:cam-0007",
         "min_memory_mb": 64 * (i + 1), "priority": i}
        for i, (name, v) in enumerate([("kws", 3), ("vision", 12), ("anomaly", 2), ("ocr", 5), ("pose", 1)])
    ]
    body = {"type": "desired", "spec_version": "1.0", "issued_at": iso(T0), "expires": iso(T0 + timedelta(days=7)),
            "target": {"device": DEVICE}, "generation": 1042, "models": models, "telemetry": {"interval_s": 30}}
    return state, signed("desired", body, deploy_keys[:deploy_threshold])


def rate(fn: Callable[[], object], seconds: float, rounds: int) -> tuple[float, list[float]]:
    """Calls per second: the median of ``rounds`` timed rounds of ``seconds`` each."""
    for _ in range(50):
        fn()
    per_round = []
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(50):
                fn()
            n += 50
            now = time.perf_counter()
            if now >= deadline:
                break
        per_round.append(n / (now - t0))
    return statistics.median(per_round), per_round


def micro(fn: Callable[[], object], n: int) -> float:
    """Median microseconds per call over 5 batches of ``n``."""
    for _ in range(min(n, 50)):
        fn()
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        batches.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    ap.add_argument("--quick", action="store_true", help="short rounds (a smoke run)")
    args = ap.parse_args()
    seconds, rounds, n = (0.3, 3, 300) if args.quick else (1.0, 5, 2000)
    pinned = pin_one_core()
    log(pinned)

    metrics: dict[str, Any] = {"cpu": pinned}
    for threshold in (1, 2):
        state, data = setup(threshold)
        assert state.verify_desired(data, NOW).accepted
        per_s, rounds_s = rate(lambda: state.verify_desired(data, NOW), seconds, rounds)
        envelope = dsse.Envelope.from_json(data)
        public = state._role_keys["deploy"][envelope.signatures[0].keyid]  # noqa: SLF001 - the bench needs the raw key
        total_us = 1e6 / per_s
        envelope_us = micro(lambda: dsse.Envelope.from_json(data), n)
        signature_us = micro(lambda: dsse.verify_one(envelope, envelope.signatures[0], public), n)
        body_us = micro(lambda: AnyDesired.model_validate_json(envelope.payload), n)
        rest_us = max(0.0, total_us - envelope_us - threshold * signature_us - body_us)
        metrics[f"threshold_{threshold}"] = {
            "verifications_per_s": round(per_s, 1),
            "rounds_per_s": [round(r, 1) for r in rounds_s],
            "envelope_bytes": len(data),
            "us_per_verification": round(total_us, 2),
            "split_us": {
                "envelope_parse": round(envelope_us, 2),
                "signatures": round(threshold * signature_us, 2),
                "body_parse": round(body_us, 2),
                "checks_and_new_state": round(rest_us, 2),
            },
            "signature_share": round(threshold * signature_us / total_us, 3),
        }
        log(f"threshold {threshold}: {per_s:,.0f} verifications/s ({total_us:.1f} us; "
            f"{threshold} x Ed25519 {signature_us:.1f} us, envelope {envelope_us:.1f} us, body {body_us:.1f} us)")

    value = metrics["threshold_1"]["verifications_per_s"]
    out = report("trust", metrics, {"verifications_per_s": target(value, 2000, ">=")})
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
