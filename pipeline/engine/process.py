"""Running a stateless stage over one partition batch.

A per-record stage is called once per record; what it returns, raises or marks
becomes that record's outcome. A batch stage gets the whole batch and the
:class:`~pipeline.engine.result.BatchResult` to write to. If a batch stage raises,
the engine cannot tell which record was at fault: it runs the batch again one
record at a time (so ``process_batch`` must keep no effect of a call that raised)
and only the records that fail alone become dead letters.

``on_error``: ``dead_letter`` turns an unexpected exception into a
``processing_error`` dead letter of that record (counted by the budget, so a
systematic bug still stops the stage); ``crash`` re-raises it, and the worker exits
without committing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.engine.emit import Emitter, emits_of
from pipeline.engine.result import BatchResult
from pipeline.errors import ConfigError, InvalidMessage, RetryableError
from pipeline.records import Record
from pipeline.stage import StageContext, StageDef


class Engine:
    """What both engines share: the stage's processor and context, and what a
    record's failure becomes."""

    stateful = False

    def __init__(
        self,
        stage_id: str,
        definition: StageDef,
        ctx: StageContext,
        emitter: Emitter,
        on_error: str = "dead_letter",
    ) -> None:
        self.stage_id = stage_id
        self.definition = definition
        self.ctx = ctx
        self.emitter = emitter
        self.crash = on_error == "crash"
        self.declared = definition.all_reasons
        self.processor: Any = definition.build(ctx)

    def new_result(self) -> BatchResult:
        return BatchResult(self.stage_id, self.declared, self.emitter)

    def failed(self, record: Record, result: BatchResult, exc: Exception) -> None:
        """Account for ``record``'s failure in ``result``: a dead letter (bad input, or
        a bug with ``on_error: dead_letter``) or a retry. Call it from an ``except``
        block: a bug with ``on_error: crash``, and a ConfigError (a declaration
        problem, not this record's), are raised again."""
        if isinstance(exc, InvalidMessage):
            result.reject(record, exc)
        elif isinstance(exc, RetryableError):
            result.retry(record, exc)
        elif self.crash or isinstance(exc, ConfigError):
            raise exc
        else:
            result.bug(record, exc)


class StatelessEngine(Engine):
    """A per-record or batch stage, bound to its context."""

    def process(self, partition: int, records: Sequence[Record]) -> BatchResult:
        if self.definition.kind == "batch":
            return self._batch(records)
        return self._per_record(records)

    def _per_record(self, records: Sequence[Record]) -> BatchResult:
        result = self.new_result()
        ctx, outputs = self.ctx, result.outputs
        process, emitter = self.processor.process, self.emitter
        for record in records:
            ctx._duplicate = False
            try:
                emits = emits_of(process(record))
                outs = emitter.from_record(record, emits) if emits else None
            except Exception as exc:
                self.failed(record, result, exc)
                continue
            if ctx._duplicate:
                result.duplicates += 1
            elif outs:
                outputs.extend(outs)
            else:
                result.dropped.append(record)
        return result

    def _batch(self, records: Sequence[Record]) -> BatchResult:
        result = self.new_result()
        try:
            self.processor.process_batch(records, result)
        except ConfigError:
            raise
        except Exception as exc:
            if self.crash and not isinstance(exc, InvalidMessage | RetryableError):
                raise
            return self._one_by_one(records)
        return result

    def _one_by_one(self, records: Sequence[Record]) -> BatchResult:
        """Each record alone: the ones that fail alone are dead letters."""
        result = self.new_result()
        for record in records:
            alone = self.new_result()
            try:
                self.processor.process_batch([record], alone)
            except Exception as exc:
                self.failed(record, result, exc)
                continue
            result.outputs.extend(alone.outputs)
            result.dead.extend(alone.dead)
            result.rejected_offsets.extend(alone.rejected_offsets)
            result.retryable.extend(alone.retryable)
            result.duplicates += alone.duplicates
            result.dropped.extend(alone.dropped)
        return result
