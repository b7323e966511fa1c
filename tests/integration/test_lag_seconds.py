"""Consumer lag in seconds from a real worker with a backlog (the gauge
``pipeline_consumer_lag_seconds``) and in ``pipeline status``.

The backlog: records that claim (ingest-ts header and timestamp) to have come into
the pipeline ten minutes ago, on which parse stops (its dead-letter budget), so they
stay uncommitted. While the worker watched them land, their age counts from their
landing; a worker started on them afterwards can only go by their own times; the
broker-only ``pipeline status`` too.
"""

from __future__ import annotations

import json
import time

from pipeline.contract import H_INGEST_TS
from pipeline.kafka.clients import producer
from tests.integration.harness import Pipeline, isolated_config, wait_for
from tests.integration.test_topics_cli import run_cli

OLD_S = 600


def lag_seconds(worker, topic: str) -> dict[int, float]:
    """The worker's gauge per partition of ``topic`` ({} while it does not answer)."""
    try:
        samples = worker.metrics()
    except OSError:
        return {}
    return {
        int(dict(labels)["partition"]): value
        for (name, labels), value in samples.items()
        if name == "pipeline_consumer_lag_seconds" and dict(labels)["topic"] == topic
    }


def test_lag_in_seconds_of_a_stopped_stage(broker, tmp_path):
    config, settings = isolated_config(
        tmp_path,
        broker.bootstrap,
        stages={"parse": {"dlq_budget": {"max_consecutive": 20, "min_records": 1000}}},
    )
    raw = settings.stages["parse"].inputs[0]
    pipe = Pipeline(config, settings, tmp_path)
    try:
        parse = pipe.start("parse")
        wait_for(
            lambda: len(lag_seconds(parse, raw)) == settings.topics[raw].partitions,
            60,
            "the parse worker to report lag of every partition",
            pipe.logs,
        )
        assert set(lag_seconds(parse, raw).values()) == {0.0}  # nothing waits
        time.sleep(1.5)  # the worker has seen the empty partitions for a while

        # records that came into the pipeline ten minutes ago land now: bad ones
        old_ms = int(time.time() * 1000) - OLD_S * 1000
        client = producer(settings)
        for i in range(100):
            client.produce(
                raw,
                b"not json %d" % i,
                b"k",
                partition=0,
                timestamp=old_ms,
                headers=[(H_INGEST_TS, str(old_ms).encode())],
            )
        assert client.flush(30) == 0
        landed = time.time()
        wait_for(
            lambda: parse.counter("pipeline_stage_stopped") == 1,
            45,
            "parse to stop on its dead-letter budget",
            pipe.logs,
        )
        wait_for(lambda: lag_seconds(parse, raw)[0] > 0, 10, "a lag in seconds", pipe.logs)
        # the worker saw them land: their age counts from then, not from ingest (600 s
        # ago); dated between two samples of the high watermark, a record may count
        # from the sample before it landed, and samples run late on a busy machine
        first = lag_seconds(parse, raw)[0]
        assert 0 < first <= time.time() - landed + 5, first
        time.sleep(2.0)
        later = lag_seconds(parse, raw)[0]
        assert later >= first + 1.0, (first, later)  # a stopped stage keeps ageing
        assert {p: v for p, v in lag_seconds(parse, raw).items() if p} == {1: 0, 2: 0, 3: 0}

        # from the broker alone only the records' own times are known: an upper bound
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        result = run_cli(["--config", str(config), "status", "--json", "--sample-s", "1"], env)
        report = json.loads(result.stdout)
        by_stage = {s["stage"]: s for s in report["stages"]}
        assert by_stage["parse"]["lag_s"] >= OLD_S - 5, by_stage["parse"]
        ages = {
            p["partition"]: p["lag_s"] for p in by_stage["parse"]["partitions"] if p["topic"] == raw
        }
        assert ages[0] >= OLD_S - 5 and ages[1] is None, ages
        assert by_stage["enrich"]["lag_s"] is None  # nothing waiting there
        table = run_cli(["--config", str(config), "status", "--sample-s", "1"], env).stdout
        assert "lag s" in table and "10m" in table, table

        # a new worker on the same backlog did not see it land: the records' own times
        parse.stop()
        restarted = pipe.start("parse")
        wait_for(
            lambda: restarted.counter("pipeline_stage_stopped") == 1,
            60,
            "the new parse worker to stop on the same records",
            pipe.logs,
        )
        wait_for(
            lambda: lag_seconds(restarted, raw).get(0, 0) >= OLD_S - 5,
            15,
            "the age of records older than the worker",
            pipe.logs,
        )
        assert lag_seconds(restarted, raw)[0] < OLD_S + 120
    finally:
        pipe.stop_all()
