"""What a backfill reads: Parquet files or a Kafka range, planned into chunks.

A plan is computed from metadata alone (Parquet footers, partition offsets), so
``--dry-run`` reads no data, and it is deterministic: the same input gives the
same chunks, which is what lets a resumed run skip the chunks it checkpointed.
A chunk never spans two Parquet row groups or two partitions; reading one holds
at most one row group in memory.

A Parquet row becomes one JSON object of its columns (``backfill.columns``, in
that order; all columns when none are named), with the ``backfill.timestamp_column``
as the record's timestamp and ``backfill.key_column`` as its key: the same row is
the same payload every time, so a stage that derives lineage ids from content (the
built-in ingest) derives the same one.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, PipelineError
from pipeline.records import Record


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows ``[start, start + rows)`` of one unit: a Parquet row group (``part`` is
    the file) or a topic partition (``part`` is the topic; offsets)."""

    index: int
    part: str
    unit: int
    start: int
    rows: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Source(Protocol):
    kind: str

    def describe(self) -> dict[str, Any]:
        """What the run state keeps about the input, enough to re-open it."""
        ...

    def fingerprint(self) -> str:
        """Changes when the input changes: a resumed run refuses another input."""
        ...

    def plan(self, chunk_size: int) -> list[Chunk]: ...

    def read(self, chunk: Chunk) -> list[Record]:
        """The chunk's rows as records the ingest stage accepts (payload in ``value``)."""
        ...

    def close(self) -> None: ...


