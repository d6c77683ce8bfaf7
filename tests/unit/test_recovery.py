"""The start-up resume table (store/recovery.py), one named case per row."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from edge_runtime.errors import StoreCorrupt
from edge_runtime.store.recovery import DEFAULT_MAX_ATTEMPTS, RESUME_TABLE, RecoveryPlan, Step, plan_recovery
from edge_runtime.store.state import INSTALL_STATES, InstallRecord

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def record(state: str, attempts: int = 0) -> InstallRecord:
    return InstallRecord(
        version="2", token="00112233aabbccdd", sha256="ab" * 32, size=10, state=state, attempts=attempts, started_at=T0
    )


# (case name, found state or None, attempts, cap, expected plan)
CASES = [
    ("nothing_in_progress", None, 0, 3, RecoveryPlan(Step.NOTHING)),
    ("downloading_cleans_up", "downloading", 0, 3, RecoveryPlan(Step.CLEAN_UP, "interrupted")),
    ("verifying_cleans_up", "verifying", 0, 3, RecoveryPlan(Step.CLEAN_UP, "interrupted")),
    # attempts never matter before the bytes are verified
    ("verifying_ignores_attempts", "verifying", 9, 3, RecoveryPlan(Step.CLEAN_UP, "interrupted")),
    ("staged_retries", "staged", 0, 3, RecoveryPlan(Step.RETRY)),
    ("loading_retries", "loading", 1, 3, RecoveryPlan(Step.RETRY)),
    ("health_check_retries", "health_check", 2, 3, RecoveryPlan(Step.RETRY)),
    ("loading_at_cap_rolls_back", "loading", 3, 3, RecoveryPlan(Step.ROLL_BACK, "crash_loop")),
    ("health_check_past_cap_rolls_back", "health_check", 7, 3, RecoveryPlan(Step.ROLL_BACK, "crash_loop")),
    ("staged_at_cap_rolls_back", "staged", 1, 1, RecoveryPlan(Step.ROLL_BACK, "crash_loop")),
    ("cap_one_first_try_retries", "loading", 0, 1, RecoveryPlan(Step.RETRY)),
    ("active_finishes", "active", 1, 3, RecoveryPlan(Step.FINISH)),
    ("active_finishes_even_at_cap", "active", 5, 3, RecoveryPlan(Step.FINISH)),
    ("rolled_back_finishes", "rolled_back", 3, 3, RecoveryPlan(Step.FINISH)),
]


@pytest.mark.parametrize(("found", "attempts", "cap", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resume_table(found: str | None, attempts: int, cap: int, expected: RecoveryPlan) -> None:
    rec = None if found is None else record(found, attempts)
    assert plan_recovery(rec, max_attempts=cap) == expected


# (case name, found state or None, resumable, expected plan): the caller's resumable flag
# (a chunked transfer with its bitmap on disk) only ever keeps a download.
RESUMABLE_CASES = [
    ("downloading_resumable_resumes", "downloading", True, RecoveryPlan(Step.RESUME)),
    ("downloading_not_resumable_cleans_up", "downloading", False, RecoveryPlan(Step.CLEAN_UP, "interrupted")),
    ("verifying_resumable_still_cleans_up", "verifying", True, RecoveryPlan(Step.CLEAN_UP, "interrupted")),
    ("nothing_resumable_is_nothing", None, True, RecoveryPlan(Step.NOTHING)),
    ("staged_resumable_still_retries", "staged", True, RecoveryPlan(Step.RETRY)),
    ("active_resumable_still_finishes", "active", True, RecoveryPlan(Step.FINISH)),
]


@pytest.mark.parametrize(("found", "resumable", "expected"), [c[1:] for c in RESUMABLE_CASES],
                         ids=[c[0] for c in RESUMABLE_CASES])
def test_resume_table_with_a_resumable_download(found: str | None, resumable: bool, expected: RecoveryPlan) -> None:
    rec = None if found is None else record(found)
    assert plan_recovery(rec, resumable=resumable) == expected


def test_every_install_state_has_a_recovery_step() -> None:
    assert set(RESUME_TABLE) == set(INSTALL_STATES)


def test_default_cap_is_three() -> None:
    assert DEFAULT_MAX_ATTEMPTS == 3
    assert plan_recovery(record("loading", 2)).step is Step.RETRY
    assert plan_recovery(record("loading", 3)).step is Step.ROLL_BACK


def test_unknown_state_is_corrupt() -> None:
    # pydantic refuses it on parse; a record built around validation still gets a clear error
    rec = InstallRecord.model_construct(**{**record("staged").model_dump(), "state": "exploded"})
    with pytest.raises(StoreCorrupt, match="unknown state 'exploded'"):
        plan_recovery(rec)


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        plan_recovery(record("staged"), max_attempts=0)
