"""`pipeline replay`: rewinding a stage's committed offsets on the real broker."""

from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition

from pipeline.kafka.clients import admin, client_config, producer
from pipeline.kafka.offsets import committed_offsets
from pipeline.settings import Settings
from tests.integration.harness import isolated_config
from tests.integration.test_topics_cli import run_cli, run_pipeline

MINUTE_MS = 60_000

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def parse_input(broker, tmp_path):
    """An isolated config whose parse input holds 30 records on partition 0:
    offsets 0-9 at now-30min, 10-19 at now-5min, 20-29 at now."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    topic = settings.stage("parse").inputs[0]
    now = int(time.time() * 1000)
    client = producer(settings)
    for i, ts in enumerate([now - 30 * MINUTE_MS] * 10 + [now - 5 * MINUTE_MS] * 10 + [now] * 10):
        client.produce(topic, f"r{i}".encode(), f"k{i}".encode(), partition=0, timestamp=ts)
    assert client.flush(30) == 0
    return config, settings, topic


def tps_of(settings: Settings, topic: str) -> list[tuple[str, int]]:
    return [(topic, p) for p in range(settings.topics[topic].partitions)]


def commit(settings: Settings, offsets: dict[tuple[str, int], int]) -> None:
    group = settings.group_id("parse")
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
    )
    client = admin(settings)  # referenced until the answer is in: a dropped client never answers
    answer = client.alter_consumer_group_offsets([request], request_timeout=10)[group].result(15)
    assert all(tp.error is None for tp in answer.topic_partitions), answer.topic_partitions


def committed(settings: Settings, topic: str) -> dict[int, int | None]:
    offsets = committed_offsets(
        admin(settings), settings.group_id("parse"), tps_of(settings, topic)
    )
    return {p: o for (_, p), o in offsets.items()}


def replay(broker, config, *args):
    result = run_cli(
        ["--config", str(config), "replay", "parse", *args],
        {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap},
    )
    assert result.exit_code == 0, result.output
    return result


def replay_json(broker, config, *args) -> dict[int, dict]:
    rows = json.loads(replay(broker, config, *args, "--json").stdout)
    return {row["partition"]: row for row in rows}


def test_by_duration_dry_run_changes_nothing_and_execute_moves_the_group(broker, parse_input):
    config, settings, topic = parse_input
    commit(settings, {tp: 30 if tp[1] == 0 else 0 for tp in tps_of(settings, topic)})
    before = committed(settings, topic)
    assert before == {0: 30, 1: 0, 2: 0, 3: 0}

    rows = replay_json(broker, config, "--by-duration", "PT10M")
    p0 = rows[0]
    assert (p0["topic"], p0["current"], p0["target"], p0["delta"]) == (topic, 30, 10, 20)
    assert (p0["low"], p0["high"], p0["applied"]) == (0, 30, False)
    # The embedded broker answers offsets_for_times with 0, which the check rejects.
    assert p0["method"] == ("scan" if broker.kind == "embedded" else "broker"), p0
    for p in (1, 2, 3):
        assert (rows[p]["current"], rows[p]["target"], rows[p]["delta"]) == (0, 0, 0)
        assert (rows[p]["low"], rows[p]["high"]) == (0, 0)
    assert committed(settings, topic) == before

    human = replay(broker, config, "--by-duration", "PT10M").stdout
    assert "dry run: nothing changed" in human
    assert ("scanned" if broker.kind == "embedded" else "broker's") in human  # cells may wrap
    assert committed(settings, topic) == before

    rows = replay_json(broker, config, "--by-duration", "PT10M", "--execute")
    assert rows[0]["applied"] and rows[0]["target"] == 10
    assert committed(settings, topic) == {0: 10, 1: 0, 2: 0, 3: 0}

    # A time after every record is the end; before every record is the start.
    assert replay_json(broker, config, "--to-datetime", "2999-01-01T00:00:00Z")[0]["target"] == 30
    assert replay_json(broker, config, "--by-duration", "PT1H")[0]["target"] == 0


def test_execute_refuses_while_the_group_has_a_live_member(broker, parse_input):
    config, settings, topic = parse_input
    commit(settings, {(topic, 0): 30})
    member = Consumer(
        {
            **client_config(settings),
            "group.id": settings.group_id("parse"),
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )
    try:
        member.subscribe([topic])
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the consumer got no assignment"
            member.poll(0.2)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        proc = run_pipeline(
            ["--config", str(config), "replay", "parse", "--to-earliest", "--execute"],
            env,
            timeout=60,
        )
    finally:
        member.close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: consumer group {settings.group_id('parse')} is live")
    assert lines[0].endswith("stop the stage's workers first")
    assert committed(settings, topic)[0] == 30


def test_shift_by_earliest_offset_and_partition(broker, parse_input):
    config, settings, topic = parse_input
    commit(settings, {(topic, 0): 30})  # partitions 1-3: no commit

    rows = replay_json(broker, config, "--shift-by", "-5")
    assert (rows[0]["current"], rows[0]["target"], rows[0]["delta"]) == (30, 25, 5)
    assert rows[1]["current"] is None and rows[1]["note"] == "no commit: low -5 (clamped)"
    assert committed(settings, topic) == {0: 30, 1: None, 2: None, 3: None}

    replay_json(broker, config, "--shift-by", "-5", "--partition", "0", "--execute")
    assert committed(settings, topic) == {0: 25, 1: None, 2: None, 3: None}

    rows = replay_json(broker, config, "--to-earliest", "--execute")
    assert {p: r["target"] for p, r in rows.items()} == {0: 0, 1: 0, 2: 0, 3: 0}
    assert committed(settings, topic) == {0: 0, 1: 0, 2: 0, 3: 0}

    rows = replay_json(broker, config, "--shift-by", "-5", "--execute")
    assert (rows[0]["target"], rows[0]["note"]) == (0, "commit -5 (clamped)")
    assert committed(settings, topic)[0] == 0

    rows = replay_json(broker, config, "--shift-by", "100", "--partition", "0")
    assert (rows[0]["target"], rows[0]["delta"]) == (30, -30)  # clamped: skips 30 records

    replay_json(broker, config, "--to-offset", "12", "--partition", "0", "--execute")
    assert committed(settings, topic) == {0: 12, 1: 0, 2: 0, 3: 0}

    replay_json(broker, config, "--to-latest", "--execute")
    assert committed(settings, topic) == {0: 30, 1: 0, 2: 0, 3: 0}
