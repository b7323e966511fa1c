"""Tracing one record by reading one partition of the lineage topic, near its time.

Every hop of lineage id ``L`` is in partition ``lineage_partition(L)``
(:mod:`pipeline.lineage.placing`), and lineage records carry the time they were
produced, which does not go down within a partition. :func:`find` reads:

1. that partition from the first record at or after ``start`` (default: the time
   in ``L``, the reading's own time, minus :data:`LEAD_MS`), found by bisection
   (:class:`pipeline.kafka.seek.PartitionSeeker`, O(log n) single-record fetches);
2. forward, until ``within`` after its first hop of ``L`` (or, if none shows up,
   ``within`` after the first record read); by default it stops sooner, once the
   path is complete (:data:`~pipeline.lineage.trace.COMPLETE_ENDS`) and the scan
   is :data:`SETTLE_MS` past its last hop;
3. the same for the parent of a fan-out's child (from the parent's time), and for
   the result of each ``counted`` hop: the ``emitted`` record of its reference
   (from the counted hop's time), then that one output record, and, when the
   pipeline has sinks, that record's ``stored`` hops (where it landed).

So a trace costs O(log n) fetches plus the lineage produced in one window of one
partition, whatever the topic's length. What it does not see: hops earlier than
``start`` (a reading whose clock runs ahead by more than a minute), later than the
window (a dead letter redriven days later, a backfill's windows emitted at its end
long after), hops of a reading ingested long after its own time (a backfill, a
device that buffered: give ``start``), and hops written before placement by id
(any partition): :func:`pipeline.lineage.trace.trace_many` reads everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.contract import H_LINEAGE, H_STATE_REF, ulid_ms
from pipeline.errors import ConfigError
from pipeline.kafka.seek import PartitionSeeker, ReadCost, timestamp
from pipeline.lineage.hops import COUNTED, STORED, expand
from pipeline.lineage.placing import emitted, lineage_partition
from pipeline.lineage.trace import COMPLETE_ENDS, Trace, end_of, order_hops
from pipeline.settings import Settings

#: the search starts this long before the id's time (device clocks a little ahead,
#: producers' clocks a little apart)
LEAD_MS = 60_000
#: a complete path: the scan goes on this long past its last hop (hops of one record
#: written by two workers can land a few milliseconds out of order)
SETTLE_MS = 5_000
DEFAULT_WITHIN_MS = 3_600_000
#: the search for the start may stop this many records before it: reading them
#: costs less than the last probes would
SLACK = 64


@dataclass(frozen=True, slots=True)
class Search:
    """Where to look. ``start_ms`` None: the lineage id's time - :data:`LEAD_MS`.
    ``whole_window``: read the whole window even once the path is complete."""

    start_ms: int | None = None
    within_ms: int = DEFAULT_WITHIN_MS
    whole_window: bool = False


@dataclass(slots=True)
class Searched:
    """One stretch of one partition that was read, and why the read stopped."""

    what: str  # the lineage id or state reference looked for
    topic: str
    partition: int
    from_ms: int
    to_ms: int | None  # the time of the last record read
    records: int
    stopped: str  # "complete", "found", "window" or "end"

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "topic": self.topic,
            "partition": self.partition,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "records": self.records,
            "stopped": self.stopped,
        }


@dataclass(slots=True)
class Found:
    trace: Trace
    searched: list[Searched] = field(default_factory=list)
    cost: ReadCost = field(default_factory=ReadCost)


class _Finder:
    def __init__(self, settings: Settings, search: Search, seeker: PartitionSeeker) -> None:
        topic = settings.lineage_topic
        if topic is None:
            raise ConfigError("lineage is off: set lineage_topic in pipeline.yaml")
        self.topic = topic
        self.partitions = settings.topics[topic].partitions
        self.order = settings.stage_ids
        self.finals = settings.topology.final_topics()
        self.stages = settings.stages
        #: stages with no output (sinks): a window's trace goes on to where it landed
        self.sinks = any(not spec.all_outputs for spec in settings.stages.values())
        self.search = search
        self.seeker = seeker
        self.searched: list[Searched] = []

    def _start(self, lineage_id: str) -> int:
        if self.search.start_ms is not None:
            return self.search.start_ms
        at = ulid_ms(lineage_id)
        if at is None:
            raise ConfigError(
                f"{lineage_id!r} is not a ULID, so it tells no time to look from: give "
                "--from, or --all to read the whole lineage topic"
            )
        return at - LEAD_MS

    def hops(
        self,
        lineage_id: str,
        complete: Callable[[list[dict[str, Any]]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Hops of ``lineage_id``, and of children naming it as parent (marked
        ``child``), from one window of its partition; the read stops early once
        ``complete(found)`` (default: the path ended)."""
        complete = complete or self._complete
        tp = (self.topic, lineage_partition(lineage_id, self.partitions))
        start = self._start(lineage_id)
        offset, _ = self.seeker.offset_for_time(tp, start, SLACK)
        needle = lineage_id.encode()
        found: list[dict[str, Any]] = []
        read = self.seeker.cost.records
        limit: int | None = None
        last_hop: int | None = None
        checked: int | None = None
        stopped, ts = "end", None
        for msg in self.seeker.scan(tp, offset):
            ts = timestamp(msg) or 0
            if ts < start:
                continue  # the search stopped a little before the start
            if limit is None:
                limit = ts + self.search.within_ms
            if ts > limit:
                stopped = "window"
                break
            if (
                not self.search.whole_window
                and last_hop is not None
                and ts > last_hop + SETTLE_MS
                and checked != last_hop
            ):
                checked = last_hop
                if complete(found):
                    stopped = "complete"
                    break
            value = msg.value()
            if not value or needle not in value:
                continue
            matched = False
            if msg.key() == needle:  # format 1: one hop per record, keyed by its id
                found.append(orjson.loads(value))
                matched = True
            for hop in expand(value):
                if hop["id"] == lineage_id:
                    found.append(hop)
                    matched = True
                elif hop.get("parent") == lineage_id:
                    found.append({**hop, "child": hop["id"]})
                    matched = True
            if matched:
                if last_hop is None:
                    limit = ts + self.search.within_ms
                last_hop = ts
        self.searched.append(
            Searched(lineage_id, *tp, start, ts, self.seeker.cost.records - read, stopped)
        )
        return found

    def _complete(self, found: list[dict[str, Any]]) -> bool:
        own = order_hops([h for h in found if "child" not in h], self.order)
        children = [h for h in found if "child" in h]
        # a counted hop is the end of the path here; its result is looked for after
        counted: list[dict[str, Any]] = [{}] if own and own[-1]["outcome"] == COUNTED else []
        return end_of(own, counted, [h["child"] for h in children], self.finals) in COMPLETE_ENDS

    def result(self, stage: str, ref: str, counted_at: int) -> dict[str, Any] | None:
        """The output record a ``counted`` hop's reference names, via its ``emitted``
        record: the first one after the hop (the last in the window with
        ``whole_window``, i.e. after corrections)."""
        tp = (self.topic, lineage_partition(ref, self.partitions))
        start = counted_at - SETTLE_MS  # emitted after it was counted (clocks apart a little)
        offset, _ = self.seeker.offset_for_time(tp, start, SLACK)
        needle = orjson.dumps(ref)[1:-1]  # as the text sits inside the JSON value
        read = self.seeker.cost.records
        limit: int | None = None
        where: list[Any] | None = None
        stopped, ts = "end", None
        for msg in self.seeker.scan(tp, offset):
            ts = timestamp(msg) or 0
            if ts < start:
                continue
            limit = ts + self.search.within_ms if limit is None else limit
            if ts > limit:
                stopped = "window"
                break
            value = msg.value()
            if not value or needle not in value:
                continue
            for entry in emitted(value):
                if entry["ref"] == ref and entry["stage"] == stage:
                    where = entry["out"]
            if where is not None and not self.search.whole_window:
                stopped = "found"
                break
        self.searched.append(
            Searched(ref, *tp, start, ts, self.seeker.cost.records - read, stopped)
        )
        return None if where is None else self._output(where, ref)

    def _output(self, where: Sequence[Any], ref: str) -> dict[str, Any] | None:
        topic, partition, offset = where
        msg = self.seeker.first_at((topic, partition), offset, offset + 1)
        if msg is None or msg.offset() != offset:
            return None  # gone (retention)
        if dict(msg.headers() or []).get(H_STATE_REF) != ref.encode():
            return None
        doc = orjson.loads(msg.value() or b"{}")
        result = {**(doc if isinstance(doc, dict) else {"value": doc}), "at": list(where)}
        lineage = dict(msg.headers() or []).get(H_LINEAGE)
        if isinstance(lineage, bytes) and lineage:
            result["lineage_id"] = lineage.decode("ascii", "replace")
        return result

    def stored(self, lineage_id: str, topic: str) -> list[dict[str, Any]]:
        """Where sinks stored the record ``lineage_id`` of ``topic`` (a window): its
        ``stored`` hops, ``{"stage", "ref"}`` each. The read stops once every stage
        reading ``topic`` has a hop of it (a Parquet sink's comes at its flush)."""
        readers = {sid for sid, spec in self.stages.items() if topic in spec.inputs}

        def everyone(found: list[dict[str, Any]]) -> bool:
            return readers <= {h["stage"] for h in found}

        return [
            {"stage": h["stage"], "ref": h.get("ref")}
            for h in self.hops(lineage_id, everyone)
            if h["outcome"] == STORED and "child" not in h
        ]


