"""Windowed aggregation: a reusable stateful stage.

Records (JSON objects) are grouped by ``key`` fields into event-time windows of
``window_s`` seconds aligned to the epoch: tumbling, or hopping every ``hop_s``
(a record then counts in every window that contains it). Per window it keeps
``count``, ``sum``, ``min``, ``max``, ``mean``, ``first``/``last`` (the value at the
earliest/latest event time) of the ``value`` field, the ``carry`` fields of the
window's first record, and any user reducer. A window is emitted once, when its
lane's watermark reaches ``end + allowed_lateness``; then:

* a record whose lineage id the window already counted is a duplicate (ignored);
* any other record for it is ``late`` (a dead letter) — unless it also belongs to
  a window still open (hopping), which counts it, or ``late: correct`` is set and
  the window closed less than ``correction_horizon_s`` (event time) before the
  watermark: then the record is counted and the window is emitted again with
  ``version`` + 1 and ``corrects`` (the version it replaces), on the same topic
  (a sink keyed by the window keeps the newest version). A late record for a window
  that had no records yet gives that window at version 1. With ``late: correct``
  every window carries ``version``, and closed windows are kept for the horizon;
* the window's lineage ids are kept for ``closed_retention_s`` of event time
  (default one window length, at least the correction horizon), then the window is
  forgotten; a replay reaching further back gets ``late`` dead letters for records
  already counted, never a second count. A window keeps each id as a 64-bit
  fingerprint (BLAKE2b; 8 bytes in the changelog instead of the id's 26 characters):
  two ids of one window alike in all 64 bits would count once, a chance of about
  n²/2⁶⁵ for a window of n readings (10⁻¹¹ for 10,000).

Backfill lanes get ``backfill_lateness_s`` of allowed lateness; their windows all
close when the lane ends, and carry ``"source": "backfill:<run>"``. The engine
(:mod:`pipeline.engine.stateful`) provides the lanes, watermarks, idle advance,
fence and crash-safe changelog; this module is only the windows.

From pipeline.yaml::

    uses: pipeline.operators:windowed
    config: {key: [device_id], time: ts, value: value, window_s: 300, hop_s: 60,
             aggregations: [count, mean, max]}

From Python, with reducers of your own::

    p95 = Reducer(init=list, add=lambda acc, v, doc: acc + [v], result=percentile_95)
    stats = window_stage(key=("device_id",), reducers={"p95": p95})
"""

from __future__ import annotations

import base64
import heapq
import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import chain, islice
from operator import itemgetter, lt
from typing import Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dlq.reasons import LATE
from pipeline import contract
from pipeline.errors import InvalidMessage
from pipeline.records import Emit, Record
from pipeline.stage import END_OF_TIME, StageContext, StageDef, State, stage

SCHEMA_VIOLATION = "schema_violation"
BUILTIN = ("count", "sum", "min", "max", "mean", "first", "last")
_STATE_REF = contract.H_STATE_REF
_LINEAGE = contract.H_LINEAGE
_from_bytes = int.from_bytes


def fingerprint(lineage: bytes) -> int:
    """A lineage id (UTF-8) as the 64-bit number a window keeps (stable across
    processes and versions: it is in the changelog)."""
    return _from_bytes(blake2b(lineage, digest_size=8).digest(), "little")


class Fingerprints:
    """A window's fingerprints: packed (8 bytes each, sorted) and, added since they
    were last packed, in a set. A set of ints alone took ≈ 60 bytes per id; the
    packing runs when the window is encoded, once per batch that touched it."""

    __slots__ = ("fresh", "packed")

    def __init__(self, packed: array[int] | None = None) -> None:
        self.packed: array[int] = array("Q") if packed is None else packed
        self.fresh: set[int] = set()

    def add(self, fp: int) -> None:
        self.fresh.add(fp)

    def __contains__(self, fp: object) -> bool:
        if fp in self.fresh:
            return True
        packed = self.packed
        i = bisect_left(packed, cast(int, fp))
        return i < len(packed) and bool(packed[i] == fp)

    def __len__(self) -> int:
        return len(self.packed) + len(self.fresh)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprints):
            return NotImplemented
        return self.pack() == other.pack()

    __hash__ = None  # type: ignore[assignment]

    def pack(self) -> array[int]:
        """All of them, sorted (packs what was added since last time)."""
        if self.fresh:
            self.packed = array("Q", sorted(chain(self.packed, self.fresh)))
            self.fresh = set()
        return self.packed


