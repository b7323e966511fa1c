"""The Parquet sink: records into Parquet files in a directory or an object store.

::

    stages:
      lake:
        uses: pipeline.sinks:parquet
        inputs: [iot.aggregates]
        dlq: iot.lake.dlq
        config:
          path: /data/lake/aggregates        # or s3://bucket/prefix, gs://..., hdfs://...
          partition_by: [date, site]         # date: the UTC day of time_column
          roll_records: 100000               # a file per input partition at most this big
          roll_s: 60                         # ... and at most this old

**Layout.** Hive-style directories (``date=2026-12-06/site=berlin/``; ``date`` is
derived from ``time_column``, other names are record fields, left out of the
files' columns as Hive readers expect). A flush writes, per directory, one file
named after the input partition and offset range it holds:
``part-<topic>-<partition>-<first offset>-<last offset>.parquet``. Every row also
carries its input coordinates (``_partition``, ``_offset``).

**Durability and exactly once.** Records are buffered per input partition and
flushed when ``roll_records`` are buffered or the oldest is ``roll_s`` old (wall
clock). Each file is written under a hidden name and then renamed (on an object
store: one PUT, which appears whole), and only then are the records durable: the
runtime acks and commits their offsets after the flush, never before. Before
writing a flush's files, the sink writes a manifest of them
(``_pipeline/<stage>/<topic>/<partition>/<first>-<last>.json``; readers ignore
``_`` paths). When the sink gets a partition, the first offset it is handed is the
group's committed offset F: files of manifests that start at or after F were
written but never committed (a crash, or a rewind of the sink with ``pipeline
replay``) and are deleted before anything is written again; a file that straddles
F is rewritten without its rows from F on. So a restart or a rewind rewrites the
same records once, never beside an older copy. Manifests of the newest
``manifest_keep`` flushes per partition are kept; a rewind further back than that
is reported in the log (the older files are left as they are).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import Field, model_validator

from pipeline.errors import ConfigError, InvalidMessage, Unavailable
from pipeline.records import Record
from pipeline.sinks.rows import SCHEMA_VIOLATION, RowModel, Rows
from pipeline.stage import SinkOutputs, StageContext, stage

log = logging.getLogger("pipeline.sinks.parquet")

DATE = "date"


class ParquetConfig(RowModel):
    #: a directory, or a URL pyarrow's filesystems know (file://, s3://, gs://, hdfs://)
    path: str = Field(min_length=1)
    #: directory levels: ``date`` (the UTC day of time_column) or record fields
    partition_by: tuple[str, ...] = (DATE,)
    time_column: str = "window_start"
    roll_records: int = Field(default=100_000, ge=1, le=10_000_000)
    roll_s: float = Field(default=60.0, gt=0)
    compression: str = "zstd"
    manifest_keep: int = Field(default=10_000, ge=10)

    @model_validator(mode="after")
    def _partitions_known(self) -> ParquetConfig:
        for name in self.partition_by:
            if name != DATE and name not in self.columns:
                raise ValueError(f"partition_by {name!r} is not a column")
        if DATE in self.partition_by and self.columns.get(self.time_column) != "timestamp":
            raise ValueError(
                f"partition_by date needs time_column {self.time_column!r} to be a timestamp"
            )
        return self


class _Buffer:
    """One input partition's records since its last flush, and the offsets handed
    over (dead letters included: a flush makes them durable too)."""

    __slots__ = ("end", "first_at", "records", "rows", "start")

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.records: list[Record] = []
        self.start: int | None = None
        self.end: int | None = None
        self.first_at = 0.0


class ParquetSink:
    """Buffers records per partition and flushes them as Parquet files (module doc)."""

    buffers = True

    def __init__(self, ctx: StageContext) -> None:
        import pyarrow as pa
        import pyarrow.fs as pafs

        self.ctx = ctx
        config: ParquetConfig = ctx.config
        self.config = config
        self.rows = Rows(config)
        try:
            self.fs, root = pafs.FileSystem.from_uri(config.path)
        except (pa.ArrowInvalid, ValueError):  # a plain path, relative or not
            self.fs, root = pafs.LocalFileSystem(), config.path
        except Exception as exc:  # a filesystem pyarrow was built without, bad URL
            raise ConfigError(f"stage {ctx.stage_id}: path {config.path}: {exc}") from None
        self.root = root.rstrip("/") or "/"
        self.part_index = [
            (name, self.rows.columns.index(name)) for name in config.partition_by if name != DATE
        ]
        self.time_index = self.rows.columns.index(config.time_column)
        left_out = {name for name, _ in self.part_index}
        #: (row index, name, arrow type) of the columns a file holds (partition
        #: fields are in its path), then the input coordinates
        self.file_columns = [
            (i, name, _arrow_type(t))
            for i, (name, t) in enumerate(zip(self.rows.columns, self.rows.types, strict=True))
            if name not in left_out
        ]
        self.schema = pa.schema(
            [pa.field(name, t) for _, name, t in self.file_columns]
            + [pa.field("_partition", pa.int32()), pa.field("_offset", pa.int64())]
        )
        self.buffered: dict[tuple[str, int], _Buffer] = {}
        #: partitions whose leftovers were cleaned since they were (re)assigned
        self.clean: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.clock = ctx.clock
        self._flushes = 0

    # -- the sink contract ---------------------------------------------------------------
    def write(self, records: Sequence[Record], out: SinkOutputs) -> None:
        topic, partition = records[0].topic, records[0].partition
        tp = (topic, partition)
        rows: list[tuple[Any, ...]] = []
        kept: list[Record] = []
        for record in records:
            try:
                rows.append(self.rows.row(record))
            except InvalidMessage as exc:
                out.dead_letter(record, exc)
                continue
            kept.append(record)
        with self.lock:
            if tp not in self.clean:
                self._clean_leftovers(topic, partition, records[0].offset)
                self.clean.add(tp)
            buffer = self.buffered.get(tp)
            if buffer is None:
                buffer = self.buffered[tp] = _Buffer()
            n_rows, start, end, first_at = (
                len(buffer.rows),
                buffer.start,
                buffer.end,
                buffer.first_at,
            )
            if buffer.end is None:
                buffer.start, buffer.first_at = records[0].offset, self.clock()
            buffer.end = records[-1].offset
            buffer.rows += rows
            buffer.records += kept
            if len(buffer.rows) >= self.config.roll_records:
                try:
                    self._flush(topic, partition, buffer, out)
                except BaseException:  # leave no effect: the batch is run again
                    del buffer.rows[n_rows:], buffer.records[n_rows:]
                    buffer.start, buffer.end, buffer.first_at = start, end, first_at
                    raise

    def flush_due(self, now: float, out: SinkOutputs) -> None:
        with self.lock:
            for (topic, partition), buffer in self.buffered.items():
                if buffer.end is not None and now - buffer.first_at >= self.config.roll_s:
                    self._flush(topic, partition, buffer, out)

    def drop(self) -> None:
        with self.lock:
            self.buffered.clear()
            self.clean.clear()

    def close(self) -> None:
        self.drop()

    # -- flushing ----------------------------------------------------------------------------
    def _flush(self, topic: str, partition: int, buffer: _Buffer, out: SinkOutputs) -> None:
        """Write the buffer's files (manifest first), report them stored and the
        offsets durable, and empty the buffer. Unavailable on a storage error
        (the buffer is kept: the same files are written again next time)."""
        start, end = buffer.start, buffer.end
        assert start is not None and end is not None
        if buffer.rows:
            groups: dict[str, list[int]] = {}
            for i, row in enumerate(buffer.rows):
                groups.setdefault(self._directory(row), []).append(i)
            name = f"part-{topic}-{partition}-{start}-{end}.parquet"
            files = [f"{d}/{name}" if d else name for d in groups]
            try:
                self._write_manifest(topic, partition, start, end, files)
                for (directory, index), path in zip(groups.items(), files, strict=True):
                    self._write_file(
                        directory,
                        path,
                        [buffer.rows[i] for i in index],
                        [buffer.records[i] for i in index],
                    )
            except OSError as exc:
                raise Unavailable("storage", f"{self.config.path}: {exc}") from None
            for index, path in zip(groups.values(), files, strict=True):
                for i in index:
                    out.stored(buffer.records[i], path)
        out.durable(topic, partition, end)
        buffer.rows, buffer.records = [], []
        buffer.start = buffer.end = None
        self._flushes += 1
        if self._flushes % 100 == 0:
            self._prune(topic, partition)

    def _directory(self, row: tuple[Any, ...]) -> str:
        parts = []
        for name in self.config.partition_by:
            if name == DATE:
                when = row[self.time_index]
                parts.append(f"date={when:%Y-%m-%d}")
            else:
                value = row[self.rows.columns.index(name)]
                text = _HIVE_NULL if value is None else quote(str(value), safe="")
                parts.append(f"{name}={text}")
        return "/".join(parts)

    def _full(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root != "/" else f"/{relative}"

    def _write_file(
        self, directory: str, path: str, rows: list[tuple[Any, ...]], records: list[Record]
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = [pa.array([row[i] for row in rows], type=t) for i, _, t in self.file_columns] + [
            pa.array([r.partition for r in records], type=pa.int32()),
            pa.array([r.offset for r in records], type=pa.int64()),
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._atomic(
            path, lambda sink: pq.write_table(table, sink, compression=self.config.compression)
        )

    def _atomic(self, relative: str, write: Any) -> None:
        """Write under a hidden name, then rename: readers see the whole file or none."""
        final = self._full(relative)
        parent, _, name = final.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        hidden = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(hidden) as sink:
            write(sink)
        self.fs.move(hidden, final)

    # -- manifests ----------------------------------------------------------------------------
    def _manifest_dir(self, topic: str, partition: int) -> str:
        return f"_pipeline/{self.ctx.stage_id}/{topic}/{partition}"

    def _write_manifest(
        self, topic: str, partition: int, start: int, end: int, files: list[str]
    ) -> None:
        doc = orjson.dumps({"start": start, "end": end, "files": files})
        path = f"{self._manifest_dir(topic, partition)}/{start:020d}-{end:020d}.json"
        self._atomic(path, lambda sink: sink.write(doc))

    def _manifests(self, topic: str, partition: int) -> list[tuple[int, int, str]]:
        """(start, end, full path) of the partition's manifests, oldest first."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(
            self._full(self._manifest_dir(topic, partition)), allow_not_found=True
        )
        found = []
        for info in self.fs.get_file_info(selector):
            stem = info.base_name.removesuffix(".json")
            first, _, last = stem.partition("-")
            if info.is_file and first.isdigit() and last.isdigit():
                found.append((int(first), int(last), info.path))
        return sorted(found)

    def _clean_leftovers(self, topic: str, partition: int, first: int) -> None:
        """The partition was (re)assigned and ``first`` is the group's committed
        offset: remove what flushes at or after it wrote (never committed, or
        rewound), so those records are written once more, not beside a copy."""
        try:
            manifests = self._manifests(topic, partition)
            if manifests and first < manifests[0][0]:
                log.error(
                    "stage %s: %s[%d] starts at offset %d, before the oldest manifest kept "
                    "(%d; manifest_keep=%d): files of earlier offsets are left as they are and "
                    "may now hold records twice",
                    self.ctx.stage_id,
                    topic,
                    partition,
                    first,
                    manifests[0][0],
                    self.config.manifest_keep,
                )
            for start, end, path in manifests:
                if end < first:
                    continue
                doc = orjson.loads(self._read(path))
                if start >= first:
                    for relative in doc["files"]:
                        self._delete(self._full(relative))
                    self._delete(path)
                    log.info(
                        "stage %s: %s[%d] offsets %d-%d were written but not committed: "
                        "removed %d file(s), they are written again",
                        self.ctx.stage_id,
                        topic,
                        partition,
                        start,
                        end,
                        len(doc["files"]),
                    )
                    continue
                # a flush that straddles ``first``: keep only its rows before it
                kept = self._trim(topic, partition, doc["files"], first, start)
                self._write_manifest(topic, partition, start, first - 1, kept)
                self._delete(path)
                log.info(
                    "stage %s: %s[%d] restarts at offset %d inside a flush of %d-%d: its "
                    "files now end at %d",
                    self.ctx.stage_id,
                    topic,
                    partition,
                    first,
                    start,
                    end,
                    first - 1,
                )
        except OSError as exc:
            raise Unavailable("storage", f"{self.config.path}: {exc}") from None

    def _trim(
        self, topic: str, partition: int, files: list[str], first: int, start: int
    ) -> list[str]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        kept = []
        for relative in files:
            full = self._full(relative)
            with self.fs.open_input_file(full) as source:
                table = pq.read_table(source)
            table = table.filter(pc.less(table["_offset"], first))
            if table.num_rows:
                directory = relative.rpartition("/")[0]
                name = f"part-{topic}-{partition}-{start}-{first - 1}.parquet"
                path = f"{directory}/{name}" if directory else name
                self._atomic(path, lambda sink, t=table: pq.write_table(t, sink))
                kept.append(path)
            self._delete(full)
        return kept

    def _prune(self, topic: str, partition: int) -> None:
        """Forget manifests beyond the newest ``manifest_keep`` (their files stay)."""
        try:
            manifests = self._manifests(topic, partition)
            for _, _, path in manifests[: max(0, len(manifests) - self.config.manifest_keep)]:
                self._delete(path)
        except OSError:
            log.warning("stage %s: could not prune manifests", self.ctx.stage_id, exc_info=True)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as source:
            return bytes(source.read())

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)


_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    return {
        "text": pa.string(),
        "bigint": pa.int64(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
        "timestamp": pa.timestamp("ms", tz="UTC"),
        "json": pa.string(),
    }[name]


parquet = stage(
    config=ParquetConfig,
    reasons={
        SCHEMA_VIOLATION: "a record without the sink's key fields, or a field of the wrong type",
    },
    name="pipeline.sinks:parquet",
)(ParquetSink)
