"""The batch a worker failed on, so that a crash loop is seen, not silent.

A worker that exits on a batch (a bug with ``on_error: crash``, an exception in a
stage hook, a broker that will not take its outputs) first writes what it failed
on to the compacted ``failures_topic``, keyed ``<stage>/<topic>/<partition>``:
the batch's first and last offset, the error, and how many times in a row it has
failed there (one more than the record already there, if that named the same
first offset). The next worker of the stage reads its records at start:
``pipeline_batch_failures{stage,topic,partition}`` shows the attempts, and from the
second attempt ``/healthz`` names the partition and offset it is stuck on. A batch
that goes through past that offset (with batches in flight: that landed, after every
batch before it of its partition) clears the record (a tombstone). ``pipeline
status`` reads the topic too and shows a stage that is crash-looping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import orjson

from pipeline.errors import BrokerError
from pipeline.kafka.clients import producer
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.produce import produce_acked
from pipeline.settings import Settings

log = logging.getLogger("pipeline.failures")

#: from this many failed attempts on one batch in a row, it is a crash loop
LOOP = 2


@dataclass(frozen=True, slots=True)
class Failure:
    stage: str
    topic: str
    partition: int
    offset: int  # the failed batch's first offset
    last_offset: int
    attempts: int
    error: str
    at_ms: int

    @property
    def key(self) -> bytes:
        return f"{self.stage}/{self.topic}/{self.partition}".encode()

    @property
    def looping(self) -> bool:
        return self.attempts >= LOOP

    def describe(self) -> str:
        return (
            f"stage {self.stage} failed {self.attempts} time(s) in a row on "
            f"{self.topic}[{self.partition}] at offset {self.offset} (batch "
            f"{self.offset}-{self.last_offset}; last: {self.error})"
        )


def read_failures(settings: Settings, stage: str | None = None) -> list[Failure]:
    """The failures on record (of ``stage``, or of every stage), newest per key."""
    topic = settings.failures_topic
    if topic is None:
        return []
    latest: dict[bytes, Failure | None] = {}
    for message in read_topic(settings, topic):
        key = message.key() or b""
        value = message.value()
        if not value:
            latest[key] = None
            continue
        try:
            failure = Failure(**orjson.loads(value))
        except (orjson.JSONDecodeError, TypeError):
            continue
        latest[key] = failure
    return [f for f in latest.values() if f is not None and (stage is None or f.stage == stage)]


class FailureLog:
    """A worker's side of the failures topic."""

    def __init__(self, settings: Settings, stage_id: str) -> None:
        self.settings = settings
        self.stage_id = stage_id
        self.topic = settings.failures_topic
        self.known: dict[tuple[str, int], Failure] = {}

    def load(self) -> dict[tuple[str, int], Failure]:
        """What earlier workers of the stage failed on (blocking; at start)."""
        found = read_failures(self.settings, self.stage_id)
        self.known = {(f.topic, f.partition): f for f in found}
        return self.known

    def record(self, topic: str, partition: int, first: int, last: int, error: str) -> Failure:
        """Note a failed batch before the worker exits (blocking, bounded, best effort)."""
        before = self.known.get((topic, partition))
        attempts = 1
        # the same batch again, or one that covers it (batch bounds after a restart
        # depend on what was committed and fetched)
        if before is not None and first <= before.offset <= last:
            attempts = before.attempts + 1
        now_ms = int(time.time() * 1000)
        failure = Failure(
            self.stage_id, topic, partition, first, last, attempts, error[:500], now_ms
        )
        if self.topic is not None:
            try:
                produce_acked(
                    producer(self.settings),
                    [(self.topic, failure.key, orjson.dumps(asdict(failure)), [], None)],
                    "record the failed batch",
                    timeout=5.0,
                )
            except BrokerError as exc:
                log.warning("the failed batch was not recorded: %s", exc)
        self.known[(topic, partition)] = failure
        return failure

    def passed(self, topic: str, partition: int, first: int, last: int) -> Failure | None:
        """A batch went through: if it covers a recorded failure, forget it (returns it)."""
        failure = self.known.get((topic, partition))
        if failure is None or last < failure.offset:
            return None
        if self.known.pop((topic, partition), None) is None:
            return None  # cleared meanwhile (another batch's check, in another thread)
        if self.topic is not None:
            try:
                produce_acked(
                    producer(self.settings),
                    [(self.topic, failure.key, None, [], None)],
                    "clear the failed batch",
                    timeout=5.0,
                )
            except BrokerError as exc:
                log.warning("the failed batch's record was not cleared: %s", exc)
        return failure
