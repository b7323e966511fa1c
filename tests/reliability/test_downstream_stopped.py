"""R5: a stage's downstream stops while input keeps arriving.

enrich and aggregate are stopped while ingest and parse keep receiving readings:
parse's output keeps growing in ``iot.parsed``, the enrich group's committed offsets
do not move (nothing is committed that was not processed), and its lag is the
records waiting for it. When enrich and aggregate come back, everything arrives: 0
lost, windows equal to a batch recomputation, nothing declared late (the
aggregate's idle watermark must not advance while a stage upstream is down).
"""

from __future__ import annotations

import signal
import threading
import time

from pipeline.kafka.clients import admin, client_config
from pipeline.kafka.offsets import committed_offsets, group_lag, high_watermarks, partitions_of
from tests.integration.harness import (
    REGISTRY,
    Pipeline,
    assert_windows_match,
    dead_letters,
    isolated_config,
    produce_steadily,
    publish_devices,
    record_figures,
    sent_records,
    wait_for,
    wait_for_all_readings,
    window_counts,
)

DOWNSTREAM = ("enrich", "aggregate")


def test_stopped_downstream_keeps_its_input_waiting_and_loses_nothing(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    client = admin(settings)
    parsed = settings.stages["enrich"].inputs[0]
    parsed_tps = partitions_of(settings, [parsed])
    records = sent_records(6000, seed=51, devices=50, bad_ratio=0.0)
    errors: list[str] = []
    # 200 readings/s for 30 s: still arriving while enrich and aggregate are down
    feeder = threading.Thread(
        target=produce_steadily,
        args=(settings, settings.stages["ingest"].inputs[0], records, 50, 0.25, errors),
    )
    feeder.start()
    try:
        wait_for(
            lambda: pipe.workers["aggregate"][0].counter("pipeline_records_consumed_total") > 0,
            90,
            "readings to reach the aggregate",
            pipe.logs,
        )
        for stage in DOWNSTREAM:
            assert pipe.workers[stage][0].stop(signal.SIGTERM) == 0
        stopped = time.monotonic()

        def parsed_end() -> int:
            return sum(high_watermarks(client_config(settings), parsed_tps).values())

        committed = committed_offsets(client, settings.group_id("enrich"), parsed_tps)
        end_at_stop = parsed_end()
        time.sleep(8)
        end_later = parsed_end()
        assert end_later > end_at_stop, "parse stopped writing while enrich was down"
        assert committed_offsets(client, settings.group_id("enrich"), parsed_tps) == committed
        waiting = sum(group_lag(settings, client, "enrich").values())
        assert waiting >= end_later - sum(v or 0 for v in committed.values())
        for stage in DOWNSTREAM:
            pipe.start(stage)
        stopped_s = round(time.monotonic() - stopped, 1)
        feeder.join()
        assert not errors, errors
        good = sum(r.kind == "good" for r in records)
        got = wait_for_all_readings(pipe, good, timeout=240)
        assert_windows_match(records, got)
        assert not dead_letters(settings, "aggregate"), "a reading was reported late"
        unique, again = window_counts(got)
        record_figures(
            tmp_path,
            {
                "scenario": "R5 enrich+aggregate stopped under load, then restarted",
                "stopped_s": stopped_s,
                "records_written_by_parse_while_stopped": end_later - end_at_stop,
                "enrich_lag_before_restart": waiting,
                "good_readings": good,
                "lost": good - sum(unique.values()),
                "windows": len(unique),
                "windows_emitted_again_identical": again,
            },
        )
    finally:
        pipe.stop_all()
