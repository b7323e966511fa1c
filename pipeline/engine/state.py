"""Keyed state of a stateful stage: per partition, per lane, with a crash-safe changelog.

In memory, one :class:`LaneState` per (partition, lane) holds the stage's values
as Python objects. What a batch changed is written to the changelog (a compacted
topic, one partition per input partition) in this order, once the batch's outputs
were acknowledged:

1. values set (and, for a key set and then deleted in the same batch, the value it
   had last),
2. the lane's watermark,
3. deletions,
4. tombstones of ``ended`` markers older than the stage's
   ``ended_lane_retention_s`` (:func:`expired_lanes`),
5. per backfill lane ended now: tombstones of its keys, of its watermark, then an
   ``ended`` marker (the wall-clock time it ended),
6. last, the *fence*: the next input offset of the batch's topic partition.

The changelog keeps the order of one partition's writes, so whatever prefix of
them survives a crash is a state from which re-delivering the batch gives the
same result: records below a saved fence are skipped as duplicates; updates
without their watermark are recognised by the stage (e.g. as repeats of a
lineage id); and nothing is forgotten before the watermark that forgot it is
saved. An expired marker's tombstone may land without the batch's fence: the
batch, re-delivered, finds the marker expired again (the clock only moves on).
Changelog keys are JSON arrays: ``["s", partition, lane, key]``,
``["wm", partition, lane]``, ``["end", partition, lane]`` (value ``{"at": ms}``;
``{}`` as written before: ended when loaded), ``["in", partition, topic]``.

A record of a partition whose value cannot be read (corrupt bytes, a stage codec
that raises on it or a window that is not one) does not stop the load: it is set
aside in :attr:`PartitionStore.unreadable`, and the runner moves it to the stage's
dead-letter topic (``state_unreadable``) and deletes it from the changelog
(:meth:`pipeline.engine.runner.StageRunner.quarantine`). What it held starts empty:
a value's key, a lane's watermark (taken again from the next records), a fence
(re-delivered records are then recognised only by what the stage keeps: a window
still held knows its lineage ids; a record of a window already emitted and
forgotten is ``late``; a stage that keeps nothing of the kind counts it again). An
``ended`` marker that cannot be read counts as ended when loaded (a later record of
that lane is late), as an empty one always did. More than :data:`QUARANTINE_MAX`
unreadable records in one load, or (from 3 on) more than half of the partition's,
is not a corrupt record but a codec or version problem: the load raises
:class:`~pipeline.errors.StateUnreadable` and sets nothing aside, as a bug in a
stage stops it rather than dead-lettering everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.errors import StateUnreadable
from pipeline.records import fitted
from pipeline.stage import LIVE, Codec

_MISSING: Any = object()

Write = tuple[bytes, bytes | None]

log = logging.getLogger("pipeline.engine")


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A changelog record of a partition whose value could not be read."""

    key: bytes
    value: bytes
    error_class: str
    error: str


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


# Keys and values of the table are kept as long as the key lives: fitted (see
# pipeline.records.fitted), not in orjson's 4 KiB buffers.
def state_key(partition: int, lane: str, key: Any) -> bytes:
    return fitted(orjson.dumps(["s", partition, lane, key]))


def watermark_key(partition: int, lane: str) -> bytes:
    return fitted(orjson.dumps(["wm", partition, lane]))


def ended_key(partition: int, lane: str) -> bytes:
    return fitted(orjson.dumps(["end", partition, lane]))


def fence_key(partition: int, topic: str) -> bytes:
    return fitted(orjson.dumps(["in", partition, topic]))


