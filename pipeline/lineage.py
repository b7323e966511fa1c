"""Record lineage: one hop per record per stage, on the lineage topic.

Each stage appends, for every record it handled, a hop keyed by the record's
lineage id (so all hops of a record land in one partition, in order)::

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

Hops of a batch are produced after its outputs were acknowledged (they carry the
output offsets) and before the batch is acked, so a committed record always has
its hop; a crash in between may write a hop twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from dlq import retry
from pipeline import contract
from pipeline.errors import ConfigError
from pipeline.kafka import Delivered, read_topic
from pipeline.settings import Settings
from stages.model import InRecord, StageResult

Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]

PASSED, DEAD_LETTER, RETRY, COUNTED = "passed", "dead_letter", "retry", "counted"


def _lineage(headers: Sequence[tuple[str, bytes | None]]) -> bytes | None:
    for name, value in headers:
        if name == contract.H_LINEAGE:
            return value
    return None


def hops(
    stage: str,
    topic: str,
    records: Sequence[InRecord],
    result: StageResult,
    retries: Sequence[Outgoing],
    delivered: Sequence[Delivered],
    now_ms: int,
) -> list[Outgoing]:
    """The hops of one delivered batch, to produce to ``topic``.

    ``delivered`` is the broker's answer for outputs, then ``retries``, then dead
    letters, in that order (as :meth:`pipeline.bindings.Binding.deliver` sends them).
    """
    if not records:
        return []
    in_topic, in_partition = records[0].topic, records[0].partition
    out: list[Outgoing] = []

    def add(
        lineage: bytes | None,
        source: list[Any],
        where: Delivered | None,
        outcome: str,
        **extra: Any,
    ) -> None:
        if lineage is None:
            return
        doc = {
            "id": lineage.decode("ascii", "replace"),
            "stage": stage,
            "in": source,
            "out": None if where is None else [where.topic, where.partition, where.offset],
            "outcome": outcome,
            **extra,
            "at": now_ms,
        }
        out.append((topic, lineage, orjson.dumps(doc), [], None))

    n_out, n_retry = len(result.outputs), len(retries)
    for record, where in zip(result.outputs, delivered[:n_out], strict=True):
        if record.source_offset is not None:  # aggregate results: see ``counted``
            add(
                _lineage(record.headers),
                [in_topic, in_partition, record.source_offset],
                where,
                PASSED,
            )
    for (_, _, _, headers, _), where in zip(
        retries, delivered[n_out : n_out + n_retry], strict=True
    ):
        at = retry.origin(headers, in_topic, in_partition, -1, 0)
        reason = dict(headers).get(retry.REASON, b"").decode()
        add(_lineage(headers), [at.topic, at.partition, at.offset], where, RETRY, reason=reason)
    for dead, where in zip(result.dead, delivered[n_out + n_retry :], strict=True):
        source = [dead.topic, dead.partition, dead.offset]
        add(_lineage(dead.headers), source, where, DEAD_LETTER, reason=str(dead.reason))
    for offset, lineage_id, window in getattr(result, "counted", ()):
        source = [in_topic, in_partition, offset]
        add(lineage_id.encode(), source, None, COUNTED, window=list(window))
    return out


# -- tracing one record ---------------------------------------------------------

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
    """Traces of several records: reads each lineage partition they live in once, and
    the aggregates topic once."""
    topic = settings.lineage_topic
    if topic is None:
        raise ConfigError("lineage is off: set lineage_topic in pipeline.yaml")
    partitions = settings.topics[topic].partitions
    wanted = {i.encode(): i for i in lineage_ids}
    by_partition = sorted({partition_for(k, partitions) for k in wanted})
    found: dict[str, list[dict[str, Any]]] = {i: [] for i in lineage_ids}
    for message in read_topic(settings, topic, partitions=by_partition):
        key = message.key()
        if key in wanted:
            found[wanted[key]].append(orjson.loads(message.value() or b"{}"))
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
