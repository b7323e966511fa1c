"""Dead-letter summaries that read a window of long dead-letter topics, on a real broker:
`pipeline dlq summary` and a backfill run's final count."""

from __future__ import annotations

import math
import time
from collections import Counter

import orjson

from dlq.read import Filters
from dlq.summary import dlq_offsets, run_dead_letters, window_summary
from dlq.view import iso
from pipeline import contract
from pipeline.testing.history import write_dead_letters
from tests.integration.harness import isolated_config
from tests.integration.test_topics_cli import run_cli

DAY = 86_400_000


def test_a_summary_reads_the_window_not_the_whole_dead_letter_topic(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    now = int(time.time() * 1000)
    # 30 days of dead letters, one every 100 s: 25920, 864 of them in the last day
    written = write_dead_letters(settings, "parse", 25_920, now - 30 * DAY, 0.01)
    since = now - DAY
    expected = Counter(reason for at, reason in written if at >= since)
    assert sum(expected.values()) == 864

    got = window_summary(settings, ["parse"], Filters(), since)
    assert {row.reason: row.count for row in got.rows} == expected
    assert got.held == {"parse": len(written)}
    # O(log n) to find the day's start, then the day's dead letters (and a minute)
    window = sum(expected.values())
    assert got.cost.records <= 2 * math.log2(len(written)) + window + 10, got.cost
    assert got.cost.partitions == {(settings.stage("parse").dlq, 0)}

    # the command: the same counts; --reason narrows them; by default the last day
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    args = ["--config", str(config), "dlq", "summary", "--stage", "parse", "--json"]
    shown = run_cli([*args, "--since", iso(since)], env)
    assert shown.exit_code == 0, shown.output
    assert {r["reason"]: r["count"] for r in orjson.loads(shown.stdout)} == expected
    last_day = run_cli(args, env)
    assert sum(r["count"] for r in orjson.loads(last_day.stdout)) in (863, 864)
    one = run_cli([*args, "--since", iso(since), "--reason", "decode_error"], env)
    assert {r["reason"]: r["count"] for r in orjson.loads(one.stdout)} == {
        "decode_error": expected["decode_error"]
    }


def test_a_backfill_runs_dead_letters_are_counted_from_where_the_run_started(broker, tmp_path):
    _, settings = isolated_config(tmp_path, broker.bootstrap)
    now = int(time.time() * 1000)
    run = contract.backfill_source("r1")
    # history before the run, some of it from an earlier run of the same id
    write_dead_letters(settings, "parse", 5_000, now - 10 * DAY, 0.05)
    write_dead_letters(settings, "enrich", 300, now - DAY, 0.05, source=run)
    started = dlq_offsets(settings)
    assert started[f"{settings.stage('parse').dlq}:0"] == 5_000
    # the run's own, among live ones
    write_dead_letters(settings, "parse", 40, now, 10, ("schema_violation",), source=run)
    write_dead_letters(settings, "parse", 25, now, 10, ("decode_error",))
    write_dead_letters(settings, "enrich", 7, now, 10, ("unknown_device",), source=run)

    counts = run_dead_letters(settings, run, started, now)
    assert counts == {"parse": {"schema_violation": 40}, "enrich": {"unknown_device": 7}}
    # a run that recorded no offsets (started before they were kept): from its start time
    assert run_dead_letters(settings, run, None, now) == counts