def find(
    settings: Settings, lineage_id: str, search: Search | None = None, measure: bool = False
) -> Found:
    """The trace of ``lineage_id`` from bounded reads (see the module docstring):
    what was read and what it cost beside it (``measure``: with the bytes the client
    received). ConfigError if lineage is off, or if the id is no ULID and ``search``
    gives no start."""
    search = search or Search()
    cost = ReadCost()
    with PartitionSeeker(settings, cost=cost, measure=measure) as seeker:
        finder = _Finder(settings, search, seeker)
        seeker.require(finder.topic)
        raw = finder.hops(lineage_id)
        own = [h for h in raw if "child" not in h]
        children = list(dict.fromkeys(h["child"] for h in raw if "child" in h))
        parent = next((h["parent"] for h in own if h.get("parent")), None)
        if parent is not None:
            split_by = next(h["stage"] for h in own if h.get("parent"))
            upstream = finder.hops(parent)
            own = [h for h in upstream if "child" not in h and h["stage"] != split_by] + own
        hops = order_hops(own, finder.order)
        refs = {
            (h["stage"], orjson.dumps(h["window"]).decode()): h["at"]
            for h in hops
            if h["outcome"] == COUNTED
        }
        results = {key: finder.result(*key, at) for key, at in refs.items()}
        windows = [
            result
            for h in hops
            if h["outcome"] == COUNTED
            and (result := results.get((h["stage"], orjson.dumps(h["window"]).decode())))
        ]
        if finder.sinks:  # where the windows landed outside Kafka
            for window in windows:
                if "lineage_id" in window:
                    window["stored"] = finder.stored(window["lineage_id"], window["at"][0])
        end = end_of(hops, windows, children, finder.finals)
        trace = Trace(lineage_id, hops, windows, end, parent, children)
    return Found(trace, finder.searched, cost)
