"""Records as stages see them, and what a stage returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlq.envelope import DeadLetter
from dlq.reasons import Reason
from pipeline.errors import InvalidMessage


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


@dataclass(slots=True)
class StageResult:
    """What a stage made of a batch. Every input is accounted for:
    ``len(inputs) == outputs_from_inputs + len(dead) + duplicates`` for 1:1 stages."""

    outputs: list[OutRecord] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0

    def reject(self, stage: str, record: InRecord, exc: InvalidMessage, attempts: int = 1) -> None:
        self.dead.append(
            DeadLetter(
                stage=stage,
                reason=Reason(exc.reason),
                error_class=type(exc).__name__,
                error_message=str(exc),
                key=record.key,
                value=record.value,
                headers=record.headers,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp_ms=record.timestamp_ms,
                attempts=attempts,
            )
        )
