"""The four stages as separate processes on a real broker."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from pipeline import contract
from pipeline.demo.simulator import SimRecord
from pipeline.kafka.clients import admin
from pipeline.kafka.offsets import group_lag, read_topic
from pipeline.lineage.find import find
from pipeline.lineage.trace import trace_many
from pipeline.ops.rewind import group_state, is_live
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    aggregates,
    assert_windows_match,
    dead_letters,
    isolated_config,
    produce,
    publish_devices,
    sent_records,
    wait_for,
    wait_for_all_readings,
)
from tests.integration.test_topics_cli import run_cli


def test_four_stage_pipeline_counts_every_good_reading_once(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    try:
        records = sent_records(3000, seed=11)
        kinds = Counter(r.kind for r in records)
        assert (
            kinds["duplicate"] > 5
            and sum(v for k, v in kinds.items() if k not in ("good", "duplicate")) > 10
        )
        produce(settings, settings.stages["ingest"].inputs[0], records)
        got = wait_for_all_readings(pipe, kinds["good"])
        assert_windows_match(records, got)
        # every poison record is on its stage's dead-letter topic with its reason,
        # once, and its dlq.original.* coordinates point at it in the stage's input
        for stage in ("ingest", "parse", "enrich", "aggregate"):
            want = Counter((r.kind, r.value) for r in records if r.stage == stage)
            wait_for(
                lambda stage=stage, want=want: (
                    len(dead_letters(settings, stage)) >= sum(want.values())
                ),
                30,
                f"{stage} dead letters",
                pipe.logs,
            )
            dead = dead_letters(settings, stage)
            have = Counter(
                (dict(m.headers())["dlq.reason"].decode(), m.value() or b"") for m in dead
            )
            assert have == want, stage
            source = {
                (m.partition(), m.offset()): m
                for m in read_topic(settings, settings.stages[stage].inputs[0])
            }
            origins = set()
            for m in dead:
                h = dict(m.headers())
                assert h["dlq.stage"] == stage.encode()
                assert h["dlq.original.topic"] == settings.stages[stage].inputs[0].encode()
                origin = (int(h["dlq.original.partition"]), int(h["dlq.original.offset"]))
                original = source[origin]
                assert original.value() == m.value() and original.key() == m.key()
                # the original's lineage id, or, for a record that entered here without
                # one, the id its entry derives (its outputs and hops name the same)
                entry = contract.entry_lineage_id(
                    original.timestamp()[1], original.topic(), *origin
                ).encode()
                assert dict(original.headers() or []).get("lineage-id", entry) == h["lineage-id"]
                origins.add(origin)
            assert len(origins) == len(dead)
        # no window is emitted twice in a run without failures
        keys = [(w["device_id"], w["metric"], w["window_start"]) for w in got]
        assert len(keys) == len(set(keys))
        # lineage: every record ingest accepted has a complete path, ending in the
        # window that counted it or the dead letter where it stopped
        raw = read_topic(settings, settings.stages["parse"].inputs[0])
        ids = sorted({dict(m.headers())["lineage-id"].decode() for m in raw})
        traces = trace_many(settings, ids)
        assert [t for t in traces.values() if not t.complete] == []
        ends = Counter(t.end for t in traces.values())
        later_poison = sum(1 for r in records if r.stage in ("parse", "enrich", "aggregate"))
        assert ends == {"window": kinds["good"], "dead_letter": later_poison}, ends
        one = next(t for t in traces.values() if t.end == "window")
        assert [h["stage"] for h in one.hops] == ["ingest", "parse", "enrich", "aggregate"]
        assert one.windows[0]["count"] >= 1
        # one record's trace from one partition of the lineage topic: the same path
        for lineage_id in (one.lineage_id, next(i for i, t in traces.items() if t.end != "window")):
            found = find(settings, lineage_id)
            assert len({p for t, p in found.cost.partitions if t == settings.lineage_topic}) <= 2
            whole = traces[lineage_id]
            assert (found.trace.hops, found.trace.windows) == (whole.hops, whole.windows)
            assert found.trace.end == whole.end
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        shown = run_cli(["--config", str(config), "lineage", "trace", one.lineage_id], env)
        assert shown.exit_code == 0 and "end: window" in shown.stdout, shown.output
        # trace context: each stage's output is a child span of its input, one trace
        spans = []
        for topic in ("parse", "enrich", "aggregate"):
            for m in read_topic(settings, settings.stages[topic].inputs[0]):
                if dict(m.headers())["lineage-id"].decode() == one.lineage_id:
                    spans.append(dict(m.headers())["traceparent"].decode().split("-"))
        assert (
            len(spans) == 3 and len({s[1] for s in spans}) == 1 and len({s[2] for s in spans}) == 3
        )
        assert_metrics_match(pipe, settings, records, len(got))
    finally:
        pipe.stop_all()


def test_stage_scaled_to_two_workers_shares_partitions(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    second = pipe.start("parse")
    first = pipe.workers["parse"][0]
    try:
        wait_for(
            lambda: (
                first.counter("pipeline_assigned_partitions") == 2
                and second.counter("pipeline_assigned_partitions") == 2
            ),
            90,
            "parse partitions split 2/2 between two workers",
            pipe.logs,
        )
        records = sent_records(2000, seed=12, bad_ratio=0.0)
        produce(settings, settings.stages["ingest"].inputs[0], records)
        good = sum(r.kind == "good" for r in records)
        got = wait_for_all_readings(pipe, good)
        assert_windows_match(records, got)
        consumed = [w.counter("pipeline_records_consumed_total") for w in (first, second)]
        assert all(c > 0 for c in consumed), consumed
        assert sum(consumed) == good  # nothing processed twice, nothing skipped
    finally:
        pipe.stop_all()


@pytest.mark.parametrize("stage", ["enrich", "aggregate"])
def test_table_state_is_complete_after_sigkill(broker, tmp_path, stage):
    """Registry and window state recover fully from their changelogs after a kill.

    The first half of the readings leaves windows open in the aggregate's state;
    the registry is published in many small batches, so a recovery that stops at
    ListOffsets' answer (inside the last batch on the embedded broker) would miss
    devices or window updates and the final aggregates would not match."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    for i in range(0, len(REGISTRY), 7):  # many changelog batches
        publish_devices(settings, REGISTRY[i : i + 7])
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    victim = pipe.workers[stage][0]
    try:
        records = sent_records(2400, seed=13, devices=100, bad_ratio=0.0)
        half = len(records) // 2
        landing = settings.stages["ingest"].inputs[0]
        produce(settings, landing, records[:half])
        wait_for(
            lambda: victim.counter("pipeline_records_consumed_total") >= half * 0.9,
            90,
            f"{stage} to process the first half",
            pipe.logs,
        )
        time.sleep(2)  # let commits and changelog writes land
        victim.kill()
        produce(settings, landing, records[half:])  # a backlog builds up while it is down
        restarted = pipe.start(stage)
        good = sum(r.kind == "good" for r in records)
        got = wait_for_all_readings(pipe, good)
        assert_windows_match(records, got)
        assert restarted.counter("pipeline_records_consumed_total") > 0
        assert not dead_letters(settings, "enrich"), "a registered device was reported unknown"
        assert not dead_letters(settings, "aggregate"), "a reading was reported late"
    finally:
        pipe.stop_all()


