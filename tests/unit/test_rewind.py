"""`pipeline replay`: offset resolution and option validation, without a broker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.errors import ConfigError
from pipeline.ops.rewind import (
    Target,
    is_live,
    offset_target,
    parse_target,
    resolve_time_offset,
    stage_partitions,
)
from pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[2]

# Offsets 0..9 at 1000, 10..19 at 2000, 20..29 at 3000 (ms).
TIMESTAMPS = [1000] * 10 + [2000] * 10 + [3000] * 10


class Log:
    """A partition as a plain list of record timestamps, counting reads."""

    def __init__(self, timestamps: list[int | None], low: int = 0) -> None:
        self.timestamps = timestamps
        self.low = low
        self.reads: list[int] = []
        self.scans = 0

    @property
    def high(self) -> int:
        return self.low + len(self.timestamps)

    def ts_at(self, offset: int) -> int | None:
        self.reads.append(offset)
        return self.timestamps[offset - self.low]

    def scan_for(self, target_ms: int):
        def scan() -> int:
            self.scans += 1
            for i, ts in enumerate(self.timestamps):
                if ts is not None and ts >= target_ms:
                    return self.low + i
            return self.high

        return scan

    def resolve(self, target_ms: int, candidate: int | None) -> tuple[int, str]:
        return resolve_time_offset(
            target_ms, candidate, self.low, self.high, self.ts_at, self.scan_for(target_ms)
        )


# -- resolve_time_offset ---------------------------------------------------------


def test_a_correct_broker_answer_is_verified_and_used_without_a_scan():
    log = Log(TIMESTAMPS)
    assert log.resolve(1500, 10) == (10, "broker")
    assert log.scans == 0
    assert sorted(log.reads) == [9, 10]


def test_the_embedded_brokers_answer_zero_is_caught_and_a_scan_finds_the_offset():
    log = Log(TIMESTAMPS)
    assert log.resolve(1500, 0) == (10, "scan")
    assert log.scans == 1
    log = Log(TIMESTAMPS)
    assert log.resolve(2000, 0) == (10, "scan")
    assert log.resolve(2001, 0) == (20, "scan")


def test_an_answer_one_too_late_or_too_early_is_not_accepted():
    assert Log(TIMESTAMPS).resolve(1500, 11) == (10, "scan")  # ts(10) >= T: 11 is not first
    assert Log(TIMESTAMPS).resolve(1500, 9) == (10, "scan")  # ts(9) < T


def test_zero_is_right_when_the_target_is_before_every_record():
    log = Log(TIMESTAMPS)
    assert log.resolve(500, 0) == (0, "broker")
    assert log.scans == 0


def test_a_target_after_every_record_is_the_high_watermark():
    assert Log(TIMESTAMPS).resolve(5000, 0) == (30, "scan")  # embedded broker: 0
    log = Log(TIMESTAMPS)
    assert log.resolve(5000, None) == (30, "broker")  # real Kafka: "none" (-1)
    assert log.reads == [29] and log.scans == 0


def test_an_empty_partition_resolves_to_its_end_without_reading():
    log = Log([], low=7)
    assert log.resolve(1500, None) == (7, "broker")
    assert log.resolve(1500, 7) == (7, "broker")
    assert log.reads == [] and log.scans == 0


def test_answers_outside_the_watermarks_or_unreadable_records_mean_a_scan():
    log = Log(TIMESTAMPS[10:], low=10)  # offsets 0..9 deleted by retention
    assert log.resolve(500, 0) == (10, "scan")
    assert log.resolve(2500, 99) == (20, "scan")
    gap = Log([1000, None, 2000, 2000])  # offset 1 has no readable record
    assert gap.resolve(1500, 2) == (2, "scan")


# -- targets ---------------------------------------------------------------------


def target(**chosen) -> Target:
    options = {
        "to_datetime": None,
        "by_duration": None,
        "shift_by": None,
        "to_offset": None,
        "to_earliest": False,
        "to_latest": False,
        **chosen,
    }
    return parse_target(**options, now=datetime(2026, 11, 29, 12, 0, tzinfo=UTC))


def test_shift_is_relative_to_the_commit_and_clamped_to_the_watermarks():
    assert offset_target(target(shift_by=-5), 20, 0, 30) == (15, "commit -5")
    assert offset_target(target(shift_by=-50), 20, 3, 30) == (3, "commit -50 (clamped)")
    assert offset_target(target(shift_by=+50), 20, 0, 30) == (30, "commit +50 (clamped)")


def test_shift_without_a_commit_is_relative_to_the_low_watermark():
    assert offset_target(target(shift_by=5), None, 4, 30) == (9, "no commit: low +5")
    assert offset_target(target(shift_by=-5), None, 4, 30) == (
        4,
        "no commit: low -5 (clamped)",
    )


def test_absolute_and_watermark_targets():
    assert offset_target(target(to_offset=12), 20, 0, 30) == (12, "absolute")
    assert offset_target(target(to_offset=99), 20, 0, 30) == (30, "absolute (clamped)")
    assert offset_target(target(to_offset=1), None, 5, 30) == (5, "absolute (clamped)")
    assert offset_target(target(to_earliest=True), 20, 5, 30) == (5, "low watermark")
    assert offset_target(target(to_latest=True), 20, 5, 30) == (30, "high watermark")


def test_time_targets_in_epoch_ms():
    at = target(to_datetime="2026-11-29T10:00:00+01:00")
    assert (at.kind, at.value) == (
        "time",
        int(datetime(2026, 11, 29, 9, tzinfo=UTC).timestamp()) * 1000,
    )
    ago = target(by_duration="PT10M")
    noon = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert ago.value == int((noon - timedelta(minutes=10)).timestamp() * 1000)


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="choose where"):
        target()
    with pytest.raises(ConfigError, match="--to-earliest and --to-latest exclude each other"):
        target(to_earliest=True, to_latest=True)
    with pytest.raises(ConfigError, match="must be >= 0"):
        target(to_offset=-1)
    with pytest.raises(ConfigError, match="no timezone"):
        target(to_datetime="2026-11-29T10:00:00")


def test_liveness_from_describe_consumer_groups():
    assert is_live("STABLE", 0)  # the embedded broker: live, no members listed
    assert is_live("PREPARING_REBALANCING", 0)
    assert is_live("EMPTY", 1)  # members listed: live whatever the state says
    assert not is_live("EMPTY", 0)
    assert not is_live("DEAD", 0)
    assert not is_live("UNKNOWN", 0)


def test_stage_partitions_come_from_the_config():
    settings = load_settings(REPO / "config" / "pipeline.yaml")
    assert stage_partitions(settings, "parse", None) == [("iot.raw", p) for p in range(4)]
    assert stage_partitions(settings, "parse", 2) == [("iot.raw", 2)]
    with pytest.raises(ConfigError, match=r"partition 4 does not exist: iot.raw has 4"):
        stage_partitions(settings, "parse", 4)


# -- the command, failing before any broker access --------------------------------

NO_BROKER = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # nothing listens there


def replay(*args: str):
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["replay", *args], env=NO_BROKER)
    # A broker access would have to time out first (seconds), then exit 3.
    assert time.monotonic() - started < 3, "validation touched the broker"
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_target_option():
    line = one_error_line(replay("parse"))
    assert "--to-datetime" in line and "--to-latest" in line


def test_two_target_options():
    line = one_error_line(replay("parse", "--to-earliest", "--shift-by", "-5"))
    assert "--shift-by and --to-earliest exclude each other" in line


def test_naive_datetime_needs_a_timezone():
    line = one_error_line(replay("parse", "--to-datetime", "2026-11-29T10:00:00"))
    assert "timezone" in line and "2026-11-29T10:00:00Z" in line


def test_bad_duration():
    line = one_error_line(replay("parse", "--by-duration", "10 minutes"))
    assert "'10 minutes' is not an ISO 8601 duration" in line


def test_unknown_stage_names_the_known_ones():
    line = one_error_line(replay("transform", "--to-earliest"))
    assert line == (
        "error: unknown stage 'transform'; choose one of: ingest, parse, enrich, aggregate"
    )


def test_partition_that_does_not_exist():
    line = one_error_line(replay("parse", "--to-earliest", "--partition", "9"))
    assert "partition 9 does not exist" in line
