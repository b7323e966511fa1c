"""Long histories, written fast, for benchmarks and tests of what reads them.

:func:`write_dead_letters` writes dead letters to a stage's DLQ as the stages do.

:func:`write_lineage` writes ``hops`` lineage hops to the lineage topic as the
stages would (format 2, placed by lineage id, :mod:`pipeline.lineage.placing`),
``hops_per_s`` of them per second of record time from ``start_ms``, straight
from one producer (not through the stages), with given timestamps, and in time
order the records of :class:`TracedReading` s (a reading's four hops, the
``emitted`` record of its window and the window's output record) where their
time falls. The history's lineage ids are never a traced reading's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from dlq.envelope import FAILED_AT, DeadLetter, dead_letter_record
from pipeline import contract
from pipeline.errors import BrokerError
from pipeline.kafka.clients import producer
from pipeline.kafka.produce import produce_acked
from pipeline.lineage.placing import EMITTED, FORMAT, lineage_partition, place
from pipeline.settings import Settings

#: (timestamp ms, topic, partition, key, value, headers)
Timed = tuple[int, str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]


def _doc(stage: str, at: int, in_topic: str, in_partition: int, groups: list[Any]) -> Any:
    return {"v": FORMAT, "stage": stage, "at": at, "in": [in_topic, in_partition], "groups": groups}


@dataclass(frozen=True)
class TracedReading:
    """One reading's path, as the built-in stages would leave it: ingest, parse,
    enrich passed, aggregate counted into ``window``, the window emitted to the
    aggregate's output ``window_closes_ms`` after the reading entered."""

    lineage_id: str
    entered_ms: int
    window: tuple[str, str, int]
    window_closes_ms: int = 70_000

    def records(self, settings: Settings, output_at: tuple[int, int]) -> list[Timed]:
        """Its lineage records (and the window's output record, first) with their
        timestamps; ``output_at`` is where the output record will land."""
        topic = settings.lineage_topic
        assert topic is not None
        partitions = settings.topics[topic].partitions
        stages = settings.stage_ids[:4]
        out: list[Timed] = []
        for i, stage in enumerate(stages):
            spec = settings.stage(stage)
            at = self.entered_ms + 10 * (i + 1)
            group: dict[str, Any]
            if i < 3:
                group = {
                    "outcome": "passed",
                    "ids": self.lineage_id,
                    "in_offsets": [i],
                    "out": spec.default_output,
                    "partitions": [0],
                    "offsets": [i],
                }
            else:
                group = {
                    "outcome": "counted",
                    "ids": self.lineage_id,
                    "in_offsets": [i],
                    "windows": [list(self.window)],
                }
            head = _doc(stage, at, spec.inputs[0], 0, [])
            del head["groups"]
            for _, p, key, value in place(topic, stage.encode(), head, [(group, 1)], partitions):
                out.append((at, topic, p, key, value, []))
        aggregate = stages[3]
        closes = self.entered_ms + self.window_closes_ms
        ref = orjson.dumps(list(self.window)).decode()
        emitted = {
            "outcome": EMITTED,
            "ids": "",
            "refs": [ref],
            "out": settings.stage(aggregate).default_output,
            "partitions": [output_at[0]],
            "offsets": [output_at[1]],
        }
        doc = _doc(aggregate, closes, "", 0, [emitted])
        out.append((closes, topic, lineage_partition(ref, partitions), b"x", orjson.dumps(doc), []))
        return out

    def output(self, settings: Settings) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        """The window's output record: topic, value and headers."""
        device, metric, start = self.window
        value = orjson.dumps(
            {"device_id": device, "metric": metric, "window_start": start, "count": 1}
        )
        ref = orjson.dumps(list(self.window))
        return (
            settings.stage(settings.stage_ids[3]).default_output or "",
            value,
            [(contract.H_STATE_REF, ref)],
        )


def _history_batches(
    settings: Settings, hops_per_batch: int, pool: int = 64
) -> list[list[tuple[int, bytes | None]]]:
    """``pool`` batches of hops (partition, value) to cycle through: parse passing
    ``hops_per_batch`` readings each."""
    topic = settings.lineage_topic
    assert topic is not None
    partitions = settings.topics[topic].partitions
    batches = []
    for b in range(pool):
        ids = [contract.lineage_id(0, "history", b, i) for i in range(hops_per_batch)]
        group = {
            "outcome": "passed",
            "ids": " ".join(ids),
            "in_offsets": list(range(hops_per_batch)),
            "out": "iot.parsed",
            "partitions": [i % 4 for i in range(hops_per_batch)],
            "offsets": list(range(b * hops_per_batch, (b + 1) * hops_per_batch)),
        }
        head = {"v": FORMAT, "stage": "parse", "at": 0, "in": ["iot.raw", b % 4]}
        placed = place(topic, b"parse/iot.raw/0", head, [(group, hops_per_batch)], partitions)
        batches.append([(p, value) for _, p, _, value in placed])
    return batches


