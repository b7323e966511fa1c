"""Consumer lag in seconds: how long the oldest record not yet committed has waited.

Lag in records means little across stages of different cost (a thousand records are
a tenth of a second for one stage and a minute for another); the age of the oldest
uncommitted record says how late a stage is, in the unit a user sets targets in.

The age is ``now`` minus the time that record was *appended to the stage's input*.
Record timestamps do not say that: a stage's outputs carry their reading's event
time (a backfill's are months old), and brokers seldom stamp append time
(``LogAppendTime``; the embedded broker ignores it). So a worker learns when records
landed from what it sees of each partition (:class:`LandingClock`): the high
watermark of every Fetch response, with the wall-clock time it first saw each new
end. A record at offset ``o`` landed between the last observation whose end was
``≤ o`` and the first whose end was ``> o``; between the two the time is
interpolated by offset. Records that were already there when the worker first saw
the partition (a restart, a rebalance, a backlog) landed before that first
observation; for them the clock takes the record's own times (its ingest time
header, or its timestamp where that is later) as a bound, interpolated up to the
first observation: an overestimate by however long the record spent upstream.

Bounded: observations at or below the committed offset are dropped (one is kept as
the lower bracket), and past :data:`MAX_POINTS` every other older point is merged
away (resolution thins out for old records, never for new ones).

Pure: times are passed in; nothing here reads a clock, Kafka or Prometheus.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

from pipeline.contract import H_INGEST_TS

#: observations kept per partition at most
MAX_POINTS = 256


def record_time_s(timestamp_ms: int, headers: Sequence[tuple[str, bytes]]) -> float | None:
    """A bound on when a record was first written into the pipeline: its ingest time
    header, or its timestamp where that is later (seconds; None if it has neither)."""
    best = timestamp_ms if timestamp_ms and timestamp_ms > 0 else None
    for name, value in headers:
        if name == H_INGEST_TS:
            if value and value.isdigit():
                ingest = int(value)
                best = ingest if best is None else max(best, ingest)
            break
    return None if best is None else best / 1000


class LandingClock:
    """When the records of one partition were appended, as one consumer saw it."""

    __slots__ = ("_anchor", "_highs", "_times")

    def __init__(self) -> None:
        self._highs: list[int] = []  # increasing high watermarks ...
        self._times: list[float] = []  # ... and when each was first seen
        self._anchor: tuple[int, float] | None = None

    @property
    def first_high(self) -> int | None:
        """The end at the first observation kept (records below it were there before)."""
        return self._highs[0] if self._highs else None

    def observe(self, high: int, now: float) -> None:
        """The partition's end (high watermark) is ``high`` at ``now``."""
        if self._highs and high <= self._highs[-1]:
            return
        self._highs.append(high)
        self._times.append(now)
        if len(self._highs) > MAX_POINTS:
            self._thin()

    def anchor(self, offset: int, landed_by: float | None) -> None:
        """The record at ``offset``, there before the first observation (or before any),
        landed no earlier than ``landed_by`` (its own times, :func:`record_time_s`)."""
        if landed_by is None or (self._highs and offset >= self._highs[0]):
            return
        if self._anchor is None or offset < self._anchor[0]:
            self._anchor = (offset, landed_by)

    def forget_below(self, committed: int) -> None:
        """Drop what no uncommitted record needs (keeps the bracket below ``committed``)."""
        keep_from = bisect_right(self._highs, committed) - 1
        if keep_from > 0:
            del self._highs[:keep_from]
            del self._times[:keep_from]
            self._anchor = None  # it lay below the first observation, now committed

    def landed_at(self, offset: int) -> float | None:
        """When the record at ``offset`` was appended (estimate); None if, as far as
        this clock knows, it has not been."""
        highs, times = self._highs, self._times
        if not highs or offset >= highs[-1]:
            return None
        i = bisect_right(highs, offset)  # highs[i] > offset: first seen at times[i]
        high, high_t = highs[i], times[i]
        if i > 0:
            low, low_t = highs[i - 1], times[i - 1]
        elif self._anchor is not None:
            low, low_t = self._anchor[0], min(self._anchor[1], high_t)
            if offset <= low:
                return low_t  # older than the anchor: at least as old as it
        else:
            return high_t  # there before the first observation: at the latest then
        return low_t + (high_t - low_t) * (offset - low) / max(1, high - low)

    def age(self, committed: int, now: float) -> float:
        """Seconds the oldest record not yet committed (at ``committed``) has waited;
        0 when every record this clock knows of is committed."""
        landed = self.landed_at(committed)
        return 0.0 if landed is None else max(0.0, now - landed)

    def _thin(self) -> None:
        """Merge every other point of the older half (the newest half stays exact)."""
        half = len(self._highs) // 2
        keep = list(range(0, half, 2)) + list(range(half, len(self._highs)))
        self._highs = [self._highs[i] for i in keep]
        self._times = [self._times[i] for i in keep]


class LandingClocks:
    """A :class:`LandingClock` per (topic, partition) a worker consumes."""

    def __init__(self) -> None:
        self.clocks: dict[tuple[str, int], LandingClock] = {}

    def clock(self, topic: str, partition: int) -> LandingClock:
        tp = (topic, partition)
        found = self.clocks.get(tp)
        if found is None:
            found = self.clocks[tp] = LandingClock()
        return found

    def observe(self, ends: Iterable[tuple[str, int, int]], now: float) -> None:
        for topic, partition, high in ends:
            self.clock(topic, partition).observe(high, now)

    def batch(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """A batch starting at ``offset`` is about to be processed: its first record
        anchors the clock if it predates the first observation (a check per batch)."""
        clock = self.clock(topic, partition)
        first = clock.first_high
        if first is None or offset < first:
            clock.anchor(offset, record_time_s(timestamp_ms, headers))

    def age(self, topic: str, partition: int, committed: int, now: float) -> float:
        found = self.clocks.get((topic, partition))
        if found is None:
            return 0.0
        found.forget_below(committed)
        return found.age(committed, now)
