"""A controller ``Store`` holding what the placement side needs, for unit tests: a release
whose manifest carries the model's signature (inputs and outputs), as a push records it."""

from __future__ import annotations

from controller.store import ReleaseRecord, Store

KWS_SIGNATURE = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                 "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}]}


def add_kws_release(store: Store, version: str, *, created_at: float) -> None:
    """Record release ``kws@version`` (5,000 bytes, signature ``KWS_SIGNATURE``)."""
    sha = "ab" * 32
    store.add_release(ReleaseRecord(model="kws", version=version, sha256=sha, size=5000,
                                    manifest={"name": "kws", "version": version, "sha256": sha, "size": 5000,
                                              "signature": KWS_SIGNATURE},
                                    envelope="{}", created_at=created_at, created_by="t"))
