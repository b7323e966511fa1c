"""Finding a time in a partition without reading the partition: O(log n) fetches.

:meth:`PartitionSeeker.offset_for_time` returns the first offset whose record
timestamp is at or after a target, in a partition whose timestamps do not go
down (producer time of records produced in order, like lineage hops and dead
letters: small disorder between producers is absorbed by the callers' margins).
It asks the broker (``offsets_for_times``) and *verifies* the answer with the
record at it and the one before; where the answer is wrong (the embedded broker
answers 0 for every time, see TEST_BROKER.md) it searches the offsets, one
single-record fetch per step (:func:`time_offset`: bisection steps alternating
with interpolation ones). The partition's end comes from a Fetch response's
high watermark (right on every broker), not from ListOffsets.

Every read is counted in a :class:`ReadCost`: records returned to this process
and their bytes, fetches started (one per probe or scan), partitions touched.
Single records are fetched small (``probe_bytes`` per fetch, one fetch queued at
a time), so a probe costs one record batch of the broker's (a broker returns
whole batches: up to the producers' ``batch.size``), whatever the partition's
length; ranges (:meth:`PartitionSeeker.scan`) in fetches of ``scan_bytes``;
``measure=True`` adds what the client received (librdkafka's statistics). No
consumer group is joined, nothing is committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.errors import BrokerError
from pipeline.kafka.clients import broker_error, consumer
from pipeline.kafka.offsets import topic_partitions
from pipeline.settings import Settings

TP = tuple[str, int]


@dataclass
class ReadCost:
    """What the reads of one command cost (deterministic for a given topic)."""

    #: records the reads returned, probes and scans
    records: int = 0
    #: their key, value and header bytes
    bytes: int = 0
    #: fetches started at a new offset (a bisection step, a verification, a scan)
    seeks: int = 0
    #: the partitions read
    partitions: set[TP] = field(default_factory=set)
    #: bytes and records the client received from the broker, whole record batches
    #: and protocol included (librdkafka's statistics; None unless measured)
    received_bytes: int | None = None
    received_records: int | None = None

    def count(self, msg: Message) -> None:
        self.records += 1
        size = len(msg.key() or b"") + len(msg.value() or b"")
        headers: Any = msg.headers() or ()
        for name, value in headers:
            size += len(name) + len(value or b"")
        self.bytes += size

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "bytes": self.bytes,
            "seeks": self.seeks,
            "partitions": sorted([list(tp) for tp in self.partitions]),
            "received_bytes": self.received_bytes,
            "received_records": self.received_records,
        }


def timestamp(msg: Message) -> int | None:
    kind, ts = msg.timestamp()
    return int(ts) if kind != TIMESTAMP_NOT_AVAILABLE and ts >= 0 else None


class PartitionSeeker:
    """Single records, bounds and time offsets of partitions, read with assign."""

    def __init__(
        self,
        settings: Settings,
        timeout: float = 15.0,
        cost: ReadCost | None = None,
        probe_bytes: int = 4096,
        scan_bytes: int = 1 << 18,
        measure: bool = False,
    ) -> None:
        self.cost = cost if cost is not None else ReadCost()
        self._settings = settings
        self._timeout = timeout
        self._measure = measure
        self._received: dict[str, tuple[int, int]] = {}
        #: single records: fetches of one batch; ranges: fetches of up to ``scan_bytes``
        self._probe = self._client("probe", probe_bytes)
        self._scan_bytes = scan_bytes
        self._scanner: Any = None
        self._bounds: dict[TP, tuple[int, int]] = {}

    def _client(self, name: str, fetch_bytes: int) -> Any:
        config: dict[str, Any] = {
            "fetch.message.max.bytes": fetch_bytes,
            "fetch.max.bytes": fetch_bytes,
            "message.max.bytes": max(1000, fetch_bytes),
            "receive.message.max.bytes": 2**31 - 1,
            "queued.min.messages": 1,
            "queued.max.messages.kbytes": max(1, fetch_bytes // 1024),
            "fetch.wait.max.ms": 10,
            "fetch.error.backoff.ms": 50,
            # librdkafka otherwise waits 1 s before fetching again once its queue
            # holds queued.min.messages: every probe would take a second
            "fetch.queue.backoff.ms": 0,
        }
        if self._measure:
            config |= {
                "statistics.interval.ms": 20,
                "stats_cb": lambda raw: self._on_stats(name, raw),
            }
        return consumer(self._settings, None, **config)

    def _on_stats(self, name: str, raw: str) -> None:
        stats = json.loads(raw)
        self._received[name] = (int(stats["rx_bytes"]), int(stats["rxmsgs"]))
        self.cost.received_bytes = sum(b for b, _ in self._received.values())
        self.cost.received_records = sum(n for _, n in self._received.values())

    def close(self) -> None:
        clients = [c for c in (self._probe, self._scanner) if c is not None]
        if self._measure:  # the last statistics, after the last fetch
            time.sleep(0.06)
            for client in clients:
                client.poll(0)
        for client in clients:
            client.close()

    def __enter__(self) -> PartitionSeeker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require(self, topic: str) -> int:
        """The partition count of ``topic``; BrokerError (one line, what to do) if the
        broker does not answer or the topic does not exist."""
        return topic_partitions(self._probe, topic)

    # -- reading ---------------------------------------------------------------------
    def scan(self, tp: TP, start: int, end: int | None = None) -> Iterator[Message]:
        """Records of ``tp`` from ``start`` up to ``end`` (default: its end as of
        :meth:`bounds`), in order; stop iterating to stop reading. BrokerError if
        nothing arrives for ``timeout`` seconds."""
        if self._scanner is None:
            self._scanner = self._client("scan", self._scan_bytes)
        return self._read(self._scanner, tp, start, self.bounds(tp)[1] if end is None else end)

    def _read(self, client: Any, tp: TP, start: int, stop: int) -> Iterator[Message]:
        if start >= stop:
            return
        topic, partition = tp
        self.cost.seeks += 1
        self.cost.partitions.add(tp)
        client.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + self._timeout
        try:
            while True:
                try:
                    # what is queued, at once; else wait for one record (consume would
                    # wait for its 500 records until the timeout)
                    batch = client.consume(num_messages=500, timeout=0)
                    if not batch:
                        one = client.poll(0.2)
                        batch = [one] if one is not None else []
                except KafkaException as exc:
                    raise broker_error(f"cannot read {topic}[{partition}]", exc) from None
                if not batch and time.monotonic() > deadline:
                    raise BrokerError(
                        f"reading {topic}[{partition}] from offset {start} got nothing within "
                        f"{self._timeout:.0f}s; is the broker at KAFKA_BOOTSTRAP_SERVERS up?"
                    )
                for msg in batch:
                    at = msg.offset()
                    if (msg.topic(), msg.partition()) != tp or at is None:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if at >= stop:
                                return
                            continue
                        raise BrokerError(f"reading {topic}[{partition}]: {err.str()}")
                    if at < start:
                        continue  # the rest of a batch fetched from before ``start``
                    if at >= stop:
                        return
                    self.cost.count(msg)
                    deadline = time.monotonic() + self._timeout
                    yield msg
                    if at + 1 >= stop:
                        return
        finally:
            client.unassign()

    def first_at(self, tp: TP, offset: int, end: int | None = None) -> Message | None:
        """The first record of ``tp`` at or after ``offset`` (and before ``end``)."""
        stop = self.bounds(tp)[1] if end is None else end
        for msg in self._read(self._probe, tp, offset, stop):
            return msg
        return None

    # -- bounds and times ------------------------------------------------------------
    def bounds(self, tp: TP) -> tuple[int, int]:
        """``(low, high)`` watermarks of ``tp``: high from a Fetch response (one probe
        of the partition's last record), read once per seeker."""
        known = self._bounds.get(tp)
        if known is not None:
            return known
        part = TopicPartition(*tp)
        try:
            low, reported = self._probe.get_watermark_offsets(part, timeout=self._timeout)
        except KafkaException as exc:
            raise broker_error(f"cannot read the offsets of {tp[0]}[{tp[1]}]", exc) from None
        high = reported
        if reported > 0:
            self._bounds[tp] = (low, reported + 1)  # let the probe read the last record
            last = self.first_at(tp, reported - 1)
            if last is not None:
                _, fetched = self._probe.get_watermark_offsets(part, cached=True)
                high = max(fetched, (last.offset() or 0) + 1, reported)
        self._bounds[tp] = (low, high)
        return low, high

    def offset_for_time(self, tp: TP, target_ms: int, slack: int = 0) -> tuple[int, str]:
        """The first offset of ``tp`` whose timestamp is >= ``target_ms`` (its high
        watermark when there is none), or with ``slack`` up to that many offsets
        before it; and how it was found: ``"broker"`` (the broker's answer,
        verified) or ``"search"`` (:func:`time_offset`)."""
        low, high = self.bounds(tp)
        if high <= low:
            return high, "broker"
        try:
            (answer,) = self._probe.offsets_for_times(
                [TopicPartition(tp[0], tp[1], target_ms)], timeout=self._timeout
            )
            candidate = answer.offset if answer.error is None and answer.offset >= 0 else high
        except KafkaException:
            candidate = None

        def probe(offset: int, end: int) -> Stamped | None:
            msg = self.first_at(tp, offset, end)
            return None if msg is None else ((msg.offset() or 0), timestamp(msg))

        return time_offset(target_ms, candidate, low, high, probe, slack)


#: a record's (offset, timestamp)
Stamped = tuple[int, int | None]


def time_offset(
    target_ms: int,
    candidate: int | None,
    low: int,
    high: int,
    probe: Callable[[int, int], Stamped | None],
    slack: int = 0,
) -> tuple[int, str]:
    """The first offset in ``[low, high)`` whose timestamp is >= ``target_ms``
    (``high`` if none), for timestamps that do not go down; and ``"broker"`` or
    ``"search"``. With ``slack``, the search may stop up to ``slack`` offsets before
    it (the caller reads on from there and skips the earlier records).

    ``candidate`` is the broker's ``offsets_for_times`` answer (None: none): taken
    when the record at it is at or after the target (or it is ``high``) and the one
    just before it is earlier (or it is ``low``): two probes. Otherwise a search:
    ``probe(offset, end)`` gives the first record in ``[offset, end)`` or None.
    Steps alternate between bisection and interpolation on the times found so far
    (records come at a steady rate, mostly): at most about 2·log2(high - low)
    probes, far fewer when the rate is steady.
    """
    if (
        candidate is not None
        and low <= candidate <= high
        and _holds(target_ms, candidate, low, high, probe)
    ):
        return candidate, "broker"
    found = high
    lo, hi = low, high
    lo_ts: int | None = None  # the time of a record just before ``lo``
    hi_ts: int | None = None  # the time of the record at ``found``
    step = 0
    while hi - lo > slack:
        mid = (lo + hi) // 2
        if step % 2 and lo_ts is not None and hi_ts is not None and hi_ts > lo_ts:
            share = (target_ms - lo_ts) / (hi_ts - lo_ts)
            mid = min(hi - 1, max(lo, lo + int(share * (hi - lo))))
        step += 1
        first = probe(mid, hi)
        if first is None:  # nothing in [mid, hi): the answer is before mid
            hi = mid
            continue
        at, ts = first
        if ts is not None and ts >= target_ms:
            found, hi, hi_ts = at, mid, ts
        else:
            lo, lo_ts = at + 1, ts
    # all records before ``lo`` are earlier; the first at or after is in [lo, hi) or at
    # ``found``: with slack, reading on from ``lo`` finds it
    return (found if slack == 0 else lo), "search"


def _holds(
    target_ms: int,
    offset: int,
    low: int,
    high: int,
    probe: Callable[[int, int], Stamped | None],
) -> bool:
    if offset < high:
        here = probe(offset, high)
        if here is None or here[0] != offset or here[1] is None or here[1] < target_ms:
            return False
    if offset == low:
        return True
    before = probe(offset - 1, high)
    if before is None or before[0] != offset - 1:
        return False  # a gap before it (compaction): let the bisection decide
    return before[1] is not None and before[1] < target_ms