def test_rewinding_parse_reprocesses_and_leaves_the_aggregates_unchanged(broker, tmp_path):
    """`pipeline replay parse --by-duration PT10M --execute` on a stopped stage: every
    reading flows again, the aggregate recognises each as counted (lineage id) and
    emits nothing new."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    for stage in ("ingest", "parse", "enrich"):
        pipe.start(stage)
    aggregate = pipe.start(
        "aggregate", env={"PIPELINE_STAGES__AGGREGATE__CONFIG__CLOSED_RETENTION_S": "7200"}
    )
    try:
        records = sent_records(1500, seed=14)
        produce(settings, settings.stages["ingest"].inputs[0], records)
        good = sum(r.kind == "good" for r in records)
        before = wait_for_all_readings(pipe, good)
        assert_windows_match(records, before)
        raw_count = len(read_topic(settings, settings.stages["parse"].inputs[0]))
        parse = pipe.workers["parse"][0]
        parse.stop()
        client = admin(settings)
        wait_for(
            lambda: not is_live(*group_state(client, settings.group_id("parse"))),
            30,
            "the parse group to empty (the broker notices the leave)",
        )
        args = ["--config", str(config), "replay", "parse", "--by-duration", "PT10M"]
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        result = run_cli([*args, "--execute", "--json"], env)
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert all(p["applied"] for p in plan), plan
        assert sum(p["delta"] for p in plan) == raw_count, plan
        restarted = pipe.start("parse")
        wait_for(
            lambda: (
                restarted.counter("pipeline_records_consumed_total") >= raw_count
                and aggregate.counter("pipeline_duplicates_dropped_total") >= good
                and not any(
                    v
                    for s in ("parse", "enrich", "aggregate")
                    for v in group_lag(settings, client, s).values()
                )
            ),
            120,
            "every reading re-processed and recognised as counted",
            pipe.logs,
        )
        time.sleep(3)  # an idle tick would emit any window the replay re-opened
        after = aggregates(settings)
        assert _multiset(after) == _multiset(before)  # same records (partition order aside)
        assert not dead_letters(settings, "aggregate")
    finally:
        pipe.stop_all()


def _multiset(windows: list[dict]) -> Counter:
    return Counter(json.dumps(w, sort_keys=True) for w in windows)


def assert_metrics_match(pipe: Pipeline, settings, records: list[SimRecord], windows: int) -> None:
    """Each worker's /metrics, scraped over HTTP and parsed with prometheus_client,
    counts exactly the records this run sent through it; lag drains to 0."""
    poison = Counter(r.stage for r in records if r.stage is not None)
    repeats = sum(r.kind == "duplicate" for r in records)
    w = {stage: procs[0] for stage, procs in pipe.workers.items()}

    def total(stage: str, name: str, **labels: str) -> float:
        samples = w[stage].metrics()
        return sum(
            v
            for (n, ls), v in samples.items()
            if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
        )

    spec = settings.stages
    ingested = len(records) - poison["ingest"] - repeats
    assert total(
        "ingest", "pipeline_records_consumed_total", topic=spec["ingest"].inputs[0]
    ) == len(records)
    assert total("ingest", "pipeline_duplicates_dropped_total") == repeats
    assert (
        total("ingest", "pipeline_records_produced_total", topic=spec["ingest"].output) == ingested
    )
    parsed = ingested - poison["parse"]
    assert total("parse", "pipeline_records_consumed_total") == ingested
    assert total("parse", "pipeline_records_produced_total") == parsed
    assert (
        total("enrich", "pipeline_records_consumed_total", topic=spec["enrich"].inputs[0]) == parsed
    )
    attempts = settings.stages["enrich"].retry.max_attempts
    assert total("enrich", "pipeline_retries_total") == poison["enrich"] * (attempts - 1)
    enriched = parsed - poison["enrich"]
    assert total("enrich", "pipeline_records_produced_total") == enriched
    assert total("aggregate", "pipeline_records_consumed_total") == enriched
    assert total("aggregate", "pipeline_windows_emitted_total") == windows
    for stage in ("ingest", "parse", "enrich", "aggregate"):
        assert total(stage, "pipeline_dlq_records_total") == poison[stage], stage

    def lag_drained() -> bool:
        lags = [
            v
            for p in w.values()
            for (n, _), v in p.metrics().items()
            if n == "pipeline_consumer_lag_records"
        ]
        return len(lags) >= 16 and not any(lags)

    wait_for(lag_drained, 30, "every partition's lag gauge at 0", pipe.logs)
