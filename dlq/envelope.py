"""The dead-letter envelope: original key, value and headers plus ``dlq.*`` headers.

One set of headers, used by every stage:

``dlq.stage`` ``dlq.reason`` ``dlq.error.class`` ``dlq.error.message``
``dlq.original.topic`` ``dlq.original.partition`` ``dlq.original.offset``
``dlq.original.timestamp`` ``dlq.failed-at`` ``dlq.attempts`` ``dlq.replay-count``

A previous envelope on the record (a re-driven dead letter) is replaced, except
``dlq.replay-count`` which is carried over; ``retry.*`` headers (:mod:`dlq.retry`)
are dropped. ``dlq.original.*`` name where the record entered the stage the first
time, also when it failed during a retry.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlq.retry import PREFIX as RETRY_PREFIX

PREFIX = "dlq."
STAGE = "dlq.stage"
REASON = "dlq.reason"
ERROR_CLASS = "dlq.error.class"
ERROR_MESSAGE = "dlq.error.message"
ORIGINAL_TOPIC = "dlq.original.topic"
ORIGINAL_PARTITION = "dlq.original.partition"
ORIGINAL_OFFSET = "dlq.original.offset"
ORIGINAL_TIMESTAMP = "dlq.original.timestamp"
FAILED_AT = "dlq.failed-at"
ATTEMPTS = "dlq.attempts"
REPLAY_COUNT = "dlq.replay-count"

_MAX_MESSAGE = 512


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that a stage could not process, with why."""

    stage: str
    reason: str
    error_class: str
    error_message: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    attempts: int = 1

    def envelope_headers(self, failed_at_ms: int) -> list[tuple[str, bytes]]:
        """Original headers (minus an older envelope) followed by the ``dlq.*`` set."""
        replay_count = b"0"
        kept: list[tuple[str, bytes]] = []
        for name, value in self.headers:
            if name == REPLAY_COUNT:
                replay_count = value
            elif not name.startswith((PREFIX, RETRY_PREFIX)):
                kept.append((name, value))
        message = self.error_message[:_MAX_MESSAGE]
        kept += [
            (STAGE, self.stage.encode()),
            (REASON, self.reason.encode()),
            (ERROR_CLASS, self.error_class.encode()),
            (ERROR_MESSAGE, message.encode("utf-8", "replace")),
            (ORIGINAL_TOPIC, self.topic.encode()),
            (ORIGINAL_PARTITION, str(self.partition).encode()),
            (ORIGINAL_OFFSET, str(self.offset).encode()),
            (ORIGINAL_TIMESTAMP, str(self.timestamp_ms).encode()),
            (FAILED_AT, str(failed_at_ms).encode()),
            (ATTEMPTS, str(self.attempts).encode()),
            (REPLAY_COUNT, replay_count),
        ]
        return kept
