"""Consumer lag from committed offsets and Fetch high watermarks, and the
pipeline-quiet check the aggregate uses before advancing an idle watermark.

High watermarks come from :func:`pipeline.kafka.high_watermarks` (a Fetch
response), because the embedded broker answers ListOffsets with a value inside
the last batch, which would make lag look smaller than it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.kafka import admin, client_config, high_watermarks
from pipeline.settings import STAGE_IDS, Settings

TP = tuple[str, int]


def committed_offsets(
    client: AdminClient, group_id: str, partitions: Iterable[TP], timeout: float = 10.0
) -> dict[TP, int | None]:
    """The group's committed offset per partition (None where it committed nothing)."""
    request = ConsumerGroupTopicPartitions(
        group_id, [TopicPartition(topic, partition) for topic, partition in partitions]
    )
    try:
        result = client.list_consumer_group_offsets([request], request_timeout=timeout)
        answer = result[group_id].result()
    except KafkaException as exc:
        raise BrokerError(f"cannot read offsets of group {group_id}: {exc.args[0].str()}") from None
    return {
        (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
        for tp in answer.topic_partitions
    }


def partitions_of(settings: Settings, topics: Iterable[str]) -> list[TP]:
    return [(t, p) for t in topics for p in range(settings.topics[t].partitions)]


def group_lag(settings: Settings, client: AdminClient, stage_id: str) -> dict[TP, int]:
    """Records in the stage's input topics (and retry topic, whose records are still
    on their way) that its group has not committed yet."""
    spec = settings.stage(stage_id)
    topics = [*spec.inputs, *([spec.retry.topic] if spec.retry else [])]
    tps = partitions_of(settings, topics)
    ends = high_watermarks(client_config(settings), tps)
    committed = committed_offsets(client, settings.group_id(stage_id), tps)
    return {tp: max(0, ends[tp] - (committed.get(tp) or 0)) for tp in tps}


class PipelineQuiet:
    """Answers "have ``stage_id`` and every stage before it committed all their
    input?", at most once per ``ttl``.

    An idle partition's watermark may only advance when nothing is on its way:
    if a stage upstream is down or behind, or records wait in the stage's own
    input, they would otherwise arrive after their windows closed and be
    dead-lettered as late.
    """

    def __init__(self, settings: Settings, stage_id: str, ttl: float) -> None:
        self._settings = settings
        self._upstream = STAGE_IDS[: STAGE_IDS.index(stage_id) + 1]
        self._ttl = ttl
        self._client: AdminClient | None = None
        self._checked_at = float("-inf")
        self._quiet = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < self._ttl:
            return self._quiet
        if self._client is None:
            self._client = admin(self._settings)
        client = self._client
        try:
            self._quiet = all(
                not any(group_lag(self._settings, client, stage).values())
                for stage in self._upstream
            )
        except (BrokerError, KafkaException):
            # the broker did not answer: nothing is known to be quiet (the worker's
            # broker probe reports and, in time, exits; this must not crash it)
            self._quiet = False
        self._checked_at = time.monotonic()
        return self._quiet
