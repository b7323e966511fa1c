"""Dead letters for people and machines: summaries by stage and reason, payload
previews that never print terminal escapes, and JSON views (``dlq show``)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dlq.read import UNKNOWN_REASON, StoredDeadLetter
from pipeline.timeparse import from_ms

PREVIEW_BYTES = 512


@dataclass(frozen=True, slots=True)
class SummaryRow:
    stage: str
    reason: str
    count: int
    oldest_failed_at_ms: int | None
    newest_failed_at_ms: int | None
    max_replay_count: int


def summarize(
    letters: Iterable[StoredDeadLetter], stage_ids: Sequence[str] = ()
) -> list[SummaryRow]:
    """Counts by stage and reason with the oldest and newest failed-at, in stage order
    (``stage_ids``), then by reason ("?", malformed, last)."""
    acc: dict[tuple[str, str], list[Any]] = {}
    for letter in letters:
        row = acc.setdefault((letter.stage, letter.reason), [0, None, None, 0])
        row[0] += 1
        at = letter.failed_at_ms
        if at is not None:
            row[1] = at if row[1] is None else min(row[1], at)
            row[2] = at if row[2] is None else max(row[2], at)
        row[3] = max(row[3], letter.replay_count)

    def order(key: tuple[str, str]) -> tuple[int, bool, str]:
        stage, reason = key
        at = stage_ids.index(stage) if stage in stage_ids else len(stage_ids)
        return (at, reason == UNKNOWN_REASON, reason)

    return [SummaryRow(s, r, *acc[(s, r)]) for s, r in sorted(acc, key=order)]


# ------------------------------------------------------------ text and JSON views


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (``…Z``)."""
    if ms is None:
        return None
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utf8_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\r\t" for c in text)


@dataclass(frozen=True, slots=True)
class Preview:
    encoding: str  # "text" | "hex" | "none"
    text: str
    size: int
    truncated: bool


def preview(data: bytes | None, limit: int = PREVIEW_BYTES) -> Preview:
    """The first ``limit`` bytes: as text when printable UTF-8, else as hex."""
    if data is None:
        return Preview("none", "", 0, False)
    head = data[:limit]
    truncated = len(data) > limit
    for cut in range(4 if truncated else 1):  # a multi-byte character may straddle the cut
        try:
            decoded = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _printable(decoded):
            return Preview("text", decoded, len(data), truncated)
        break
    return Preview("hex", head.hex(" "), len(data), truncated)


def brief(letter: StoredDeadLetter) -> dict[str, Any]:
    """The envelope of a dead letter as JSON-ready fields (no key, value, headers)."""
    return {
        "ref": letter.ref,
        "stage": letter.stage,
        "reason": letter.reason,
        "error_class": letter.error_class,
        "error_message": letter.error_message,
        "original_topic": letter.original_topic,
        "original_partition": letter.original_partition,
        "original_offset": letter.original_offset,
        "original_timestamp": iso(letter.original_timestamp_ms),
        "original_timestamp_ms": letter.original_timestamp_ms,
        "failed_at": iso(letter.failed_at_ms),
        "failed_at_ms": letter.failed_at_ms,
        "attempts": letter.attempts,
        "replay_count": letter.replay_count,
        "dlq_topic": letter.topic,
        "dlq_partition": letter.partition,
        "dlq_offset": letter.offset,
        "problems": list(letter.problems),
    }


def full(letter: StoredDeadLetter) -> dict[str, Any]:
    """Everything, bytes as base64 plus a UTF-8 text field when they decode."""
    return {
        **brief(letter),
        "key_b64": b64(letter.key),
        "key_text": utf8_text(letter.key),
        "value_b64": b64(letter.value),
        "value_text": utf8_text(letter.value),
        "headers": [
            {"name": n, "value_b64": b64(v), "value_text": utf8_text(v)} for n, v in letter.headers
        ],
    }


# ----------------------------------------------------------------------- export
