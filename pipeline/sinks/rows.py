"""Records as rows: the column model both sinks share.

A sink stores JSON records (aggregate windows by default) as rows of fixed columns,
each a field of the record (same name) with a type:

========== ====================== ===============================================
type       from the record        PostgreSQL / Parquet
========== ====================== ===============================================
text       a string               text / string
bigint     an integer             bigint / int64
double     a number               double precision / float64
boolean    true or false          boolean / bool
timestamp  epoch milliseconds     timestamptz / timestamp[ms, UTC]
json       any JSON value         jsonb / string (the JSON text)
========== ====================== ===============================================

Two columns have defaults when the record lacks them: ``source`` (the record's
``source`` header: ``live`` or ``backfill:<run-id>``) and ``version`` (1; a
correction of a window carries ``version`` > 1, see the windowed operator). The
``key`` columns identify a result (a window): they must be present and not null,
else the record is a ``schema_violation`` dead letter, as is a field of the wrong
type.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import InvalidMessage
from pipeline.records import Record

SCHEMA_VIOLATION = "schema_violation"

ColumnType = Literal["text", "bigint", "double", "boolean", "timestamp", "json"]

#: the columns of an ``aggregate/1`` window (stages/aggregate.py), with the version
AGGREGATE_COLUMNS: Mapping[str, ColumnType] = {
    "device_id": "text",
    "metric": "text",
    "window_start": "timestamp",
    "source": "text",
    "window_end": "timestamp",
    "version": "bigint",
    "site": "text",
    "unit": "text",
    "count": "bigint",
    "min": "double",
    "max": "double",
    "mean": "double",
    "first_ts": "timestamp",
    "last_ts": "timestamp",
    "first_lineage_id": "text",
    "last_lineage_id": "text",
}
AGGREGATE_KEY = ("device_id", "metric", "window_start", "source")
VERSION = "version"
SOURCE = "source"


class RowModel(BaseModel):
    """The ``key`` and ``columns`` of a sink's config (both sinks take them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: tuple[str, ...] = Field(default=AGGREGATE_KEY, min_length=1)
    columns: dict[str, ColumnType] = Field(default_factory=lambda: dict(AGGREGATE_COLUMNS))

    @model_validator(mode="after")
    def _key_in_columns(self) -> RowModel:
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ValueError(f"key column(s) {missing} are not among the columns")
        for name in self.columns:
            if not name.replace("_", "a").isalnum() or not name[0].isalpha():
                raise ValueError(f"column name {name!r}: use letters, digits and '_'")
        return self


def _ms_to_datetime(value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not epoch milliseconds")
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _bigint(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    if not -(2**63) <= value < 2**63:
        raise TypeError("out of the 64-bit range")
    return value


def _double(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("not true or false")
    return value


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


CONVERT = {
    "text": _text,
    "bigint": _bigint,
    "double": _double,
    "boolean": _boolean,
    "timestamp": _ms_to_datetime,
    "json": _json,
}


class Rows:
    """Turns records into rows (tuples in column order) for one sink's model."""

    def __init__(self, model: RowModel) -> None:
        self.columns = tuple(model.columns)
        self.types = tuple(model.columns.values())
        self.key = tuple(model.key)
        self.key_index = tuple(self.columns.index(k) for k in self.key)
        self.version_index = self.columns.index(VERSION) if VERSION in self.columns else None
        self._convert = tuple(CONVERT[t] for t in self.types)

    def row(self, record: Record) -> tuple[Any, ...]:
        """The record's row; InvalidMessage (``schema_violation``) if it has none."""
        doc = record.json()
        if not isinstance(doc, dict):
            raise InvalidMessage(SCHEMA_VIOLATION, "not a JSON object")
        values: list[Any] = []
        for name, convert in zip(self.columns, self._convert, strict=True):
            value = doc.get(name)
            if value is None:
                if name == SOURCE:
                    value = record.source
                elif name == VERSION:
                    value = 1
                elif name in self.key:
                    raise InvalidMessage(SCHEMA_VIOLATION, f"key field {name!r} is missing")
                else:
                    values.append(None)
                    continue
            try:
                values.append(convert(value))
            except TypeError as exc:
                raise InvalidMessage(SCHEMA_VIOLATION, f"field {name!r}: {exc}") from None
        return tuple(values)

    def key_of(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(row[i] for i in self.key_index)

    def version_of(self, row: tuple[Any, ...]) -> int:
        return int(row[self.version_index]) if self.version_index is not None else 0

    def ref(self, row: tuple[Any, ...]) -> list[Any]:
        """A row's key (and version) as JSON-able values, for a lineage hop."""
        out: list[Any] = []
        for i in self.key_index:
            value = row[i]
            out.append(int(value.timestamp() * 1000) if isinstance(value, datetime) else value)
        if self.version_index is not None:
            out.append(row[self.version_index])
        return out
