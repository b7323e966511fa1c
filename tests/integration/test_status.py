"""``pipeline status`` against a real broker and real stage workers."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from confluent_kafka import TopicPartition

from pipeline.kafka.clients import admin, consumer, producer
from pipeline.kafka.offsets import group_lag
from tests.integration.harness import (
    Pipeline,
    aggregates,
    dead_letters,
    isolated_config,
    produce,
    publish_devices,
    wait_for,
)
from tests.integration.test_pipeline import REGISTRY, sent_records
from tests.integration.test_topics_cli import run_cli, run_pipeline


def status_json(config, env, sample_s: float = 1.0):
    result = run_cli(
        ["--config", str(config), "status", "--json", "--sample-s", str(sample_s)], env
    )
    return result, json.loads(result.stdout)


def test_status_down_then_ok_then_stalled(broker, tmp_path):
    config, settings = isolated_config(
        tmp_path,
        broker.bootstrap,
        # parse stops after 20 dead letters in a row (the last phase)
        stages={"parse": {"dlq_budget": {"max_consecutive": 20, "min_records": 1000}}},
    )
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    publish_devices(settings, REGISTRY)
    records = sent_records(200, seed=7, bad_ratio=0.1)
    produce(settings, settings.stages["ingest"].inputs[0], records)

    # no worker at all: ingest has everything to do and nobody to do it
    result, report = status_json(config, env)
    assert result.exit_code == 1, result.output
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == list(settings.stage_ids)
    assert by_stage["ingest"]["verdict"] == "down"
    assert by_stage["ingest"]["lag"] == 200
    assert sum(p["lag"] for p in by_stage["ingest"]["partitions"]) == 200
    assert by_stage["ingest"]["live"] is False
    assert by_stage["ingest"]["last_processed"] is None
    for name in ("parse", "enrich", "aggregate"):
        assert by_stage[name]["verdict"] == "idle" and by_stage[name]["lag"] == 0
    assert report["healthy"] is False and report["unhealthy"] == ["ingest"]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unhealthy stage(s): ingest down (lag 200")

    # the same as a real process, human table on stdout, one line on stderr
    proc = run_pipeline(
        ["--config", str(config), "status", "--sample-s", "0.5"],
        {**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: unhealthy stage(s): ingest down"), proc.stderr
    assert "parse" not in proc.stderr
    ingest_row = next(line for line in proc.stdout.splitlines() if line.startswith("ingest "))
    assert ingest_row.split()[-1] == "down" and " 200 " in ingest_row

    # all four stages: once everything is processed, every stage is healthy
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    try:
        client = admin(settings)

        def processed() -> bool:
            pipe.check_alive()
            if any(any(group_lag(settings, client, s).values()) for s in settings.stage_ids):
                return False
            return bool(aggregates(settings))  # and windows were emitted

        wait_for(processed, 70, "every stage to commit all its input", pipe.logs)
        result, report = status_json(config, env)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert report["healthy"] is True and report["unhealthy"] == []
        for s in report["stages"]:
            assert s["verdict"] in ("ok", "idle"), s
            assert s["lag"] == 0 and all(p["lag"] == 0 for p in s["partitions"]), s
            assert s["live"] is True, s
            assert s["last_processed"] is not None, s
            assert s["last_processed_ms"] > 0, s
            dead = Counter(
                dict(m.headers())["dlq.reason"].decode() for m in dead_letters(settings, s["stage"])
            )
            assert s["dlq_by_reason"] == dict(dead), s["stage"]
            assert s["dlq_depth"] == sum(dead.values())
        depth = {s["stage"]: s["dlq_depth"] for s in report["stages"]}
        assert depth["ingest"] and depth["parse"] and depth["enrich"], depth
        enrich = next(s for s in report["stages"] if s["stage"] == "enrich")
        assert any(p["retry"] for p in enrich["partitions"])

        # parse stops on its dead-letter budget: live, lag, no progress
        parse = pipe.workers["parse"][0]
        raw = settings.stages["parse"].inputs[0]
        garbage = producer(settings)
        for i in range(100):
            garbage.produce(raw, b"not json at all %d" % i, b"k", partition=0)
        assert garbage.flush(30) == 0
        wait_for(
            lambda: parse.counter("pipeline_stage_stopped") == 1,
            45,
            "parse to stop on its dead-letter budget",
            pipe.logs,
        )
        result, report = status_json(config, env)
        assert result.exit_code == 1, result.output
        by_stage = {s["stage"]: s for s in report["stages"]}
        assert by_stage["parse"]["verdict"] == "stalled", by_stage["parse"]
        assert by_stage["parse"]["lag"] > 0 and by_stage["parse"]["committed_in_sample"] == 0
        assert report["unhealthy"] == ["parse"]
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("error: unhealthy stage(s): parse stalled")
    finally:
        pipe.stop_all()


def test_retries_held_for_their_backoff_are_not_a_stall(broker, tmp_path):
    """A live member of the enrich group that commits nothing: a retry record due in
    the future is waiting (ok), one already due is stalled, no member is down."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    retry_topic = settings.stages["enrich"].retry.topic
    now = int(time.time() * 1000)
    send = producer(settings)
    for due in (now + 600_000, now - 600_000):
        send.produce(retry_topic, b"{}", b"dev-x", headers=[("retry.due-at", str(due).encode())])
    assert send.flush(30) == 0
    # the embedded broker completes a first join after about half the session timeout
    member = consumer(
        settings, group_id=settings.group_id("enrich"), **{"session.timeout.ms": 6000}
    )
    member.subscribe([retry_topic])
    try:
        wait_for(lambda: bool(member.poll(0.2) or member.assignment()), 30, "the member to join")

        result, report = status_json(config, env, sample_s=0.5)
        enrich = next(s for s in report["stages"] if s["stage"] == "enrich")
        assert (enrich["lag"], enrich["waiting"], enrich["live"]) == (2, 2, True), enrich
        assert enrich["verdict"] == "ok"
        assert result.exit_code == 0, result.output

        # the head of the retry partition is now overdue and nothing moves
        member.commit(offsets=[TopicPartition(retry_topic, 0, 1)], asynchronous=False)
        result, report = status_json(config, env, sample_s=0.5)
        enrich = next(s for s in report["stages"] if s["stage"] == "enrich")
        assert (enrich["lag"], enrich["waiting"], enrich["verdict"]) == (1, 0, "stalled"), enrich
        assert result.exit_code == 1
        assert result.stderr.startswith("error: unhealthy stage(s): enrich stalled (lag 1")
    finally:
        member.close()
    result, report = status_json(config, env, sample_s=0.5)
    enrich = next(s for s in report["stages"] if s["stage"] == "enrich")
    assert enrich["verdict"] == "down" and enrich["live"] is False, enrich
    assert result.exit_code == 1
