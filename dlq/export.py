"""``dlq export``: dead letters to Parquet or JSON Lines, in bounded batches."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dlq.read import StoredDeadLetter
from dlq.view import full
from pipeline.errors import ConfigError, PipelineError

EXPORT_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
_EXPORT_BATCH = 5000


def export_format(path: str | Path) -> str:
    """``parquet`` or ``jsonl`` from the file name; ConfigError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ConfigError(
            f"cannot export to {str(path)!r}: the file name must end in .parquet or .jsonl"
        )
    return EXPORT_FORMATS[suffix]


def parquet_schema() -> Any:
    import pyarrow as pa

    ts = pa.timestamp("ms", tz="UTC")
    return pa.schema(
        [
            ("ref", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("error_class", pa.string()),
            ("error_message", pa.string()),
            ("original_topic", pa.string()),
            ("original_partition", pa.int32()),
            ("original_offset", pa.int64()),
            ("original_timestamp", ts),
            ("failed_at", ts),
            ("attempts", pa.int32()),
            ("replay_count", pa.int32()),
            ("key", pa.binary()),
            ("value", pa.binary()),
            (
                "headers",
                pa.list_(pa.struct([("name", pa.string()), ("value", pa.binary())])),
            ),
        ]
    )


def _parquet_rows(letters: Sequence[StoredDeadLetter]) -> dict[str, list[Any]]:
    return {
        "ref": [d.ref for d in letters],
        "stage": [d.stage for d in letters],
        "reason": [d.reason for d in letters],
        "error_class": [d.error_class for d in letters],
        "error_message": [d.error_message for d in letters],
        "original_topic": [d.original_topic for d in letters],
        "original_partition": [d.original_partition for d in letters],
        "original_offset": [d.original_offset for d in letters],
        "original_timestamp": [d.original_timestamp_ms for d in letters],
        "failed_at": [d.failed_at_ms for d in letters],
        "attempts": [d.attempts for d in letters],
        "replay_count": [d.replay_count for d in letters],
        "key": [d.key for d in letters],
        "value": [d.value for d in letters],
        "headers": [[{"name": n, "value": v} for n, v in d.headers] for d in letters],
    }


def _batches(letters: Iterable[StoredDeadLetter], size: int) -> Iterator[list[StoredDeadLetter]]:
    batch: list[StoredDeadLetter] = []
    for letter in letters:
        batch.append(letter)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def export(letters: Iterable[StoredDeadLetter], path: str | Path) -> int:
    """Write ``letters`` to a Parquet or JSON-lines file (by extension); return the count.

    The file appears complete or not at all (written beside it, then renamed).
    """
    target = Path(path)
    kind = export_format(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    count = 0
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema()
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in _batches(letters, _EXPORT_BATCH):
                    writer.write_table(pa.table(_parquet_rows(batch), schema=schema))
                    count += len(batch)
        else:
            with tmp.open("w", encoding="utf-8") as out:
                for letter in letters:
                    out.write(json.dumps(full(letter), ensure_ascii=False) + "\n")
                    count += 1
        os.replace(tmp, target)
    except OSError as exc:
        raise PipelineError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------- replay
