"""Running a sink: a stage whose effect is outside Kafka (:class:`~pipeline.stage.Sink`).

A sink's batch yields no outputs, only dead letters, ``stored`` records (lineage
hops naming the row or file) and durable offsets. What the engine adds to the
sink's own ``write``:

* a sink that does not buffer has made a batch durable when ``write`` returns: the
  engine marks the batch's last offset durable;
* an unexpected exception: like a batch stage, the records are written again one
  at a time, and only those that fail alone become dead letters (``on_error:
  dead_letter``), or the worker exits (``crash``);
* :class:`~pipeline.errors.Unavailable` always goes up to the runtime, which runs
  the batch again later (records written alone before it was raised are written
  again then: sinks write idempotently);
* ``flush_due`` (time-based rolling), ``drop`` (partitions revoked) and
  ``on_committed`` are passed on when the sink has them.

A sink may block on I/O: :attr:`SinkEngine.blocking` tells the runtime to run it off
the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.engine.process import Engine
from pipeline.engine.result import BatchResult
from pipeline.errors import ConfigError, InvalidMessage, RetryableError, Unavailable
from pipeline.records import Record


class SinkEngine(Engine):
    """A sink bound to its context."""

    #: the runtime runs :meth:`process` and :meth:`flush` in a thread
    blocking = True

    @property
    def buffers(self) -> bool:
        """Does the sink keep records after ``write`` returns (so the runtime must hold
        their offsets until it reports them durable)?"""
        return bool(getattr(self.processor, "buffers", False))

    def process(self, partition: int, records: Sequence[Record]) -> BatchResult:
        result = self.new_result()
        if not records:
            return result
        try:
            self.processor.write(records, result)
        except (ConfigError, Unavailable):
            raise
        except Exception as exc:
            if self.crash and not isinstance(exc, InvalidMessage | RetryableError):
                raise
            result = self._one_by_one(records)
        if not self.buffers:
            result.durable(records[0].topic, partition, records[-1].offset)
        return result

    def _one_by_one(self, records: Sequence[Record]) -> BatchResult:
        """Each record alone: the ones that fail alone are dead letters."""
        result = self.new_result()
        write = self.processor.write
        for record in records:
            alone = self.new_result()
            try:
                write([record], alone)
            except (ConfigError, Unavailable):
                raise
            except Exception as exc:
                self.failed(record, result, exc)
                continue
            result.dead.extend(alone.dead)
            result.rejected_offsets.extend(alone.rejected_offsets)
            result.retryable.extend(alone.retryable)
            result.duplicates += alone.duplicates
            result.dropped.extend(alone.dropped)
            result.stored_at.extend(alone.stored_at)
            for (topic, partition), through in alone.durable_through.items():
                result.durable(topic, partition, through)
        return result

    def flush(self, now: float) -> BatchResult | None:
        """What the sink's ``flush_due`` stored and made durable (None: nothing)."""
        flush_due = getattr(self.processor, "flush_due", None)
        if flush_due is None:
            return None
        result = self.new_result()
        flush_due(now, result)
        if not (result.stored_at or result.durable_through or result.dead):
            return None
        return result

    def drop(self) -> None:
        """Forget buffered records (their partitions move to another worker)."""
        drop = getattr(self.processor, "drop", None)
        if drop is not None:
            drop()

    def committed(self, topic: str, partition: int, offset: int) -> None:
        """The group committed ``offset`` (the next to read) of ``topic[partition]``."""
        hook = getattr(self.processor, "on_committed", None)
        if hook is not None:
            hook(topic, partition, offset)

    def close(self) -> None:
        close: Any = getattr(self.processor, "close", None)
        if close is not None:
            close()
