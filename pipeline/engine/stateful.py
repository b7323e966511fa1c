"""Running a stateful stage: lanes, watermarks, the re-delivery fence, end of a lane.

Per input partition the engine keeps a :class:`~pipeline.engine.state.PartitionStore`:

* **lanes**: a record whose ``source`` header is ``backfill:<run-id>`` goes to that
  run's own state, so a backfill's old data is neither late against the live
  watermark nor mixed into live state; the run's end-of-input control record runs
  the lane's last hooks (watermark :data:`~pipeline.stage.END_OF_TIME`,
  ``on_end_of_lane``), then drops the lane and remembers it as ended: a later record
  of it is ``late`` for ``ended_lane_retention_s`` (wall clock) after the end, then
  the marker is deleted (one key per run does not stay in the state forever) and a
  record of that run would open a lane again;
* **watermarks**: for a stage with ``event_time``, each lane's watermark is the
  highest event time seen there (advanced after the record is processed, so the
  stage sees the watermark the record arrived at); when it moves, ``on_watermark``
  runs. An idle live lane's watermark advances with the wall clock (:meth:`tick`,
  only while the pipeline upstream is caught up, checked by the runtime);
* **the fence**: the next input offset of each input topic, written last with the
  batch's state; records below it are already in the state and are skipped.

Changes a record made to state are rolled back if processing it raised. An
exception in a hook (``on_watermark``, ``on_end_of_lane``) is not attributable to a
record: it is re-raised and the worker exits without committing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dlq.reasons import LATE
from pipeline import contract
from pipeline.engine.emit import Emitter, emits_of
from pipeline.engine.process import Engine
from pipeline.engine.result import BatchResult
from pipeline.engine.state import (
    LaneState,
    PartitionStore,
    Unreadable,
    ended_key,
    ended_value,
    expired_lanes,
    fence_key,
    load_partition,
)
from pipeline.errors import InvalidMessage
from pipeline.records import Record
from pipeline.stage import END_OF_TIME, LIVE, StageContext, StageDef

log = logging.getLogger("pipeline.engine")
_SOURCE, _CONTROL = contract.H_SOURCE, contract.H_CONTROL
_BACKFILL = contract.SOURCE_BACKFILL_PREFIX.encode()
_END_OF_INPUT = contract.CONTROL_END_OF_INPUT.encode()


def lane_of(record: Record) -> tuple[str, bool]:
    """The record's lane (LIVE, or ``backfill:<run-id>``) and whether it is the lane's
    end-of-input control record."""
    lane, control = LIVE, False
    for name, value in record.headers:
        if name == _SOURCE:
            lane = value.decode("utf-8", "replace") if value.startswith(_BACKFILL) else LIVE
        elif name == _CONTROL:
            control = value == _END_OF_INPUT
    return lane, control and bool(lane)


class StatefulEngine(Engine):
    """A stateful stage bound to its context, with the state of its partitions."""

    stateful = True

    def __init__(
        self,
        stage_id: str,
        definition: StageDef,
        ctx: StageContext,
        emitter: Emitter,
        on_error: str = "dead_letter",
        idle_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        ended_lane_retention_s: float = 30 * 86400,
    ) -> None:
        super().__init__(stage_id, definition, ctx, emitter, on_error)
        self.idle_timeout_s = idle_timeout_s
        self.ended_retention_ms = int(ended_lane_retention_s * 1000)
        self.clock = clock
        codec = definition.state_codec
        assert codec is not None
        self.codec = codec
        proc = self.processor
        self._event_time = getattr(proc, "event_time", None)
        self._on_watermark = getattr(proc, "on_watermark", None)
        self._next_deadline = getattr(proc, "next_deadline", None)
        self._on_end_of_lane = getattr(proc, "on_end_of_lane", None)
        self._on_restore = getattr(proc, "on_restore", None)
        self.stores: dict[int, PartitionStore] = {}

    # -- state of partitions -----------------------------------------------------------
    def load(self, partition: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        """(Re)build ``partition`` from changelog items."""
        store = load_partition(partition, items, self.codec, self.clock())
        if store.unreadable:
            log.warning(
                "stage %s, partition %d: %d state records could not be read and are left "
                "out (StageRunner.load moves them to the dead-letter topic)",
                self.stage_id,
                partition,
                len(store.unreadable),
            )
        if self._on_restore is not None:
            for state in store.lanes.values():
                self._on_restore(state)
        store.on_new = self._on_restore
        self.stores[partition] = store

    def drop(self, partition: int) -> None:
        self.stores.pop(partition, None)

    def unreadable(self, partition: int) -> list[Unreadable]:
        """The changelog records of ``partition`` its last load could not read and that
        were not yet quarantined (:meth:`quarantined`)."""
        store = self.stores.get(partition)
        return list(store.unreadable) if store is not None else []

    def quarantined(self, partition: int, records: int) -> None:
        """The first ``records`` of :meth:`unreadable` are in the dead-letter topic."""
        store = self.stores.get(partition)
        if store is not None:
            del store.unreadable[:records]

    def _store(self, partition: int) -> PartitionStore:
        store = self.stores.get(partition)
        if store is None:
            store = PartitionStore(partition, self.clock(), self._on_restore)
            self.stores[partition] = store
        return store

    # -- a batch -------------------------------------------------------------------------
    def process(self, partition: int, records: Sequence[Record]) -> BatchResult:
        result = self.new_result()
        store = self._store(partition)
        now_ms = int(self.clock() * 1000)
        expired = expired_lanes(store, now_ms, self.ended_retention_ms)
        topic = records[0].topic if records else ""
        fence = store.fences.get(topic, -1)
        dirty: dict[str, LaneState] = {}
        ended: list[LaneState] = []
        live_input = False
        for record in records:
            if record.offset < fence:  # re-delivered: its effect is in the state already
                result.duplicates += 1
                continue
            lane, end_of_input = lane_of(record)
            if lane:
                if end_of_input:
                    if lane not in store.ended:
                        ended.append(self._end_lane(store, lane, result, now_ms))
                        dirty[lane] = ended[-1]
                    continue
                if lane in store.ended:
                    result.reject(
                        record, InvalidMessage(LATE, f"{lane} has ended: its state is emitted")
                    )
                    continue
            else:
                live_input = True
            state = store.lanes.get(lane)
            if state is None:
                state = store.lane(lane)
            dirty[lane] = state
            self._one(record, state, result)
        if live_input:
            store.last_live_input_at = self.clock()
        writes = result.writes
        for state in dirty.values():
            state.flush(self.codec, writes)
        writes += expired  # before a marker of the same lane ended again, below
        for state in ended:
            state.drop_all(writes)
            writes.append((ended_key(partition, state.lane), ended_value(now_ms)))
            store.lanes.pop(state.lane, None)
        if records and records[-1].offset >= fence:
            # last: once it is in the changelog, so is everything before it (one
            # partition, in order), and a re-delivery of these records is skipped
            nxt = records[-1].offset + 1
            store.fences[topic] = nxt
            writes.append((fence_key(partition, topic), b'{"next":%d}' % nxt))
        return result

    def _one(self, record: Record, state: LaneState, result: BatchResult) -> None:
        ctx = self.ctx
        ctx._duplicate, ctx._counted, ctx._lineage_id = False, None, None
        state._journaling = True
        try:
            ts = self._event_time(record) if self._event_time is not None else None
            emits = self.processor.process(record, state)
            outs = self.emitter.from_record(record, emits_of(emits)) if emits else None
        except Exception as exc:
            state.rollback()
            self.failed(record, result, exc)
            return
        state._journaling = False
        if state._journal:
            state._journal.clear()
        if state.emitted:
            emitted, state.emitted = state.emitted, []
            self._from_state(state, emitted, result)
        if ctx._duplicate:
            result.duplicates += 1
        else:
            if outs:
                result.outputs.extend(outs)
            counted = ctx._counted
            if counted:
                lineage = (
                    ctx._lineage_id
                    or record.lineage_id
                    or contract.entry_lineage_id(
                        record.timestamp_ms, record.topic, record.partition, record.offset
                    )
                )
                offset = record.offset
                if len(counted) == 1:
                    result.counted.append((offset, lineage, counted[0]))
                else:
                    result.counted.extend((offset, lineage, ref) for ref in counted)
            elif not outs:
                result.dropped.append(record)
        if ts is not None:
            watermark = state.watermark
            if watermark is None or ts > watermark:
                state.watermark, state._wm_dirty = ts, True
                on_watermark = self._on_watermark
                if on_watermark is not None and ts >= state.next_due:
                    emitted = on_watermark(state, ts)
                    if emitted:
                        self._from_state(state, emitted, result)

    def _advance(self, state: LaneState, watermark: int, result: BatchResult) -> None:
        state.advance(watermark)
        if self._on_watermark is not None:
            self._from_state(state, self._on_watermark(state, watermark), result)

    def _from_state(self, state: LaneState, value: Any, result: BatchResult) -> None:
        if not value:
            return
        emits = emits_of(value)
        if emits:
            outs = self.emitter.from_state(state.lane, emits, int(self.clock() * 1000))
            result.outputs.extend(outs)
            result.emitted_from_state += len(outs)

    def _end_lane(
        self, store: PartitionStore, lane: str, result: BatchResult, now_ms: int
    ) -> LaneState:
        """A backfill run's end of input: the lane's last hooks, then it is forgotten."""
        state = store.lane(lane)
        self._advance(state, END_OF_TIME, result)
        if self._on_end_of_lane is not None:
            self._from_state(state, self._on_end_of_lane(state), result)
        store.ended[lane] = now_ms
        result.lanes_ended.append(lane)
        return state

    # -- idle time -------------------------------------------------------------------------
    def idle_partitions(self) -> bool:
        """Is any loaded partition's live lane idle (and has a watermark to advance)?"""
        if self._event_time is None:
            return False
        now = self.clock()
        return any(
            now - store.last_live_input_at >= self.idle_timeout_s
            and store.live.watermark is not None
            for store in self.stores.values()
        )

    def tick(self, partition: int, quiet_since: float) -> BatchResult | None:
        """Advance an idle partition's live watermark at wall-clock rate.

        The partition is idle from its last live input or from ``quiet_since`` (when
        the runtime last saw the pipeline upstream become quiet), whichever is later:
        time during which upstream still had work does not count. State is written
        only when the stage has work at the new watermark (``next_deadline``)."""
        store = self.stores.get(partition)
        if store is None or self._event_time is None:
            return None
        state = store.live
        if state.watermark is None:
            return None
        idle_since = max(store.last_live_input_at, quiet_since)
        if store.idle_since != idle_since:
            store.idle_since, store.idle_base = idle_since, state.watermark
        idle_for = self.clock() - idle_since
        if idle_for < self.idle_timeout_s or store.idle_base is None:
            return None
        target = store.idle_base + int(idle_for * 1000)
        if target <= state.watermark:
            return None
        if self._next_deadline is not None:
            deadline = self._next_deadline(state)
            if deadline is None or deadline > target:
                return None
        result = self.new_result()
        self._advance(state, target, result)
        state.flush(self.codec, result.writes)
        return result