def _little_endian(packed: array[int]) -> bytes:
    """Packed fingerprints as the changelog has them (little-endian)."""
    if sys.byteorder == "big":
        packed = array("Q", packed)
        packed.byteswap()
    return packed.tobytes()


def _from_little_endian(data: bytes) -> array[int]:
    packed = array("Q", data)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed


@dataclass(frozen=True)
class Reducer:
    """A user aggregation: ``add(acc, value, doc) -> acc`` from ``init()``;
    ``result(acc)`` is what the window shows. ``acc`` must be JSON-able (it is kept in
    the changelog)."""

    init: Callable[[], Any]
    add: Callable[[Any, float, Mapping[str, Any]], Any]
    result: Callable[[Any], Any] = lambda acc: acc


class WindowConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: tuple[str, ...] = Field(min_length=1)
    time: str = "ts"
    value: str = "value"
    window_s: int = Field(default=60, ge=1)
    #: hopping windows every hop_s (≤ window_s); none: tumbling
    hop_s: int | None = Field(default=None, ge=1)
    allowed_lateness_s: int = Field(default=10, ge=0)
    backfill_lateness_s: int = Field(default=3600, ge=0)
    #: how long (event time) an emitted window remembers its records' lineage ids
    closed_retention_s: int | None = Field(default=None, ge=0)
    #: a record for a closed window: a ``late`` dead letter, or a corrected window
    #: (``version`` + 1) while the window closed less than the horizon ago
    late: Literal["dead_letter", "correct"] = "dead_letter"
    correction_horizon_s: int = Field(default=3600, ge=0)
    aggregations: tuple[str, ...] = ("count", "min", "max", "mean")
    carry: tuple[str, ...] = ()
    #: first_ts, last_ts, first_lineage_id, last_lineage_id in each window
    lineage_bounds: bool = True
    #: the field whose value keys the output record (default: the first key field)
    output_key: str | None = None
    schema_name: str = Field(default="aggregate/1", alias="schema")

    @field_validator("aggregations")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [a for a in value if a not in BUILTIN]
        if unknown:
            raise ValueError(f"unknown aggregation(s) {unknown}; choose from {list(BUILTIN)}")
        return value

    @model_validator(mode="after")
    def _hop(self) -> WindowConfig:
        if self.hop_s is not None and self.hop_s > self.window_s:
            raise ValueError(f"hop_s {self.hop_s} is longer than window_s {self.window_s}")
        return self


@dataclass(slots=True)
class Window:
    key: tuple[Any, ...]
    carry: dict[str, Any]
    start: int
    end: int
    count: int = 0
    total: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    first_ts: int = 0
    last_ts: int = 0
    first_value: float = 0.0
    last_value: float = 0.0
    first_lineage_id: str = ""
    last_lineage_id: str = ""
    custom: dict[str, Any] = field(default_factory=dict)
    #: the lineage ids counted, as fingerprints (:func:`fingerprint`)
    seen: Fingerprints = field(default_factory=Fingerprints)
    closed: bool = False
    #: times emitted (the last emission's ``version``)
    version: int = 0

    def add(self, ts: int, value: float, lineage: str, seen: int) -> None:
        if (
            self.count == 0
            or ts < self.first_ts
            or (ts == self.first_ts and lineage < self.first_lineage_id)
        ):
            self.first_ts, self.first_lineage_id, self.first_value = ts, lineage, value
        if (
            self.count == 0
            or ts > self.last_ts
            or (ts == self.last_ts and lineage > self.last_lineage_id)
        ):
            self.last_ts, self.last_lineage_id, self.last_value = ts, lineage, value
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.seen.add(seen)


