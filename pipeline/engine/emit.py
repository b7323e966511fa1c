"""From what a stage emits to what the engine produces: the message contract applied.

Every output carries the contract's headers (:mod:`pipeline.contract`):

* made from an input record: the input's headers (``retry.*`` dropped), a child
  ``traceparent``, the emit's ``schema`` (else the input's), the emit's own headers
  on top. A record that entered without a ``lineage-id`` (a stage that reads a topic
  fed from outside the pipeline) gets one here, derived from its coordinates, with
  ``source: live`` and ``ingest-ts``: lineage starts where a record enters.
* several outputs of one input to one topic (a fan-out): each gets its own lineage
  id, derived from the input's and its position, and ``lineage-parent`` naming the
  input's, so each counts once downstream and traces back to its parent. One output
  per topic keeps the input's lineage id (the same record routed on).
* made from state (a closed window): a new trace, the lane's ``source``, and a
  lineage id derived from the stage, key and value (a window emitted again after a
  crash gets the same id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline import contract
from pipeline.errors import ConfigError
from pipeline.records import Emit, OutRecord, Record, header_pairs, to_bytes

_LINEAGE = contract.H_LINEAGE
_PARENT = contract.H_LINEAGE_PARENT
_SOURCE, _SCHEMA = contract.H_SOURCE, contract.H_SCHEMA
_INGEST_TS, _TRACEPARENT = contract.H_INGEST_TS, contract.H_TRACEPARENT
_LIVE = contract.SOURCE_LIVE.encode()


def emits_of(value: Any) -> list[Emit]:
    """A stage's return value (None, one Emit, or an iterable of them) as a list."""
    if value is None:
        return []
    if isinstance(value, Emit):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, bytes | str | dict):
        found = list(value)
        for item in found:
            if not isinstance(item, Emit):
                raise TypeError(f"a stage yielded {type(item).__name__}, not an Emit")
        return found
    raise TypeError(f"a stage returned {type(value).__name__}, not None, an Emit or Emits")


def _replace(headers: list[tuple[str, bytes]], updates: Sequence[tuple[str, bytes]]) -> None:
    """Set each of ``updates`` in ``headers``: replace the first pair of that name
    (dropping later ones), or append."""
    for name, value in updates:
        at = -1
        for i, (k, _) in enumerate(headers):
            if k == name:
                at = i
                break
        if at < 0:
            headers.append((name, value))
            continue
        headers[at] = (name, value)
        headers[at + 1 :] = [p for p in headers[at + 1 :] if p[0] != name]


def derived_lineage_id(parent: str, index: int) -> str:
    """A child's lineage id: the parent's time part, a random part hashed from the
    parent and the child's position (stable across re-deliveries)."""
    digest = hashlib.blake2b(f"{parent}/{index}".encode(), digest_size=10).digest()
    return parent[:10] + contract.ulid_str(bytes(6) + digest)[10:]


class Emitter:
    """Turns a stage's emits into :class:`OutRecord` s for one stage."""

    def __init__(self, stage_id: str, outputs: Sequence[str], now_ms: Any) -> None:
        self.stage_id = stage_id
        self.outputs = frozenset(outputs)
        self.default = outputs[0] if outputs else None
        self._now_ms = now_ms

    def topic_of(self, emit_topic: str | None) -> str | None:
        if emit_topic is None:
            if self.default is None:
                raise ConfigError(f"stage {self.stage_id} has no output; it cannot emit")
            return None
        if emit_topic not in self.outputs:
            raise ConfigError(
                f"stage {self.stage_id} emitted to {emit_topic!r}, not one of its outputs "
                f"{sorted(self.outputs)}; declare it under stages.{self.stage_id}.outputs"
            )
        return None if emit_topic == self.default else emit_topic

    def headers_from(
        self, source: Record, schema: bytes | None, extra: Sequence[tuple[str, bytes]] = ()
    ) -> list[tuple[str, bytes]]:
        """The contract's headers of an output made from ``source``."""
        if schema is not None:
            headers = contract.next_hop(source.headers, schema)
        else:
            incoming = contract.header_map(source.headers)
            headers = contract.next_hop_headers(incoming, "")
            headers = [p for p in headers if p[0] != _SCHEMA or p[1]]
        if not any(name == _LINEAGE for name, _ in headers):
            lineage = contract.entry_lineage_id(
                source.timestamp_ms, source.topic, source.partition, source.offset
            )
            headers.insert(0, (_LINEAGE, lineage.encode()))
            if not any(name == _SOURCE for name, _ in headers):
                headers.append((_SOURCE, _LIVE))
            if not any(name == _INGEST_TS for name, _ in headers):
                headers.append((_INGEST_TS, str(self._now_ms()).encode()))
        if extra:
            _replace(headers, extra)
        return headers

    def from_record(self, source: Record, emits: list[Emit]) -> list[OutRecord]:
        """The outputs of one input record."""
        outs: list[OutRecord] = []
        for emit in emits:
            schema = emit.schema.encode() if emit.schema is not None else None
            outs.append(
                OutRecord(
                    to_bytes(emit.key),
                    to_bytes(emit.value),
                    self.headers_from(source, schema, header_pairs(emit.headers)),
                    emit.timestamp_ms if emit.timestamp_ms is not None else source.timestamp_ms,
                    source.offset,
                    self.topic_of(emit.topic),
                )
            )
        if len(outs) > 1:
            self._split_lineage(source, outs)
        return outs

    def _split_lineage(self, source: Record, outs: list[OutRecord]) -> None:
        per_topic: dict[str | None, int] = {}
        for out in outs:
            per_topic[out.topic] = per_topic.get(out.topic, 0) + 1
        if all(n == 1 for n in per_topic.values()):
            return
        index: dict[str | None, int] = {}
        for out in outs:
            if per_topic[out.topic] == 1:
                continue
            i = index[out.topic] = index.get(out.topic, -1) + 1
            parent = next((v for k, v in out.headers if k == _LINEAGE), b"").decode()
            child = derived_lineage_id(parent, i)
            _replace(out.headers, [(_LINEAGE, child.encode()), (_PARENT, parent.encode())])
            out.parent = parent.encode()

    def from_state(self, lane: str, emits: list[Emit], now_ms: int) -> list[OutRecord]:
        """Outputs made from state (no input record): a new trace each."""
        outs: list[OutRecord] = []
        for emit in emits:
            key, value = to_bytes(emit.key), to_bytes(emit.value)
            ts = emit.timestamp_ms if emit.timestamp_ms is not None else now_ms
            digest = hashlib.blake2b(value or b"", digest_size=8).hexdigest()
            lineage = contract.lineage_id(ts, self.stage_id, key, digest)
            headers: list[tuple[str, bytes]] = [
                (_LINEAGE, lineage.encode()),
                (_TRACEPARENT, contract.new_traceparent_bytes()),
                (_SOURCE, lane.encode() if lane else _LIVE),
            ]
            if emit.schema is not None:
                headers.append((_SCHEMA, emit.schema.encode()))
            extra = header_pairs(emit.headers)
            if extra:
                _replace(headers, extra)
            outs.append(OutRecord(key, value, headers, ts, None, self.topic_of(emit.topic)))
        return outs
