"""Where lineage records go: every hop of one lineage id in one partition.

A hop of lineage id ``L`` is written to partition :func:`lineage_partition` ``(L)``
of the lineage topic (``crc32(L) % partitions``, the declared partition count), so
tracing ``L`` reads one partition (:mod:`pipeline.lineage.find`). A batch's hops
(format 2, :mod:`pipeline.lineage.hops`) are split by that partition: one record
per partition the batch's ids fall in (per :data:`MAX_HOPS` hops), each with
the same key and head, its groups holding only that partition's hops. A fan-out
child's hop (it names a ``parent``) is written to the parent's partition too, so
the parent's trace finds its children.

Outputs made from state (a closed window: no input record, a ``state-ref``
header) are recorded as ``emitted`` groups: the state's reference and where the
output was written, in partition ``lineage_partition(ref)``, so the result a
``counted`` hop names is found the same way::

    {"v": 2, "stage": "aggregate", "at": …, "in": ["iot.enriched", 2],
     "groups": [{"outcome": "emitted", "ids": "", "refs": ["[\\"dev-1\\",…]"],
                 "out": "iot.aggregates", "partitions": [3], "offsets": [812]}]}

crc32 rather than Kafka's murmur2: the records are produced to an explicit
partition, and murmur2 in Python costs ~3 µs per hop against 0.1 µs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import orjson

from pipeline.contract import H_STATE_REF
from pipeline.records import Delivered, Deliveries, OutRecord, Partitioned

FORMAT = 2
#: hops per lineage record at most (keeps a record far below Kafka's 1 MB limit)
MAX_HOPS = 2000
EMITTED = "emitted"

#: the per-hop columns of a group (parallel to its ``ids``)
COLUMNS = (
    "in_offsets",
    "in",
    "partitions",
    "offsets",
    "reasons",
    "windows",
    "outs",
    "parents",
    "refs",
)


def lineage_partition(key: str | bytes, partitions: int) -> int:
    """The lineage topic's partition of a lineage id (or a state reference)."""
    if partitions <= 1:
        return 0
    raw = key.encode("utf-8", "replace") if isinstance(key, str) else key
    return zlib.crc32(raw) % partitions


def _chunks(groups: Sequence[tuple[dict[str, Any], int]]) -> list[list[dict[str, Any]]]:
    """Groups split into lists of at most MAX_HOPS hops each."""
    out: list[list[dict[str, Any]]] = [[]]
    room = MAX_HOPS
    for group, size in groups:
        ids = group["ids"].split(" ")
        start = 0
        while start < size:
            if room == 0:
                out.append([])
                room = MAX_HOPS
            stop = min(size, start + room)
            part = {k: v for k, v in group.items() if k not in COLUMNS and k != "ids"}
            part["ids"] = " ".join(ids[start:stop])
            for column in COLUMNS:
                if column in group:
                    part[column] = group[column][start:stop]
            out[-1].append(part)
            room -= stop - start
            start = stop
    return out


def _split(group: dict[str, Any], partitions: int) -> dict[int, tuple[dict[str, Any], int]]:
    """One group's hops by lineage partition (a child's hop also under its parent's)."""
    ids = group["ids"].split(" ")
    crc = zlib.crc32
    parts = [crc(lineage_id.encode()) % partitions for lineage_id in ids]
    parents = group.get("parents")
    chosen: dict[int, list[int]] = {}
    if parents is None:
        if parts.count(parts[0]) == len(parts):
            return {parts[0]: (group, len(ids))}
        for i, p in enumerate(parts):
            picked = chosen.get(p)
            if picked is None:
                chosen[p] = [i]
            else:
                picked.append(i)
    else:
        for i, p in enumerate(parts):
            chosen.setdefault(p, []).append(i)
            if parents[i]:
                q = crc(parents[i].encode()) % partitions
                if q != p:
                    chosen.setdefault(q, []).append(i)
        if len(chosen) == 1:
            ((p, _),) = chosen.items()
            return {p: (group, len(ids))}
    placed = {}
    columns = [c for c in COLUMNS if c in group]
    head = {k: v for k, v in group.items() if k not in COLUMNS and k != "ids"}
    for p, picked in chosen.items():
        part = dict(head)
        if len(picked) == 1:
            (i,) = picked
            part["ids"] = ids[i]
            for column in columns:
                part[column] = [group[column][i]]
        else:
            take = itemgetter(*picked)
            part["ids"] = " ".join(take(ids))
            for column in columns:
                part[column] = take(group[column])  # a tuple: written as a JSON array
        placed[p] = (part, len(picked))
    return placed


