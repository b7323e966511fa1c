"""Backfill pieces that need no broker: plans, rows, state, rate, CLI usage errors."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.backfill.completion import remaining, stage_chain
from pipeline.backfill.controller import RateLimiter, check_run_id, entry_topic, prepare_chain
from pipeline.backfill.source import ParquetSource, chunk_ranges, expand_paths
from pipeline.backfill.state import RunState, compress, expand
from pipeline.cli.main import cli
from pipeline.errors import ConfigError
from pipeline.settings import load_settings
from stages.ingest import ingest
from stages.parse import parse
from tests.unit.records import Batchwise, engine

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("device_id", "ts", "seq", "metric", "value", "unit")


def readings(pattern: str) -> ParquetSource:
    """A Parquet source as the built-in pipeline.yaml reads one."""
    return ParquetSource(pattern, COLUMNS, "ts")


def write(path: Path, n: int, row_group: int, ts_type: pa.DataType | None = None) -> None:
    base = 1_764_000_000_000
    table = pa.table(
        {
            "device_id": [f"dev-{i % 3:04d}" for i in range(n)],
            "ts": pa.array([base + i * 1000 for i in range(n)], pa.int64()).cast(
                ts_type or pa.int64()
            ),
            "seq": list(range(n)),
            "metric": ["temperature"] * n,
            "value": [20.0 + i % 5 for i in range(n)],
            "unit": ["C"] * n,
            "extra": ["ignored"] * n,
        }
    )
    pq.write_table(table, path, row_group_size=row_group)


def test_chunks_follow_row_groups_and_cover_every_row_once(tmp_path):
    write(tmp_path / "a.parquet", 250, row_group=100)
    write(tmp_path / "b.parquet", 30, row_group=100)
    source = readings(str(tmp_path))  # a directory: its *.parquet, sorted
    chunks = source.plan(40)
    assert [(Path(c.part).name, c.unit, c.start, c.rows) for c in chunks][:4] == [
        ("a.parquet", 0, 0, 40),
        ("a.parquet", 0, 40, 40),
        ("a.parquet", 0, 80, 20),
        ("a.parquet", 1, 0, 40),
    ]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    rows = [r for c in chunks for r in source.read(c)]
    assert len(rows) == sum(c.rows for c in chunks) == source.total_rows() == 280
    seqs = [orjson.loads(r.value)["seq"] for r in rows]
    assert seqs == list(range(250)) + list(range(30))
    assert source.plan(40) == chunks  # deterministic: resume relies on it


def test_rows_become_payloads_parse_accepts_with_the_same_lineage_id_every_time(tmp_path):
    write(tmp_path / "t.parquet", 5, row_group=5, ts_type=pa.timestamp("ms", tz="UTC"))
    source = readings(str(tmp_path / "t.parquet"))
    (chunk,) = source.plan(10)
    rows = source.read(chunk)
    doc = orjson.loads(rows[0].value)
    assert list(doc) == ["device_id", "ts", "seq", "metric", "value", "unit"]
    assert doc["ts"] == 1_764_000_000_000 == rows[0].timestamp_ms  # timestamp → epoch ms
    settings = load_settings(REPO / "config" / "pipeline.yaml")
    assert ParquetSource.from_settings(settings, str(tmp_path / "t.parquet")).read(chunk) == rows
    first = Batchwise(engine(ingest, settings.stages["ingest"].config)).process(rows)
    again = Batchwise(engine(ingest, settings.stages["ingest"].config)).process(
        readings(str(tmp_path)).read(chunk)
    )
    ids = [dict(o.headers)["lineage-id"] for o in first.outputs]
    assert ids == [dict(o.headers)["lineage-id"] for o in again.outputs] and len(set(ids)) == 5
    parsed = Batchwise(engine(parse, settings.stages["parse"].config)).process(
        [r.__class__(r.topic, 0, i, r.timestamp_ms, o.key, o.value, tuple(o.headers))
         for i, (r, o) in enumerate(zip(rows, first.outputs, strict=True))]
    )  # fmt: skip
    assert len(parsed.outputs) == 5 and not parsed.dead


def test_a_file_without_the_reading_columns_is_refused_naming_them(tmp_path):
    pq.write_table(pa.table({"device_id": ["a"], "ts": [1]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"lacks column.*seq, metric, value, unit"):
        readings(str(tmp_path / "x.parquet"))
    with pytest.raises(ConfigError, match="no Parquet file matches"):
        expand_paths(str(tmp_path / "nothing-*.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"cannot read .* as Parquet"):
        readings(str(tmp_path / "bad.parquet"))


def test_the_fingerprint_changes_with_the_input(tmp_path):
    path = tmp_path / "f.parquet"
    write(path, 10, row_group=10)
    before = readings(str(path)).fingerprint()
    assert readings(str(path)).fingerprint() == before
    write(path, 11, row_group=10)
    assert readings(str(path)).fingerprint() != before


def test_chunk_ranges():
    assert list(chunk_ranges(0, 3)) == []
    assert list(chunk_ranges(7, 3)) == [(0, 3), (3, 3), (6, 1)]


def test_done_chunks_are_kept_as_ranges_and_round_trip_through_json():
    assert compress([5, 1, 2, 3, 7, 6, 9]) == [[1, 3], [5, 7], [9, 9]]
    assert list(expand([[1, 3], [9, 9]])) == [1, 2, 3, 9]
    run = RunState("r", "RUNNING", {}, "fp", "parse", "lane", 10, 4, 40, 0.0, "uuid")
    for i in (0, 2, 1):
        run.mark_done(i)
    assert run.done == [[0, 2]] and run.chunks_done == 3 and run.done_chunks == {0, 1, 2}
    back = RunState.from_json(orjson.loads(orjson.dumps(run.as_json())))
    assert back == run


def test_rate_limiter_paces_rows_on_average():
    now = [0.0]
    limiter = RateLimiter(100, clock=lambda: now[0])
    assert limiter.delay(50) == pytest.approx(0.5)
    now[0] = 2.0
    assert limiter.delay(50) == 0.0  # behind schedule: no wait
    assert RateLimiter(0).delay(10**9) == 0.0


def test_completion_counts_what_is_left_and_walks_the_stages_from_the_entry():
    assert remaining({("t", 0): 10, ("t", 1): 5}, {("t", 0): 4, ("t", 1): None}) == 11
    assert remaining({("t", 0): 10}, {("t", 0): 12}) == 0
    settings = load_settings(REPO / "config" / "pipeline.yaml")
    assert stage_chain(settings, "parse") == ["parse", "enrich", "aggregate"]
    assert stage_chain(settings, "ingest")[0] == "ingest"
    # entering at parse, the controller runs ingest's code itself
    assert prepare_chain(settings, "parse") == ["ingest"]
    assert prepare_chain(settings, "ingest") == []
    assert prepare_chain(settings, "aggregate") == []  # enrich joins a lookup


def test_run_ids_are_safe_names():
    assert check_run_id("bf-20261130-0100-ab12") == "bf-20261130-0100-ab12"
    for bad in ("Upper", "-x", "x" * 41, "a b", "a/b"):
        with pytest.raises(ConfigError):
            check_run_id(bad)


def test_entry_topic_is_the_stages_backfill_lane_else_its_input():
    settings = load_settings(REPO / "config" / "pipeline.yaml")
    assert entry_topic(settings, "parse") == "iot.backfill.raw"
    assert entry_topic(settings, "ingest") == "iot.landing"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "exactly one of --from-parquet or --from-topic"),
        (["run", "--from-parquet", "a", "--from-topic", "t"], "exactly one of"),
        (["run", "--from-topic", "t"], "needs --start and --end"),
        (["run", "--from-parquet", "a", "--start", "1"], "--start/--end go with --from-topic"),
        (["run", "--from-parquet", "x.parquet", "--run-id", "Bad Id"], "run id 'Bad Id'"),
        (["run", "--from-parquet", "/nonexistent/*.parquet", "--dry-run"], "no Parquet file"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    result = CliRunner().invoke(
        cli, ["--config", str(REPO / "config" / "pipeline.yaml"), "backfill", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_dry_run_plans_from_metadata_and_needs_no_broker(tmp_path, monkeypatch):
    write(tmp_path / "d.parquet", 25, row_group=10)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    result = CliRunner().invoke(
        cli,
        ["--config", str(REPO / "config" / "pipeline.yaml"), "backfill", "run", "--from-parquet",
         str(tmp_path / "d.parquet"), "--chunk-size", "4", "--dry-run", "--run-id", "d1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dry run d1: 8 chunks, 25 rows → iot.backfill.raw (stage parse); nothing sent" in (
        result.stdout
    )