class WindowCodec:
    """Windows in the changelog: JSON; the fingerprints of the lineage ids counted,
    sorted (stable bytes), as one base64 string of little-endian 64-bit numbers
    (``"seen"``). Reads the older layout too: the ids themselves (``"ids"``)."""

    def encode(self, window: Window) -> bytes:
        doc = {s: getattr(window, s) for s in Window.__slots__ if s != "seen"}
        doc["seen"] = base64.b64encode(_little_endian(window.seen.pack())).decode("ascii")
        return orjson.dumps(doc)

    def decode(self, raw: bytes) -> Window:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), list):
            raise ValueError("not a window: no key list")
        doc["key"] = tuple(doc["key"])
        if "ids" in doc:  # written before fingerprints
            ids = {fingerprint(i.encode()) for i in doc.pop("ids")}
            doc["seen"] = Fingerprints(array("Q", sorted(ids)))
        else:
            doc["seen"] = Fingerprints(_from_little_endian(base64.b64decode(doc["seen"])))
        if "version" not in doc:  # written before versions: a closed window was emitted
            doc["version"] = 1 if doc.get("closed") else 0
        _check_window(doc)
        return Window(**doc)


_INT_FIELDS = ("start", "end", "count", "first_ts", "last_ts", "version")
_FLOAT_FIELDS = ("total", "min", "max", "first_value", "last_value")


def _check_window(doc: dict[str, Any]) -> None:
    """Raise ValueError if a decoded window is not one this operator wrote: a value
    of the wrong type would otherwise fail later, when the window is restored or
    closes, where no single record is to blame (the worker would exit on it)."""
    for name in _INT_FIELDS:
        if type(doc.get(name, 0)) is not int:
            raise ValueError(f"window field {name!r} is not an integer")
    for name in _FLOAT_FIELDS:
        value = doc.get(name, 0.0)
        if type(value) is int:
            doc[name] = float(value)
        elif type(value) is not float:
            raise ValueError(f"window field {name!r} is not a number")
    for name in ("carry", "custom"):
        if not isinstance(doc.get(name, {}), dict):
            raise ValueError(f"window field {name!r} is not an object")
    for name in ("first_lineage_id", "last_lineage_id"):
        if not isinstance(doc.get(name, ""), str):
            raise ValueError(f"window field {name!r} is not a string")
    if type(doc.get("closed", False)) is not bool:
        raise ValueError("window field 'closed' is not a boolean")
    if not doc["start"] < doc["end"] or doc.get("count", 0) < 1:
        raise ValueError("window bounds or count out of order")
    packed = doc["seen"].packed
    if not all(map(lt, packed, islice(packed, 1, None))):  # sorted, no repeats
        doc["seen"] = Fingerprints(array("Q", sorted(set(packed))))