def place(
    topic: str,
    key: bytes,
    head: dict[str, Any],
    groups: Sequence[tuple[dict[str, Any], int]],
    partitions: int,
) -> list[Partitioned]:
    """The lineage records of one batch's hop groups ``(group, hops)``: per lineage
    partition, one record per :data:`MAX_HOPS` hops."""
    by_partition: dict[int, list[tuple[dict[str, Any], int]]] = {}
    if partitions <= 1:
        by_partition[0] = list(groups)
    else:
        for group, _ in groups:
            for p, placed in _split(group, partitions).items():
                by_partition.setdefault(p, []).append(placed)
    out: list[Partitioned] = []
    for p, placed_groups in by_partition.items():
        if sum(size for _, size in placed_groups) <= MAX_HOPS:
            doc = {**head, "groups": [group for group, _ in placed_groups]}
            out.append((topic, p, key, orjson.dumps(doc)))
        else:
            for chunk in _chunks(placed_groups):
                out.append((topic, p, key, orjson.dumps({**head, "groups": chunk})))
    return out


def _state_ref(headers: Sequence[tuple[str, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == H_STATE_REF:
            return value
    return None


def emitted_records(
    topic: str,
    key: bytes,
    head: dict[str, Any],
    outputs: Sequence[OutRecord],
    delivered: Sequence[Delivered],
    output_topics: Sequence[str],
    partitions: int,
) -> list[Partitioned]:
    """``emitted`` records for the outputs made from state (``source_offset`` None,
    a ``state-ref`` header); ``delivered[i]`` and ``output_topics[i]`` are where
    ``outputs[i]`` went."""
    found: dict[int, list[tuple[str, str, int, int]]] = {}
    for i, output in enumerate(outputs):
        if output.source_offset is not None:
            continue
        ref = _state_ref(output.headers)
        if ref is None:
            continue
        if isinstance(delivered, Deliveries):
            where = (delivered.partitions[i], delivered.offsets[i])
        else:
            where = (delivered[i].partition, delivered[i].offset)
        p = lineage_partition(ref, partitions)
        found.setdefault(p, []).append((ref.decode("utf-8", "replace"), output_topics[i], *where))
    out: list[Partitioned] = []
    for p, items in found.items():
        for start in range(0, len(items), MAX_HOPS):
            chunk = items[start : start + MAX_HOPS]
            topics = [t for _, t, _, _ in chunk]
            group: dict[str, Any] = {"outcome": EMITTED, "ids": "", "refs": [r for r, *_ in chunk]}
            if len(set(topics)) == 1:
                group["out"] = topics[0]
            else:
                group["outs"] = topics
            group["partitions"] = [q for _, _, q, _ in chunk]
            group["offsets"] = [o for *_, o in chunk]
            out.append((topic, p, key, orjson.dumps({**head, "groups": [group]})))
    return out


def emitted(value: bytes | None) -> list[dict[str, Any]]:
    """The ``emitted`` entries of one lineage record's value: ``{"stage", "ref", "out":
    [topic, partition, offset], "at"}`` each (``ref`` the ``state-ref`` text)."""
    if not value:
        return []
    doc = orjson.loads(value)
    if not isinstance(doc, dict) or doc.get("v") != FORMAT:
        return []
    found = []
    for group in doc["groups"]:
        if group.get("outcome") != EMITTED:
            continue
        outs = group.get("outs")
        for i, ref in enumerate(group["refs"]):
            out = outs[i] if outs is not None else group["out"]
            found.append(
                {
                    "stage": doc["stage"],
                    "ref": ref,
                    "out": [out, group["partitions"][i], group["offsets"][i]],
                    "at": doc["at"],
                }
            )
    return found
