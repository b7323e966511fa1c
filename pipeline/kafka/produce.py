"""Producing and waiting for the broker's acknowledgement.

:class:`AsyncProducer` (stage workers) and :func:`produce_acked` (the CLI, the
backfill controller) both return only once every record of a batch is
acknowledged, and raise :class:`~pipeline.errors.DeliveryError` /
:class:`~pipeline.errors.BrokerError` if any was refused: callers commit input
offsets, or checkpoint, only after that.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from pipeline.errors import BrokerError, DeliveryError, RecordsRefused
from pipeline.records import Deliveries, Outgoing, Partitioned


def produce_or_wait(
    client: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    wait_s: float = 0.05,
    **kwargs: Any,
) -> None:
    """``client.produce``; while the client's queue is full (BufferError), serve
    delivery reports for up to ``wait_s`` and try again."""
    while True:
        try:
            client.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            client.poll(wait_s)


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
        try:
            produce_or_wait(client, topic, value, key, **kwargs)
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
        #: (index, error code, "topic: message") of each record not acknowledged
        self.errors: list[tuple[int, int, str]] = []

    def on_delivery(self, index: int, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.partitions[index] = msg.partition() or 0
            self.offsets[index] = msg.offset() or 0
        else:
            self.errors.append((index, err.code(), f"{msg.topic()}: {err.str()}"))
        self._counted()

    def fail(self, index: int, code: int, text: str) -> None:
        """A record the client refused before sending it."""
        self.errors.append((index, code, text))
        self._counted()

    def _counted(self) -> None:
        if next(self._count) == self.total:
            self._loop.call_soon_threadsafe(_resolve, self.future)


#: errors that retrying the same record can never fix (the record is the problem)
PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_TIMESTAMP,
    }
)


class AsyncProducer:
    """A confluent-kafka producer whose batches can be awaited until acknowledged.

    ``send_batch`` returns only when every record of the batch is acknowledged by
    the broker, and raises :class:`DeliveryError` if any failed (transient: broker
    down, timeouts) or :class:`RecordsRefused` if every failure was a record the
    broker or client refuses for good: callers commit input offsets only after it
    returns.
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
        return await (await self.submit(records, partitioned)).acknowledged()

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Sending:
        """Hand the batch to the client, in order, and return without waiting for the
        broker: :meth:`Sending.acknowledged` awaits that. Batches submitted one after
        the other are written in that order (an idempotent producer keeps order per
        partition). Waits only while the client's queue is full."""
        if not records and not partitioned:
            return Sending(None, records, partitioned)
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
                    error = exc.args[0] if exc.args else None
                    code = error.code() if isinstance(error, KafkaError) else None
                    if code not in PERMANENT:
                        raise DeliveryError(f"cannot produce to {topic}: {exc}") from exc
                    pending.fail(index, code, f"{topic}: {error.str()}")  # type: ignore[union-attr]
                    break
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
        return Sending(pending, records, partitioned)

    def flush(self, timeout: float = 30.0) -> int:
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)


class Sending:
    """A batch handed to the client (:meth:`AsyncProducer.submit`), not yet known to
    be acknowledged."""

    __slots__ = ("_partitioned", "_pending", "_records")

    def __init__(
        self,
        pending: _Pending | None,
        records: Sequence[Outgoing],
        partitioned: Sequence[Partitioned],
    ) -> None:
        self._pending = pending
        self._records = records
        self._partitioned = partitioned

    async def acknowledged(self) -> Deliveries:
        """Every record's acknowledgement, in the order produced. Raises
        :class:`DeliveryError` if any failed (transient: broker down, timeouts) or
        :class:`RecordsRefused` if every failure was a record refused for good."""
        pending, records, partitioned = self._pending, self._records, self._partitioned
        if pending is None:
            return Deliveries(records, [], [])
        await pending.future
        produced: Sequence[Outgoing | Partitioned] = records
        if partitioned:
            produced = [*records]
            produced.extend(partitioned)
        deliveries = Deliveries(produced, pending.partitions, pending.offsets)
        if pending.errors:
            first = min(pending.errors)[2]
            message = f"{len(pending.errors)} record(s) not acknowledged: {first}"
            if all(code in PERMANENT for _, code, _ in pending.errors):
                refused = {index: text for index, _, text in pending.errors}
                raise RecordsRefused(message, refused, deliveries)
            raise DeliveryError(message)
        return deliveries


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
