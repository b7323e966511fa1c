"""Prometheus metrics, declared once. Base units; ``_total`` for counters.

Labels are bounded: ``stage``, ``topic``, ``partition``, ``reason``, ``dependency``
(a fixed word a sink names, e.g. ``postgres``) — never a device id or a payload value.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.contract import H_INGEST_TS
from pipeline.records import Record

REGISTRY = CollectorRegistry(auto_describe=True)

RECORDS_CONSUMED = Counter(
    "pipeline_records_consumed_total", "Records consumed.", ["stage", "topic"], registry=REGISTRY
)
RECORDS_PRODUCED = Counter(
    "pipeline_records_produced_total",
    "Records produced and acknowledged.",
    ["stage", "topic"],
    registry=REGISTRY,
)
DLQ_RECORDS = Counter(
    "pipeline_dlq_records_total", "Records dead-lettered.", ["stage", "reason"], registry=REGISTRY
)
DUPLICATES = Counter(
    "pipeline_duplicates_dropped_total", "Duplicate readings dropped.", ["stage"], registry=REGISTRY
)
RETRIES = Counter("pipeline_retries_total", "Records sent for retry.", ["stage"], registry=REGISTRY)
WINDOWS_EMITTED = Counter(
    "pipeline_windows_emitted_total",
    "Outputs a stateful stage made from its state (e.g. windows closed).",
    ["stage"],
    registry=REGISTRY,
)
PROCESSING_SECONDS = Histogram(
    "pipeline_processing_duration_seconds",
    "Time to process one batch, outputs acknowledged.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
E2E_LATENCY = Histogram(
    "pipeline_record_e2e_latency_seconds",
    "Time from ingest to the end of this stage, of the last record of each batch.",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
LAST_PROCESSED = Gauge(
    "pipeline_last_record_processed_timestamp_seconds",
    "Unix time the stage last finished a batch.",
    ["stage"],
    registry=REGISTRY,
)

ASSIGNED_PARTITIONS = Gauge(
    "pipeline_assigned_partitions",
    "Input partitions assigned to this worker after the last rebalance.",
    ["stage"],
    registry=REGISTRY,
)
REBALANCES = Counter(
    "pipeline_rebalances_total",
    "Completed rebalances (partitions recovered, worker ready).",
    ["stage"],
    registry=REGISTRY,
)

CONSUMER_LAG = Gauge(
    "pipeline_consumer_lag_records",
    "Records in an assigned input partition after the group's committed offset "
    "(high watermark from the last Fetch response).",
    ["stage", "topic", "partition"],
    registry=REGISTRY,
)
CONSUMER_LAG_SECONDS = Gauge(
    "pipeline_consumer_lag_seconds",
    "Age of the oldest record not yet committed in an assigned input partition: now minus "
    "when it was appended (from the high watermarks this worker saw; for records there "
    "before it started, from their ingest time); 0 when nothing waits. "
    "pipeline.obs.lag_time explains the estimate.",
    ["stage", "topic", "partition"],
    registry=REGISTRY,
)
LATE_READINGS = Counter(
    "pipeline_late_readings_total",
    "Readings for windows already emitted (also dead-lettered with reason late).",
    ["stage"],
    registry=REGISTRY,
)
BATCHES_IN_FLIGHT = Gauge(
    "pipeline_batches_in_flight",
    "Batches whose outputs, state writes or lineage hops await the broker's "
    "acknowledgement (at most runner.batches_in_flight full ones, or up to "
    "small_batches_in_flight times as many smaller ones; unless it is 1 and only the hops "
    "are in flight); not acked, so not committed, until they land.",
    ["stage"],
    registry=REGISTRY,
)
STAGE_STOPPED = Gauge(
    "pipeline_stage_stopped",
    "1 while the stage has stopped consuming because its dead-letter budget was exceeded.",
    ["stage"],
    registry=REGISTRY,
)
BATCH_FAILURES = Gauge(
    "pipeline_batch_failures",
    "Times in a row a worker of the stage failed on the batch at the partition's committed "
    "offset (from the failures topic; 0 once a batch gets past it).",
    ["stage", "topic", "partition"],
    registry=REGISTRY,
)
RETRY_WAIT = Gauge(
    "pipeline_retry_waiting",
    "1 while the retry agent waits for the next retry to come due.",
    ["stage"],
    registry=REGISTRY,
)
RECORDS_STORED = Counter(
    "pipeline_records_stored_total",
    "Records a sink stored outside Kafka (rows upserted, records in committed files).",
    ["stage"],
    registry=REGISTRY,
)
SINK_FLUSHES = Counter(
    "pipeline_sink_flushes_total",
    "Times a buffering sink made records durable (files committed) and committed offsets.",
    ["stage"],
    registry=REGISTRY,
)
DEPENDENCY_UP = Gauge(
    "pipeline_dependency_up",
    "0 while a system the stage writes to (a sink's database or store) is unreachable "
    "and its batch waits to be run again; 1 otherwise.",
    ["stage", "dependency"],
    registry=REGISTRY,
)
DEPENDENCY_FAILURES = Counter(
    "pipeline_dependency_failures_total",
    "Batch attempts that failed because a system the stage writes to was unreachable.",
    ["stage", "dependency"],
    registry=REGISTRY,
)
BACKFILL_DEFERRED = Counter(
    "pipeline_backfill_deferred_total",
    "Times the backfill lane was paused because live input was waiting.",
    ["stage"],
    registry=REGISTRY,
)
#: the backfill controller's (pipeline.backfill, `backfill run --metrics-port`):
#: ``stage`` is the run's entry stage, ``run`` the run id (one series set per run)
BACKFILL_CHUNKS = Counter(
    "pipeline_backfill_chunks_total",
    "Backfill chunks produced and checkpointed (status=sent), or skipped on resume.",
    ["stage", "run", "status"],
    registry=REGISTRY,
)
BACKFILL_ROWS = Counter(
    "pipeline_backfill_rows_total",
    "Rows the backfill controller produced into its entry stage's topic.",
    ["stage", "run"],
    registry=REGISTRY,
)


def batch_done(
    stage: str,
    records: Sequence[Record],
    produced: Mapping[str, int],
    duplicates: int,
    retries: int,
    seconds: float | None,
) -> None:
    """Account one delivered batch (records of one partition): a handful of metric
    updates per batch, none per record (dead letters are counted by reason by the
    caller). ``seconds`` None: not a batch of input (an idle tick)."""
    if records:
        RECORDS_CONSUMED.labels(stage, records[0].topic).inc(len(records))
    for topic, count in produced.items():
        RECORDS_PRODUCED.labels(stage, topic).inc(count)
    if duplicates:
        DUPLICATES.labels(stage).inc(duplicates)
    if retries:
        RETRIES.labels(stage).inc(retries)
    if seconds is None:
        return
    PROCESSING_SECONDS.labels(stage).observe(seconds)
    now = time.time()
    LAST_PROCESSED.labels(stage).set(now)
    if records:
        for name, value in records[-1].headers:
            if name == H_INGEST_TS:
                if value.isdigit():
                    E2E_LATENCY.labels(stage).observe(max(0.0, now - int(value) / 1000))
                break


# The doors devices use (pipeline.edge): ``door`` is ``http`` or ``mqtt``; ``status``
# an HTTP status code the gateway answers with; ``reason`` one of
# pipeline.edge.REJECT_REASONS.
EDGE_REQUESTS = Counter(
    "pipeline_edge_requests_total",
    "HTTP requests the gateway answered, by status code.",
    ["status"],
    registry=REGISTRY,
)
EDGE_REQUEST_SECONDS = Histogram(
    "pipeline_edge_request_duration_seconds",
    "Time from a POST's arrival to its answer (records acknowledged for a 202).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
EDGE_RECORDS = Counter(
    "pipeline_edge_records_total",
    "Records a door wrote and the broker acknowledged.",
    ["door", "topic"],
    registry=REGISTRY,
)
EDGE_REJECTED = Counter(
    "pipeline_edge_rejected_total",
    "Requests (http) or messages (mqtt) refused at a door, by reason.",
    ["door", "reason"],
    registry=REGISTRY,
)
EDGE_IN_FLIGHT = Gauge(
    "pipeline_edge_in_flight_records",
    "Records produced by a door and not yet acknowledged by the broker.",
    ["door"],
    registry=REGISTRY,
)
EDGE_DEVICE_MISMATCH = Counter(
    "pipeline_edge_device_mismatch_total",
    "MQTT messages whose payload names another device than their topic (forwarded as sent).",
    registry=REGISTRY,
)
EDGE_MQTT_CONNECTED = Gauge(
    "pipeline_edge_mqtt_connected",
    "1 while the bridge is connected to the MQTT broker and subscribed.",
    registry=REGISTRY,
)
EDGE_MQTT_CONNECTS = Counter(
    "pipeline_edge_mqtt_connects_total",
    "Successful connections of the bridge to the MQTT broker (reconnects included).",
    registry=REGISTRY,
)
