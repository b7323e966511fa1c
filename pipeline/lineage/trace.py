"""Record lineage: every record's hop through every stage, on the lineage topic.

A hop says what one stage did with one record::

    {"id": "01J…", "stage": "parse", "in": ["iot.raw", 2, 1041],
     "out": ["iot.parsed", 1, 977], "outcome": "passed", "at": 1764400000123}

``outcome`` is one of:

* ``passed``: written to the stage's output (``out``);
* ``dead_letter``: written to the stage's dead-letter topic (``out``), ``reason`` set;
* ``retry``: written to the stage's retry topic (``out``), ``reason`` set;
* ``counted``: the aggregate counted it in ``window`` = [device, metric, start ms];
  the window's result is the ``iot.aggregates`` record with that key and start.

Exact repeats of a reading share its lineage id; the aggregate drops them without a
hop (they are counted in ``pipeline_duplicates_dropped_total``).

On the topic, the hops of one batch travel together (format 2): one record per
batch (per :data:`MAX_HOPS` hops), keyed ``<stage>/<topic>/<partition>`` of the
batch's input, whose value holds the hops column-wise, one group per outcome::

    {"v": 2, "stage": "parse", "at": 1764400000123, "in": ["iot.raw", 2],
     "groups": [
       {"outcome": "passed", "ids": "01J… 01J…", "in_offsets": [1041, 1042],
        "out": "iot.parsed", "partitions": [1, 3], "offsets": [977, 412]},
       {"outcome": "dead_letter", "ids": "01J…", "in": [["iot.raw", 2, 1043]],
        "out": "iot.parse.dlq", "partitions": [0], "offsets": [17],
        "reasons": ["schema_violation"]},
       {"outcome": "counted", "ids": "…", "in_offsets": […],
        "windows": [["dev-1", "temp", 1764399960000], …]}]}

``ids`` are the records' lineage ids separated by a space; the other lists are
parallel to them. A per-record record (format 1: the hop itself, keyed by its
lineage id, as stages wrote before) is still read. One record per batch instead of
one per record per stage halves what a stage produces; :func:`expand` turns a
value back into hops, and :func:`trace_many` reads the whole lineage topic.

Hops of a batch are produced after its outputs were acknowledged (they carry the
output offsets) and before the batch is acked, so a committed record always has
its hop; a crash in between may write a hop twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.errors import ConfigError
from pipeline.kafka.offsets import read_topic
from pipeline.lineage.hops import expand
from pipeline.settings import Settings

PASSED, DEAD_LETTER, RETRY, COUNTED = "passed", "dead_letter", "retry", "counted"


STAGE_ORDER = {"ingest": 0, "parse": 1, "enrich": 2, "aggregate": 3}


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class Trace:
    lineage_id: str
    hops: list[dict[str, Any]]
    windows: list[dict[str, Any]]  # the aggregate results its ``counted`` hops name
    end: str  # "window", "dead_letter", "in_flight" or "unknown"

    @property
    def complete(self) -> bool:
        return self.end in ("window", "dead_letter")

    def as_dict(self) -> dict[str, Any]:
        return {
            "lineage_id": self.lineage_id,
            "end": self.end,
            "complete": self.complete,
            "hops": self.hops,
            "windows": self.windows,
        }


def _end(hops: Sequence[dict[str, Any]], windows: Sequence[dict[str, Any]]) -> str:
    if not hops:
        return "unknown"
    last = hops[-1]
    if last["outcome"] == COUNTED:
        return "window" if windows else "in_flight"  # counted, window not emitted yet
    if last["outcome"] == DEAD_LETTER:
        return "dead_letter"
    return "in_flight"


def order_hops(hops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hops in the order they happened: by time, then by stage (a batch's hops of
    several stages can share a millisecond only across workers)."""
    unique = {orjson.dumps(h, option=orjson.OPT_SORT_KEYS): h for h in hops}
    return sorted(unique.values(), key=lambda h: (h["at"], STAGE_ORDER.get(h["stage"], 9)))


def trace_many(settings: Settings, lineage_ids: Sequence[str]) -> dict[str, Trace]:
    """Traces of several records: reads the lineage topic once (a batch's hops are
    one record, not keyed by lineage id), and the aggregates topic once."""
    topic = settings.lineage_topic
    if topic is None:
        raise ConfigError("lineage is off: set lineage_topic in pipeline.yaml")
    wanted = {i.encode(): i for i in lineage_ids}
    found: dict[str, list[dict[str, Any]]] = {i: [] for i in lineage_ids}
    # a few ids: skip the batch records that do not mention any (most of them)
    needles = list(wanted) if len(wanted) <= 16 else None
    for message in read_topic(settings, topic):
        key, value = message.key(), message.value()
        if not value:
            continue
        if key in wanted:  # format 1: one hop per record, keyed by its lineage id
            found[wanted[key]].append(orjson.loads(value))
            continue
        if needles is not None and not any(n in value for n in needles):
            continue
        for hop in expand(value):
            hops = found.get(hop["id"])
            if hops is not None:
                hops.append(hop)
    windows_wanted = {
        tuple(h["window"]) for hops in found.values() for h in hops if h["outcome"] == COUNTED
    }
    results: dict[tuple[Any, ...], dict[str, Any]] = {}
    if windows_wanted:
        for message in read_topic(settings, settings.stages["aggregate"].output):
            doc = orjson.loads(message.value() or b"{}")
            wkey = (doc.get("device_id"), doc.get("metric"), doc.get("window_start"))
            if wkey in windows_wanted:
                results[wkey] = {
                    **doc,
                    "at": [message.topic(), message.partition(), message.offset()],
                }
    traces = {}
    for lineage_id, raw_hops in found.items():
        hops = order_hops(raw_hops)
        windows = [
            results[tuple(h["window"])]
            for h in hops
            if h["outcome"] == COUNTED and tuple(h["window"]) in results
        ]
        traces[lineage_id] = Trace(lineage_id, hops, windows, _end(hops, windows))
    return traces


def trace(settings: Settings, lineage_id: str) -> Trace:
    return trace_many(settings, [lineage_id])[lineage_id]
