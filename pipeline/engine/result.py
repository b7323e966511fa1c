"""What a stage made of one partition batch: :class:`BatchResult`.

Every input record is accounted for exactly once: written (``outputs`` with its
offset as ``source_offset``), dead-lettered (``dead`` / ``rejected_offsets``),
waiting for a retry (``retryable``), a ``duplicate``, ``counted`` into state,
``stored`` by a sink (``stored_at``; a buffering sink's record may be stored by a
later batch or flush), or ``dropped`` (the stage wrote nothing for it). It is also
the :class:`Outputs` a batch stage writes to, and the
:class:`~pipeline.stage.SinkOutputs` a sink writes to.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from dlq import retry
from dlq.envelope import DeadLetter
from dlq.reasons import PROCESSING_ERROR
from pipeline.contract import H_LINEAGE, entry_lineage_id
from pipeline.errors import InvalidMessage, RetryableError
from pipeline.records import OutRecord, Record, header_pairs, to_bytes

#: frames of a bug's traceback kept in its dead letter
_TRACE_FRAMES = 3
_MAX_TRACE = 1500


def bug_summary(exc: BaseException) -> str:
    """``Class: message`` and the innermost frames, for a ``processing_error``
    dead letter: enough to find the line, bounded, no locals."""
    frames = traceback.extract_tb(exc.__traceback__)[-_TRACE_FRAMES:]
    where = " <- ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in frames[::-1]
    )
    text = f"{type(exc).__name__}: {exc}"
    if where:
        text += f" at {where}"
    return text[:_MAX_TRACE]


class BatchResult:
    """Outputs, dead letters, retries and state writes of one batch, in order."""

    __slots__ = (
        "append",
        "counted",
        "dead",
        "declared",
        "dropped",
        "duplicates",
        "durable_through",
        "emitted_from_state",
        "emitter",
        "lanes_ended",
        "outputs",
        "rejected_offsets",
        "retried",
        "retryable",
        "stage_id",
        "stored_at",
        "writes",
    )

    def __init__(self, stage_id: str, declared: Mapping[str, str], emitter: Any = None) -> None:
        self.stage_id = stage_id
        self.declared = declared
        self.emitter = emitter
        self.outputs: list[OutRecord] = []
        #: ``append(out)``: write ``out`` as it is (the stage built its headers); the
        #: list's own method, as a batch stage calls it once per record
        self.append = self.outputs.append
        self.dead: list[DeadLetter] = []
        self.duplicates = 0
        #: records the stage wrote nothing for (filtered out)
        self.dropped: list[Record] = []
        self.retryable: list[tuple[Record, RetryableError]] = []
        #: records sent to the retry topic (by the runner), in the order it sends them
        self.retried: list[Record] = []
        self.rejected_offsets: list[int] = []
        #: (input offset, lineage id, ref) of every record absorbed into state
        self.counted: list[tuple[int, str, Any]] = []
        #: changelog writes (key, value; None deletes), in the order they must land
        self.writes: list[tuple[bytes, bytes | None]] = []
        #: outputs made from state (e.g. windows closed)
        self.emitted_from_state = 0
        #: backfill lanes this batch ended
        self.lanes_ended: list[str] = []
        #: a sink's stored records: (topic, partition, offset, lineage id, where)
        self.stored_at: list[tuple[str, int, int, str, Any]] = []
        #: a sink's durable offsets: (topic, partition) -> last offset durable
        self.durable_through: dict[tuple[str, int], int] = {}

    # -- Outputs (what a batch stage calls) ----------------------------------------
    def emit(
        self,
        source: Record,
        key: Any,
        value: Any,
        schema: bytes | str | None = None,
        timestamp_ms: int | None = None,
        headers: Any = None,
        topic: str | None = None,
    ) -> None:
        emitter = self.emitter
        if isinstance(schema, str):
            schema = schema.encode()
        self.outputs.append(
            OutRecord(
                to_bytes(key),
                to_bytes(value),
                emitter.headers_from(source, schema, header_pairs(headers) if headers else ()),
                timestamp_ms if timestamp_ms is not None else source.timestamp_ms,
                source.offset,
                emitter.topic_of(topic) if topic is not None else None,
            )
        )

    def dead_letter(self, source: Record, exc: InvalidMessage) -> None:
        self.reject(source, exc)

    def retry(self, source: Record, exc: RetryableError) -> None:
        if exc.reason not in self.declared:
            self.reject(source, _undeclared(self.stage_id, exc))
            return
        self.retryable.append((source, exc))

    def duplicate(self, source: Record) -> None:
        self.duplicates += 1

    def stored(self, source: Record, ref: Any) -> None:
        lineage = source.lineage_id or entry_lineage_id(
            source.timestamp_ms, source.topic, source.partition, source.offset
        )
        self.stored_at.append((source.topic, source.partition, source.offset, lineage, ref))

    def durable(self, topic: str, partition: int, through: int) -> None:
        tp = (topic, partition)
        if through > self.durable_through.get(tp, -1):
            self.durable_through[tp] = through

    # -- the engine's side ------------------------------------------------------------
    def reject(
        self,
        record: Record,
        exc: InvalidMessage | RetryableError,
        error_class: str | None = None,
    ) -> None:
        """Dead-letter ``record`` (InvalidMessage, or a RetryableError out of attempts).

        A record that came back from the retry topic keeps its first coordinates and
        counts this attempt in ``dlq.attempts``. An undeclared reason is a bug in the
        stage's code: a ``processing_error`` naming it."""
        if exc.reason not in self.declared:
            exc = _undeclared(self.stage_id, exc)
        at = retry.origin(
            record.headers, record.topic, record.partition, record.offset, record.timestamp_ms
        )
        headers = record.headers
        if not any(name == H_LINEAGE for name, _ in headers):  # it entered here
            lineage = entry_lineage_id(
                record.timestamp_ms, record.topic, record.partition, record.offset
            )
            headers = ((H_LINEAGE, lineage.encode()), *headers)
        self.dead.append(
            DeadLetter(
                stage=self.stage_id,
                reason=exc.reason,
                error_class=error_class or type(exc).__name__,
                error_message=str(exc),
                key=record.key,
                value=record.value,
                headers=headers,
                topic=at.topic,
                partition=at.partition,
                offset=at.offset,
                timestamp_ms=at.timestamp_ms,
                attempts=retry.attempts(record.headers) + 1,
            )
        )
        self.rejected_offsets.append(record.offset)

    def bug(self, record: Record, exc: BaseException) -> None:
        """Dead-letter ``record`` for an unexpected exception in stage code."""
        self.reject(record, InvalidMessage(PROCESSING_ERROR, bug_summary(exc)), type(exc).__name__)


def _undeclared(stage_id: str, exc: InvalidMessage | RetryableError) -> InvalidMessage:
    return InvalidMessage(
        PROCESSING_ERROR,
        f"stage {stage_id} raised undeclared reason {exc.reason!r} ({exc}); declare it in "
        "@stage(reasons={...})",
    )