class LaneState:
    """The :class:`pipeline.stage.State` of one partition and lane."""

    __slots__ = (
        "_data",
        "_deleted",
        "_dirty",
        "_journal",
        "_journaling",
        "_last_set",
        "_wm_dirty",
        "cache",
        "emitted",
        "get",
        "lane",
        "next_due",
        "partition",
        "watermark",
    )

    def __init__(self, partition: int, lane: str = LIVE) -> None:
        self.partition = partition
        self.lane = lane
        self.cache: dict[str, Any] = {}
        #: the watermark at which the stage's on_watermark next has work (the stage may
        #: keep it; 0: every time the watermark moves)
        self.next_due = 0
        self._data: dict[Any, Any] = {}
        #: the highest event time seen in this lane (or advanced to while idle); the
        #: engine moves it, stages read it
        self.watermark: int | None = None
        #: ``get(key, default=None)``: the dict's own (a worker calls it per record)
        self.get = self._data.get
        self._wm_dirty = False
        self._dirty: dict[Any, None] = {}
        self._deleted: dict[Any, None] = {}
        self._last_set: dict[Any, Any] = {}
        #: what the record being processed changed (while ``_journaling``)
        self._journal: list[tuple[Any, Any, bool, bool, Any]] = []
        self._journaling = False
        #: outputs made from state while a record was processed (``emit``)
        self.emitted: list[Any] = []

    # -- what the stage sees -----------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter(list(self._data.items()))

    def keys(self) -> Iterator[Any]:
        return iter(list(self._data))

    def set(self, key: Any, value: Any) -> None:
        if self._journaling and (
            self._data.get(key, _MISSING) is not value or key not in self._dirty
        ):
            self._note(key)
        self._data[key] = value
        self._dirty[key] = None
        if key in self._deleted:
            del self._deleted[key]
            self._last_set.pop(key, None)

    def emit(self, emit: Any) -> None:
        """Write ``emit`` as an output made from state (a new trace, as
        ``on_watermark``'s are), not from the record being processed."""
        self.emitted.append(emit)

    def delete(self, key: Any) -> None:
        if key not in self._data:
            return
        if self._journaling:
            self._note(key)
        if key in self._dirty:
            self._last_set[key] = self._data[key]
            del self._dirty[key]
        del self._data[key]
        self._deleted[key] = None

    # -- the engine's side ----------------------------------------------------------
    def _note(self, key: Any) -> None:
        self._journal.append(
            (
                key,
                self._data.get(key, _MISSING),
                key in self._dirty,
                key in self._deleted,
                self._last_set.get(key, _MISSING),
            )
        )

    def begin(self) -> None:
        """Start recording what one record changes (see :meth:`rollback`)."""
        self._journaling = True

    def commit(self) -> None:
        self._journaling = False
        if self._journal:
            self._journal.clear()

    def rollback(self) -> None:
        """Undo the sets and deletes since :meth:`begin` (not in-place changes of a
        value: a stage that can fail after changing a value should change a copy)."""
        self._journaling = False
        self.emitted = []
        journal, self._journal = self._journal, []
        for key, value, dirty, deleted, last in reversed(journal):
            if value is _MISSING:
                self._data.pop(key, None)
            else:
                self._data[key] = value
            if dirty:
                self._dirty[key] = None
            else:
                self._dirty.pop(key, None)
            if deleted:
                self._deleted[key] = None
            else:
                self._deleted.pop(key, None)
            if last is _MISSING:
                self._last_set.pop(key, None)
            else:
                self._last_set[key] = last

    def advance(self, watermark: int) -> None:
        self.watermark = watermark
        self._wm_dirty = True

    def load_value(self, key: Any, value: Any) -> None:
        self._data[key] = value

    def load_watermark(self, watermark: int | None) -> None:
        self.watermark = watermark

    def flush(self, codec: Codec, out: list[Write]) -> None:
        """Append this lane's changes to ``out`` in the crash-safe order; forget them."""
        partition, lane = self.partition, self.lane
        encode = codec.encode
        data = self._data
        for key in self._dirty:
            out.append((state_key(partition, lane, key), fitted(encode(data[key]))))
        for key, value in self._last_set.items():
            out.append((state_key(partition, lane, key), fitted(encode(value))))
        if self._wm_dirty:
            mark = orjson.dumps({"watermark": self.watermark})
            out.append((watermark_key(partition, lane), fitted(mark)))
        for key in self._deleted:
            out.append((state_key(partition, lane, key), None))
        self._dirty.clear()
        self._deleted.clear()
        self._last_set.clear()
        self._wm_dirty = False

    def drop_all(self, out: list[Write]) -> None:
        """Tombstones for every key and the watermark (an ended lane)."""
        partition, lane = self.partition, self.lane
        for key in self._data:
            out.append((state_key(partition, lane, key), None))
        out.append((watermark_key(partition, lane), None))
        self._data.clear()


class PartitionStore:
    """Everything a stateful stage keeps for one input partition."""

    __slots__ = (
        "ended",
        "fences",
        "idle_base",
        "idle_since",
        "lanes",
        "last_live_input_at",
        "on_new",
        "partition",
        "unreadable",
    )

    def __init__(
        self, partition: int, now: float, on_new: Callable[[LaneState], None] | None = None
    ) -> None:
        self.partition = partition
        #: called with each lane made after the store (the stage's on_restore)
        self.on_new = on_new
        self.lanes: dict[str, LaneState] = {LIVE: LaneState(partition, LIVE)}
        if on_new is not None:
            on_new(self.lanes[LIVE])
        #: backfill lanes that ended -> when (wall-clock ms); a record of one is late
        self.ended: dict[str, int] = {}
        #: input topic -> the next input offset the state does not hold
        self.fences: dict[str, int] = {}
        self.last_live_input_at = now
        self.idle_since: float | None = None
        self.idle_base: int | None = None
        #: changelog records of this partition that could not be read when loaded
        self.unreadable: list[Unreadable] = []

    @property
    def live(self) -> LaneState:
        return self.lanes[LIVE]

    def lane(self, name: str) -> LaneState:
        state = self.lanes.get(name)
        if state is None:
            state = self.lanes[name] = LaneState(self.partition, name)
            if self.on_new is not None:
                self.on_new(state)
        return state


