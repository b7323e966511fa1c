"""The orchestrated backfill on the real broker: Parquet → parse … aggregate.

Readings an hour old (the live watermark is "now") go through the backfill lane;
the run is COMPLETE only once the aggregate has committed them all, so the
windows are checked the moment the controller exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from pipeline.backfill.source import ParquetSource
from pipeline.backfill.state import RunStore
from pipeline.demo.simulator import SimRecord, generate
from pipeline.kafka.clients import admin, client_config, producer
from pipeline.kafka.embedded import free_port
from pipeline.kafka.offsets import committed_offsets, high_watermarks, partitions_of, read_topic
from stages.parse import decode
from tests.integration.harness import (
    REGISTRY,
    REPO,
    TEST_ENV,
    Pipeline,
    aggregates,
    assert_windows_match,
    isolated_config,
    publish_devices,
    sent_records,
    wait_for,
)

COLUMNS = ("device_id", "ts", "seq", "metric", "value", "unit")


def readings_file(path: Path, n: int, seed: int, row_group: int) -> list[SimRecord]:
    """A Parquet file of the good readings of ``sent_records`` (one per (device, seq)),
    in time order, plus two rows parse must dead-letter."""
    good = sorted(
        (r for r in sent_records(n, seed, bad_ratio=0.0) if r.kind == "good"),
        key=lambda r: (r.ts, r.device_id),
    )
    rows = {c: [] for c in COLUMNS}
    for r in good:
        doc = decode(r.value)  # JSON or CSV, as a device sent it
        for c in COLUMNS:
            rows[c].append(doc[c])
    # a null value (schema_violation) and an impossible humidity (out_of_range)
    for c, v in zip(
        COLUMNS, ("dev-0001", good[-1].ts, 10**6, "temperature", None, "C"), strict=True
    ):
        rows[c].append(v)
    for c, v in zip(
        COLUMNS, ("dev-0002", good[-1].ts, 10**6 + 1, "humidity", 500.0, "%"), strict=True
    ):
        rows[c].append(v)
    schema = pa.schema(
        [
            ("device_id", pa.string()),
            ("ts", pa.int64()),
            ("seq", pa.int64()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("unit", pa.string()),
        ]
    )
    pq.write_table(pa.table(rows, schema=schema), path, row_group_size=row_group)
    return good


def cli_env(settings, config: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        **TEST_ENV,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        "PIPELINE_CONFIG": str(config),
        **(extra or {}),
    }


def backfill(settings, config: Path, *args: str, extra_env=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "backfill", *args],
        env=cli_env(settings, config, extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def start_backfill(settings, config: Path, *args: str, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "backfill", *args],
        env=cli_env(settings, config, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def lane_records(settings) -> list:
    return read_topic(settings, settings.stages["parse"].backfill_lane)


def chunk_of(msg) -> int:
    return int(dict(msg.headers())["backfill-chunk"])


def test_parquet_backfill_completes_only_when_aggregated_and_matches_a_batch_computation(
    broker, tmp_path
):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    data = tmp_path / "readings.parquet"
    good = readings_file(data, 3000, seed=61, row_group=1000)
    total = len(good) + 2

    # --dry-run: the plan from the footers, nothing sent
    dry = backfill(
        settings,
        config,
        "run",
        "--from-parquet",
        str(data),
        "--chunk-size",
        "400",
        "--run-id",
        "dry",
        "--dry-run",
        "--json",
    )
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert sum(c["rows"] for c in plan["chunks"]) == total == plan["total_rows"]
    assert all(c["rows"] <= 400 for c in plan["chunks"])
    meta = pq.ParquetFile(data).metadata
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert len(groups) == 3  # 1000, 1000, the rest: a chunk never spans two row groups
    assert [c["rows"] for c in plan["chunks"]] == [
        r for n in groups for r in [400] * (n // 400) + ([n % 400] if n % 400 else [])
    ]
    lane = settings.stages["parse"].backfill_lane
    assert set(
        high_watermarks(client_config(settings), partitions_of(settings, [lane])).values()
    ) == {0}
    assert RunStore(settings).runs() == []

    pipe = Pipeline(config, settings, tmp_path)
    for stage in ("parse", "enrich", "aggregate"):
        pipe.start(stage)
    try:
        run = backfill(
            settings,
            config,
            "run",
            "--from-parquet",
            str(data),
            "--chunk-size",
            "400",
            "--rate",
            "0",
            "--run-id",
            "r1",
            "--json",
            extra_env={"PIPELINE_OPENLINEAGE__FILE_PATH": str(tmp_path / "ol.jsonl")},
        )
        assert run.returncode == 0, run.stderr + pipe.logs()
        state = json.loads(run.stdout)
        events = [json.loads(x) for x in (tmp_path / "ol.jsonl").read_text().splitlines()]
        kinds = [e["eventType"] for e in events]
        assert kinds[0] == "START" and kinds[-1] == "COMPLETE" and "RUNNING" in kinds
        assert {e["run"]["runId"] for e in events} == {state["openlineage_run_id"]}
        # COMPLETE means aggregated: the windows are all there *now*, nothing waited for
        got = aggregates(settings)
        assert state["state"] == "COMPLETE"
        assert state["rows_sent"] == total and state["chunks_done"] == len(plan["chunks"])
        assert state["dead_letters"] == {"parse": {"out_of_range": 1, "schema_violation": 1}}
        assert_windows_match(good, got)
        assert {w["source"] for w in got} == {"backfill:r1"}
        # lanes all the way: no backfilled record went through a live topic
        for stage in ("parse", "enrich", "aggregate"):
            assert read_topic(settings, settings.stages[stage].inputs[0]) == []
            assert len(read_topic(settings, settings.stages[stage].backfill_lane)) >= len(good)
        lane = [settings.stages["aggregate"].backfill_lane]
        ends = high_watermarks(client_config(settings), partitions_of(settings, lane))
        committed = committed_offsets(admin(settings), settings.group_id("aggregate"), list(ends))
        assert all(committed[tp] == end for tp, end in ends.items())  # incl. end-of-input

        # the same run again: already complete, nothing sent
        again = backfill(settings, config, "run", "--from-parquet", str(data), "--run-id", "r1")
        assert again.returncode == 0 and "already COMPLETE" in again.stderr
        assert len(lane_records(settings)) == total

        # the same input as a new run: the same windows again (a re-computation)
        second = backfill(
            settings,
            config,
            "run",
            "--from-parquet",
            str(data),
            "--chunk-size",
            "700",
            "--rate",
            "0",
            "--run-id",
            "r2",
            "--json",
        )
        assert second.returncode == 0, second.stderr
        after = aggregates(settings)

        def by_key(windows, source):
            return {
                (w["device_id"], w["metric"], w["window_start"]): {
                    k: v for k, v in w.items() if k != "source"
                }
                for w in windows
                if w["source"] == source
            }

        assert by_key(after, "backfill:r2") == by_key(after, "backfill:r1")

        listed = backfill(settings, config, "list", "--json")
        assert [r["run_id"] for r in json.loads(listed.stdout)] == ["r2", "r1"]
        status = backfill(settings, config, "status", "r1")
        assert status.returncode == 0 and "COMPLETE" in status.stdout
    finally:
        pipe.stop_all()


def test_a_controller_killed_mid_run_resumes_without_resending_finished_chunks(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    data = tmp_path / "readings.parquet"
    good = readings_file(data, 3000, seed=62, row_group=3000)
    pipe = Pipeline(config, settings, tmp_path)
    for stage in ("parse", "enrich", "aggregate"):
        pipe.start(stage)
    try:
        args = ["run", "--from-parquet", str(data), "--chunk-size", "200", "--run-id", "k1"]
        controller = start_backfill(settings, config, *args, "--rate", "400")
        store = RunStore(settings)

        def some_chunks_done() -> bool:
            run = store.get("k1")
            return run is not None and run.chunks_done >= 4

        wait_for(some_chunks_done, 90, "4 chunks checkpointed")
        controller.send_signal(signal.SIGKILL)
        controller.wait(10)
        at_kill = store.get("k1")
        assert at_kill is not None and at_kill.state == "RUNNING"
        done_at_kill = at_kill.done_chunks
        assert 4 <= len(done_at_kill) < at_kill.total_chunks

        resumed = backfill(settings, config, "resume", "k1", "--force", "--rate", "0", "--json")
        assert resumed.returncode == 0, resumed.stderr + pipe.logs()
        state = json.loads(resumed.stdout)
        assert state["state"] == "COMPLETE" and state["attempts"] == 2
        assert_windows_match(good, aggregates(settings))

        # from the lane itself: each checkpointed chunk was sent exactly once, in full
        rows = {c.index: c.rows for c in ParquetSource(str(data)).plan(200)}
        per_chunk = Counter(chunk_of(m) for m in lane_records(settings))
        for index in done_at_kill:
            assert per_chunk[index] == rows[index], (index, per_chunk[index])
        assert set(per_chunk) == set(rows)
        # only the chunk in flight at the kill may have gone out twice (part, then all)
        resent = {i: n for i, n in per_chunk.items() if n != rows[i]}
        assert len(resent) <= 1, resent
        assert all(rows[i] < n <= 2 * rows[i] for i, n in resent.items()), resent
        assert not set(resent) & done_at_kill
    finally:
        pipe.stop_all()


def test_cancel_stops_sending_and_the_state_says_what_was_sent(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    data = tmp_path / "readings.parquet"
    readings_file(data, 2000, seed=63, row_group=2000)
    port = free_port()
    controller = start_backfill(
        settings,
        config,
        "run",
        "--from-parquet",
        str(data),
        "--chunk-size",
        "100",
        "--rate",
        "200",
        "--run-id",
        "c1",
        "--metrics-port",
        str(port),
    )
    store = RunStore(settings)
    wait_for(lambda: (r := store.get("c1")) is not None and r.chunks_done >= 2, 60, "2 chunks")
    # the controller's own metrics, scraped while it sends
    families = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
        for s in f.samples
    }
    sent_chunks = families[
        ("pipeline_backfill_chunks_total", (("run", "c1"), ("stage", "parse"), ("status", "sent")))
    ]
    assert sent_chunks >= 2
    rows = families[("pipeline_backfill_rows_total", (("run", "c1"), ("stage", "parse")))]
    assert rows in (100 * sent_chunks, 100 * (sent_chunks - 1))  # scraped between the two
    cancelled = backfill(settings, config, "cancel", "c1")
    assert cancelled.returncode == 0, cancelled.stderr
    _, err = controller.communicate(timeout=60)
    assert controller.returncode == 1 and "CANCELLED" in err, err
    run = store.get("c1")
    assert run is not None and run.state == "CANCELLED"
    assert run.chunks_done < run.total_chunks
    sent = lane_records(settings)
    assert len(sent) == run.rows_sent == 100 * run.chunks_done
    assert {chunk_of(m) for m in sent} == run.done_chunks
    # a cancelled run is not resumed
    again = backfill(settings, config, "resume", "c1", "--force")
    assert again.returncode == 1 and "cancelled" in again.stderr


def test_a_stage_that_does_not_move_fails_the_run_with_a_reason_and_lineage_events(
    broker, tmp_path
):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    data = tmp_path / "readings.parquet"
    good = readings_file(data, 300, seed=64, row_group=300)
    events_file = tmp_path / "ol.jsonl"
    extra = {
        "PIPELINE_BACKFILL__STALL_TIMEOUT_S": "2",
        "PIPELINE_OPENLINEAGE__FILE_PATH": str(events_file),
    }
    run = backfill(
        settings,
        config,
        "run",
        "--from-parquet",
        str(data),
        "--rate",
        "0",
        "--run-id",
        "f1",
        extra_env=extra,
    )  # no parse worker runs
    assert run.returncode == 1
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: run f1 FAILED: stage parse made no progress"), run.stderr
    state = RunStore(settings).get("f1")
    assert state is not None and state.state == "FAILED" and state.rows_sent == len(good) + 2

    events = [json.loads(x) for x in events_file.read_text().splitlines()]
    assert events[0]["eventType"] == "START"
    assert events[-1]["eventType"] == "FAIL"
    assert len({e["run"]["runId"] for e in events}) == 1
    assert events[0]["job"]["facets"]["jobType"]["processingType"] == "BATCH"
    assert [(i["namespace"], i["name"]) for i in events[0]["inputs"]] == [("file", str(data))]
    outputs = [o["name"] for o in events[0]["outputs"]]
    assert outputs == [settings.stages["parse"].backfill_lane, settings.stages["aggregate"].output]
    assert "no progress" in events[-1]["run"]["facets"]["errorMessage"]["message"]


def test_a_kafka_time_range_backfilled_through_all_four_stages(broker, tmp_path):
    """``--from-topic`` with a time range, entering at ingest (the workers do the
    ingest work); poison records in the range end as the run's dead letters."""
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    publish_devices(settings, REGISTRY)
    archive = settings.stages["ingest"].inputs[0].replace("iot.landing", "archive")
    client = admin(settings)  # kept: the future needs its client alive
    client.create_topics([NewTopic(archive, 2, -1)])[archive].result()
    t0 = int(time.time() * 1000) - 3_600_000
    records = list(generate(20, 900, start_ms=t0, bad_ratio=0.03, dup_ratio=0.0, seed=65))
    sender = producer(settings)
    for i, r in enumerate(records):  # arrival time: 10 ms apart
        sender.produce(archive, r.value, r.key, timestamp=t0 + 10 * i)
    assert sender.flush(30) == 0
    chosen = records[300:700]
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat()  # noqa: E731

    pipe = Pipeline(config, settings, tmp_path)
    pipe.start_all()
    try:
        run = backfill(
            settings,
            config,
            "run",
            "--from-topic",
            archive,
            "--start",
            iso(t0 + 3000),
            "--end",
            iso(t0 + 7000),
            "--stage",
            "ingest",
            "--chunk-size",
            "150",
            "--rate",
            "0",
            "--run-id",
            "k2",
            "--json",
        )
        assert run.returncode == 0, run.stderr + pipe.logs()
        state = json.loads(run.stdout)
        assert state["state"] == "COMPLETE" and state["rows_sent"] == 400
        assert state["entry_topic"] == settings.stages["ingest"].inputs[0]
        assert_windows_match(chosen, aggregates(settings))
        expected_dead: dict[str, dict[str, int]] = {}
        for r in chosen:
            if r.stage is not None:
                by_reason = expected_dead.setdefault(r.stage, {})
                by_reason[r.kind] = by_reason.get(r.kind, 0) + 1
        assert expected_dead and state["dead_letters"] == expected_dead
    finally:
        pipe.stop_all()