class WindowedAggregate:
    """The stateful processor (see the module docstring)."""

    def __init__(self, ctx: StageContext, reducers: Mapping[str, Reducer] | None = None) -> None:
        self.ctx = ctx
        config: WindowConfig = ctx.config
        self.config = config
        self.reducers = dict(reducers or {})
        self.size_ms = config.window_s * 1000
        self.hop_ms = (config.hop_s or config.window_s) * 1000
        self.tumbling = self.hop_ms == self.size_ms
        fields = tuple(config.key)
        getter = itemgetter(*fields)
        self._key_of: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            getter if len(fields) > 1 else (lambda doc: (getter(doc),))
        )
        self.correcting = config.late == "correct"
        self.horizon_ms = config.correction_horizon_s * 1000 if self.correcting else 0
        #: tumbling windows without reducers or corrections take
        #: :meth:`_process_tumbling`, a tight twin of :meth:`process` (which stays the
        #: reference: tests compare the two)
        self.fast = self.tumbling and not self.reducers and not self.correcting
        self.process = self._process_tumbling if self.fast else self._process  # type: ignore[method-assign]
        retention = config.closed_retention_s
        self.retention_ms = self.size_ms if retention is None else retention * 1000
        self.retention_ms = max(self.retention_ms, self.horizon_ms)
        self.lateness_ms = config.allowed_lateness_s * 1000
        self.backfill_lateness_ms = config.backfill_lateness_s * 1000
        self.key_fields = config.key
        key_field = config.output_key or config.key[0]
        self.output_key_index = config.key.index(key_field) if key_field in config.key else None
        self.output_key_field = key_field
        self.schema = config.schema_name
        self._parsed: tuple[Record, dict[str, Any], tuple[Any, ...], int, float] | None = None

    # -- reading a record ------------------------------------------------------------
    def event_time(self, record: Record) -> int:
        """The record's event time; the parsed record is kept for :meth:`process`."""
        cfg = self.config
        try:
            doc = orjson.loads(record.value or b"")
            key = self._key_of(doc)
            ts = int(doc[cfg.time])
            value = float(doc[cfg.value])
            hash(key)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidMessage(
                SCHEMA_VIOLATION,
                f"not a record with key {list(self.key_fields)} (scalars), time "
                f"{cfg.time!r} and value {cfg.value!r}",
            ) from None
        self._parsed = (record, doc, key, ts, value)
        return ts

    def _parse(self, record: Record) -> tuple[dict[str, Any], tuple[Any, ...], int, float]:
        parsed = self._parsed
        if parsed is None or parsed[0] is not record:
            self.event_time(record)
            parsed = self._parsed
            assert parsed is not None
        return parsed[1], parsed[2], parsed[3], parsed[4]

    def _lateness(self, state: State) -> int:
        return self.backfill_lateness_ms if state.lane else self.lateness_ms

    def _starts(self, ts: int) -> list[int]:
        hop, size = self.hop_ms, self.size_ms
        if hop == size:  # tumbling: one window
            return [ts - ts % size]
        start = ts - ts % hop
        starts = []
        while start > ts - size:
            starts.append(start)
            start -= hop
        starts.reverse()
        return starts

    # -- the stateful hooks ---------------------------------------------------------------
    def process(self, record: Record, state: State) -> None:
        # replaced per instance by _process_tumbling or _process (see __init__)
        self._process(record, state)

    def _process_tumbling(self, record: Record, state: State) -> None:
        """:meth:`_process` for one window per record and no reducers."""
        parsed = self._parsed
        if parsed is not None and parsed[0] is record:  # event_time() read it just now
            _, doc, key, ts, value = parsed
        else:
            doc, key, ts, value = self._parse(record)
        headers = record.headers
        if headers and headers[0][0] == _LINEAGE:  # where the engine and ingest put it
            raw = headers[0][1]
            lineage = raw.decode("ascii", "replace")
            if not raw.isascii():  # fingerprint what _process does: lineage.encode()
                raw = lineage.encode()
        else:
            lineage = record.lineage_id or contract.entry_lineage_id(
                record.timestamp_ms, record.topic, record.partition, record.offset
            )
            raw = lineage.encode()
        seen = fingerprint(raw)
        size = self.size_ms
        start = ts - ts % size
        wkey = (*key, start)
        window = state.get(wkey)
        if window is not None and seen in window.seen:
            self.ctx.duplicate()
            return
        lateness = self.backfill_lateness_ms if state.lane else self.lateness_ms
        watermark = state.watermark
        if watermark is not None and start + size + lateness <= watermark:
            raise InvalidMessage(
                LATE,
                f"record at {ts} is for window [{start}, {start + size}) "
                f"already closed at watermark {watermark}",
            )
        if window is None:
            carry = {f: doc.get(f, "") for f in self.config.carry}
            window = Window(key, carry, start, start + size)
            close_at = window.end + lateness
            heapq.heappush(state.cache["closing"], (close_at, wkey))
            if close_at < state.next_due:
                state.next_due = close_at
        window.add(ts, value, lineage, seen)
        state.set(wkey, window)
        # ctx.counted(wkey, lineage), without the call (once per record)
        ctx = self.ctx
        if ctx._counted is None:
            ctx._counted, ctx._lineage_id = [wkey], lineage
        else:
            ctx.counted(wkey, lineage)

    def _process(self, record: Record, state: State) -> None:
        parsed = self._parsed
        if parsed is not None and parsed[0] is record:  # event_time() read it just now
            _, doc, key, ts, value = parsed
        else:
            doc, key, ts, value = self._parse(record)
        lineage = record.lineage_id or contract.entry_lineage_id(
            record.timestamp_ms, record.topic, record.partition, record.offset
        )
        seen = fingerprint(lineage.encode())
        watermark = state.watermark
        lateness = self.backfill_lateness_ms if state.lane else self.lateness_ms
        starts = [ts - ts % self.size_ms] if self.tumbling else self._starts(ts)
        first = state.get((*key, starts[0]))
        if first is not None and seen in first.seen:
            self.ctx.duplicate()
            return
        if watermark is None:
            open_starts = starts
        else:
            open_starts = [s for s in starts if s + self.size_ms + lateness > watermark]
        # closed windows a record corrects (late: correct): closed less than the
        # horizon before the watermark
        fixing: list[int] = []
        if self.correcting and len(open_starts) < len(starts):
            assert watermark is not None
            fixing = [
                s
                for s in starts
                if s not in open_starts
                and s + self.size_ms + lateness + self.horizon_ms > watermark
            ]
        if not open_starts and not fixing:
            beyond = (
                f"closed more than correction_horizon_s={self.config.correction_horizon_s} before"
                if self.correcting
                else "already closed at"
            )
            raise InvalidMessage(
                LATE,
                f"record at {ts} is for window [{starts[-1]}, {starts[-1] + self.size_ms}) "
                f"{beyond} watermark {watermark}",
            )
        # plan every change first: a reducer that raises must find every window as it
        # was (state rolls back what was set, not what was changed in place)
        plan: list[tuple[tuple[Any, ...], Window, dict[str, Any], bool, bool]] = []
        for start, closed in [(s, True) for s in fixing] + [(s, False) for s in open_starts]:
            wkey = (*key, start)
            window = state.get(wkey)
            new = window is None
            if window is None:
                carry = {f: doc.get(f, "") for f in self.config.carry}
                window = Window(key, carry, start, start + self.size_ms, closed=closed)
                window.custom = {name: r.init() for name, r in self.reducers.items()}
            elif seen in window.seen:
                continue
            custom = {
                name: reducer.add(window.custom[name], value, doc)
                for name, reducer in self.reducers.items()
            }
            plan.append((wkey, window, custom, new, closed))
        closing, evicting = state.cache["closing"], state.cache["evicting"]
        for wkey, window, custom, new, closed in plan:
            if new:
                if closed:  # born closed: it is emitted now, and forgotten in time
                    due = window.end + lateness + self.retention_ms
                    heapq.heappush(evicting, (due, wkey))
                else:
                    due = window.end + lateness
                    heapq.heappush(closing, (due, wkey))
                state.next_due = min(state.next_due, due)
            window.add(ts, value, lineage, seen)
            window.custom.update(custom)
            state.set(wkey, window)
            self.ctx.counted(wkey, lineage)
            if closed:
                state.emit(self._emit(state, window))

    def on_watermark(self, state: State, watermark: int) -> list[Emit] | None:
        closing, evicting = state.cache["closing"], state.cache["evicting"]
        if (not closing or closing[0][0] > watermark) and (
            not evicting or evicting[0][0] > watermark
        ):
            return None  # nothing closes or is forgotten yet (most records)
        emits: list[Emit] = []
        lateness = self._lateness(state)
        while closing and closing[0][0] <= watermark:
            _, wkey = heapq.heappop(closing)
            window = state.get(wkey)
            if window is None or window.closed:
                continue
            window.closed = True
            state.set(wkey, window)
            heapq.heappush(evicting, (window.end + lateness + self.retention_ms, wkey))
            emits.append(self._emit(state, window))
        while evicting and evicting[0][0] <= watermark:
            _, wkey = heapq.heappop(evicting)
            state.delete(wkey)
        self._due(state)
        return emits

    @staticmethod
    def _due(state: State) -> None:
        """Tell the engine the watermark at which :meth:`on_watermark` next has work."""
        closing, evicting = state.cache["closing"], state.cache["evicting"]
        due = [h[0][0] for h in (closing, evicting) if h]
        state.next_due = min(due) if due else END_OF_TIME + 1

    def next_deadline(self, state: State) -> int | None:
        closing, evicting = state.cache["closing"], state.cache["evicting"]
        due = [h[0][0] for h in (closing, evicting) if h]
        return min(due) if due else None

    def on_restore(self, state: State) -> None:
        closing: list[tuple[int, tuple[Any, ...]]] = []
        evicting: list[tuple[int, tuple[Any, ...]]] = []
        lateness = self._lateness(state)
        for wkey, window in state.items():
            if window.closed:
                evicting.append((window.end + lateness + self.retention_ms, wkey))
            else:
                closing.append((window.end + lateness, wkey))
        heapq.heapify(closing)
        heapq.heapify(evicting)
        state.cache["closing"], state.cache["evicting"] = closing, evicting
        self._due(state)

    # -- a window's result ---------------------------------------------------------------------
    def result(self, window: Window) -> dict[str, Any]:
        doc: dict[str, Any] = dict(zip(self.key_fields, window.key, strict=True))
        doc.update(window.carry)
        doc["window_start"], doc["window_end"] = window.start, window.end
        for name in self.config.aggregations:
            if name == "count":
                doc["count"] = window.count
            elif name == "sum":
                doc["sum"] = window.total
            elif name == "min":
                doc["min"] = window.min
            elif name == "max":
                doc["max"] = window.max
            elif name == "mean":
                doc["mean"] = window.total / window.count
            elif name == "first":
                doc["first"] = window.first_value
            elif name == "last":
                doc["last"] = window.last_value
        for name, reducer in self.reducers.items():
            doc[name] = reducer.result(window.custom[name])
        if self.config.lineage_bounds:
            doc["first_ts"], doc["last_ts"] = window.first_ts, window.last_ts
            doc["first_lineage_id"] = window.first_lineage_id
            doc["last_lineage_id"] = window.last_lineage_id
        return doc

    def _emit(self, state: State, window: Window) -> Emit:
        doc = self.result(window)
        window.version += 1
        if self.correcting:
            doc["version"] = window.version
            if window.version > 1:
                doc["corrects"] = window.version - 1
        if state.lane:
            doc["source"] = state.lane
        key = (
            window.key[self.output_key_index]
            if self.output_key_index is not None
            else window.carry.get(self.output_key_field)
        )
        return Emit(
            key=None if key is None else str(key),
            value=orjson.dumps(doc),
            timestamp_ms=window.end,
            schema=self.schema,
            headers=((_STATE_REF, orjson.dumps([*window.key, window.start])),),
        )


def window_stage(*, reducers: Mapping[str, Reducer] | None = None, **defaults: Any) -> StageDef:
    """A windowed-aggregation stage; ``defaults`` are :class:`WindowConfig` fields that
    pipeline.yaml's ``config:`` may still override."""
    for name in reducers or {}:
        if name in BUILTIN or name in WindowConfig.model_fields:
            raise ValueError(f"reducer name {name!r} clashes with a built-in field")

    @stage(
        stateful=True,
        config=WindowConfig,
        state_codec=WindowCodec(),
        reasons={SCHEMA_VIOLATION: "a record without the key, time or value fields"},
        name="pipeline.operators:windowed",
    )
    class Windowed(WindowedAggregate):
        """Event-time windowed aggregation (pipeline.operators.window)."""

        def __init__(self, ctx: StageContext) -> None:
            super().__init__(ctx, reducers)

    definition = cast(StageDef, Windowed)
    return definition.configured(**defaults) if defaults else definition


#: the operator for pipeline.yaml: ``uses: pipeline.operators:windowed``
windowed = window_stage()

__all__: Sequence[str] = ("Reducer", "Window", "WindowConfig", "window_stage", "windowed")
