"""Consumer lag in seconds (pipeline.obs.lag_time): when records landed, from the ends
a worker saw, and the age of the oldest uncommitted one."""

from __future__ import annotations

import pytest

from pipeline.contract import H_INGEST_TS
from pipeline.obs.lag_time import MAX_POINTS, LandingClock, LandingClocks, record_time_s


def test_nothing_waiting_is_zero_seconds() -> None:
    clock = LandingClock()
    assert clock.age(0, now=100.0) == 0.0  # nothing seen yet
    clock.observe(10, now=100.0)
    assert clock.age(10, now=500.0) == 0.0  # committed up to the end


def test_a_record_landed_between_the_two_ends_that_bracket_it() -> None:
    clock = LandingClock()
    clock.observe(100, now=1000.0)
    clock.observe(200, now=1010.0)  # offsets 100..199 landed in (1000, 1010]
    assert clock.landed_at(100) == pytest.approx(1000.0)
    assert clock.landed_at(150) == pytest.approx(1005.0)
    assert clock.landed_at(199) == pytest.approx(1009.9)
    assert clock.landed_at(200) is None  # not landed as far as the worker knows
    assert clock.age(150, now=1030.0) == pytest.approx(25.0)


def test_the_age_grows_while_nothing_is_committed() -> None:
    clock = LandingClock()
    clock.observe(0, now=0.0)
    clock.observe(50, now=10.0)
    ages = [clock.age(0, now) for now in (10.0, 20.0, 70.0)]
    assert ages == pytest.approx([10.0, 20.0, 70.0])  # a stopped stage keeps ageing


def test_records_there_before_the_first_observation_use_their_own_times() -> None:
    clock = LandingClock()
    clock.observe(1000, now=5000.0)  # a worker starts on a backlog of 1000 records
    assert clock.age(0, now=5000.0) == 0.0  # no record seen: at the latest, just now
    clock.anchor(0, landed_by=4400.0)  # the first record came in ten minutes ago
    assert clock.age(0, now=5000.0) == pytest.approx(600.0)
    assert clock.age(500, now=5000.0) == pytest.approx(300.0)  # interpolated to the end
    clock.anchor(0, landed_by=6000.0)  # a later anchor for the same offset is ignored
    assert clock.age(0, now=5000.0) == pytest.approx(600.0)


def test_an_anchor_is_never_later_than_the_first_observation() -> None:
    clock = LandingClock()
    clock.anchor(3, landed_by=9000.0)  # a record's clock ahead (event time from a device)
    clock.observe(10, now=100.0)
    assert clock.landed_at(3) == pytest.approx(100.0)


def test_an_anchor_past_the_first_observation_is_ignored() -> None:
    clock = LandingClock()
    clock.observe(10, now=100.0)
    clock.observe(20, now=110.0)
    clock.anchor(15, landed_by=1.0)
    assert clock.landed_at(15) == pytest.approx(105.0)


def test_committed_observations_are_forgotten() -> None:
    clock = LandingClock()
    for i in range(1, 11):
        clock.observe(i * 100, now=float(i))
    clock.forget_below(550)
    assert clock.first_high == 500  # the bracket below 550 stays
    assert clock.landed_at(550) == pytest.approx(5.5)


def test_memory_is_bounded_and_new_records_stay_exact() -> None:
    clock = LandingClock()
    for i in range(1, 10 * MAX_POINTS):
        clock.observe(i * 10, now=float(i))
    assert len(clock._highs) <= MAX_POINTS
    last = 10 * MAX_POINTS - 1
    assert clock.landed_at((last - 1) * 10 + 5) == pytest.approx(last - 0.5)
    assert clock.landed_at(15) is not None


def test_record_time_prefers_the_ingest_time_header() -> None:
    event_time = 1_000_000
    assert record_time_s(event_time, [(H_INGEST_TS, b"2000000")]) == 2000.0
    assert record_time_s(3_000_000, [(H_INGEST_TS, b"2000000")]) == 3000.0
    assert record_time_s(event_time, []) == 1000.0
    assert record_time_s(0, [(H_INGEST_TS, b"junk")]) is None


def test_clocks_per_partition_anchor_from_the_first_record_of_a_batch() -> None:
    clocks = LandingClocks()
    clocks.batch("in", 0, 40, 1_000, [(H_INGEST_TS, b"900000")])  # before any observation
    clocks.observe([("in", 0, 100), ("in", 1, 7)], now=1000.0)
    assert clocks.age("in", 0, committed=40, now=1000.0) == pytest.approx(100.0)
    assert clocks.age("in", 1, committed=0, now=1000.0) == 0.0  # landed "just now" at best
    assert clocks.age("in", 1, committed=7, now=1000.0) == 0.0
    assert clocks.age("other", 0, committed=0, now=1000.0) == 0.0
