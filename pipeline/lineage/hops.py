"""Record lineage: every record's hop through every stage, on the lineage topic.

A hop says what one stage did with one record::

    {"id": "01J…", "stage": "parse", "in": ["iot.raw", 2, 1041],
     "out": ["iot.parsed", 1, 977], "outcome": "passed", "at": 1764400000123}

``outcome`` is one of:

* ``passed``: written to the stage's output (``out``);
* ``dead_letter``: written to the stage's dead-letter topic (``out``), ``reason`` set;
* ``retry``: written to the stage's retry topic (``out``), ``reason`` set;
* ``counted``: a stateful stage absorbed it into ``window`` (the state's reference,
  e.g. [device, metric, window start ms]); the result is the stage's output record
  whose ``state-ref`` header is that reference;
* ``stored``: a sink stored it outside Kafka, at ``ref`` (a row's key, a file);
* ``dropped``: the stage wrote nothing for it (a filter).

A record one stage split into several (a fan-out) has a hop per child, under the
child's own lineage id, with ``parent`` naming the input's. Exact repeats of a
record share its lineage id; stages drop them without a hop (they are counted in
``pipeline_duplicates_dropped_total``).

On the topic, the hops of one batch travel together (format 2): one record per
lineage partition the batch's ids fall in (:mod:`pipeline.lineage.placing`: all
hops of one id are in one partition), per :data:`MAX_HOPS` hops, keyed
``<stage>/<topic>/<partition>`` of the batch's input, whose value holds the hops
column-wise, one group per outcome::

    {"v": 2, "stage": "parse", "at": 1764400000123, "in": ["iot.raw", 2],
     "groups": [
       {"outcome": "passed", "ids": "01J… 01J…", "in_offsets": [1041, 1042],
        "out": "iot.parsed", "partitions": [1, 3], "offsets": [977, 412]},
       (or "outs": [topic per hop] when a batch wrote to several topics; "parents":
        [lineage id of the input, "" when the same] after a fan-out)
       {"outcome": "dead_letter", "ids": "01J…", "in": [["iot.raw", 2, 1043]],
        "out": "iot.parse.dlq", "partitions": [0], "offsets": [17],
        "reasons": ["schema_violation"]},
       {"outcome": "counted", "ids": "…", "in_offsets": […],
        "windows": [["dev-1", "temp", 1764399960000], …]}]}

``ids`` are the records' lineage ids separated by a space; the other lists are
parallel to them. A per-record record (format 1: the hop itself, keyed by its
lineage id, as stages wrote before) is still read. A few records per batch instead
of one per record per stage halves what a stage produces; :func:`expand` turns a
value back into hops. Outputs made from state get ``emitted`` records (where the
result a ``counted`` hop names was written; :mod:`pipeline.lineage.placing`).

Hops of a batch are produced after its outputs were acknowledged (they carry the
output offsets) and before the batch is acked, so a committed record always has
its hop; a crash in between may write a hop twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from dlq import retry
from pipeline import contract
from pipeline.engine.result import BatchResult
from pipeline.lineage.placing import EMITTED, FORMAT, MAX_HOPS, emitted_records, place
from pipeline.records import Delivered, Deliveries, Outgoing, Partitioned, Record

PASSED, DEAD_LETTER, RETRY, COUNTED = "passed", "dead_letter", "retry", "counted"
DROPPED, STORED = "dropped", "stored"
__all__ = [
    "EMITTED",
    "FORMAT",
    "MAX_HOPS",
    "batch_hops",
    "expand",
    "state_hops",
    "stored_hops",
]

_H_LINEAGE = contract.H_LINEAGE


def _lineage(headers: Sequence[tuple[str, bytes | None]]) -> bytes | None:
    if headers and headers[0][0] == _H_LINEAGE:  # where ingest puts it
        return headers[0][1]
    for name, value in headers:
        if name == _H_LINEAGE:
            return value
    return None


def _where(delivered: Sequence[Delivered], start: int, stop: int) -> tuple[list[int], list[int]]:
    """Partitions and offsets of ``delivered[start:stop]``."""
    if isinstance(delivered, Deliveries):
        return delivered.partitions[start:stop], delivered.offsets[start:stop]
    chosen = delivered[start:stop]
    return [d.partition for d in chosen], [d.offset for d in chosen]


def _ids(ids: Iterable[bytes]) -> str:
    return b" ".join(ids).decode("ascii", "replace")


def batch_hops(
    stage: str,
    topic: str,
    records: Sequence[Record],
    result: BatchResult,
    retries: Sequence[Outgoing],
    delivered: Sequence[Delivered],
    now_ms: int,
    output_topics: Sequence[str],
    retry_topic: str,
    dlq_topic: str,
    lineage_partitions: int = 1,
) -> list[Partitioned]:
    """The hops of one delivered batch: the records (format 2) to produce to ``topic``,
    which has ``lineage_partitions`` partitions, each to its id's; and the
    ``emitted`` records of its outputs made from state.

    ``delivered`` is the broker's answer for outputs, then ``retries``, then dead
    letters, in that order (as :class:`pipeline.engine.runner.StageRunner` sends
    them); ``output_topics`` names each output's topic.
    """
    if not records:
        return []
    in_topic, in_partition = records[0].topic, records[0].partition
    n_out, n_retry = len(result.outputs), len(retries)
    groups: list[tuple[str, dict[str, Any], int]] = []  # (outcome, group, size)

    # passed: outputs made from an input record (not from state: see ``counted``)
    ids: list[bytes] = []
    in_offsets: list[int] = []
    parents: list[str] | None = None
    picked: list[int] | None = None
    for index, record in enumerate(result.outputs):
        lineage = _lineage(record.headers)
        if lineage is None or record.source_offset is None:
            if picked is None:
                picked = list(range(index))
            continue
        parent = record.parent
        if parent is not None:
            if parents is None:
                parents = [""] * len(ids)
            parents.append(parent.decode("ascii", "replace"))
        elif parents is not None:
            parents.append("")
        ids.append(lineage)
        in_offsets.append(record.source_offset)
        if picked is not None:
            picked.append(index)
    if ids:
        partitions, offsets = _where(delivered, 0, n_out)
        topics = list(output_topics)
        if picked is not None:
            partitions = [partitions[i] for i in picked]
            offsets = [offsets[i] for i in picked]
            topics = [topics[i] for i in picked]
        group: dict[str, Any] = {
            "outcome": PASSED,
            "ids": _ids(ids),
            "in_offsets": in_offsets,
        }
        if len(set(topics)) == 1:
            group["out"] = topics[0]
        else:
            group["outs"] = topics
        group["partitions"], group["offsets"] = partitions, offsets
        if parents is not None:
            group["parents"] = parents
        groups.append((PASSED, group, len(ids)))

    def coordinated(
        outcome: str, out: str, start: int, items: Sequence[tuple[bytes | None, list[Any], str]]
    ) -> None:
        kept = [(i, item) for i, item in enumerate(items) if item[0] is not None]
        if not kept:
            return
        partitions, offsets = _where(delivered, start, start + len(items))
        group = {
            "outcome": outcome,
            "ids": _ids(item[0] for _, item in kept),  # type: ignore[misc]
            "in": [item[1] for _, item in kept],
            "out": out,
            "partitions": [partitions[i] for i, _ in kept],
            "offsets": [offsets[i] for i, _ in kept],
            "reasons": [item[2] for _, item in kept],
        }
        groups.append((outcome, group, len(kept)))

    if retries:
        items = []
        for _, _, _, headers, _ in retries:
            at = retry.origin(headers, in_topic, in_partition, -1, 0)
            reason = dict(headers).get(retry.REASON, b"").decode()
            items.append((_lineage(headers), [at.topic, at.partition, at.offset], reason))
        coordinated(RETRY, retry_topic, n_out, items)
    if result.dead:
        items = [
            (_lineage(d.headers), [d.topic, d.partition, d.offset], str(d.reason))
            for d in result.dead
        ]
        coordinated(DEAD_LETTER, dlq_topic, n_out + n_retry, items)
    if result.counted:
        group = {
            "outcome": COUNTED,
            "ids": " ".join([lineage_id for _, lineage_id, _ in result.counted]),
            "in_offsets": [offset for offset, _, _ in result.counted],
            "windows": [ref for _, _, ref in result.counted],
        }
        groups.append((COUNTED, group, len(result.counted)))
    dropped = [
        (
            _lineage(r.headers)
            or contract.entry_lineage_id(r.timestamp_ms, r.topic, r.partition, r.offset).encode(),
            r.offset,
        )
        for r in result.dropped
    ]
    if dropped:
        group = {
            "outcome": DROPPED,
            "ids": _ids(lineage for lineage, _ in dropped),
            "in_offsets": [offset for _, offset in dropped],
        }
        groups.append((DROPPED, group, len(dropped)))
    key = f"{stage}/{in_topic}/{in_partition}".encode()
    head = {"v": FORMAT, "stage": stage, "at": now_ms, "in": [in_topic, in_partition]}
    out = place(topic, key, head, [(g, size) for _, g, size in groups], lineage_partitions)
    if result.emitted_from_state:
        out += emitted_records(
            topic, key, head, result.outputs, delivered, output_topics, lineage_partitions
        )
    return out


def stored_hops(
    stage: str,
    topic: str,
    stored: Sequence[tuple[str, int, int, str, Any]],
    now_ms: int,
    partitions: int = 1,
) -> list[Partitioned]:
    """The ``stored`` hops of a sink's records, ``(topic, partition, offset, lineage
    id, ref)`` each: per input partition, one lineage record per lineage partition
    (format 2, a ``stored`` group with ``refs`` beside ``ids``)."""
    by_partition: dict[tuple[str, int], list[tuple[int, str, Any]]] = {}
    for in_topic, in_partition, offset, lineage_id, ref in stored:
        by_partition.setdefault((in_topic, in_partition), []).append((offset, lineage_id, ref))
    out: list[Partitioned] = []
    for (in_topic, in_partition), items in by_partition.items():
        group = {
            "outcome": STORED,
            "ids": " ".join(lineage_id for _, lineage_id, _ in items),
            "in_offsets": [offset for offset, _, _ in items],
            "refs": [ref for _, _, ref in items],
        }
        key = f"{stage}/{in_topic}/{in_partition}".encode()
        head = {"v": FORMAT, "stage": stage, "at": now_ms, "in": [in_topic, in_partition]}
        out += place(topic, key, head, [(group, len(items))], partitions)
    return out


def state_hops(
    stage: str,
    topic: str,
    partition: int,
    outputs: Sequence[Any],
    delivered: Sequence[Delivered],
    output_topics: Sequence[str],
    now_ms: int,
    partitions: int = 1,
) -> list[Partitioned]:
    """The ``emitted`` records of outputs a stateful stage made from state with no
    input (an idle partition's windows closing): ``partition`` is the stage's."""
    key = f"{stage}/-/{partition}".encode()
    head = {"v": FORMAT, "stage": stage, "at": now_ms, "in": ["", partition]}
    return emitted_records(topic, key, head, outputs, delivered, output_topics, partitions)


def expand(value: bytes | None) -> list[dict[str, Any]]:
    """The hops in one lineage record's value (format 2, or a format-1 hop)."""
    if not value:
        return []
    doc = orjson.loads(value)
    if not isinstance(doc, dict):
        return []
    if doc.get("v") != FORMAT:
        return [doc] if isinstance(doc.get("id"), str) else []
    stage, at = doc["stage"], doc["at"]
    in_topic, in_partition = doc["in"]
    found: list[dict[str, Any]] = []
    for group in doc["groups"]:
        outcome = group["outcome"]
        if outcome == EMITTED:
            continue
        ids = group["ids"].split(" ") if group["ids"] else []
        out = group.get("out")
        outs = group.get("outs")
        parents = group.get("parents")
        for i, lineage_id in enumerate(ids):
            if outs is not None:
                out = outs[i]
            if "in" in group:
                source = group["in"][i]
            else:
                source = [in_topic, in_partition, group["in_offsets"][i]]
            hop: dict[str, Any] = {
                "id": lineage_id,
                "stage": stage,
                "in": source,
                "out": None if out is None else [out, group["partitions"][i], group["offsets"][i]],
                "outcome": outcome,
            }
            if "reasons" in group:
                hop["reason"] = group["reasons"][i]
            if "windows" in group:
                hop["window"] = group["windows"][i]
            if "refs" in group:
                hop["ref"] = group["refs"][i]
            if parents is not None and parents[i]:
                hop["parent"] = parents[i]
            hop["at"] = at
            found.append(hop)
    return found


# -- tracing one record ---------------------------------------------------------
