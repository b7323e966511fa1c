"""``dlq purge``: dead letters forgotten below a floor, never deleted.

Deleting records (DeleteRecords) crashes the embedded broker, so each dead-letter
partition has a *floor*: an offset stored as the committed offset of the consumer
group ``<app_prefix>-dlq-floor``. Every read ignores records below it; the broker
removes them physically when the topic's ``retention.ms`` expires. A floor never
moves backwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from dlq.read import Reader, broker_call, floor_group
from dlq.view import iso
from pipeline.errors import BrokerError
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class PartitionPurge:
    partition: int
    old_floor: int
    new_floor: int
    end: int
    purged: int  # dead letters between the old and new floor
    blocked_by: str | None = None  # REF of a dead letter without failed-at that stopped it


@dataclass(frozen=True, slots=True)
class PurgeReport:
    stage: str
    topic: str
    before_ms: int
    dry_run: bool
    partitions: tuple[PartitionPurge, ...]
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def purged(self) -> int:
        return sum(p.purged for p in self.partitions)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "topic": self.topic,
            "before": iso(self.before_ms),
            "dry_run": self.dry_run,
            "purged": self.purged,
            "by_reason": self.by_reason,
            "partitions": [
                {
                    "partition": p.partition,
                    "old_floor": p.old_floor,
                    "new_floor": p.new_floor,
                    "end": p.end,
                    "purged": p.purged,
                    "blocked_by": p.blocked_by,
                }
                for p in self.partitions
            ],
        }


def purge(settings: Settings, stage: str, before_ms: int, *, dry_run: bool = True) -> PurgeReport:
    """Move each partition's floor up to the first dead letter that failed at or after
    ``before_ms`` (scanning from the current floor; never backwards).

    A dead letter without a readable failed-at stops the floor (it is reported as
    ``blocked_by``): what cannot be dated is not hidden. Nothing is deleted; with
    ``dry_run`` nothing is changed at all.
    """
    topic = settings.stage(stage).dlq
    results: list[PartitionPurge] = []
    reasons: Counter[str] = Counter()
    with Reader(settings) as reader:
        for partition in reader.prepare([topic])[topic]:
            old = reader.floor(topic, partition)
            end = reader.end(topic, partition)
            new, count, blocked = max(old, end), 0, None
            letters = reader.dead_letters(stage, partition, old)
            try:
                for letter in letters:
                    at = letter.failed_at_ms
                    if at is None or at >= before_ms:
                        new = letter.offset
                        blocked = letter.ref if at is None else None
                        break
                    count += 1
                    reasons[letter.reason] += 1
            finally:
                letters.close()
            results.append(PartitionPurge(partition, old, max(old, new), end, count, blocked))
        moved = [p for p in results if p.new_floor > p.old_floor]
        if moved and not dry_run:
            _set_floors(reader.admin, floor_group(settings), topic, moved)
    return PurgeReport(stage, topic, before_ms, dry_run, tuple(results), dict(reasons))


def _set_floors(
    client: AdminClient, group: str, topic: str, moved: Sequence[PartitionPurge]
) -> None:
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p.partition, p.new_floor) for p in moved]
    )
    futures = broker_call(
        f"cannot store the purge floor (group {group})",
        lambda: client.alter_consumer_group_offsets([request], request_timeout=15),
    )
    answer = broker_call(
        f"cannot store the purge floor (group {group})", lambda: futures[group].result()
    )
    for tp in answer.topic_partitions:
        if tp.error is not None:
            raise BrokerError(
                f"cannot store the purge floor of {topic}[{tp.partition}]: {tp.error.str()}"
            )
