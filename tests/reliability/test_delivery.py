"""Reliability: the pipeline loses nothing when its workers die under load.

Sequenced readings (per device seq 0..n) go through the four stages while every
stage in turn is stopped — SIGKILL, or SIGTERM — and restarted. The final windows
must equal a batch recomputation of the input (nothing lost, nothing counted
twice); re-deliveries are counted and reported. Figures are printed and written to
``reliability-figures.json`` under the test's tmp dir.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import pytest

from pipeline.kafka.offsets import read_topic
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    assert_windows_match,
    dead_letters,
    isolated_config,
    produce_steadily,
    publish_devices,
    sent_records,
    wait_for,
    wait_for_all_readings,
)

STAGES = ("ingest", "parse", "enrich", "aggregate")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_every_stage_restarted_under_load_loses_nothing(broker, tmp_path, sig):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    records = sent_records(6000, seed=31, devices=50, bad_ratio=0.0)
    landing = settings.stages["ingest"].inputs[0]
    errors: list[str] = []
    feeder = threading.Thread(
        target=produce_steadily, args=(settings, landing, records, 100, 0.25, errors)
    )
    started = time.monotonic()
    feeder.start()
    try:
        for stage in STAGES:
            victim = pipe.workers[stage][-1]
            wait_for(
                lambda v=victim: v.counter("pipeline_records_consumed_total") > 0,
                90,
                f"{stage} to be processing",
                pipe.logs,
            )
            time.sleep(1.0)
            if sig == signal.SIGKILL:
                victim.kill()
            else:
                assert victim.stop(signal.SIGTERM) == 0, victim.log_tail()
            pipe.start(stage)
        feeder.join()
        assert not errors, errors
        good = sum(r.kind == "good" for r in records)
        got = wait_for_all_readings(pipe, good, timeout=240)
        assert_windows_match(records, got)
        assert not dead_letters(settings, "enrich"), "a registered device was reported unknown"
        assert not dead_letters(settings, "aggregate"), "a reading was reported late"
        enriched = read_topic(settings, settings.stages["enrich"].output)
        seen = Counter(dict(m.headers())["lineage-id"] for m in enriched)
        redelivered = sum(n - 1 for n in seen.values())
        unique = {(w["device_id"], w["metric"], w["window_start"]): w["count"] for w in got}
        figures = {
            "scenario": f"R1 rolling {sig.name}",
            "readings_sent": len(records),
            "good_readings": good,
            "lost": good - sum(unique.values()),
            "windows": len(unique),
            "windows_emitted_again_identical": len(got) - len(unique),
            "redelivered_before_dedup_at_enriched": redelivered,
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp_path / "reliability-figures.json").write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures))
    finally:
        pipe.stop_all()


def test_a_stage_scaled_up_and_down_under_load_loses_nothing(broker, tmp_path):
    """R2: parse goes 1 → 2 → 1 workers while readings flow (two rebalances)."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    records = sent_records(5000, seed=32, devices=50, bad_ratio=0.0)
    errors: list[str] = []
    feeder = threading.Thread(
        target=produce_steadily,
        args=(settings, settings.stages["ingest"].inputs[0], records, 100, 0.25, errors),
    )
    feeder.start()
    try:
        first = pipe.workers["parse"][0]
        wait_for(
            lambda: first.counter("pipeline_records_consumed_total") > 0,
            90,
            "parse to be processing",
            pipe.logs,
        )
        second = pipe.start("parse")
        wait_for(
            lambda: (
                second.counter("pipeline_assigned_partitions") > 0
                and first.counter("pipeline_assigned_partitions") < 4
            ),
            90,
            "the second parse worker to take partitions",
            pipe.logs,
        )
        time.sleep(2)
        assert second.stop(signal.SIGTERM) == 0, second.log_tail()
        wait_for(
            lambda: first.counter("pipeline_assigned_partitions") == 4,
            90,
            "the first parse worker to take all partitions back",
            pipe.logs,
        )
        feeder.join()
        assert not errors, errors
        good = sum(r.kind == "good" for r in records)
        got = wait_for_all_readings(pipe, good, timeout=240)
        assert_windows_match(records, got)
        assert not dead_letters(settings, "aggregate")
        unique = {(w["device_id"], w["metric"], w["window_start"]): w["count"] for w in got}
        lost = good - sum(unique.values())
        print(json.dumps({"scenario": "R2 parse 1→2→1", "good_readings": good, "lost": lost}))
    finally:
        pipe.stop_all()
