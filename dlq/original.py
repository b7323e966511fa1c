"""The whole original record of a truncated dead letter, from its source topic.

A dead letter past ``dlq.max_payload_bytes`` keeps only a prefix of its value
(:func:`dlq.envelope.bounded`); its ``dlq.original.*`` headers say where the record
was read, and ``dlq.payload.sha256`` what it was. While the source topic retains
it, :func:`original_value` reads it back and checks the digest; a record that is
gone (deleted by retention, a recreated topic, a compacted key) is
:class:`OriginalGone` with one line saying why.
"""

from __future__ import annotations

import hashlib
import time

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from dlq import envelope
from dlq.read import StoredDeadLetter
from pipeline.errors import PipelineError
from pipeline.kafka.clients import consumer
from pipeline.settings import Settings


class OriginalGone(PipelineError):
    """The original of a truncated dead letter cannot be read back."""


def _header(letter: StoredDeadLetter, name: str) -> str | None:
    found = None
    for key, value in letter.headers:
        if key == name and value is not None:
            found = value.decode("utf-8", "replace")
    return found


def is_truncated(letter: StoredDeadLetter) -> bool:
    return _header(letter, envelope.TRUNCATED) == "true"


def original_value(settings: Settings, letter: StoredDeadLetter, timeout: float = 15.0) -> bytes:
    """The dead letter's whole value: its own when it was not truncated, else the
    original record's from its source topic (checked against ``dlq.payload.sha256``)."""
    if not is_truncated(letter):
        return letter.value or b""
    topic, partition, offset = (
        letter.original_topic,
        letter.original_partition,
        letter.original_offset,
    )
    where = f"{topic}[{partition}]@{offset}"
    if topic is None or partition is None or offset is None or offset < 0:
        raise OriginalGone(f"dead letter {letter.ref}: truncated, and it names no original record")
    reader = consumer(settings)
    try:
        try:
            low, _high = reader.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
        except KafkaException as exc:
            raise OriginalGone(f"dead letter {letter.ref}: cannot read {where}: {exc}") from None
        if offset < low:
            raise OriginalGone(
                f"dead letter {letter.ref}: its original {where} is gone (the topic starts at "
                f"{low} now: retention deleted it)"
            )
        reader.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise OriginalGone(f"dead letter {letter.ref}: reading {where}: {err.str()}")
            if (msg.offset() or 0) != offset:
                break
            value = msg.value() or b""
            digest = _header(letter, envelope.PAYLOAD_SHA256)
            if digest is not None and hashlib.sha256(value).hexdigest() != digest:
                raise OriginalGone(
                    f"dead letter {letter.ref}: {where} is not its original any more (the "
                    "digest differs: the topic was recreated or compacted)"
                )
            return value
        raise OriginalGone(f"dead letter {letter.ref}: its original {where} was not found")
    finally:
        reader.close()
