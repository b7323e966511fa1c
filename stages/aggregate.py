"""Aggregate: ``iot.enriched`` → ``iot.aggregates``; event-time tumbling windows.

Windows are ``[start, start + window)`` per ``(device_id, metric)``, aligned to the
epoch. Each input partition has its own watermark (the highest event time seen
there, like Kafka Streams' stream time). A window is emitted once, when the
watermark reaches ``end + allowed_lateness``. After that:

* a reading whose lineage id the window already counted is a duplicate (ignored);
* any other reading for it is ``late`` (a dead letter);
* the window's ids are kept for ``closed_retention_s`` of event time (default one
  window length), then forgotten; a replay reaching further back than that gets
  ``late`` dead letters for readings already counted, never a second count.

Re-delivery after a crash: with each batch's state the changelog gets, last, the
next input offset of the batch's topic partition (the *fence*). Records below the
fence are already in the state, so a re-delivered batch is skipped as duplicates
however long ago its windows were closed and forgotten (the lineage ids of
closed windows only cover ``closed_retention_s``).

The watermark is advanced per record, so results do not depend on how records
were batched: re-processing the same input gives the same windows. When a
partition gets no input for ``idle_timeout_s``, :meth:`AggregateStage.tick`
advances its watermark at wall-clock rate, so the last windows of a stream close.
The runner calls ``tick`` only while every upstream stage is caught up
(:class:`pipeline.lag.UpstreamQuiet`): a partition that is quiet because a stage
before it is down must not close windows its backlog still belongs to.

Backfill runs are *lanes*: a reading whose ``source`` header is
``backfill:<run-id>`` goes to that run's own state (windows and watermark) in the
partition, with ``aggregate.backfill_lateness_s`` of allowed lateness, so old data
is neither late against the live watermark nor mixed into live windows; its
windows are the same ``[start, start + window)`` computed by the same code. The
controller ends a run with an end-of-input control record on every partition:
the lane's remaining windows are emitted, its state is dropped, and the run is
remembered as ended (a later reading of it is ``late``). Emitted backfill windows
carry ``"source": "backfill:<run-id>"`` (value and header); live ones are unchanged.

State changes are reported as ``writes``, (key, bytes or None = delete) in order, for the runner
to write to a changelog; :meth:`AggregateStage.load` rebuilds a partition from it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from dlq.reasons import Reason
from pipeline import contract
from pipeline.errors import InvalidMessage
from pipeline.records import InRecord, OutRecord, StageResult
from pipeline.settings import AggregateSettings

STAGE = "aggregate"

WindowKey = tuple[str, str, int]  # device_id, metric, window start (ms)


@dataclass(slots=True)
class Window:
    device_id: str
    metric: str
    site: str
    unit: str
    start: int
    end: int
    count: int = 0
    total: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    first_ts: int = 0
    last_ts: int = 0
    first_lineage_id: str = ""
    last_lineage_id: str = ""
    ids: set[str] = field(default_factory=set)
    closed: bool = False

    def add(self, ts: int, value: float, lineage: str) -> None:
        if (
            self.count == 0
            or ts < self.first_ts
            or (ts == self.first_ts and lineage < self.first_lineage_id)
        ):
            self.first_ts, self.first_lineage_id = ts, lineage
        if (
            self.count == 0
            or ts > self.last_ts
            or (ts == self.last_ts and lineage > self.last_lineage_id)
        ):
            self.last_ts, self.last_lineage_id = ts, lineage
        self.count += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        self.ids.add(lineage)

    def result(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "metric": self.metric,
            "site": self.site,
            "unit": self.unit,
            "window_start": self.start,
            "window_end": self.end,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "mean": self.total / self.count,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "first_lineage_id": self.first_lineage_id,
            "last_lineage_id": self.last_lineage_id,
        }

    def to_state(self) -> bytes:
        doc = {s: getattr(self, s) for s in self.__slots__ if s != "ids"}
        doc["ids"] = sorted(self.ids)
        return orjson.dumps(doc)

    @classmethod
    def from_state(cls, raw: bytes) -> Window:
        doc = orjson.loads(raw)
        doc["ids"] = set(doc["ids"])
        return cls(**doc)


LIVE = ""  # the live lane; a backfill lane is named by its source, backfill:<run-id>
_BACKFILL = contract.SOURCE_BACKFILL_PREFIX.encode()
_END_OF_INPUT = contract.CONTROL_END_OF_INPUT.encode()
#: the watermark an ended lane reaches: every window closes and is forgotten
END_OF_TIME = (1 << 62) - 1


def lane_of(source: bytes | None) -> str:
    """The lane of a record from its ``source`` header: LIVE, or ``backfill:<run-id>``."""
    if source is not None and source.startswith(_BACKFILL):
        return source.decode("utf-8", "replace")
    return LIVE


@dataclass(slots=True)
class PartitionState:
    lane: str = LIVE
    lateness_ms: int = 0
    watermark: int | None = None
    last_input_at: float = 0.0
    idle_since: float | None = None  # when the current idle period began
    idle_base: int | None = None  # the watermark then
    windows: dict[WindowKey, Window] = field(default_factory=dict)
    closing: list[tuple[int, WindowKey]] = field(default_factory=list)  # heap: (close at, key)
    evicting: list[tuple[int, WindowKey]] = field(default_factory=list)  # heap: (forget at, key)
    # changed in the current batch, flushed by _flush_dirty
    touched: set[WindowKey] = field(default_factory=set)
    last_states: dict[WindowKey, bytes] = field(default_factory=dict)
    new_watermark: bytes | None = None


def window_state_key(partition: int, key: WindowKey, lane: str = LIVE) -> bytes:
    return orjson.dumps(["w", partition, *key, lane] if lane else ["w", partition, *key])


def watermark_state_key(partition: int, lane: str = LIVE) -> bytes:
    return orjson.dumps(["wm", partition, lane] if lane else ["wm", partition])


def ended_state_key(partition: int, lane: str) -> bytes:
    return orjson.dumps(["end", partition, lane])


def fence_state_key(partition: int, topic: str) -> bytes:
    return orjson.dumps(["in", partition, topic])


@dataclass(slots=True)
class AggregateResult(StageResult):
    """``writes``: changelog writes (key, value; None deletes) to apply in this order."""

    writes: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    windows_emitted: int = 0
    #: backfill lanes ended by this batch
    lanes_ended: list[str] = field(default_factory=list)
    #: (input offset, lineage id, window) of every reading counted, for lineage hops
    counted: list[tuple[int, str, WindowKey]] = field(default_factory=list)


class AggregateStage:
    def __init__(self, settings: AggregateSettings, clock: Callable[[], float] = time.time) -> None:
        self.window_ms = settings.window_s * 1000
        retention_s = settings.closed_retention_s
        self.retention_ms = self.window_ms if retention_s is None else retention_s * 1000
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.backfill_lateness_ms = settings.backfill_lateness_s * 1000
        self.idle_timeout_s = settings.idle_timeout_s
        self._clock = clock
        #: the live lane's state per partition
        self.partitions: dict[int, PartitionState] = {}
        #: backfill lanes' state per (partition, lane)
        self.lanes: dict[tuple[int, str], PartitionState] = {}
        #: backfill lanes that have ended, per partition
        self.ended: dict[int, set[str]] = {}
        #: (partition, input topic) -> the next input offset the state does not hold
        self.fences: dict[tuple[int, str], int] = {}

    # -- state -------------------------------------------------------------
    def _new_state(self, lane: str) -> PartitionState:
        lateness = self.backfill_lateness_ms if lane else self.lateness_ms
        return PartitionState(lane=lane, lateness_ms=lateness, last_input_at=self._clock())

    def load(self, partition: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Rebuild a partition's state (every lane) from changelog items (key, value)."""
        self.drop(partition)
        live = self._new_state(LIVE)
        lanes: dict[str, PartitionState] = {}
        ended: set[str] = set()
        for raw_key, raw_value in items:
            key = orjson.loads(raw_key)
            if key[1] != partition:
                continue
            kind = key[0]
            if kind == "end":
                ended.add(key[2])
                continue
            if kind == "in":
                self.fences[(partition, key[2])] = orjson.loads(raw_value)["next"]
                continue
            lane = key[-1] if (kind == "wm" and len(key) == 3) or len(key) == 6 else LIVE
            state = live if not lane else lanes.setdefault(lane, self._new_state(lane))
            if kind == "wm":
                state.watermark = orjson.loads(raw_value)["watermark"]
            elif kind == "w":
                window = Window.from_state(raw_value)
                wkey = (window.device_id, window.metric, window.start)
                state.windows[wkey] = window
                if window.closed:
                    heapq.heappush(state.evicting, (self._forget_at(state, window), wkey))
                else:
                    heapq.heappush(state.closing, (window.end + state.lateness_ms, wkey))
        self.partitions[partition] = live
        for lane, state in lanes.items():
            if lane not in ended:
                self.lanes[(partition, lane)] = state
        self.ended[partition] = ended

    def _forget_at(self, state: PartitionState, window: Window) -> int:
        return window.end + state.lateness_ms + self.retention_ms

    def drop(self, partition: int) -> None:
        self.partitions.pop(partition, None)
        self.ended.pop(partition, None)
        for fence in [k for k in self.fences if k[0] == partition]:
            del self.fences[fence]
        for key in [k for k in self.lanes if k[0] == partition]:
            del self.lanes[key]

    def _state(self, partition: int, lane: str = LIVE) -> PartitionState:
        if not lane:
            state = self.partitions.get(partition)
            if state is None:
                state = self.partitions[partition] = self._new_state(LIVE)
            return state
        state = self.lanes.get((partition, lane))
        if state is None:
            state = self.lanes[(partition, lane)] = self._new_state(lane)
        return state

    # -- processing ----------------------------------------------------------
    def process(self, partition: int, records: Sequence[InRecord]) -> AggregateResult:
        result = AggregateResult()
        live = self._state(partition)
        live_input = False  # only live input keeps the live lane from being idle
        dirty: dict[str, PartitionState] = {LIVE: live}
        ended = self.ended.setdefault(partition, set())
        topic = records[0].topic if records else ""
        fence = self.fences.get((partition, topic), -1)
        for record in records:
            if record.offset < fence:  # re-delivered: its effect is in the state already
                result.duplicates += 1
                continue
            headers = contract.header_map(record.headers)
            lane = lane_of(headers.get(contract.H_SOURCE))
            state = live
            try:
                if lane:
                    if headers.get(contract.H_CONTROL) == _END_OF_INPUT:
                        if lane not in ended:
                            self._end_lane(partition, lane, dirty, result)
                        continue
                    if lane in ended:
                        raise InvalidMessage(
                            Reason.LATE, f"{lane} has ended: its windows are already emitted"
                        )
                    state = dirty.get(lane) or self._state(partition, lane)
                    dirty[lane] = state
                else:
                    live_input = True
                self._add(partition, state, record, headers, result)
            except InvalidMessage as exc:
                result.reject(STAGE, record, exc)
        if live_input:
            live.last_input_at = self._clock()
        for state in dirty.values():
            self._flush_dirty(partition, state, result)
        for lane in result.lanes_ended:
            result.writes.append((watermark_state_key(partition, lane), None))
            result.writes.append((ended_state_key(partition, lane), b"{}"))
            ended.add(lane)
            self.lanes.pop((partition, lane), None)
        if records and records[-1].offset >= fence:
            # last: once it is in the changelog, so is everything before it (one
            # partition, in order), and a re-delivery of these records is skipped
            nxt = records[-1].offset + 1
            self.fences[(partition, topic)] = nxt
            result.writes.append((fence_state_key(partition, topic), orjson.dumps({"next": nxt})))
        return result

    def _end_lane(
        self,
        partition: int,
        lane: str,
        dirty: dict[str, PartitionState],
        result: AggregateResult,
    ) -> None:
        """A backfill run's end of input: emit all its windows, then forget the lane."""
        state = dirty.get(lane) or self._state(partition, lane)
        dirty[lane] = state
        self._advance(partition, state, END_OF_TIME, result)
        result.lanes_ended.append(lane)

    def _add(
        self,
        partition: int,
        state: PartitionState,
        record: InRecord,
        headers: dict[str, bytes],
        result: AggregateResult,
    ) -> None:
        try:
            doc = orjson.loads(record.value or b"")
            device_id, metric, ts = doc["device_id"], doc["metric"], int(doc["ts"])
            value = float(doc["value"])
            site, unit = doc.get("site", ""), doc.get("unit", "")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidMessage(
                Reason.SCHEMA_VIOLATION, "input is not an enriched/1 record"
            ) from None
        lineage_raw = headers.get(contract.H_LINEAGE)
        lineage = (
            lineage_raw.decode("ascii", "replace")
            if lineage_raw
            else contract.lineage_id(ts, record.topic, record.partition, record.offset)
        )
        start = ts - ts % self.window_ms
        wkey = (device_id, metric, start)
        window = state.windows.get(wkey)
        if window is not None and lineage in window.ids:
            result.duplicates += 1
            # A duplicate still moves the watermark as the original did, so a replay
            # of a batch whose state was partly saved closes the same windows.
            if state.watermark is None or ts > state.watermark:
                self._advance(partition, state, ts, result)
            return
        if (
            state.watermark is not None
            and start + self.window_ms + state.lateness_ms <= state.watermark
        ):
            raise InvalidMessage(
                Reason.LATE,
                f"reading at {ts} is for window [{start}, {start + self.window_ms}) "
                f"already closed at watermark {state.watermark}",
            )
        if window is None:
            window = state.windows[wkey] = Window(
                device_id, metric, site, unit, start, start + self.window_ms
            )
            heapq.heappush(state.closing, (window.end + state.lateness_ms, wkey))
        window.add(ts, value, lineage)
        state.touched.add(wkey)
        result.counted.append((record.offset, lineage, wkey))
        if state.watermark is None or ts > state.watermark:
            self._advance(partition, state, ts, result)

    def _advance(
        self, partition: int, state: PartitionState, watermark: int, result: AggregateResult
    ) -> None:
        state.watermark = watermark
        state.new_watermark = orjson.dumps({"watermark": watermark})
        closing = state.closing
        while closing and closing[0][0] <= watermark:
            _, wkey = heapq.heappop(closing)
            window = state.windows.get(wkey)
            if window is None or window.closed:
                continue
            window.closed = True
            heapq.heappush(state.evicting, (self._forget_at(state, window), wkey))
            result.windows_emitted += 1
            headers = [
                (contract.H_SCHEMA, contract.SCHEMA_AGGREGATE.encode()),
                (contract.H_TRACEPARENT, contract.new_traceparent().encode()),
            ]
            doc = window.result()
            if state.lane:
                doc["source"] = state.lane
                headers.append((contract.H_SOURCE, state.lane.encode()))
            result.outputs.append(
                OutRecord(window.device_id.encode(), orjson.dumps(doc), headers, window.end)
            )
            state.touched.add(wkey)
        evicting = state.evicting
        while evicting and evicting[0][0] <= watermark:
            _, wkey = heapq.heappop(evicting)
            window = state.windows.pop(wkey, None)
            if window is not None:
                if wkey in state.touched:  # changed in this batch: save that first
                    state.last_states[wkey] = window.to_state()
                state.touched.add(wkey)

    def _flush_dirty(self, partition: int, state: PartitionState, result: AggregateResult) -> None:
        """Fill ``writes`` in a crash-safe order: window updates, the watermark, then
        the forgotten windows' deletions.

        The changelog keeps the order of one partition's writes, so whatever
        prefix of them survives a crash is a state the batch's re-delivery turns
        into the same result: updates without the new watermark are recognised as
        duplicates, and a window is only gone once the watermark that forgot it is
        saved (forgetting it earlier would let its readings in again as new).
        """
        writes = result.writes
        deletions = []
        lane = state.lane
        for wkey in state.touched:
            window = state.windows.get(wkey)
            key = window_state_key(partition, wkey, lane)
            if window is not None:
                writes.append((key, window.to_state()))
            else:
                if wkey in state.last_states:  # closed and forgotten in one batch
                    writes.append((key, state.last_states[wkey]))
                deletions.append(key)
        state.touched.clear()
        state.last_states.clear()
        if state.new_watermark is not None:
            writes.append((watermark_state_key(partition, lane), state.new_watermark))
            state.new_watermark = None
        writes.extend((key, None) for key in deletions)

    def tick(self, partition: int, quiet_since: float) -> AggregateResult:
        """Advance an idle partition's watermark at wall-clock rate; emit what closes.

        The partition is idle from its last input or from ``quiet_since`` (when the
        caller last saw the pipeline before it become quiet), whichever is later:
        time during which upstream still had work does not count.
        """
        result = AggregateResult()
        state = self.partitions.get(partition)
        if state is None or state.watermark is None:
            return result
        idle_since = max(state.last_input_at, quiet_since)
        if state.idle_since != idle_since:
            state.idle_since, state.idle_base = idle_since, state.watermark
        idle_for = self._clock() - idle_since
        if idle_for < self.idle_timeout_s or state.idle_base is None:
            return result
        target = state.idle_base + int(idle_for * 1000)
        if (state.closing and state.closing[0][0] <= target) or (
            state.evicting and state.evicting[0][0] <= target
        ):
            # Only worth a state write when a window closes or is forgotten.
            self._advance(partition, state, target, result)
            self._flush_dirty(partition, state, result)
        return result
