"""Sinks on the real broker, real workers, a real PostgreSQL and a real filesystem:
the aggregate's windows land in a table and in Parquet files exactly once, through
crashes of the sinks, a database restarted mid-run, and rewinds of the sinks.

Readings enter at ``iot.enriched`` (the aggregate's input), so three workers run:
aggregate, store (PostgreSQL) and lake (Parquet)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pyarrow.dataset as ds
import pytest

from pipeline.contract import entry_lineage_id
from pipeline.kafka.clients import producer
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.seek import timestamp
from pipeline.settings import Settings
from pipeline.testing.postgres import PostgresServer
from tests.integration.harness import REPO, Pipeline, isolated_config, wait_for

WINDOW_MS = 5000  # harness.TEST_ENV: window_s 5, allowed lateness 3 s


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def sink_stages(pg: PostgresServer, lake: Path, roll_records: int = 200) -> dict[str, Any]:
    return {
        "topics": {
            "iot.store.dlq": {"partitions": 1},
            "iot.lake.dlq": {"partitions": 1},
        },
        "stages": {
            "store": {
                "uses": "pipeline.sinks:postgres",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.store.dlq",
                "config": {"dsn": pg.dsn, "table": f"aggregates_{time.time_ns()}"},
            },
            "lake": {
                "uses": "pipeline.sinks:parquet",
                "inputs": ["iot.aggregates"],
                "dlq": "iot.lake.dlq",
                "config": {
                    "path": str(lake),
                    "partition_by": ["date", "site"],
                    "roll_records": roll_records,
                    "roll_s": 1,
                },
            },
        },
    }


def readings(devices: int, per_device: int, start_ms: int) -> list[dict[str, Any]]:
    """Enriched readings, one a second per device, two metrics."""
    out = []
    for i in range(per_device):
        for d in range(devices):
            metric = "temperature" if (i + d) % 2 else "humidity"
            out.append(
                {
                    "device_id": f"dev-{d:03d}",
                    "ts": start_ms + i * 1000 + d,
                    "seq": i,
                    "metric": metric,
                    "value": float((i * 7 + d * 3) % 50),
                    "unit": "C" if metric == "temperature" else "%",
                    "site": f"site-{d % 3}",
                }
            )
    return out


def expected(docs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    acc: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        acc[(doc["device_id"], doc["metric"], doc["ts"] - doc["ts"] % WINDOW_MS)].append(doc)
    out = {}
    for key, items in acc.items():
        values = [d["value"] for d in items]
        out[key] = {
            "count": len(values),
            "min": min(values),
            "max": max(values),
            "mean": sum(values) / len(values),
            "first_ts": min(d["ts"] for d in items),
            "last_ts": max(d["ts"] for d in items),
            "site": items[0]["site"],
            "unit": items[0]["unit"],
        }
    return out


def produce_enriched(settings: Settings, docs: list[dict[str, Any]], pause_every: int = 0) -> None:
    client = producer(settings)
    topic = settings.stages["aggregate"].inputs[0]
    for n, doc in enumerate(docs):
        client.produce(topic, orjson.dumps(doc), doc["device_id"].encode())
        client.poll(0)
        if pause_every and n % pause_every == pause_every - 1:
            client.flush(10)
            time.sleep(0.2)
    assert client.flush(30) == 0


def table_rows(pg: PostgresServer, table: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    with psycopg.connect(**pg.connect_kwargs()) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT device_id, metric, window_start, source, version, count, min, max, mean, "
            f"first_ts, last_ts, site, unit FROM {table}"
        )
        rows = {}
        for r in cur.fetchall():
            key = (r[0], r[1], int(r[2].timestamp() * 1000))
            assert key not in rows and r[3] == "live"
            rows[key] = {
                "version": r[4],
                "count": r[5],
                "min": r[6],
                "max": r[7],
                "mean": r[8],
                "first_ts": int(r[9].timestamp() * 1000),
                "last_ts": int(r[10].timestamp() * 1000),
                "site": r[11],
                "unit": r[12],
            }
        return rows


def lake_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    table = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    return table.to_pylist()


def assert_equal_windows(
    got: dict[tuple[str, str, int], dict[str, Any]],
    want: dict[tuple[str, str, int], dict[str, Any]],
) -> None:
    assert set(got) == set(want), (len(got), len(want))
    for key, w in want.items():
        g = got[key]
        for name in ("count", "min", "max", "first_ts", "last_ts", "site", "unit"):
            assert g[name] == w[name], (key, name, g[name], w[name])
        assert math.isclose(g["mean"], w["mean"], rel_tol=1e-9), key


def lake_windows(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    rows = lake_rows(path)
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    coords = [(r["_partition"], r["_offset"]) for r in rows]
    assert len(coords) == len(set(coords)), "a record is in the lake twice"
    for r in rows:
        key = (r["device_id"], r["metric"], int(r["window_start"].timestamp() * 1000))
        assert key not in out, f"window {key} is in the lake twice"
        out[key] = {
            **r,
            "first_ts": int(r["first_ts"].timestamp() * 1000),
            "last_ts": int(r["last_ts"].timestamp() * 1000),
        }
    return out


def assert_sinks_hold(
    pipe: Pipeline,
    pg: PostgresServer,
    table: str,
    lake: Path,
    want: dict[tuple[str, str, int], dict[str, Any]],
    timeout: float,
) -> None:
    """Wait until the table and the lake hold as many windows as ``want`` (every
    worker alive meanwhile), then both must equal it."""

    def landed() -> bool:
        pipe.check_alive()
        return len(table_rows(pg, table)) == len(want) and len(lake_rows(lake)) == len(want)

    wait_for(landed, timeout, f"{len(want)} windows in the table and the lake", pipe.logs)
    assert_equal_windows(table_rows(pg, table), want)
    assert_equal_windows(lake_windows(lake), want)


def cli(
    config: Path, bootstrap: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_windows_land_in_the_table_and_the_lake_exactly_once(broker, pg, tmp_path):
    lake = tmp_path / "lake"
    config, settings = isolated_config(tmp_path, broker.bootstrap, add=sink_stages(pg, lake))
    table = settings.stages["store"].config["table"]
    env = {"PIPELINE_STAGES__STORE__CONFIG__PASSWORD": pg.password}
    init = cli(config, broker.bootstrap, "sink", "init", "store", env=env)
    assert init.returncode == 0 and f"table {table} ready" in init.stdout, init.stderr
    again = cli(config, broker.bootstrap, "sink", "init", "store", env=env)  # idempotent
    assert again.returncode == 0, again.stderr
    denied = cli(config, broker.bootstrap, "sink", "init", "store")  # no password
    assert denied.returncode == 2 and denied.stderr.count("\n") == 1, denied.stderr

    docs = readings(devices=12, per_device=40, start_ms=int(time.time() * 1000) - 3_600_000)
    want = expected(docs)
    pipe = Pipeline(config, settings, tmp_path)
    try:
        for stage in ("aggregate", "store", "lake"):
            pipe.start(stage, env=env)
        produce_enriched(settings, docs)

        assert_sinks_hold(pipe, pg, table, lake, want, 150)
        assert {r["version"] for r in table_rows(pg, table).values()} == {1}
        assert read_topic(settings, settings.stages["store"].dlq) == []
        assert read_topic(settings, settings.stages["lake"].dlq) == []

        # metrics, scraped: every window stored once by each sink (no restarts here)
        store, lake_worker = pipe.workers["store"][0], pipe.workers["lake"][0]
        assert store.counter("pipeline_records_stored_total") == len(want)
        assert lake_worker.counter("pipeline_records_stored_total") == len(want)
        assert lake_worker.counter("pipeline_sink_flushes_total") >= 1
        assert store.get("/readyz")[0] == 200

        # lineage: a window's record traces to the row and the file it landed in
        window = next(iter(read_topic(settings, settings.stages["aggregate"].output)))
        lineage_id = dict(window.headers() or [])["lineage-id"].decode()
        traced = cli(config, broker.bootstrap, "lineage", "trace", lineage_id, "--json")
        assert traced.returncode == 0, traced.stderr
        trace = orjson.loads(traced.stdout)
        stored = {h["stage"]: h["ref"] for h in trace["hops"] if h["outcome"] == "stored"}
        doc = orjson.loads(window.value())
        assert stored["store"][:3] == [table, doc["device_id"], doc["metric"]]
        assert stored["lake"].startswith("date=") and stored["lake"].endswith(".parquet")
        assert trace["end"] == "stored" and trace["complete"]
        assert (lake / stored["lake"]).exists()

        # a reading traces into its window, and on to the row and the file it landed in
        first = read_topic(settings, settings.stages["aggregate"].inputs[0])[0]
        reading_id = entry_lineage_id(
            timestamp(first) or 0, first.topic(), first.partition(), first.offset()
        )
        traced = cli(config, broker.bootstrap, "lineage", "trace", reading_id, "--json")
        assert traced.returncode == 0, traced.stderr
        (result,) = orjson.loads(traced.stdout)["windows"]
        assert {s["stage"] for s in result["stored"]} == {"store", "lake"}
        human = cli(config, broker.bootstrap, "lineage", "trace", reading_id)
        assert "stored by store at" in human.stdout and "stored by lake at" in human.stdout

        # status: both sinks are stages like the others, caught up
        shown = cli(config, broker.bootstrap, "status", "--json")
        verdicts = {s["stage"]: s for s in orjson.loads(shown.stdout)["stages"]}
        for stage in ("store", "lake"):
            assert verdicts[stage]["verdict"] in ("ok", "idle"), verdicts[stage]
            assert verdicts[stage]["lag"] == 0
    finally:
        pipe.stop_all()


def test_sinks_survive_kills_a_database_restart_and_rewinds(broker, pg, tmp_path):
    lake = tmp_path / "lake"
    config, settings = isolated_config(
        tmp_path, broker.bootstrap, add=sink_stages(pg, lake, roll_records=50)
    )
    table = settings.stages["store"].config["table"]
    env = {"PIPELINE_STAGES__STORE__CONFIG__PASSWORD": pg.password}
    assert cli(config, broker.bootstrap, "sink", "init", "store", env=env).returncode == 0
    docs = readings(devices=10, per_device=90, start_ms=int(time.time() * 1000) - 3_600_000)
    want = expected(docs)
    pipe = Pipeline(config, settings, tmp_path)
    feeder = threading.Thread(target=produce_enriched, args=(settings, docs, 60))
    try:
        pipe.start("aggregate")
        store = pipe.start("store", env=env)
        lake_worker = pipe.start("lake")
        feeder.start()
        wait_for(lambda: len(table_rows(pg, table)) > 20, 90, "first rows", pipe.logs)
        # both sinks killed mid-stream, restarted
        store.kill()
        lake_worker.kill()
        store = pipe.start("store", env=env)
        lake_worker = pipe.start("lake")
        # the database goes away for a while: the store holds its batch, not ready
        wait_for(lambda: store.get("/readyz")[0] == 200, 60, "store ready", pipe.logs)
        pg.stop()
        wait_for(
            lambda: (
                store.get("/readyz")[0] == 503
                and store.counter("pipeline_dependency_failures_total") > 0
            ),
            60,
            "the store to notice the database is gone",
            pipe.logs,
        )
        _, body = store.get("/readyz")
        assert b"postgres unreachable" in body
        assert store.alive()
        time.sleep(2)
        pg.start()
        feeder.join(120)

        assert_sinks_hold(pipe, pg, table, lake, want, 180)
        assert store.get("/readyz")[0] == 200
        assert read_topic(settings, settings.stages["store"].dlq) == []
        assert read_topic(settings, settings.stages["lake"].dlq) == []
        before_table = table_rows(pg, table)
        before_lake = sorted(
            (r["_partition"], r["_offset"], r["device_id"], r["metric"], r["count"])
            for r in lake_rows(lake)
        )

        # rewinds: both sinks stopped, their offsets moved to the start, restarted
        for stage in ("store", "lake"):
            for w in pipe.workers[stage]:
                w.stop()
            moved = cli(config, broker.bootstrap, "replay", stage, "--to-earliest", "--execute")
            assert moved.returncode == 0, moved.stderr
        store = pipe.start("store", env=env)
        lake_worker = pipe.start("lake")
        total = len(read_topic(settings, settings.stages["aggregate"].output))
        wait_for(
            lambda: (
                store.counter("pipeline_records_consumed_total") >= total
                and lake_worker.counter("pipeline_records_consumed_total") >= total
                and lake_worker.counter("pipeline_sink_flushes_total") >= 1
            ),
            120,
            "the sinks to read everything again",
            pipe.logs,
        )
        wait_for(
            lambda: (
                sorted(
                    (r["_partition"], r["_offset"], r["device_id"], r["metric"], r["count"])
                    for r in lake_rows(lake)
                )
                == before_lake
            ),
            60,
            "the lake rewritten identically",
            pipe.logs,
        )
        assert table_rows(pg, table) == before_table
        assert_equal_windows(lake_windows(lake), want)
    finally:
        feeder.join(5)
        pipe.stop_all()
        if not (pg.data / "postmaster.pid").exists():
            pg.start()


def test_sinks_scale_out_while_they_hold_batches(broker, pg, tmp_path):
    """A second worker of each sink joins while the first holds batches: the Parquet
    sink's buffered ones (a long roll_s) and the PostgreSQL sink's one waiting for
    a database that is down. The rebalance gives them up instead of waiting for
    them; afterwards the table and the lake hold every window once."""
    lake = tmp_path / "lake"
    add = sink_stages(pg, lake, roll_records=100_000)
    add["stages"]["lake"]["config"]["roll_s"] = 8
    config, settings = isolated_config(tmp_path, broker.bootstrap, add=add)
    table = settings.stages["store"].config["table"]
    env = {"PIPELINE_STAGES__STORE__CONFIG__PASSWORD": pg.password}
    assert cli(config, broker.bootstrap, "sink", "init", "store", env=env).returncode == 0
    docs = readings(devices=8, per_device=60, start_ms=int(time.time() * 1000) - 3_600_000)
    want = expected(docs)
    pipe = Pipeline(config, settings, tmp_path)
    try:
        pipe.start("aggregate")
        first_store = pipe.start("store", env=env)
        first_lake = pipe.start("lake")
        wait_for(lambda: first_store.get("/readyz")[0] == 200, 60, "store ready", pipe.logs)
        pg.stop()
        produce_enriched(settings, docs)
        wait_for(
            lambda: (
                first_store.counter("pipeline_dependency_failures_total") > 0
                and first_lake.counter("pipeline_records_consumed_total") > 0
            ),
            90,
            "a store batch waiting for the database and lake batches buffered",
            pipe.logs,
        )
        assert lake_rows(lake) == []  # held: not yet durable, nothing committed
        second_store = pipe.start("store", env=env)
        second_lake = pipe.start("lake")

        def split(a: Any, b: Any) -> bool:
            pipe.check_alive()
            return (
                a.counter("pipeline_assigned_partitions")
                + b.counter("pipeline_assigned_partitions")
                == 4
                and a.counter("pipeline_assigned_partitions") > 0
                and b.counter("pipeline_assigned_partitions") > 0
            )

        wait_for(lambda: split(first_lake, second_lake), 90, "the lake split", pipe.logs)
        wait_for(lambda: split(first_store, second_store), 90, "the store split", pipe.logs)
        pg.start()

        assert_sinks_hold(pipe, pg, table, lake, want, 150)
        for worker in (first_store, second_store, first_lake, second_lake):
            assert worker.alive()
    finally:
        pipe.stop_all()
        if not (pg.data / "postmaster.pid").exists():
            pg.start()
