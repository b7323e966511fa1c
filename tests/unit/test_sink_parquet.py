"""The Parquet sink on a real (local) filesystem, in memory otherwise: files per
directory and flush named by offset range, rolling by size and age, leftovers of
uncommitted flushes removed when a partition is taken again, a straddling file
trimmed on a rewind, bad records dead-lettered, storage errors Unavailable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pytest

from pipeline.errors import Unavailable
from pipeline.sinks import parquet
from pipeline.testing import StageHarness, record

T0 = 1_767_225_600_000  # 2026-01-01


def window(i: int, site: str = "s1", **extra: Any) -> dict[str, Any]:
    return {
        "device_id": f"d{i % 3}",
        "metric": "temperature",
        "window_start": T0 + i * 60_000,
        "window_end": T0 + (i + 1) * 60_000,
        "site": site,
        "unit": "C",
        "count": i + 1,
        "min": 1.0,
        "max": 2.0,
        "mean": 1.5,
        **extra,
    }


def harness(path: Path, **config: Any) -> StageHarness:
    return StageHarness(
        parquet,
        stage_id="lake",
        output=None,
        config={"path": str(path), "partition_by": ["date", "site"], **config},
    )


def files(path: Path) -> list[str]:
    return sorted(
        str(Path(root, f).relative_to(path))
        for root, _, names in os.walk(path)
        for f in names
        if not root.startswith(str(path / "_pipeline"))
    )


def offsets(path: Path) -> list[int]:
    return sorted(
        ds.dataset(str(path), format="parquet", partitioning="hive")
        .to_table()["_offset"]
        .to_pylist()
    )


def test_a_flush_writes_a_file_per_directory_named_by_offset_range(tmp_path):
    h = harness(tmp_path, roll_records=4)
    first = h.run([record(window(i, f"s{i % 2}"), offset=i) for i in range(3)])
    assert first.report.durable == {} and files(tmp_path) == []  # buffered, not durable
    second = h.run([record(window(3, "s1"), offset=3)])
    assert second.report.durable == {("in", 0): 3}
    assert files(tmp_path) == [
        "date=2026-01-01/site=s0/part-in-0-0-3.parquet",
        "date=2026-01-01/site=s1/part-in-0-0-3.parquet",
    ]
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert sorted(table["count"].to_pylist()) == [1, 2, 3, 4]
    assert "site" in table.column_names  # from the path (not a column of the file)
    refs = {hop["in"][2]: hop["ref"] for hop in second.hops if hop["outcome"] == "stored"}
    assert refs[0] == "date=2026-01-01/site=s0/part-in-0-0-3.parquet"
    assert not [n for n in os.listdir(tmp_path / "date=2026-01-01/site=s0") if n.startswith(".")]


def test_a_flush_comes_when_the_oldest_record_is_roll_s_old(tmp_path):
    h = harness(tmp_path, roll_s=10)
    h.run([record(window(0), offset=7)])
    assert h.flush(9).report is None
    due = h.flush(1.5)
    assert due.report.durable == {("in", 0): 7}
    assert offsets(tmp_path) == [7]


def test_leftovers_of_an_uncommitted_flush_are_removed_when_the_partition_comes_back(tmp_path):
    h = harness(tmp_path, roll_records=2)
    h.run([record(window(i), offset=i) for i in range(2)])  # flush 0-1: committed
    h.run([record(window(i), offset=i) for i in range(2, 4)])  # flush 2-3: say not committed
    assert offsets(tmp_path) == [0, 1, 2, 3]
    h.engine.drop()  # the partition moved; its next owner starts at the committed offset 2
    h.run([record(window(i), offset=i) for i in range(2, 5)])  # flush 2-4
    assert offsets(tmp_path) == [0, 1, 2, 3, 4]  # 2 and 3 once
    assert "date=2026-01-01/site=s1/part-in-0-2-3.parquet" not in files(tmp_path)


def test_a_rewind_into_a_flush_rewrites_its_file_without_the_rewound_rows(tmp_path):
    h = harness(tmp_path, roll_records=4)
    h.run([record(window(i), offset=i) for i in range(4)])  # one file, offsets 0-3
    h.engine.drop()
    h.run([record(window(i), offset=i) for i in range(2, 6)])  # rewound to 2
    assert offsets(tmp_path) == [0, 1, 2, 3, 4, 5]
    assert files(tmp_path) == [
        "date=2026-01-01/site=s1/part-in-0-0-1.parquet",
        "date=2026-01-01/site=s1/part-in-0-2-5.parquet",
    ]


def test_bad_records_are_dead_letters_and_their_offsets_become_durable(tmp_path):
    h = harness(tmp_path, roll_records=2)
    run = h.run(
        [
            record(window(0), offset=0),
            record(b"{", offset=1),
            record({"device_id": "d1"}, offset=2),
            record(window(1, count="many"), offset=3),
        ]
    )
    assert [d.reason for d in run.dead_letters] == [
        "decode_error",
        "schema_violation",
        "schema_violation",
    ]
    assert files(tmp_path) == []  # one good row: not rolled yet
    assert h.flush(61).report.durable == {("in", 0): 3}


def test_a_storage_error_is_unavailable_and_leaves_the_buffer_as_it_was(tmp_path):
    blocked = tmp_path / "lake"
    blocked.write_text("a file where the directory should be")
    h = harness(blocked, roll_records=2)
    with pytest.raises(Unavailable) as caught:
        h.run([record(window(0), offset=0), record(window(1), offset=1)])
    assert caught.value.dependency == "storage"
    blocked.unlink()
    again = h.run([record(window(0), offset=0), record(window(1), offset=1)])
    assert again.report.durable == {("in", 0): 1}
    assert offsets(blocked) == [0, 1]  # once each: the failed attempt left nothing


def test_manifests_keep_only_the_newest(tmp_path):
    h = harness(tmp_path, roll_records=1, manifest_keep=10)
    for i in range(205):
        h.run([record(window(i), offset=i)])
    kept = os.listdir(tmp_path / "_pipeline" / "lake" / "in" / "0")
    assert 10 <= len(kept) <= 110  # pruned every 100 flushes
    assert orjson.loads((tmp_path / "_pipeline/lake/in/0" / max(kept)).read_bytes())["end"] == 204
