"""confluent-kafka clients built from settings, and broker facts read correctly.

Every Kafka client the project creates gets its connection and security settings
from :func:`client_config`, so SASL/TLS flow everywhere from one place.

:func:`high_watermarks` reads partition end offsets from a Fetch response rather
than ListOffsets: the embedded broker answers ListOffsets with the base offset of
the last batch + 1, not the end (see TEST_BROKER.md); on real Kafka both agree.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.settings import Settings


def bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise BrokerError(
            "no broker configured; set KAFKA_BOOTSTRAP_SERVERS or run `pipeline broker`"
        )
    return settings.kafka_bootstrap_servers


#: librdkafka's own log lines go here (not straight to stderr); the CLI silences
#: it, stage workers log it.
RDKAFKA_LOG = logging.getLogger("pipeline.rdkafka")


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection and security settings shared by every confluent-kafka client."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "security.protocol": settings.kafka_security_protocol,
        "logger": RDKAFKA_LOG,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        config["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        config["ssl.ca.location"] = settings.kafka_ssl_cafile
    return config


def broker_error(what: str, exc: KafkaException) -> BrokerError:
    """A one-line BrokerError for a failed client call: what failed, why, what to check."""
    err = exc.args[0] if exc.args else exc
    text = err.str() if isinstance(err, KafkaError) else str(err)
    return BrokerError(f"{what}: {text}; check KAFKA_BOOTSTRAP_SERVERS and that the broker is up")


def wait_for_broker(settings: Settings, timeout: float) -> None:
    """Return once the configured cluster answers a metadata request (with the
    project's security settings); BrokerError after ``timeout`` seconds."""
    client = AdminClient({**client_config(settings), "socket.timeout.ms": 2000})
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            client.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            last = exc.args[0].str() if exc.args else str(exc)
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"no Kafka broker answered at {bootstrap(settings)} within {timeout:.0f}s "
                f"({last}); check KAFKA_BOOTSTRAP_SERVERS and the security settings"
            )
        time.sleep(0.5)


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer that partitions keys like Kafka's Java client (murmur2)."""
    return Producer(producer_config(settings, **overrides))


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The configuration :func:`producer` uses (also what the benchmarks compare)."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": 60000,
        **overrides,
    }


def consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> Consumer:
    """A consumer; without ``group_id`` a throwaway group that never commits."""
    config = {
        **client_config(settings),
        "group.id": group_id or f"pipeline-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        **overrides,
    }
    return Consumer(config)


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


@dataclass(frozen=True, slots=True)
class Delivered:
    topic: str
    partition: int
    offset: int


class DeliveryError(Exception):
    """The broker did not acknowledge a produced record."""


class AsyncProducer:
    """A confluent-kafka producer whose batches can be awaited until acknowledged.

    ``send_batch`` returns only when every record of the batch is acknowledged by
    the broker, and raises :class:`DeliveryError` if any failed: callers commit
    input offsets only after it returns.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def send_batch(
        self,
        records: Sequence[
            tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]
        ],
    ) -> list[Delivered]:
        """Produce ``(topic, key, value, headers, timestamp_ms)`` records and await them all."""
        if not records:
            return []
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        results: list[Delivered | None] = [None] * len(records)
        remaining = [len(records)]
        errors: list[str] = []
        lock = threading.Lock()

        def on_delivery(index: int) -> Callable[[KafkaError | None, Message], None]:
            def callback(err: KafkaError | None, msg: Message) -> None:
                with lock:
                    if err is not None:
                        errors.append(f"{msg.topic()}: {err.str()}")
                    else:
                        results[index] = Delivered(
                            msg.topic() or "", msg.partition() or 0, msg.offset() or 0
                        )
                    remaining[0] -= 1
                    finished = remaining[0] == 0
                if finished:
                    loop.call_soon_threadsafe(_resolve, done)

            return callback

        produce = self._producer.produce
        for index, (topic, key, value, headers, ts) in enumerate(records):
            kwargs: dict[str, Any] = {"headers": headers, "on_delivery": on_delivery(index)}
            if ts is not None and ts > 0:
                kwargs["timestamp"] = ts
            while True:
                try:
                    produce(topic, value, key, **kwargs)
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
                except KafkaException as exc:
                    raise DeliveryError(f"cannot produce to {topic}: {exc}") from exc
        await done
        if errors:
            raise DeliveryError(f"{len(errors)} record(s) not acknowledged: {errors[0]}")
        return [r for r in results if r is not None]

    def flush(self, timeout: float = 30.0) -> int:
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
        try:
            metadata = reader.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise BrokerError(
                f"cannot read {topic}: {exc.args[0].str() if exc.args else exc}; "
                "is the broker at KAFKA_BOOTSTRAP_SERVERS up?"
            ) from None
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise BrokerError(f"topic {topic} does not exist; run `pipeline topics create`")
        wanted = sorted(info.partitions) if partitions is None else list(partitions)
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