def chunk_ranges(count: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, rows)`` slices of ``count`` rows, ``chunk_size`` at most each."""
    for start in range(0, count, chunk_size):
        yield start, min(chunk_size, count - start)


# ----------------------------------------------------------------------- Parquet


def expand_paths(pattern: str) -> list[str]:
    """A file, a directory (its ``*.parquet``, sorted) or a glob (sorted)."""
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(pattern, "*.parquet")))
    elif glob.has_magic(pattern):
        paths = sorted(glob.glob(pattern, recursive=True))
    else:
        paths = [pattern] if os.path.exists(pattern) else []
    if not paths:
        raise ConfigError(f"no Parquet file matches {pattern!r}; check the path")
    return [os.path.abspath(p) for p in paths]


class ParquetSource:
    kind = "parquet"

    def __init__(
        self,
        pattern: str,
        columns: Sequence[str] = (),
        timestamp_column: str | None = None,
        key_column: str | None = None,
    ) -> None:
        self.pattern = pattern
        self.paths = expand_paths(pattern)
        self._files: dict[str, pq.ParquetFile] = {}
        self._cached: tuple[tuple[str, int], pa.Table] | None = None
        self.timestamp_column = timestamp_column
        self.key_column = key_column
        wanted = [*columns, *(c for c in (timestamp_column, key_column) if c and c not in columns)]
        self.columns: list[str] = list(columns) or list(
            self._file(self.paths[0]).schema_arrow.names
        )
        for path in self.paths:
            names = set(self._file(path).schema_arrow.names)
            missing = [c for c in (wanted or self.columns) if c not in names]
            if missing:
                raise ConfigError(
                    f"{path} lacks column(s) {', '.join(missing)}; a backfill file needs "
                    f"{', '.join(wanted or self.columns)} (backfill.columns in pipeline.yaml)"
                )

    @classmethod
    def from_settings(cls, settings: Any, pattern: str) -> ParquetSource:
        conf = settings.backfill
        return cls(pattern, conf.columns, conf.timestamp_column, conf.key_column)

    def _file(self, path: str) -> pq.ParquetFile:
        pf = self._files.get(path)
        if pf is None:
            try:
                pf = self._files[path] = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as exc:
                raise ConfigError(f"cannot read {path} as Parquet: {exc}") from None
        return pf

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "files": self.paths}

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        for path in self.paths:
            meta = self._file(path).metadata
            h.update(f"{path}|{os.path.getsize(path)}|{meta.num_rows}|".encode())
        return h.hexdigest()

    def total_rows(self) -> int:
        return sum(self._file(p).metadata.num_rows for p in self.paths)

    def plan(self, chunk_size: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        for path in self.paths:
            meta = self._file(path).metadata
            for group in range(meta.num_row_groups):
                for start, rows in chunk_ranges(meta.row_group(group).num_rows, chunk_size):
                    chunks.append(Chunk(len(chunks), path, group, start, rows))
        return chunks

    def _row_group(self, path: str, group: int) -> pa.Table:
        if self._cached is not None and self._cached[0] == (path, group):
            return self._cached[1]
        self._cached = None  # let the previous row group go first
        needed = list(
            dict.fromkeys(
                [*self.columns, *(c for c in (self.timestamp_column, self.key_column) if c)]
            )
        )
        table = self._file(path).read_row_group(group, columns=needed)
        self._cached = ((path, group), table)
        return table

    def read(self, chunk: Chunk) -> list[Record]:
        table = self._row_group(chunk.part, chunk.unit).slice(chunk.start, chunk.rows)
        names = list(
            dict.fromkeys(
                [*self.columns, *(c for c in (self.timestamp_column, self.key_column) if c)]
            )
        )
        columns = {name: _column(table.column(name)) for name in names}
        first_row = sum(
            self._file(chunk.part).metadata.row_group(g).num_rows for g in range(chunk.unit)
        )
        ts_column, key_column = self.timestamp_column, self.key_column
        records = []
        for i in range(table.num_rows):
            row = {name: columns[name][i] for name in self.columns}
            ts = columns[ts_column][i] if ts_column else 0
            key = columns[key_column][i] if key_column else None
            records.append(
                Record(
                    chunk.part,
                    chunk.unit,
                    first_row + chunk.start + i,
                    ts if isinstance(ts, int) and ts > 0 else 0,
                    None if key is None else str(key).encode("utf-8"),
                    orjson.dumps(row),
                )
            )
        return records

    def close(self) -> None:
        self._cached = None
        self._files.clear()


def _column(column: pa.ChunkedArray) -> list[Any]:
    """A column as Python values; timestamps as epoch milliseconds."""
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.timestamp("ms", tz=column.type.tz)).cast(pa.int64())
    values: list[Any] = column.to_pylist()
    return values


# --------------------------------------------------------------------- Kafka range


@dataclass(frozen=True, slots=True)
class PartitionRange:
    partition: int
    start: int
    end: int  # exclusive


class TopicSource:
    """Records of ``topic`` in per-partition offset ranges ``[start, end)``, resolved
    once (from times or offsets) when the run is created and kept in its state."""

    kind = "topic"

    def __init__(self, settings: Any, topic: str, ranges: Sequence[PartitionRange]) -> None:
        self.settings = settings
        self.topic = topic
        self.ranges = list(ranges)
        self._reader: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "topic": self.topic,
            "ranges": [[r.partition, r.start, r.end] for r in self.ranges],
        }

    def fingerprint(self) -> str:
        return hashlib.blake2b(orjson.dumps(self.describe()), digest_size=12).hexdigest()

    def total_rows(self) -> int:
        return sum(max(0, r.end - r.start) for r in self.ranges)

    def plan(self, chunk_size: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        for r in self.ranges:
            for start, rows in chunk_ranges(max(0, r.end - r.start), chunk_size):
                chunks.append(Chunk(len(chunks), self.topic, r.partition, r.start + start, rows))
        return chunks

    def read(self, chunk: Chunk) -> list[Record]:
        from pipeline.ops.rewind import PartitionReader

        if self._reader is None:
            self._reader = PartitionReader(self.settings, timeout=30.0)
        end = chunk.start + chunk.rows
        records: list[Record] = []
        for msg in self._reader.scan((chunk.part, chunk.unit), chunk.start, end):
            _, ts = msg.timestamp()
            offset = msg.offset() or 0
            records.append(
                Record(chunk.part, chunk.unit, offset, max(0, ts), msg.key(), msg.value(), ())
            )
        return records

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def resolve_range(
    settings: Any, topic: str, start: str, end: str, timeout: float = 30.0
) -> list[PartitionRange]:
    """Per partition of ``topic``, the offsets ``[start, end)`` for ``start``/``end``
    given as an ISO-8601 time with a zone (records with timestamp >= start and <
    end) or as a plain offset (the same in every partition)."""
    from pipeline.kafka.clients import admin, client_config
    from pipeline.kafka.offsets import high_watermarks
    from pipeline.kafka.topics import existing_partitions
    from pipeline.ops.rewind import PartitionReader, resolve_time_offset
    from pipeline.timeparse import parse_instant, to_ms

    partitions = existing_partitions(admin(settings), topic)
    tps = [(topic, p) for p in range(partitions)]
    highs = high_watermarks(client_config(settings), tps, timeout)
    reader = PartitionReader(settings, timeout)
    try:
        lows = {tp: reader.low_watermark(tp) for tp in tps}

        def bound(text: str, what: str) -> dict[tuple[str, int], int]:
            if text.strip().isdigit():
                return {tp: min(max(int(text), lows[tp]), highs[tp]) for tp in tps}
            target = to_ms(parse_instant(text, what))
            answers = reader.offsets_for_times(tps, target)
            return {
                tp: resolve_time_offset(
                    target,
                    answers.get(tp),
                    lows[tp],
                    highs[tp],
                    functools.partial(reader.timestamp_at, tp),
                    functools.partial(reader.first_from_time, tp, target, lows[tp], highs[tp]),
                )[0]
                for tp in tps
            }

        starts, ends = bound(start, "--start"), bound(end, "--end")
    finally:
        reader.close()
    ranges = [PartitionRange(p, starts[(topic, p)], ends[(topic, p)]) for _, p in tps]
    if all(r.end <= r.start for r in ranges):
        raise PipelineError(f"{topic} has no records between {start} and {end}; check the range")
    return ranges
