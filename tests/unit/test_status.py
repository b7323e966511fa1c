"""pipeline status: verdict rules, sampling arithmetic and output shapes, on plain data."""

from __future__ import annotations

import json

import pytest

from pipeline.ops.status import (
    PARTITION_HEADERS,
    SUMMARY_HEADERS,
    PartitionLag,
    StageStatus,
    committed_delta,
    format_age,
    format_dlq,
    is_waiting,
    partition_rows,
    problem_line,
    rate,
    report_json,
    summary_rows,
    verdict,
)

# ------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("live", [True, False])
def test_no_lag_is_idle_whatever_the_members(live):
    assert verdict(lag=0, waiting=0, committed=0, live=live) == "idle"


@pytest.mark.parametrize("live", [True, False])
def test_no_lag_with_commits_during_the_sample_is_ok(live):
    assert verdict(lag=0, waiting=0, committed=120, live=live) == "ok"


def test_lag_and_progress_is_behind():
    assert verdict(lag=500, waiting=0, committed=40, live=True) == "behind"


def test_lag_live_and_no_progress_is_stalled():
    assert verdict(lag=500, waiting=0, committed=0, live=True) == "stalled"


@pytest.mark.parametrize("committed", [0, 10])
def test_lag_without_a_live_member_is_down(committed):
    # offsets may move without a member (a rewind); nobody will consume the lag
    assert verdict(lag=1, waiting=0, committed=committed, live=False) == "down"


def test_retries_waiting_for_their_backoff_are_not_a_stall():
    assert verdict(lag=3, waiting=3, committed=0, live=True) == "ok"
    assert verdict(lag=5, waiting=3, committed=0, live=True) == "stalled"
    assert verdict(lag=5, waiting=3, committed=2, live=True) == "behind"
    assert verdict(lag=3, waiting=3, committed=0, live=False) == "down"


def test_retry_waits_while_due_after_the_sample_start():
    assert is_waiting(due_at_ms=10_001, since_ms=10_000)
    assert not is_waiting(due_at_ms=10_000, since_ms=10_000)
    assert not is_waiting(due_at_ms=0, since_ms=10_000)  # no due-at header: due now


# ------------------------------------------------------------------ arithmetic


def test_committed_delta_sums_forward_moves_and_ignores_rewinds():
    tps = [("a", 0), ("a", 1), ("a", 2), ("r", 0)]
    before = {("a", 0): 10, ("a", 1): None, ("a", 2): 50, ("r", 0): 7}
    after = {("a", 0): 25, ("a", 1): 4, ("a", 2): 20, ("r", 0): 7}
    assert committed_delta(before, after, tps) == 15 + 4 + 0 + 0


def test_rate_is_records_per_second():
    assert rate(30, 2.0) == 15.0
    assert rate(30, 0.0) == 0.0


def test_partition_lag_counts_from_zero_without_a_commit_and_never_negative():
    assert PartitionLag("t", 0, None, 40).lag == 40
    assert PartitionLag("t", 0, 30, 40).lag == 10
    assert PartitionLag("t", 0, 45, 40).lag == 0


# ---------------------------------------------------------------------- shapes


def stage(
    name: str,
    lags: list[tuple[int | None, int]],
    *,
    state: str = "STABLE",
    members: int = 0,
    committed: int = 0,
    dlq: dict[str, int] | None = None,
    last: int | None = None,
    retry_waiting: tuple[int | None, int] | None = None,
) -> StageStatus:
    parts = [PartitionLag(f"{name}.in", i, c, e) for i, (c, e) in enumerate(lags)]
    if retry_waiting is not None:
        parts.append(PartitionLag(f"{name}.retry", 0, *retry_waiting, retry=True, waiting=True))
    return StageStatus(
        stage=name,
        group=f"app-{name}",
        state=state,
        members=members,
        partitions=tuple(parts),
        committed_in_sample=committed,
        elapsed_s=2.0,
        dlq_by_reason=dlq or {},
        last_processed_ms=last,
    )


def four() -> list[StageStatus]:
    return [
        stage("ingest", [(None, 120), (None, 80)], state="EMPTY", dlq={"empty": 2}),
        stage("parse", [(10, 10)], committed=0, last=1_700_000_000_000),
        stage(
            "enrich",
            [(5, 9)],
            committed=8,
            dlq={"unknown_device": 1},
            retry_waiting=(0, 2),
            last=1_700_000_001_000,
        ),
        stage("aggregate", [(3, 7)], committed=0, members=2, state="STABLE"),
    ]


