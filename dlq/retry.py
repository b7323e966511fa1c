"""Retry headers: a record waiting in ``iot.<stage>.retry`` for another attempt.

A stage that raises :class:`~pipeline.errors.RetryableError` for a record does not
block: the record goes to the stage's retry topic with these headers, and the
stage's retry agent re-runs it when ``retry.due-at`` has passed. After
``max_attempts`` failed attempts it is dead-lettered with ``dlq.attempts`` and the
*original* topic/partition/offset (not the retry topic's).

``retry.attempts``           failed attempts so far (1 after the first failure)
``retry.due-at``             epoch ms before which the record must not be retried
``retry.reason``             reason code of the last failure (:mod:`dlq.reasons`)
``retry.error.message``      short, payload-free message of the last failure
``retry.original.topic``     where the record was first consumed …
``retry.original.partition``
``retry.original.offset``
``retry.original.timestamp``
``retry.first-failed-at``    epoch ms of the first failure

Every ``retry.*`` header is removed from a stage's outputs and dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "retry."
ATTEMPTS = "retry.attempts"
DUE_AT = "retry.due-at"
REASON = "retry.reason"
ERROR_MESSAGE = "retry.error.message"
ORIGINAL_TOPIC = "retry.original.topic"
ORIGINAL_PARTITION = "retry.original.partition"
ORIGINAL_OFFSET = "retry.original.offset"
ORIGINAL_TIMESTAMP = "retry.original.timestamp"
FIRST_FAILED_AT = "retry.first-failed-at"

Headers = Sequence[tuple[str, bytes]]


def _int(headers: Headers, name: str) -> int | None:
    for key, value in headers:
        if key == name:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def attempts(headers: Headers) -> int:
    """Failed attempts recorded on the record (0 for a record never retried)."""
    return max(0, _int(headers, ATTEMPTS) or 0)


def due_at_ms(headers: Headers) -> int:
    """When the record may be retried (0: now)."""
    return _int(headers, DUE_AT) or 0


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record entered the stage the first time."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    first_failed_at_ms: int | None


def origin(headers: Headers, topic: str, partition: int, offset: int, timestamp_ms: int) -> Origin:
    """The record's first coordinates: from ``retry.original.*`` if it is a retry,
    else the ones given (the record's own)."""
    original_topic = next((v for k, v in headers if k == ORIGINAL_TOPIC), None)
    part, off = _int(headers, ORIGINAL_PARTITION), _int(headers, ORIGINAL_OFFSET)
    if original_topic is None or part is None or off is None:
        return Origin(topic, partition, offset, timestamp_ms, None)
    return Origin(
        original_topic.decode("utf-8", "replace"),
        part,
        off,
        _int(headers, ORIGINAL_TIMESTAMP) or timestamp_ms,
        _int(headers, FIRST_FAILED_AT),
    )


def strip(headers: Headers) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers if not k.startswith(PREFIX)]


def retry_headers(
    headers: Headers,
    at: Origin,
    failed_attempts: int,
    due_at: int,
    reason: str,
    message: str,
    now_ms: int,
) -> list[tuple[str, bytes]]:
    """The record's headers (minus older ``retry.*``) plus the retry set."""
    return [
        *strip(headers),
        (ATTEMPTS, str(failed_attempts).encode()),
        (DUE_AT, str(due_at).encode()),
        (REASON, reason.encode()),
        (ERROR_MESSAGE, message[:512].encode("utf-8", "replace")),
        (ORIGINAL_TOPIC, at.topic.encode()),
        (ORIGINAL_PARTITION, str(at.partition).encode()),
        (ORIGINAL_OFFSET, str(at.offset).encode()),
        (ORIGINAL_TIMESTAMP, str(at.timestamp_ms).encode()),
        (FIRST_FAILED_AT, str(at.first_failed_at_ms or now_ms).encode()),
    ]
