"""FailureLog's count of failed attempts on one batch (the failures topic itself is
exercised against the broker in tests/integration/test_stage_bugs.py)."""

from __future__ import annotations

from pipeline.obs.failures import FailureLog
from pipeline.settings import load_settings


def log_without_topic() -> FailureLog:
    failures = FailureLog(load_settings(), "parse")
    failures.topic = None  # count only, write nothing
    return failures


def test_a_batch_failing_again_counts_as_the_same_failure_if_it_covers_the_offset() -> None:
    failures = log_without_topic()
    assert failures.record("t", 0, 40, 59, "boom").attempts == 1
    # after a restart the batch starts earlier (batches in flight were not committed)
    assert failures.record("t", 0, 20, 79, "boom").attempts == 2
    assert failures.record("t", 0, 20, 79, "boom").attempts == 3
    # a batch that does not reach the recorded offset is another failure
    assert failures.record("t", 0, 0, 19, "boom").attempts == 1
    # another partition is another failure
    assert failures.record("t", 1, 0, 19, "boom").attempts == 1


def test_a_batch_that_gets_past_the_offset_clears_it_once() -> None:
    failures = log_without_topic()
    failures.record("t", 0, 40, 59, "boom")
    assert failures.passed("t", 0, 0, 39) is None  # not yet past it
    cleared = failures.passed("t", 0, 40, 59)
    assert cleared is not None and cleared.offset == 40
    assert failures.passed("t", 0, 60, 79) is None and not failures.known
