"""Summaries of dead letters that read a window, not whole dead-letter topics.

``pipeline dlq summary`` counts, by stage and reason, the dead letters that
failed in ``[since, until)``: per partition it finds where ``since`` begins by
bisection on the records' timestamps (a dead letter's record time is when it
failed, :mod:`dlq.envelope`; :class:`pipeline.kafka.seek.PartitionSeeker`, O(log n)
single-record fetches), starts :data:`MARGIN_MS` earlier (producers' clocks a
little apart), and reads up to :data:`MARGIN_MS` past ``until``. Which dead
letters count is decided exactly, on ``dlq.failed-at`` (on the record's own time
for a dead letter that has none: a malformed one is still shown). Beside it, the
dead letters *held* per stage (above the purge floor) come from offsets alone:
exact, O(1), for a DLQ topic one stage owns.

So the cost is the dead letters of the window, whatever the topics hold. Dead
letters written before their record time was the failure's carry the original
record's time: a window may miss those; ``--all`` (:func:`dlq.read.iter_dead_letters`)
reads everything.

:func:`run_dead_letters` counts a backfill run's dead letters from the DLQ offsets
recorded when the run started (what it wrote is after them), not from the start.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from dlq.read import Filters, Reader, StoredDeadLetter, owners_of
from dlq.view import SummaryRow, summarize
from pipeline.contract import H_SOURCE
from pipeline.kafka.seek import PartitionSeeker, ReadCost
from pipeline.settings import Settings

#: reads start this long before ``since`` and stop this long after ``until``
MARGIN_MS = 60_000
DEFAULT_WINDOW_MS = 24 * 3_600_000
#: the search for ``since`` may stop this many records before it (they are read and
#: fail the window's test)
SLACK = 64

TP = tuple[str, int]


@dataclass
class WindowSummary:
    rows: list[SummaryRow]
    since_ms: int
    until_ms: int | None
    #: per stage: dead letters above the floor (None: its DLQ topic is shared)
    held: dict[str, int | None] = field(default_factory=dict)
    cost: ReadCost = field(default_factory=ReadCost)


def _in_window(letter: StoredDeadLetter, since_ms: int, until_ms: int | None) -> bool:
    at = letter.failed_at_ms if letter.failed_at_ms is not None else letter.timestamp_ms
    if at is None:
        return False
    return at >= since_ms and (until_ms is None or at < until_ms)


def _window(
    reader: Reader,
    seeker: PartitionSeeker,
    stage: str,
    partition: int,
    since_ms: int,
    until_ms: int | None,
) -> Iterator[StoredDeadLetter]:
    topic = reader.settings.stage(stage).dlq
    start, _ = seeker.offset_for_time((topic, partition), since_ms - MARGIN_MS, SLACK)
    start = max(start, reader.floor(topic, partition))
    stop = None if until_ms is None else until_ms + MARGIN_MS
    for letter in reader.dead_letters(stage, partition, start):
        if stop is not None and letter.timestamp_ms is not None and letter.timestamp_ms >= stop:
            return
        yield letter


def window_summary(
    settings: Settings,
    stages: Sequence[str],
    filters: Filters,
    since_ms: int,
    until_ms: int | None = None,
) -> WindowSummary:
    """Dead letters of ``stages`` that failed in ``[since_ms, until_ms)`` and pass
    ``filters`` (reasons), counted by stage and reason; and what each stage holds."""
    cost = ReadCost()
    letters: list[StoredDeadLetter] = []
    held: dict[str, int | None] = {}
    with Reader(settings, cost) as reader, PartitionSeeker(settings, cost=cost) as seeker:
        partitions = reader.prepare([settings.stage(s).dlq for s in stages])
        for stage in stages:
            topic = settings.stage(stage).dlq
            shared = len(owners_of(settings, topic)) > 1
            held[stage] = None if shared else 0
            for partition in partitions[topic]:
                if not shared:
                    end, floor = reader.end(topic, partition), reader.floor(topic, partition)
                    held[stage] = (held[stage] or 0) + max(0, end - floor)
                for letter in _window(reader, seeker, stage, partition, since_ms, until_ms):
                    if _in_window(letter, since_ms, until_ms) and filters.matches_reason(letter):
                        letters.append(letter)
    return WindowSummary(summarize(letters, settings.stage_ids), since_ms, until_ms, held, cost)


def dlq_offsets(settings: Settings) -> dict[str, int]:
    """Every stage's DLQ partitions' end offsets now, ``"topic:partition" -> offset``
    (what a backfill run records when it starts)."""
    with Reader(settings) as reader:
        topics = list(dict.fromkeys(settings.stage(s).dlq for s in settings.stage_ids))
        partitions = reader.prepare(topics)
        return {f"{t}:{p}": reader.end(t, p) for t, ps in partitions.items() for p in ps}


def run_dead_letters(
    settings: Settings,
    source: str,
    start_offsets: Mapping[str, int] | None,
    started_ms: int,
) -> dict[str, dict[str, int]]:
    """A backfill run's dead letters (``source`` header ``backfill:<run-id>``) per stage
    and reason, read from ``start_offsets`` (the DLQs' ends when it started); for a
    run that recorded none, from its start time by bisection."""
    wanted = source.encode()
    counts: dict[str, dict[str, int]] = {}
    with Reader(settings) as reader, PartitionSeeker(settings) as seeker:
        topics = list(dict.fromkeys(settings.stage(s).dlq for s in settings.stage_ids))
        partitions = reader.prepare(topics)
        for topic in topics:
            owners = owners_of(settings, topic)
            for partition in partitions[topic]:
                start = (start_offsets or {}).get(f"{topic}:{partition}")
                earliest = 0
                if start is None:
                    earliest = started_ms - MARGIN_MS
                    start, _ = seeker.offset_for_time((topic, partition), earliest, SLACK)
                for msg in reader.records(topic, partition, start):
                    headers = dict(msg.headers() or [])
                    if headers.get(H_SOURCE) != wanted or msg.timestamp()[1] < earliest:
                        continue
                    holder = (headers.get("dlq.stage") or b"").decode("utf-8", "replace")
                    stage = holder if holder in owners else owners[0]
                    reason = (headers.get("dlq.reason") or b"?").decode("utf-8", "replace")
                    by_reason = counts.setdefault(stage, {})
                    by_reason[reason] = by_reason.get(reason, 0) + 1
    return counts