#: at most this many unreadable records of a partition are set aside in one load,
#: and from 3 on at most half of its records: more is a codec or version problem,
#: and setting them aside would empty the state (the load raises instead)
QUARANTINE_MAX = 10


def load_partition(
    partition: int, items: Iterable[tuple[bytes, bytes]], codec: Codec, now: float
) -> PartitionStore:
    """A partition's state rebuilt from changelog items (key, value); values that
    cannot be read are set aside in ``unreadable`` (see the module docstring).
    :class:`~pipeline.errors.StateUnreadable` if there are too many of them
    (:data:`QUARANTINE_MAX`)."""
    store = PartitionStore(partition, now)
    foreign = total = 0
    for raw_key, raw_value in items:
        try:
            key = orjson.loads(raw_key)
        except orjson.JSONDecodeError:
            foreign += 1
            continue
        if not isinstance(key, list) or len(key) < 3 or key[1] != partition:
            continue
        total += 1
        kind = key[0]
        try:
            if kind == "s" and len(key) == 4:
                store.lane(key[2]).load_value(_hashable(key[3]), codec.decode(raw_value))
            elif kind == "wm":
                store.lane(key[2]).load_watermark(_int_field(raw_value, "watermark"))
            elif kind == "end":
                store.ended[key[2]] = _ended_at(raw_value, now)
            elif kind == "in":
                store.fences[key[2]] = _int_field(raw_value, "next")
        except (MemoryError, RecursionError):
            raise  # the worker's trouble, not the record's
        except Exception as exc:
            store.unreadable.append(
                Unreadable(raw_key, raw_value, type(exc).__name__, str(exc)[:300])
            )
    if foreign:
        log.warning(
            "the state table holds %d records whose key is not the framework's JSON array; "
            "they are left alone (written to the changelog by something else?)",
            foreign,
        )
    bad = len(store.unreadable)
    if bad > QUARANTINE_MAX or (bad >= 3 and bad * 2 > total):
        first = store.unreadable[0]
        raise StateUnreadable(
            f"{bad} of the {total} state records of partition {partition} cannot be read "
            f"(first: {first.error_class}: {first.error}); that is a codec or version "
            "problem, not one corrupt record, so none was set aside: run the release that "
            "wrote them, or fix the stage's state codec"
        )
    for lane in store.ended:
        store.lanes.pop(lane, None)
    return store


def _int_field(raw: bytes, name: str) -> int:
    doc = orjson.loads(raw)
    value = doc.get(name) if isinstance(doc, dict) else None
    if type(value) is float and value.is_integer():  # a stage's event_time gave a float
        return int(value)
    if type(value) is not int:  # a bool is not an offset or a time
        raise ValueError(f"{name!r} is not an integer in {raw[:80]!r}")
    return value


def _ended_at(raw: bytes, now: float) -> int:
    """When an ``ended`` marker says its lane ended; when loaded, if it does not say."""
    try:
        at = orjson.loads(raw).get("at") if raw else None
    except (orjson.JSONDecodeError, AttributeError):
        at = None
    return at if type(at) is int else int(now * 1000)


def ended_value(at_ms: int) -> bytes:
    """An ``ended`` marker's value: when the lane ended."""
    return b'{"at":%d}' % at_ms


def expired_lanes(store: PartitionStore, now_ms: int, retention_ms: int) -> list[Write]:
    """Forget the ended lanes of ``store`` that ended ``retention_ms`` or more before
    ``now_ms``; returns their markers' tombstones (to write before the lanes ended in
    the same batch and the fence)."""
    horizon = now_ms - retention_ms
    gone = []
    # markers are kept in the order they ended (the changelog's, when loaded): the
    # first one not yet expired ends the look (a marker behind it, ended earlier by a
    # clock that went back, expires a little later, never sooner)
    for lane, at in store.ended.items():
        if at > horizon:
            break
        gone.append(lane)
    for lane in gone:
        del store.ended[lane]
    return [(ended_key(store.partition, lane), None) for lane in gone]
