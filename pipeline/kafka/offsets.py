"""Broker facts read correctly: end offsets, committed offsets, lag, whole topics.

:func:`high_watermarks` reads partition end offsets from a Fetch response rather
than ListOffsets: the embedded broker answers ListOffsets with the base offset of
the last batch + 1, not the end (see TEST_BROKER.md); on real Kafka both agree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.kafka.clients import client_config, consumer
from pipeline.settings import Settings


def high_watermarks(
    config: Mapping[str, Any], partitions: Iterable[tuple[str, int]], timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """End offset (next offset to be written) of each partition, from a Fetch response.

    Seeks near the end that ListOffsets reports and fetches once; the Fetch
    response's high watermark is right on every broker. Falls back to the
    ListOffsets answer when a partition returns nothing before ``timeout``.
    """
    tps = list(partitions)
    if not tps:
        return {}
    probe = Consumer(
        {
            **{k: v for k, v in config.items() if not k.startswith(("group.", "enable.", "auto."))},
            "group.id": f"pipeline-hw-probe-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        reported: dict[tuple[str, int], int] = {}
        for topic, partition in tps:
            _, high = probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            reported[(topic, partition)] = high
        pending = {tp for tp, high in reported.items() if high > 0}
        if not pending:
            return reported
        probe.assign([TopicPartition(t, p, max(reported[(t, p)] - 1, 0)) for t, p in pending])
        deadline = time.monotonic() + timeout
        result = dict(reported)
        while pending and time.monotonic() < deadline:
            for msg in probe.consume(num_messages=500, timeout=0.2):
                tp = (msg.topic(), msg.partition())
                if tp not in pending:
                    continue
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    continue
                _, high = probe.get_watermark_offsets(TopicPartition(*tp), cached=True)
                if high >= 0:
                    result[tp] = max(high, reported[tp])
                    pending.discard(tp)
        return result
    finally:
        probe.close()


def topic_partitions(client: Any, topic: str) -> int:
    """The partition count of ``topic`` from ``client``'s metadata (any confluent
    client); BrokerError, one line saying what to do, if the broker does not answer
    or the topic does not exist."""
    try:
        metadata = client.list_topics(topic, timeout=10)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot read {topic}: {exc.args[0].str() if exc.args else exc}; "
            "is the broker at KAFKA_BOOTSTRAP_SERVERS up?"
        ) from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise BrokerError(f"topic {topic} does not exist; run `pipeline topics create`")
    return len(info.partitions)


def read_topic(
    settings: Settings,
    topic: str,
    timeout: float = 30.0,
    partitions: Sequence[int] | None = None,
) -> list[Message]:
    """Every record of ``topic`` from the beginning up to its end as of the call.

    The end comes from :func:`high_watermarks` (a Fetch response, right on every
    broker), and records are read with assign, without joining a group. Raises
    BrokerError if the end is not reached within ``timeout``.
    """
    reader = consumer(settings)
    messages: list[Message] = []
    try:
        count = topic_partitions(reader, topic)
        wanted = list(range(count)) if partitions is None else list(partitions)
        ends = high_watermarks(client_config(settings), [(topic, p) for p in wanted])
        pending = {p for p in wanted if ends[(topic, p)] > 0}
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} did not reach its end within {timeout:.0f}s")
            for msg in reader.consume(num_messages=1000, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise BrokerError(f"reading {topic}: {err.str()}")
                partition, offset = msg.partition() or 0, msg.offset() or 0
                if partition not in pending:
                    continue
                end = ends[(topic, partition)]
                if offset < end:
                    messages.append(msg)
                if offset + 1 >= end:
                    pending.discard(partition)
        return messages
    finally:
        reader.close()


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