def write_lineage(
    settings: Settings,
    hops: int,
    start_ms: int,
    hops_per_s: float,
    traced: Sequence[TracedReading] = (),
    hops_per_batch: int = 50,
    batch_records: int = 4,
) -> int:
    """Write the history (see the module docstring); returns the lineage records
    written. Raises BrokerError if the broker does not acknowledge them."""
    topic = settings.lineage_topic
    assert topic is not None
    # broker batches of a few records, as workers make them (one lineage record per
    # partition per input batch, 1 ms linger): a fetch returns whole batches, so the
    # batches' size is what one probe of a bisection costs
    client = producer(
        settings,
        **{"linger.ms": 5, "batch.num.messages": batch_records, "enable.idempotence": False},
    )
    extra: list[Timed] = []
    for reading in traced:
        out_topic, value, headers = reading.output(settings)
        closes = reading.entered_ms + reading.window_closes_ms
        acked = produce_acked(client, [(out_topic, b"w", value, headers, closes)], "write")
        ((_, partition), end) = next(iter(acked.items()))
        extra += reading.records(settings, (partition, end - 1))
    extra.sort(key=lambda record: record[0])  # stable: a reading's hops keep their order
    pool = _history_batches(settings, hops_per_batch)
    written = 0
    step_ms = 1000.0 * hops_per_batch / hops_per_s
    count = -(-hops // hops_per_batch)
    for n, batch in zip(range(count), itertools.cycle(pool), strict=False):
        at = start_ms + int(n * step_ms)
        while extra and extra[0][0] <= at:
            written += _produce(client, extra.pop(0))
        for p, doc in batch:
            written += _produce(client, (at, topic, p, b"parse/iot.raw/0", doc, []))
    while extra:
        written += _produce(client, extra.pop(0))
    if client.flush(120) > 0:
        raise BrokerError("the history was not acknowledged within 120 s")
    return written


def _produce(client: Any, record: Timed) -> int:
    at, topic, partition, key, value, headers = record
    while True:
        try:
            client.produce(topic, value, key, partition=partition, timestamp=at, headers=headers)
            return 1
        except BufferError:
            client.poll(0.05)


def write_dead_letters(
    settings: Settings,
    stage: str,
    count: int,
    start_ms: int,
    per_s: float,
    reasons: Sequence[str] = ("schema_violation", "out_of_range", "decode_error"),
    source: str | None = None,
    batch_records: int = 64,
) -> list[tuple[int, str]]:
    """Write ``count`` dead letters of ``stage`` to its DLQ as the stages would (the
    envelope, record time = failed-at), ``per_s`` per second of failed-at from
    ``start_ms``, reasons in turn, ``source`` (``backfill:<run>``) if given;
    returns ``(failed-at, reason)`` of each."""
    spec = settings.stage(stage)
    client = producer(
        settings,
        **{"linger.ms": 5, "batch.num.messages": batch_records, "enable.idempotence": False},
    )
    headers = ((contract.H_SOURCE, source.encode()),) if source else ()
    templates = []  # one envelope per reason; failed-at is put in per record
    for reason in reasons:
        dead = DeadLetter(
            stage=stage,
            reason=reason,
            error_class="InvalidMessage",
            error_message="a bad reading",
            key=b"dev-1",
            value=b'{"device_id": "dev-1", "seq": 1}',
            headers=headers,
            topic=spec.inputs[0],
            partition=0,
            offset=0,
            timestamp_ms=start_ms,
        )
        _, key, value, envelope, _ = dead_letter_record(dead, spec.dlq, 0)
        at = next(i for i, (name, _) in enumerate(envelope) if name == FAILED_AT)
        templates.append((key, value, envelope, at))
    written = []
    for i in range(count):
        failed_at = start_ms + int(i * 1000 / per_s)
        key, value, envelope, at = templates[i % len(templates)]
        envelope = list(envelope)
        envelope[at] = (FAILED_AT, b"%d" % failed_at)
        _produce(client, (failed_at, spec.dlq, 0, key, value, envelope))
        written.append((failed_at, reasons[i % len(reasons)]))
    if client.flush(120) > 0:
        raise BrokerError("the dead letters were not acknowledged within 120 s")
    return written
