"""The dead-letter envelope: original key, value and headers plus ``dlq.*`` headers.

One set of headers, used by every stage:

``dlq.stage`` ``dlq.reason`` ``dlq.error.class`` ``dlq.error.message``
``dlq.original.topic`` ``dlq.original.partition`` ``dlq.original.offset``
``dlq.original.timestamp`` ``dlq.failed-at`` ``dlq.attempts`` ``dlq.replay-count``

A previous envelope on the record (a re-driven dead letter) is replaced, except
``dlq.replay-count`` which is carried over; ``retry.*`` headers (:mod:`dlq.retry`)
are dropped. ``dlq.original.*`` name where the record entered the stage the first
time, also when it failed during a retry.

A dead letter's record time is when it failed (``dlq.failed-at``), not the
original's (kept in ``dlq.original.timestamp``; a redrive restores it): within a
partition dead letters are in time order, so a command finds a time in a DLQ by
bisection (:mod:`dlq.summary`), and the topic's retention counts from the failure.
Dead letters written before this held the original's time.

A dead letter always fits (:func:`bounded`): past ``dlq.max_payload_bytes`` its
value is a prefix, and ``dlq.payload.truncated``, ``dlq.payload.size`` and
``dlq.payload.sha256`` say so; ``dlq.original.*`` still find the whole record in its
source topic while that is retained (``pipeline dlq original REF``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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


# -- a dead letter always fits -------------------------------------------------------
#: the largest dead letter (key + value + header names and values) by default:
#: well under Kafka's default 1 MB message limit, whatever the original was
MAX_PAYLOAD_BYTES = 256 * 1024
TRUNCATED = "dlq.payload.truncated"
PAYLOAD_SIZE = "dlq.payload.size"
PAYLOAD_SHA256 = "dlq.payload.sha256"
KEY_SIZE = "dlq.key.size"
HEADERS_DROPPED = "dlq.headers.dropped"
#: original headers a dead letter keeps even when it must drop the others
_KEPT = frozenset({"lineage-id", "lineage-parent", "traceparent", "source", "schema", "ingest-ts"})


def _size(headers: Sequence[tuple[str, bytes]]) -> int:
    return sum(len(k) + len(v) for k, v in headers)


def bounded(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter's key, value and headers within ``max_bytes``.

    When they would not fit: original headers other than the contract's are dropped
    first if they take more than a quarter of the budget (``dlq.headers.dropped``
    counts them); a key over an eighth is cut to that (``dlq.key.size`` says how long
    it was); the value is cut to the prefix that fits, and ``dlq.payload.truncated``,
    ``dlq.payload.size`` and ``dlq.payload.sha256`` (of the whole original value)
    say so. A dead letter that fits is returned as it is.
    """
    size = len(key or b"") + len(value or b"") + _size(headers)
    if size <= max_bytes:
        return key, value, headers
    out = list(headers)
    if _size(out) > max_bytes // 4:
        kept = [(k, v) for k, v in out if k.startswith(PREFIX) or k in _KEPT]
        dropped = len(out) - len(kept)
        out = [(k, v[: max_bytes // 16]) for k, v in kept]
        if dropped:
            out.append((HEADERS_DROPPED, str(dropped).encode()))
    if key is not None and len(key) > max_bytes // 8:
        out.append((KEY_SIZE, str(len(key)).encode()))
        key = key[: max_bytes // 8]
    if value is not None:
        marks = [
            (TRUNCATED, b"true"),
            (PAYLOAD_SIZE, str(len(value)).encode()),
            (PAYLOAD_SHA256, hashlib.sha256(value).hexdigest().encode()),
        ]
        room = max(0, max_bytes - len(key or b"") - _size(out) - _size(marks))
        if len(value) > room:
            value = value[:room]
            out += marks
    return key, value, out


def dead_letter_record(
    dead: DeadLetter, topic: str, now_ms: int, max_bytes: int = MAX_PAYLOAD_BYTES
) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]:
    """The record to produce for ``dead`` on ``topic``: envelope on, within ``max_bytes``,
    timestamped ``now_ms`` (when it failed)."""
    key, value, headers = bounded(dead.key, dead.value, dead.envelope_headers(now_ms), max_bytes)
    return (topic, key, value, headers, now_ms)
