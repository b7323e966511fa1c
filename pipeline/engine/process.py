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

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from pipeline.engine.emit import Emitter, emits_of
from pipeline.engine.result import BatchResult
from pipeline.errors import ConfigError, InvalidMessage, RetryableError
from pipeline.records import OutRecord, Record
from pipeline.stage import StageContext, StageDef

_FAILED: Any = object()


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

    def attempt(self, record: Record, result: BatchResult, call: Callable[[], Any]) -> Any:
        """``call()``'s value, or :data:`_FAILED` once its failure is accounted for in
        ``result``: a dead letter (bad input, or a bug with ``on_error:
        dead_letter``) or a retry. A bug with ``on_error: crash``, and a ConfigError
        (a declaration problem, not this record's), are raised."""
        try:
            return call()
        except ConfigError:
            raise
        except InvalidMessage as exc:
            result.reject(record, exc)
        except RetryableError as exc:
            result.retry(record, exc)
        except Exception as exc:
            if self.crash:
                raise
            result.bug(record, exc)
        return _FAILED


class StatelessEngine(Engine):
    """A per-record or batch stage, bound to its context."""

    def process(self, partition: int, records: Sequence[Record]) -> BatchResult:
        if self.definition.kind == "batch":
            return self._batch(records)
        return self._per_record(records)

    def _per_record(self, records: Sequence[Record]) -> BatchResult:
        result = self.new_result()
        ctx, outputs = self.ctx, result.outputs
        for record in records:
            ctx._duplicate = False
            outs = self.attempt(record, result, partial(self._outputs_of, record))
            if outs is _FAILED:
                continue
            if ctx._duplicate:
                result.duplicates += 1
            elif outs:
                outputs.extend(outs)
            else:
                result.dropped.append(record)
        return result

    def _outputs_of(self, record: Record) -> list[OutRecord]:
        return self.emitter.from_record(record, emits_of(self.processor.process(record)))

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
            alone_batch = partial(self.processor.process_batch, [record], alone)
            if self.attempt(record, result, alone_batch) is _FAILED:
                continue
            result.outputs.extend(alone.outputs)
            result.dead.extend(alone.dead)
            result.rejected_offsets.extend(alone.rejected_offsets)
            result.retryable.extend(alone.retryable)
            result.duplicates += alone.duplicates
            result.dropped.extend(alone.dropped)
        return result
