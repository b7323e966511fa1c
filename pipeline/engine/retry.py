"""Bounded retries: where a :class:`~pipeline.errors.RetryableError` goes next.

A retryable record goes to the stage's retry topic with the ``retry.*`` headers
(:mod:`dlq.retry`), due after the policy's backoff; once it has used
``max_attempts`` (or at once, for a stage without a retry policy) it is
dead-lettered with ``dlq.attempts`` and its first coordinates.
"""

from __future__ import annotations

from dlq import retry
from pipeline.engine.result import BatchResult
from pipeline.records import Outgoing
from pipeline.settings import RetryPolicy


def route_retries(policy: RetryPolicy | None, result: BatchResult, now_ms: int) -> list[Outgoing]:
    """The retry records of ``result``; records out of attempts become dead letters
    in ``result``. Clears ``result.retryable``."""
    outgoing: list[Outgoing] = []
    if not result.retryable:
        return outgoing
    for record, exc in result.retryable:
        failed = retry.attempts(record.headers) + 1
        if policy is None or failed >= policy.max_attempts:
            result.reject(record, exc)
            continue
        at = retry.origin(
            record.headers, record.topic, record.partition, record.offset, record.timestamp_ms
        )
        due = now_ms + int(policy.delay_s(failed) * 1000)
        headers = retry.retry_headers(
            record.headers, at, failed, due, str(exc.reason), str(exc), now_ms
        )
        outgoing.append((policy.topic, record.key, record.value, headers, at.timestamp_ms))
    result.retryable.clear()
    return outgoing
