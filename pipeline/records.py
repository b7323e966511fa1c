"""Records: what a stage reads (:class:`Record`) and what it asks to write (:class:`Emit`).

A :class:`Record` is one consumed Kafka record, bytes and coordinates, nothing
decoded: a stage decodes what it needs (``record.json()``), so a bad payload is
the stage's to judge (a dead letter with a reason), never a record silently
skipped by a deserializer.

An :class:`Emit` is one record a stage wants written. The engine turns it into an
:class:`OutRecord` with the message contract's headers (:mod:`pipeline.contract`):
the input's lineage id, a child ``traceparent``, ``source``, and ``schema`` when the
emit names one. :class:`OutRecord` is the engine's form; a batch stage on a hot path
may build it directly (``out.append``), headers included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.contract import H_LINEAGE, H_SOURCE, SOURCE_LIVE
from pipeline.errors import InvalidMessage

#: the framework's reason for a payload that is not what ``json()``/``text()`` expect
DECODE_ERROR = "decode_error"

HeaderPairs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record: bytes and coordinates, nothing decoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: HeaderPairs = ()

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    @property
    def lineage_id(self) -> str | None:
        """The ``lineage-id`` header (a ULID), assigned where the record entered."""
        headers = self.headers
        if headers and headers[0][0] == H_LINEAGE:  # where the engine and ingest put it
            return headers[0][1].decode("ascii", "replace")
        raw = self.header(H_LINEAGE)
        return raw.decode("ascii", "replace") if raw else None

    @property
    def source(self) -> str:
        """``live``, or ``backfill:<run-id>`` for a record a backfill run sent."""
        raw = self.header(H_SOURCE)
        return raw.decode("utf-8", "replace") if raw else SOURCE_LIVE

    def json(self) -> Any:
        """The value parsed as JSON; :class:`InvalidMessage` (``decode_error``) if it
        is empty or not JSON."""
        if not self.value:
            raise InvalidMessage(DECODE_ERROR, "empty payload")
        try:
            return orjson.loads(self.value)
        except orjson.JSONDecodeError as exc:
            raise InvalidMessage(DECODE_ERROR, f"invalid JSON: {exc}") from None

    def text(self) -> str:
        """The value as UTF-8 text; :class:`InvalidMessage` (``decode_error``) if it is
        not."""
        try:
            return (self.value or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(DECODE_ERROR, "payload is not UTF-8 text") from None


HeadersIn = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]]


@dataclass(slots=True)
class Emit:
    """One record a stage wants written.

    ``key``/``value``: bytes as they are; ``str`` is UTF-8 encoded; any other value
    (a dict, a list, a number) is written as JSON. ``headers`` are added to (and
    override) the ones the contract carries over from the input. ``topic`` routes
    the record to one of the stage's declared ``outputs`` (default: the first).
    ``timestamp_ms`` defaults to the input's timestamp.
    """

    key: Any
    value: Any
    headers: HeadersIn | None = None
    timestamp_ms: int | None = None
    schema: str | None = None
    topic: str | None = None


@dataclass(slots=True)
class OutRecord:
    """One record to produce, in the engine's form: bytes and final headers."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None = None
    #: offset of the input record it was made from, for lineage hops (None: made
    #: from state, e.g. a closed window)
    source_offset: int | None = None
    #: one of the stage's outputs; None: its default output
    topic: str | None = None
    #: a fan-out's child: the lineage id of the input it was split from
    parent: bytes | None = None


def to_bytes(value: Any) -> bytes | None:
    """An emitted key or value as bytes: bytes as they are, str as UTF-8, None as
    None, anything else as JSON."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return orjson.dumps(value)


def fitted(data: bytes) -> bytes:
    """``data`` in an allocation of its own size, for bytes kept beyond a batch.

    orjson (from 3.12) returns its output in the buffer it wrote to, rounded up to a
    power of two of at least 4 KiB and never shrunk: a 60-byte key takes 4 KiB, a
    29 KB window 256 KiB. Fine for a record that is sent and dropped; a stage's state
    table kept hundreds of MB of that slack. One copy (a few µs per MB)."""
    return bytes(memoryview(data))


def header_pairs(headers: HeadersIn | None) -> list[tuple[str, bytes]]:
    """Emit headers as ``(name, bytes)`` pairs."""
    if not headers:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode("utf-8")) for k, v in items]


# -- what is produced, and what the broker answered ---------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where the broker put one produced record."""

    topic: str
    partition: int
    offset: int


#: a record to produce: ``(topic, key, value, headers, timestamp_ms)``
Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


#: a record for a given partition, without headers or timestamp (a changelog write):
#: ``(topic, partition, key, value)``; a None value is a tombstone
Partitioned = tuple[str, int, bytes | None, bytes | None]


class Deliveries(Sequence[Delivered]):
    """The broker's acknowledgements of one batch, in the order it was produced.

    Kept as two arrays (``partitions``, ``offsets``) plus the produced records'
    topics; a :class:`Delivered` is made only when one is asked for.
    """

    __slots__ = ("_records", "offsets", "partitions")

    def __init__(
        self,
        records: Sequence[Outgoing | Partitioned],
        partitions: list[int],
        offsets: list[int],
    ) -> None:
        self._records = records
        self.partitions = partitions
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def topic(self, index: int) -> str:
        return self._records[index][0]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return Delivered(self._records[index][0], self.partitions[index], self.offsets[index])
