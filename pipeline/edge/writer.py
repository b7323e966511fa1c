"""Writing a door's records to Kafka: the target topic, a broker probe, and the
gateway's admission-controlled, acknowledged writes.

Every door writes what ingest reads from any producer: the raw bytes, keyed by
device id (``None`` when the record names none), partitioned like Kafka's Java
client (murmur2, :func:`pipeline.kafka.clients.producer`), with a ``traceparent``
header when the device sent one. Ingest does the rest (lineage id, headers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import ConfigError, DeliveryError, Overloaded
from pipeline.kafka.clients import bootstrap, client_config, producer
from pipeline.kafka.produce import AsyncProducer
from pipeline.obs.metrics import EDGE_IN_FLIGHT, EDGE_RECORDS
from pipeline.records import Outgoing
from pipeline.settings import Settings

log = logging.getLogger("pipeline.edge")


def target_topic(settings: Settings) -> str:
    """Where the doors write: ``edge.topic``, else the first input of the entry stage
    (the one no other stage feeds; ingest in the built-in pipeline)."""
    if settings.edge.topic is not None:
        return settings.edge.topic
    entries = settings.topology.entry_stages()
    if not entries:
        raise ConfigError("no entry stage to write to; set edge.topic in pipeline.yaml")
    return settings.stage(entries[0]).inputs[0]


class BrokerProbe:
    """A metadata request every ``every_s`` in a thread of its own (never on the event
    loop): :meth:`reachable` is False once no answer came for ``unreachable_after_s``.
    Before the first answer it is False too."""

    def __init__(
        self, settings: Settings, every_s: float = 2.0, unreachable_after_s: float = 6.0
    ) -> None:
        self._client = AdminClient({**client_config(settings), "socket.timeout.ms": 2000})
        self._bootstrap = bootstrap(settings)
        self._every = every_s
        self._after = unreachable_after_s
        self._last_ok: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-probe", daemon=True)
        self.topics: set[str] = set()

    def start(self) -> BrokerProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """One metadata request now; True if the broker answered."""
        try:
            metadata = self._client.list_topics(timeout=2.0)
        except KafkaException:
            return False
        self.topics = set(metadata.topics)
        self._last_ok = time.monotonic()
        return True

    def _run(self) -> None:
        warned = 0.0
        while not self._stop.is_set():
            if not self.check() and time.monotonic() - warned > 30:
                warned = time.monotonic()
                log.warning("no Kafka broker answered at %s", self._bootstrap)
            self._stop.wait(self._every)

    def reachable(self) -> bool:
        last = self._last_ok
        return last is not None and time.monotonic() - last < self._after

    def problem(self) -> str | None:
        if self.reachable():
            return None
        return f"no Kafka broker answered at {self._bootstrap}"


class EdgeWriter:
    """Acknowledged writes for the gateway: :meth:`write` returns only once the broker
    acknowledged every record, or raises :class:`~pipeline.errors.Overloaded` *before
    producing anything* when ``max_in_flight`` records are already waiting, or
    :class:`~pipeline.errors.DeliveryError` when the broker did not acknowledge within
    ``ack_timeout_s`` (records still queued are then written or dropped by the
    producer; a client that retries gets duplicates at worst, which ingest and the
    aggregate recognise).
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        door: str,
        max_in_flight: int,
        ack_timeout_s: float,
    ) -> None:
        self.topic = topic
        self._door = door
        self._max = max_in_flight
        self._timeout = ack_timeout_s
        self.in_flight = 0
        self._gauge = EDGE_IN_FLIGHT.labels(door)
        self._acked = EDGE_RECORDS.labels(door, topic)
        self._producer = AsyncProducer(
            producer(
                settings,
                **{
                    # room for every admitted record: BufferError never stalls a request
                    "queue.buffering.max.messages": max(100_000, 2 * max_in_flight),
                    "message.timeout.ms": int(max(30.0, 3 * ack_timeout_s) * 1000),
                },
            )
        )

    async def write(self, records: Sequence[Outgoing]) -> None:
        n = len(records)
        if self.in_flight + n > self._max:
            raise Overloaded(f"{self.in_flight} records waiting for the broker")
        self.in_flight += n
        self._gauge.set(self.in_flight)
        task = asyncio.ensure_future(self._producer.send_batch(records))
        task.add_done_callback(lambda t: self._settled(t, n))
        try:
            await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            raise DeliveryError(
                f"the broker did not acknowledge within {self._timeout:.0f}s"
            ) from None
        self._acked.inc(n)

    def _settled(self, task: asyncio.Future[Any], n: int) -> None:
        self.in_flight -= n
        self._gauge.set(self.in_flight)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a batch of %d records failed after its answer: %s", n, task.exception())

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout)
