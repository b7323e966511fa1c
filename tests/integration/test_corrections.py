"""Corrections for late data, end to end: the aggregate with ``late: correct`` and the
PostgreSQL sink on a real broker and server. Readings that arrive after their window
closed, within and beyond the correction horizon, with the aggregate and the sink
killed in between, leave the table equal to a batch recomputation over everything
within the horizon, each window at the version its corrections give; those beyond
are ``late`` dead letters. A ``late`` dead letter redriven while its window is
within the horizon corrects it too."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from pipeline.kafka.offsets import read_topic
from pipeline.testing.postgres import PostgresServer
from tests.integration.harness import Pipeline, isolated_config, wait_for
from tests.integration.test_sinks import (
    WINDOW_MS,
    assert_equal_windows,
    cli,
    expected,
    produce_enriched,
    readings,
    table_rows,
)

HORIZON_S = 150


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


def late(device: str, ts: int, value: float, site: str = "site-0") -> dict[str, Any]:
    return {
        "device_id": device,
        "ts": ts,
        "seq": -1,
        "metric": "temperature",
        "value": value,
        "unit": "C",
        "site": site,
    }


def test_late_readings_correct_windows_within_the_horizon_through_restarts(broker, pg, tmp_path):
    add = {
        "topics": {"iot.store.dlq": {"partitions": 1}},
        "stages": {
            "store": {
                "uses": "pipeline.sinks:postgres",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.store.dlq",
                "config": {"dsn": pg.dsn, "table": f"corrected_{time.time_ns()}"},
            }
        },
    }
    config, settings = isolated_config(
        tmp_path,
        broker.bootstrap,
        stages={
            "aggregate": {
                "config": {
                    "window_s": 5,
                    "allowed_lateness_s": 3,
                    "late": "correct",
                    "correction_horizon_s": HORIZON_S,
                }
            }
        },
        add=add,
    )
    table = settings.stages["store"].config["table"]
    env = {"PIPELINE_STAGES__STORE__CONFIG__PASSWORD": pg.password}
    assert cli(config, broker.bootstrap, "sink", "init", "store", env=env).returncode == 0

    t0 = (int(time.time() * 1000) - 3_600_000) // WINDOW_MS * WINDOW_MS
    on_time = readings(devices=6, per_device=300, start_ms=t0)  # event time t0 .. t0+300 s
    # within the horizon when they arrive (the watermark is near t0 + 300 s and moves
    # with the wall clock while idle): windows that ended 10-40 s before it
    within = [
        late(f"dev-{d:03d}", t0 + (260 + 7 * d + k) * 1000 + 1, 100.0 + k, f"site-{d % 3}")
        for d in range(6)
        for k in range(3)
    ]
    born = [late("dev-999", t0 + 271_500, 5.0), late("dev-999", t0 + 272_500, 6.0)]
    # beyond: windows that ended about 270 s before the watermark
    beyond = [late(f"dev-{d:03d}", t0 + 20_000 + d, 200.0) for d in range(6)]

    pipe = Pipeline(config, settings, tmp_path)
    try:
        aggregate = pipe.start("aggregate")
        store = pipe.start("store", env=env)
        produce_enriched(settings, on_time)
        first = expected(on_time)
        wait_for(
            lambda: len(table_rows(pg, table)) == len(first),
            150,
            f"{len(first)} on-time windows stored",
            pipe.logs,
        )
        aggregate.kill()
        store.kill()
        aggregate = pipe.start("aggregate")
        store = pipe.start("store", env=env)
        produce_enriched(settings, within[:9] + beyond[:3] + born[:1])
        wait_for(
            lambda: aggregate.counter("pipeline_records_consumed_total") >= 13,
            90,
            "the first late readings",
            pipe.logs,
        )
        aggregate.kill()  # between corrections: the changelog keeps versions
        aggregate = pipe.start("aggregate")
        produce_enriched(settings, within[9:] + beyond[3:] + born[1:])

        want = expected(on_time + within + born)
        versions = Counter(
            (d["device_id"], d["metric"], d["ts"] - d["ts"] % WINDOW_MS) for d in within + born
        )

        def corrected() -> bool:
            pipe.check_alive()
            rows = table_rows(pg, table)
            return len(rows) == len(want) and all(
                rows[key]["version"] == n + (0 if key[0] == "dev-999" else 1)
                for key, n in versions.items()
                if key in rows
            )

        wait_for(corrected, 150, "every correction in the table", pipe.logs)
        rows = table_rows(pg, table)
        assert_equal_windows(rows, want)
        for key, row in rows.items():
            fixes = versions.get(key, 0)
            want_version = fixes if key[0] == "dev-999" else 1 + fixes
            assert row["version"] == want_version, (key, row["version"], want_version)
        dead = read_topic(settings, settings.stages["aggregate"].dlq)
        reasons = Counter(dict(m.headers() or [])["dlq.reason"].decode() for m in dead)
        assert reasons == {"late": len(beyond)}
        assert all(
            b"correction_horizon_s" in dict(m.headers() or [])["dlq.error.message"] for m in dead
        )
        assert read_topic(settings, settings.stages["store"].dlq) == []
        # every version of a corrected window is on the aggregates topic, each once
        out = [m for m in read_topic(settings, settings.stages["aggregate"].output)]
        lineage_ids = [dict(m.headers() or [])["lineage-id"] for m in out]
        assert len(set(lineage_ids)) == len(first) + sum(versions.values())
    finally:
        pipe.stop_all()


def test_a_redriven_late_dead_letter_corrects_its_window_within_the_horizon(broker, pg, tmp_path):
    """Late readings dead-lettered while corrections were off are redriven once they
    are on (the windows were remembered: closed_retention_s): the redrive takes the
    same path as any record, and corrects the windows."""
    add = {
        "topics": {"iot.store.dlq": {"partitions": 1}},
        "stages": {
            "store": {
                "uses": "pipeline.sinks:postgres",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.store.dlq",
                "config": {"dsn": pg.dsn, "table": f"redriven_{time.time_ns()}"},
            }
        },
    }
    config, settings = isolated_config(
        tmp_path,
        broker.bootstrap,
        stages={"aggregate": {"config": {"closed_retention_s": 600}}},
        add=add,
    )
    table = settings.stages["store"].config["table"]
    env = {"PIPELINE_STAGES__STORE__CONFIG__PASSWORD": pg.password}
    assert cli(config, broker.bootstrap, "sink", "init", "store", env=env).returncode == 0
    t0 = (int(time.time() * 1000) - 3_600_000) // WINDOW_MS * WINDOW_MS
    on_time = readings(devices=4, per_device=120, start_ms=t0)
    stragglers = [late(f"dev-{d:03d}", t0 + (100 + d) * 1000 + 1, 300.0 + d) for d in range(4)]
    pipe = Pipeline(config, settings, tmp_path)
    try:
        aggregate = pipe.start("aggregate")
        pipe.start("store", env=env)
        produce_enriched(settings, on_time)
        first = expected(on_time)
        wait_for(lambda: len(table_rows(pg, table)) == len(first), 150, "windows", pipe.logs)
        produce_enriched(settings, stragglers)
        dlq = settings.stages["aggregate"].dlq
        wait_for(lambda: len(read_topic(settings, dlq)) == 4, 60, "late dead letters", pipe.logs)
        assert_equal_windows(table_rows(pg, table), first)  # nothing corrected yet

        aggregate.stop()
        pipe.start(
            "aggregate",
            env={
                "PIPELINE_STAGES__AGGREGATE__CONFIG__LATE": "correct",
                "PIPELINE_STAGES__AGGREGATE__CONFIG__CORRECTION_HORIZON_S": str(HORIZON_S),
            },
        )
        sent = cli(config, broker.bootstrap, "dlq", "replay", "--stage", "aggregate")
        assert sent.returncode == 0, sent.stderr
        want = expected(on_time + stragglers)
        keys = {(d["device_id"], d["metric"], d["ts"] - d["ts"] % WINDOW_MS) for d in stragglers}
        wait_for(
            lambda: all(table_rows(pg, table)[k]["version"] == 2 for k in keys),
            90,
            "the redriven readings to correct their windows",
            pipe.logs,
        )
        assert_equal_windows(table_rows(pg, table), want)
        assert len(read_topic(settings, dlq)) == 4  # no new dead letter
    finally:
        pipe.stop_all()
