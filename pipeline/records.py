"""Records as stages see them, and what a stage returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlq import retry
from dlq.envelope import DeadLetter
from dlq.reasons import Reason
from pipeline.errors import InvalidMessage, RetryableError


@dataclass(frozen=True, slots=True)
class InRecord:
    """One consumed record: bytes and coordinates, nothing decoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(slots=True)
class OutRecord:
    """One record to produce to the stage's output topic (keyed by device id)."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None = None
    #: offset of the input record it was made from (1:1 stages), for lineage hops
    source_offset: int | None = None


@dataclass(slots=True)
class StageResult:
    """What a stage made of a batch. Every input is accounted for:
    ``len(inputs) == outputs_from_inputs + len(dead) + duplicates`` for 1:1 stages."""

    outputs: list[OutRecord] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    #: records that may succeed later; the runner retries or dead-letters them
    retryable: list[tuple[InRecord, RetryableError]] = field(default_factory=list)
    #: offsets (in the consumed topic) of the records in ``dead``
    rejected_offsets: list[int] = field(default_factory=list)

    def reject(self, stage: str, record: InRecord, exc: InvalidMessage | RetryableError) -> None:
        """Dead-letter ``record`` (InvalidMessage, or a RetryableError out of attempts).

        A record that came back from the retry topic keeps its first coordinates
        and counts this attempt in ``dlq.attempts``."""
        at = retry.origin(
            record.headers, record.topic, record.partition, record.offset, record.timestamp_ms
        )
        self.dead.append(
            DeadLetter(
                stage=stage,
                reason=Reason(exc.reason),
                error_class=type(exc).__name__,
                error_message=str(exc),
                key=record.key,
                value=record.value,
                headers=record.headers,
                topic=at.topic,
                partition=at.partition,
                offset=at.offset,
                timestamp_ms=at.timestamp_ms,
                attempts=retry.attempts(record.headers) + 1,
            )
        )
        self.rejected_offsets.append(record.offset)
