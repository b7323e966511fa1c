"""Tracing records: every hop they made, read back from the whole lineage topic.

:func:`trace_many` reads every partition of the lineage topic (and the counting
stages' outputs) once: it sees hops of any format and age, at a cost that grows
with the topic. One record's trace from bounded reads of one partition is
:func:`pipeline.lineage.find.find` (what ``pipeline lineage trace`` does by default).

A trace is the hops (:mod:`pipeline.lineage.hops`) of one lineage id in the order
they happened, plus:

* the **parent's** hops before them when the record is a fan-out's child (its
  hop names the ``parent``), so the path starts where the record entered;
* its **children** when a stage split it into several records;
* the **results** its ``counted`` hops name: the counting stage's output records
  whose ``state-ref`` header is the hop's reference (e.g. the window).

How it ended: ``window`` (counted, result found), ``stored`` (a sink stored it;
the hop's ``ref`` says where), ``dead_letter``, ``dropped`` (filtered out),
``output`` (written to a topic no stage reads), ``fanned_out``
(split into children), or ``in_flight`` / ``unknown``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.contract import H_LINEAGE, H_STATE_REF
from pipeline.errors import ConfigError
from pipeline.kafka.offsets import read_topic
from pipeline.lineage.hops import COUNTED, DEAD_LETTER, DROPPED, PASSED, STORED, expand
from pipeline.settings import Settings

COMPLETE_ENDS = ("window", "stored", "dead_letter", "dropped", "output", "fanned_out")


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class Trace:
    lineage_id: str
    hops: list[dict[str, Any]]
    windows: list[dict[str, Any]]  # the results its ``counted`` hops name
    end: str
    parent: str | None = None
    children: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.end in COMPLETE_ENDS

    def as_dict(self) -> dict[str, Any]:
        return {
            "lineage_id": self.lineage_id,
            "end": self.end,
            "complete": self.complete,
            "parent": self.parent,
            "children": self.children,
            "hops": self.hops,
            "windows": self.windows,
        }


def end_of(
    hops: Sequence[dict[str, Any]],
    windows: Sequence[dict[str, Any]],
    children: Sequence[str],
    final_topics: Sequence[str],
) -> str:
    if children:
        return "fanned_out"
    if not hops:
        return "unknown"
    last = hops[-1]
    outcome = last["outcome"]
    if outcome == COUNTED:
        return "window" if windows else "in_flight"  # counted, result not emitted yet
    if outcome == DEAD_LETTER:
        return "dead_letter"
    if outcome == DROPPED:
        return "dropped"
    if outcome == STORED:
        return "stored"
    if outcome == PASSED and last.get("out") and last["out"][0] in final_topics:
        return "output"
    return "in_flight"


def order_hops(hops: list[dict[str, Any]], stage_order: Sequence[str]) -> list[dict[str, Any]]:
    """Hops in the order they happened: by time, then by stage (a batch's hops of
    several stages can share a millisecond only across workers)."""
    rank = {s: i for i, s in enumerate(stage_order)}
    unique = {orjson.dumps(h, option=orjson.OPT_SORT_KEYS): h for h in hops}
    return sorted(unique.values(), key=lambda h: (h["at"], rank.get(h["stage"], len(rank))))


def _scan(settings: Settings, topic: str, wanted: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Hops of ``wanted`` ids, and of children whose parent is wanted (under the
    parent's id, marked ``child``), from one read of the lineage topic."""
    found: dict[str, list[dict[str, Any]]] = {i: [] for i in wanted}
    needles = [i.encode() for i in wanted] if len(wanted) <= 16 else None
    for message in read_topic(settings, topic):
        key, value = message.key(), message.value()
        if not value:
            continue
        text_key = key.decode("ascii", "replace") if key else None
        if text_key in wanted:  # format 1: one hop per record, keyed by its lineage id
            found[text_key].append(orjson.loads(value))
            continue
        if needles is not None and not any(n in value for n in needles):
            continue
        for hop in expand(value):
            hops = found.get(hop["id"])
            if hops is not None:
                hops.append(hop)
            parent = hop.get("parent")
            if parent in wanted:
                found[parent].append({**hop, "child": hop["id"]})
    return found


def _results(settings: Settings, counted: set[tuple[str, bytes]]) -> dict[tuple[str, bytes], Any]:
    """Output records of the counting stages whose ``state-ref`` is one of ``counted``."""
    results: dict[tuple[str, bytes], Any] = {}
    for stage in dict.fromkeys(s for s, _ in counted):
        spec = settings.stages.get(stage)
        if spec is None:
            continue
        for topic in spec.all_outputs:
            for message in read_topic(settings, topic):
                ref = dict(message.headers() or []).get(H_STATE_REF)
                if isinstance(ref, bytes) and (stage, ref) in counted:
                    doc = orjson.loads(message.value() or b"{}")
                    result = {
                        **(doc if isinstance(doc, dict) else {"value": doc}),
                        "at": [message.topic(), message.partition(), message.offset()],
                    }
                    lineage = dict(message.headers() or []).get(H_LINEAGE)
                    if isinstance(lineage, bytes) and lineage:
                        result["lineage_id"] = lineage.decode("ascii", "replace")
                    results[(stage, ref)] = result
    return results


def trace_many(settings: Settings, lineage_ids: Sequence[str]) -> dict[str, Trace]:
    """Traces of several records: reads the lineage topic once (twice when a record
    is a fan-out's child), and the counting stages' outputs once."""
    topic = settings.lineage_topic
    if topic is None:
        raise ConfigError("lineage is off: set lineage_topic in pipeline.yaml")
    order = settings.stage_ids
    found = _scan(settings, topic, set(lineage_ids))
    parents = {
        i: next((h["parent"] for h in hops if h.get("parent") and "child" not in h), None)
        for i, hops in found.items()
    }
    wanted_parents = {p for p in parents.values() if p is not None} - set(found)
    parent_hops = _scan(settings, topic, wanted_parents) if wanted_parents else {}
    for i, parent in parents.items():
        if parent is not None:
            upstream = found.get(parent, parent_hops.get(parent, []))
            stage = next(h["stage"] for h in found[i] if h.get("parent"))
            found[i] = [h for h in upstream if "child" not in h and h["stage"] != stage] + found[i]
    counted = {
        (h["stage"], orjson.dumps(h["window"]))
        for hops in found.values()
        for h in hops
        if h["outcome"] == COUNTED and "child" not in h
    }
    results = _results(settings, counted) if counted else {}
    finals = settings.topology.final_topics()
    traces = {}
    for lineage_id in lineage_ids:
        raw = found[lineage_id]
        children = list(dict.fromkeys(h["child"] for h in raw if "child" in h))
        hops = order_hops([h for h in raw if "child" not in h], order)
        windows = [
            results[key]
            for h in hops
            if h["outcome"] == COUNTED
            and (key := (h["stage"], orjson.dumps(h["window"]))) in results
        ]
        end = end_of(hops, windows, children, finals)
        traces[lineage_id] = Trace(lineage_id, hops, windows, end, parents[lineage_id], children)
    return traces


def trace(settings: Settings, lineage_id: str) -> Trace:
    return trace_many(settings, [lineage_id])[lineage_id]
