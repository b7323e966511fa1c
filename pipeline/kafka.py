"""confluent-kafka clients built from settings, and broker facts read correctly.

Every Kafka client the project creates gets its connection and security settings
from :func:`client_config`, so SASL/TLS flow everywhere from one place.

:func:`high_watermarks` reads partition end offsets from a Fetch response rather
than ListOffsets: the embedded broker answers ListOffsets with the base offset of
the last batch + 1, not the end (see TEST_BROKER.md); on real Kafka both agree.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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


class RepeatFilter(logging.Filter):
    """Lets a kind of line through once per ``every_s``: librdkafka repeats a failing
    connection several times a second per client while a broker is down, which
    buried everything else in a worker's log. A kind is the message with its
    numbers (ports, counters, timings) blanked."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())[:120]
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[kind] = now
        return True


RDKAFKA_LOG.addFilter(RepeatFilter())


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
        "linger.ms": 1,
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


Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


def produce_acked(
    client: Producer,
    records: Sequence[Outgoing],
    what: str,
    *,
    partitions: Sequence[int] | None = None,
    timeout: float = 120.0,
    pace: Callable[[int], None] | None = None,
    pace_every: int = 1000,
    hint: str = "check that the broker is up",
) -> dict[tuple[str, int], int]:
    """Produce ``records`` (``partitions[i]`` for record i if given, else by key) and
    wait until the broker acknowledged every one: the synchronous twin of
    :meth:`AsyncProducer.send_batch`, for the CLI and the backfill controller.

    Returns one past the highest acknowledged offset per (topic, partition).
    ``pace(n)`` is called after every ``pace_every`` records (and for the rest at
    the end), e.g. a rate limiter. Raises BrokerError ``cannot {what}: …; {hint}``
    if any record was refused or not acknowledged within ``timeout``.
    """
    acked: dict[tuple[str, int], int] = {}
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(f"{msg.topic()}: {err.str()}")
            return
        tp = (msg.topic() or "", msg.partition() or 0)
        end = (msg.offset() or 0) + 1
        if end > acked.get(tp, 0):
            acked[tp] = end

    for i, (topic, key, value, headers, ts) in enumerate(records):
        kwargs: dict[str, Any] = {"headers": headers, "on_delivery": on_delivery}
        if ts:
            kwargs["timestamp"] = ts
        if partitions is not None:
            kwargs["partition"] = partitions[i]
        while True:
            try:
                client.produce(topic, value, key, **kwargs)
                break
            except BufferError:
                client.poll(0.05)
            except KafkaException as exc:
                raise BrokerError(f"cannot {what}: {exc}; {hint}") from None
        if pace is not None and (i + 1) % pace_every == 0:
            client.poll(0)
            pace(pace_every)
    if pace is not None:
        pace(len(records) % pace_every)
    if client.flush(timeout) > 0 or errors:
        why = (
            f"{len(errors)} record(s) refused: {errors[0]}"
            if errors
            else f"not acknowledged within {timeout:.0f}s"
        )
        raise BrokerError(f"cannot {what}: {why}; {hint}")
    return acked


#: a record for a given partition, without headers or timestamp (a changelog write):
#: ``(topic, partition, key, value)``; a None value is a tombstone
Partitioned = tuple[str, int, bytes | None, bytes | None]


class Deliveries(Sequence[Delivered]):
    """The broker's acknowledgements of one batch, in the order it was produced.

    Kept as two arrays (``partitions``, ``offsets``) plus the produced records'
    topics; a :class:`Delivered` is made only when one is asked for.
    """

    __slots__ = ("_records", "offsets", "partitions")

    def __init__(
        self,
        records: Sequence[Outgoing | Partitioned],
        partitions: list[int],
        offsets: list[int],
    ) -> None:
        self._records = records
        self.partitions = partitions
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def topic(self, index: int) -> str:
        return self._records[index][0]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return Delivered(self._records[index][0], self.partitions[index], self.offsets[index])


class _Pending:
    """One batch in flight: the delivery reports of all its records land here.

    ``on_delivery`` is one bound method for the batch; each record's callback is a
    ``functools.partial`` of it with the record's index (no closure, lock or object
    per report). Reports are served by the poll thread (and by ``flush`` at close):
    the completion count is an ``itertools.count``, whose ``next`` is atomic, and
    the last report resolves the batch's one future on the event loop.
    """

    __slots__ = ("_count", "_loop", "errors", "future", "offsets", "partitions", "total")

    def __init__(self, loop: asyncio.AbstractEventLoop, total: int) -> None:
        self._loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.total = total
        self._count = itertools.count(1)
        self.partitions = [0] * total
        self.offsets = [0] * total
        self.errors: list[str] = []

    def on_delivery(self, index: int, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.partitions[index] = msg.partition() or 0
            self.offsets[index] = msg.offset() or 0
        else:
            self.errors.append(f"{msg.topic()}: {err.str()}")
        if next(self._count) == self.total:
            self._loop.call_soon_threadsafe(_resolve, self.future)


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
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        """Produce ``(topic, key, value, headers, timestamp_ms)`` records, then
        ``partitioned`` ones, and await them all; the acknowledgements come back in
        that order."""
        if not records and not partitioned:
            return Deliveries(records, [], [])
        pending = _Pending(asyncio.get_running_loop(), len(records) + len(partitioned))
        on_delivery = pending.on_delivery
        produce = self._producer.produce
        for index, (topic, key, value, headers, ts) in enumerate(records):
            callback = partial(on_delivery, index)
            while True:
                try:
                    if ts is not None and ts > 0:
                        produce(
                            topic,
                            value,
                            key,
                            on_delivery=callback,
                            timestamp=ts,
                            headers=headers,  # type: ignore[arg-type]
                        )
                    else:
                        produce(
                            topic,
                            value,
                            key,
                            on_delivery=callback,
                            headers=headers,  # type: ignore[arg-type]
                        )
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
                except KafkaException as exc:
                    raise DeliveryError(f"cannot produce to {topic}: {exc}") from exc
        index = len(records)
        for topic, partition, key, value in partitioned:
            while True:
                try:
                    produce(topic, value, key, partition, on_delivery=partial(on_delivery, index))
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
                except KafkaException as exc:
                    raise DeliveryError(f"cannot produce to {topic}: {exc}") from exc
            index += 1
        await pending.future
        if pending.errors:
            raise DeliveryError(
                f"{len(pending.errors)} record(s) not acknowledged: {pending.errors[0]}"
            )
        produced: Sequence[Outgoing | Partitioned] = records
        if partitioned:
            produced = [*records]
            produced.extend(partitioned)
        return Deliveries(produced, pending.partitions, pending.offsets)

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
