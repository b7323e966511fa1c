"""Bounded retries: where a :class:`~pipeline.errors.RetryableError` goes next.

A retryable record goes to the stage's retry topic with the ``retry.*`` headers
(:mod:`dlq.retry`), due after the policy's backoff; once it has used
``max_attempts`` (or at once, for a stage without a retry policy) it is
dead-lettered with ``dlq.attempts`` and its first coordinates.
"""

from __future__ import annotations

from dlq import retry
from dlq.reasons import UNWRITABLE
from pipeline.engine.result import BatchResult
from pipeline.errors import InvalidMessage
from pipeline.records import Outgoing, Record
from pipeline.settings import RetryPolicy


def route_retries(
    policy: RetryPolicy | None, result: BatchResult, now_ms: int, max_bytes: int | None = None
) -> list[Outgoing]:
    """The retry records of ``result`` (their records in ``result.retried``, in the same
    order); records out of attempts become dead letters in ``result``, and so do
    records too large to go to the retry topic (``unwritable``). Clears
    ``result.retryable``."""
    outgoing: list[Outgoing] = []
    if not result.retryable:
        return outgoing
    for record, exc in result.retryable:
        failed = retry.attempts(record.headers) + 1
        if policy is None or failed >= policy.max_attempts:
            result.reject(record, exc)
            continue
        if max_bytes is not None and len(record.value or b"") + len(record.key or b"") > max_bytes:
            result.reject(record, _too_large(policy.topic, record, max_bytes))
            continue
        at = retry.origin(
            record.headers, record.topic, record.partition, record.offset, record.timestamp_ms
        )
        due = now_ms + int(policy.delay_s(failed) * 1000)
        headers = retry.retry_headers(
            record.headers, at, failed, due, str(exc.reason), str(exc), now_ms
        )
        outgoing.append((policy.topic, record.key, record.value, headers, at.timestamp_ms))
        result.retried.append(record)
    result.retryable.clear()
    return outgoing


def _too_large(topic: str, record: Record, max_bytes: int) -> InvalidMessage:
    size = len(record.value or b"") + len(record.key or b"")
    return InvalidMessage(
        UNWRITABLE, f"a record of {size} bytes cannot go to {topic} (max {max_bytes})"
    )
