"""The crash-safe model store: what is installed on this device, and how it got there.

Owns everything under the device data dir that concerns models (listed in ``layout.py``):
content-addressed blobs (``blobs.py``), the one versioned state file with its write-ahead
install records (``state.py``), the lock, quota and garbage collection (``store.py``), and
the table that turns an install found half-done at start-up into a recovery step
(``recovery.py``). Driving an install through the engine is ``edge_runtime.installer``.
"""

from edge_runtime.store.blobs import BlobInfo, BlobStore, hash_file
from edge_runtime.store.layout import FORMAT_HISTORY, STATE_FORMAT, StoreLayout, is_sha256_hex
from edge_runtime.store.recovery import DEFAULT_MAX_ATTEMPTS, RESUME_TABLE, RecoveryPlan, Step, plan_recovery
from edge_runtime.store.state import (
    INSTALL_STATES,
    InstallRecord,
    LastResult,
    ModelState,
    StoreState,
    VersionRecord,
    parse_state,
    state_problems,
)
from edge_runtime.store.store import GcReport, ModelListing, ModelStore

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "FORMAT_HISTORY",
    "INSTALL_STATES",
    "RESUME_TABLE",
    "STATE_FORMAT",
    "BlobInfo",
    "BlobStore",
    "GcReport",
    "InstallRecord",
    "LastResult",
    "ModelListing",
    "ModelState",
    "ModelStore",
    "RecoveryPlan",
    "Step",
    "StoreLayout",
    "StoreState",
    "VersionRecord",
    "hash_file",
    "is_sha256_hex",
    "parse_state",
    "plan_recovery",
    "state_problems",
]
