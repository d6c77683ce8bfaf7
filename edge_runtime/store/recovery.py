"""What to do at start-up about an install that a crash interrupted. Pure: no I/O.

Mender's resume table: the install state found in ``state.json`` at start-up maps to one
recovery step. Because each state is written *before* its action runs, the state names the
first action that may not have finished, and that action is safe to redo:

    found state                      step         why
    (none)                           nothing      no install was in progress
    downloading, verifying           clean_up     the bytes were never verified: remove the
                                                  partial file, record "interrupted"; the old
                                                  version is still active
    downloading, resumable           resume       a chunked transfer with its bitmap on disk
                                                  (the caller decides, see below): change
                                                  nothing; the record, the part and its bitmap
                                                  stay, and the agent continues the transfer
    staged, loading, health_check    retry        the bytes are verified and in the store: load
                                                  and health-check again, then commit or roll back
      ... with attempts >= cap       roll_back    the process died that often while loading or
                                                  checking it: a crash loop; give up (reason
                                                  ``crash_loop``), the old version stays active
    active, rolled_back              finish       the decision is already durable: drop the
                                                  record and collect garbage

``attempts`` is bumped (durably) every time the install enters ``loading``, so a model whose
load kills the process is retried at most ``max_attempts`` times in all.

Resuming a download is safe because nothing the part holds is trusted yet: the transfer's
bitmap claims only chunks that were fsynced before it was written (``agent/transfer.py``), a
claimed chunk missing from the part is fetched again, and the whole part is checked against
the sha256 and size of the signed manifest before it becomes a blob, which catches anything
else. ``verifying`` is never resumed: the bytes were complete and the check was under way,
so redoing the transfer from the start is no loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from edge_runtime.errors import StoreCorrupt
from edge_runtime.store.state import InstallRecord

DEFAULT_MAX_ATTEMPTS = 3


class Step(str, Enum):
    NOTHING = "nothing"
    CLEAN_UP = "clean_up"
    RESUME = "resume"
    RETRY = "retry"
    ROLL_BACK = "roll_back"
    FINISH = "finish"


RESUME_TABLE: Mapping[str, Step] = MappingProxyType(
    {
        "downloading": Step.CLEAN_UP,
        "verifying": Step.CLEAN_UP,
        "staged": Step.RETRY,
        "loading": Step.RETRY,
        "health_check": Step.RETRY,
        "active": Step.FINISH,
        "rolled_back": Step.FINISH,
    }
)


@dataclass(frozen=True)
class RecoveryPlan:
    """One recovery step and, for a step that ends an install, the reason recorded."""

    step: Step
    reason: str | None = None


def plan_recovery(
    record: InstallRecord | None, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, resumable: bool = False
) -> RecoveryPlan:
    """The recovery step for the install record found at start-up.

    ``resumable``: the caller will continue this record's transfer (its part has a chunk
    bitmap and the expected sha256 is known); only a ``downloading`` record heeds it.

    Raises:
        ValueError: ``max_attempts`` < 1.
        StoreCorrupt: the record's state is not one of the install states.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if record is None:
        return RecoveryPlan(Step.NOTHING)
    step = RESUME_TABLE.get(record.state)
    if step is None:
        raise StoreCorrupt(f"install of version {record.version} is in unknown state {record.state!r}")
    if step is Step.CLEAN_UP and resumable and record.state == "downloading":
        return RecoveryPlan(Step.RESUME)
    if step is Step.CLEAN_UP:
        return RecoveryPlan(Step.CLEAN_UP, reason="interrupted")
    if step is Step.RETRY and record.attempts >= max_attempts:
        return RecoveryPlan(Step.ROLL_BACK, reason="crash_loop")
    return RecoveryPlan(step)