def test_report_json_shape():
    report = report_json(four(), 2.0)
    assert json.loads(json.dumps(report)) == report  # plain JSON types only
    assert set(report) == {"sample_s", "healthy", "unhealthy", "stages"}
    assert report["sample_s"] == 2.0
    assert report["healthy"] is False
    assert report["unhealthy"] == ["ingest", "aggregate"]
    assert [s["stage"] for s in report["stages"]] == ["ingest", "parse", "enrich", "aggregate"]
    ingest, parse, enrich, aggregate = report["stages"]
    assert set(ingest) == {
        "stage",
        "group",
        "state",
        "members",
        "live",
        "lag",
        "waiting",
        "lag_s",
        "partitions",
        "committed_in_sample",
        "sample_elapsed_s",
        "throughput",
        "dlq_depth",
        "dlq_by_reason",
        "dlq_by_reason_since",
        "last_processed",
        "last_processed_ms",
        "verdict",
        "healthy",
        "failures",
    }
    assert ingest["lag"] == 200 and ingest["live"] is False and ingest["verdict"] == "down"
    assert ingest["partitions"] == [
        {
            "topic": "ingest.in",
            "partition": 0,
            "committed": None,
            "end": 120,
            "lag": 120,
            "retry": False,
            "waiting": False,
            "lag_s": None,
        },
        {
            "topic": "ingest.in",
            "partition": 1,
            "committed": None,
            "end": 80,
            "lag": 80,
            "retry": False,
            "waiting": False,
            "lag_s": None,
        },
    ]
    assert ingest["dlq_depth"] == 2 and ingest["dlq_by_reason"] == {"empty": 2}
    assert ingest["last_processed"] is None and ingest["last_processed_ms"] is None
    assert parse["verdict"] == "idle" and parse["lag"] == 0 and parse["live"] is True
    assert parse["last_processed"] == "2023-11-14T22:13:20.000Z"
    assert parse["last_processed_ms"] == 1_700_000_000_000
    assert enrich["lag"] == 6 and enrich["waiting"] == 2
    assert enrich["throughput"] == 4.0 and enrich["committed_in_sample"] == 8
    assert enrich["verdict"] == "behind" and enrich["healthy"] is True
    assert enrich["partitions"][-1]["retry"] is True
    assert aggregate["verdict"] == "stalled" and aggregate["members"] == 2


def test_problem_line_names_every_unhealthy_stage_on_one_line():
    line = problem_line(four())
    assert line == (
        "unhealthy stage(s): ingest down (lag 200, no live member); "
        "aggregate stalled (lag 4, no progress during the sample)"
    )
    healthy = [s for s in four() if s.stage in ("parse", "enrich")]
    assert problem_line(healthy) is None


def test_table_rows_line_up_with_headers():
    statuses = four()
    rows = summary_rows(statuses, now_ms=1_700_000_061_000)
    assert all(len(r) == len(SUMMARY_HEADERS) for r in rows)
    by_stage = {r[0]: dict(zip(SUMMARY_HEADERS, r, strict=True)) for r in rows}
    assert by_stage["ingest"]["verdict"] == "down"
    assert by_stage["ingest"]["lag"] == "200"
    assert by_stage["ingest"]["dlq"] == "2 (last day: empty 2)"
    assert by_stage["ingest"]["last processed"] is None
    assert by_stage["parse"]["last processed"] == "2023-11-14T22:13:20.000Z (61s ago)"
    assert by_stage["enrich"]["lag"] == "6 (2 waiting)"
    assert by_stage["enrich"]["rec/s"] == "4.0"
    parts = partition_rows(statuses)
    assert all(len(r) == len(PARTITION_HEADERS) for r in parts)
    assert len(parts) == sum(len(s.partitions) for s in statuses)
    assert ["enrich", "enrich.retry (retry)", 0, 0, 2, "2 (waiting)", "-"] in parts


def test_lag_in_seconds_is_the_oldest_waiting_record_of_a_stage():
    from dataclasses import replace

    base = stage("enrich", [(5, 9), (3, 3)], retry_waiting=(0, 2))
    parts = list(base.partitions)
    parts[0] = replace(parts[0], lag_s=42.4)
    parts[2] = replace(parts[2], lag_s=900.0)  # a retry held for its backoff: not late
    status = replace(base, partitions=tuple(parts))
    assert status.lag_s == 42.4
    assert status.as_json()["lag_s"] == 42.4
    assert status.as_json()["partitions"][0]["lag_s"] == 42.4
    row = dict(zip(SUMMARY_HEADERS, summary_rows([status], now_ms=0)[0], strict=True))
    assert row["lag s"] == "42s"
    assert partition_rows([status])[0][-1] == "42s"
    assert stage("parse", [(10, 10)]).lag_s is None


def test_age_of_a_record_counts_from_its_ingest_time():
    from pipeline.contract import H_INGEST_TS
    from pipeline.ops.status import age_s

    event_time_ms = 1_000_000  # a reading's own time, long before it came in
    headers = [(H_INGEST_TS, b"1700000000000")]
    assert age_s(event_time_ms, headers, now_ms=1_700_000_030_000) == 30.0
    assert age_s(1_700_000_020_000, [], now_ms=1_700_000_030_000) == 10.0  # a landing record
    assert age_s(0, [], now_ms=1) is None


def test_formatting_helpers():
    assert format_dlq({}) == "0"
    assert format_dlq({"decode_error": 3, "late": 1}) == "4 (last day: decode_error 3, late 1)"
    # held from offsets: older dead letters count though the last day had fewer
    assert format_dlq({"late": 1}, held=7) == "7 (last day: late 1)"
    assert format_dlq({}, held=5) == "5"
    assert [format_age(s) for s in (-1, 5, 119, 600, 7199, 7200, 200_000)] == [
        "0s",
        "5s",
        "119s",
        "10m",
        "119m",
        "2h",
        "2d",
    ]


def test_a_batch_failed_twice_in_a_row_is_a_crash_loop_even_with_progress():
    from dataclasses import replace

    from pipeline.obs.failures import Failure

    once = Failure("parse", "parse.in", 3, 120, 130, 1, "ZeroDivisionError: division by zero", 0)
    first = replace(stage("parse", [(10, 50)], committed=5), failures=(once,))
    assert first.verdict == "behind" and first.healthy  # one failure is a restart
    again = replace(first, failures=(replace(once, attempts=2),))
    assert again.verdict == "crash-looping" and not again.healthy
    line = problem_line([again])
    assert line is not None and "parse crash-looping" in line
    assert "parse.in[3] at offset 120" in line and "ZeroDivisionError" in line
    (shown,) = report_json([again], 2.0)["stages"][0]["failures"]
    assert shown["attempts"] == 2 and shown["offset"] == 120 and shown["last_offset"] == 130
