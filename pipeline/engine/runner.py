"""One stage's batch handling, from records in to everything acknowledged, with no
Faust and no broker: the producer is injected (confluent-kafka in a worker, an
in-memory one in :mod:`pipeline.testing` and the engine's tests).

Per partition batch, :meth:`StageRunner.handle`:

1. runs the stage (:mod:`.process` or :mod:`.stateful`) into a
   :class:`~pipeline.engine.result.BatchResult`;
2. routes retryable records to the retry topic or, out of attempts, to dead letters;
3. checks the dead-letter budget: :class:`~pipeline.errors.BudgetExceeded` means
   nothing of the batch is delivered;
4. produces outputs, retries and dead letters and awaits the broker's
   acknowledgement of all of them;
5. produces the batch's lineage hops (they name the outputs' offsets) and its state
   writes (after the outputs: state must not run ahead of outputs never
   acknowledged), and awaits them;
6. applies the state writes to the in-memory table (``on_state``).

Only then may the caller ack the batch (commit its offsets). A crash anywhere
before re-delivers it: at-least-once, lineage ids and the fence make repeats
harmless. A batch of the stage's backfill lane writes its outputs to the lanes of
the stages that read them (``lane_targets``), so a backfill never sits in front of
live records downstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

from dlq.budget import Budget
from dlq.envelope import DeadLetter
from pipeline.engine.result import BatchResult
from pipeline.engine.retry import route_retries
from pipeline.lineage.hops import batch_hops
from pipeline.records import Deliveries, Outgoing, Partitioned, Record
from pipeline.settings import StageSpec


class Producer(Protocol):
    """What the runner needs of a producer: a batch in, every acknowledgement out, in
    order; :class:`~pipeline.errors.DeliveryError` if any record was refused."""

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries: ...


@dataclass
class BatchReport:
    """What a delivered batch did, for metrics and logs."""

    records: Sequence[Record]
    result: BatchResult
    retries: int
    #: records produced per output topic
    produced: dict[str, int] = field(default_factory=dict)
    #: dead letters per reason
    dead_by_reason: dict[str, int] = field(default_factory=dict)


_TOPIC = attrgetter("topic")


def _noop(name: str) -> None:
    return None


class StageRunner:
    """Process, route, budget, deliver and account for the batches of one stage."""

    def __init__(
        self,
        stage_id: str,
        spec: StageSpec,
        engine: Any,
        producer: Producer,
        *,
        lineage_topic: str | None = None,
        lane_targets: Mapping[str, tuple[str, ...]] | None = None,
        budget: Budget | None = None,
        clock: Callable[[], float] = time.time,
        on_state: Callable[[int, list[tuple[bytes, bytes | None]]], None] | None = None,
        spans: Callable[[Sequence[Record], BatchResult, int], None] | None = None,
        failpoint: Callable[[str], None] = _noop,
    ) -> None:
        self.stage_id = stage_id
        self.spec = spec
        self.engine = engine
        self.producer = producer
        self.lineage_topic = lineage_topic
        self.default_output = spec.default_output
        self.lane = spec.backfill_lane
        self.lane_targets = dict(lane_targets or {})
        self.budget = budget or Budget(stage_id, spec.dlq_budget)
        self.clock = clock
        self.on_state = on_state
        self.spans = spans
        self.failpoint = failpoint
        self.retry_topic = spec.retry.topic if spec.retry is not None else ""

    # -- routing -------------------------------------------------------------------------
    def _targets(self, topic: str | None, lane_batch: bool) -> tuple[str, ...]:
        chosen = topic or self.default_output
        assert chosen is not None  # the emitter refuses emits of a stage with no output
        if lane_batch:
            return self.lane_targets.get(chosen, (chosen,))
        return (chosen,)

    def _outgoing(
        self, result: BatchResult, retries: Sequence[Outgoing], lane_batch: bool
    ) -> tuple[list[Outgoing], list[str]]:
        """Outputs (first copy each), retries, dead letters, then extra lane copies;
        and the topic of each output's first copy (lineage hops name it)."""
        outputs = result.outputs
        now_ms = int(self.clock() * 1000)
        if not lane_batch and self.default_output and not any(map(_TOPIC, outputs)):
            # the common case: every output to the default topic
            topic = self.default_output
            batch = [(topic, o.key, o.value, o.headers, o.timestamp_ms) for o in outputs]
            topics = [topic] * len(batch)
            batch += retries
            batch += [self._dead_letter(d, now_ms) for d in result.dead]
            return batch, topics
        batch = []
        topics = []
        extra: list[Outgoing] = []
        default = self._targets(None, lane_batch) if self.default_output else ()
        for o in outputs:
            targets = default if o.topic is None else self._targets(o.topic, lane_batch)
            batch.append((targets[0], o.key, o.value, o.headers, o.timestamp_ms))
            topics.append(targets[0])
            for more in targets[1:]:
                extra.append((more, o.key, o.value, o.headers, o.timestamp_ms))
        batch += retries
        batch += [self._dead_letter(d, now_ms) for d in result.dead]
        batch += extra
        return batch, topics

    def _dead_letter(self, dead: DeadLetter, now_ms: int) -> Outgoing:
        return (
            self.spec.dlq,
            dead.key,
            dead.value,
            dead.envelope_headers(now_ms),
            dead.timestamp_ms or None,
        )

    # -- a batch ---------------------------------------------------------------------------
    async def handle(self, partition: int, records: Sequence[Record]) -> BatchReport:
        """Process and deliver one batch; see the module docstring. Raises
        BudgetExceeded (nothing delivered) or DeliveryError (not acknowledged)."""
        self.failpoint("batch-stall")
        start_ns = time.time_ns()
        result = self.engine.process(partition, records)
        if self.spans is not None:
            self.spans(records, result, start_ns)
        retries = route_retries(self.spec.retry, result, int(self.clock() * 1000))
        if result.rejected_offsets:
            self.budget.check(self._outcomes(records, result))
        else:
            self.budget.check_clean(len(records))
        lane_batch = self.lane is not None and bool(records) and records[0].topic == self.lane
        batch, topics = self._outgoing(result, retries, lane_batch)
        delivered = await self.producer.send_batch(batch)
        if result.dead:
            self.failpoint("dlq-delivered")
        hops: list[Outgoing] = []
        if self.lineage_topic is not None:
            hops = batch_hops(
                self.stage_id,
                self.lineage_topic,
                records,
                result,
                retries,
                delivered,
                int(self.clock() * 1000),
                topics,
                self.retry_topic,
                self.spec.dlq,
            )
        writes = self._state_writes(partition, result)
        await self.producer.send_batch(hops, writes)
        if self.on_state is not None and result.writes:
            self.on_state(partition, result.writes)
        return self._report(records, result, retries, topics)

    async def tick(self, partition: int, quiet_since: float) -> BatchReport | None:
        """Advance an idle partition of a stateful stage; deliver what that emits."""
        tick = getattr(self.engine, "tick", None)
        result = tick(partition, quiet_since) if tick is not None else None
        if result is None:
            return None
        batch, topics = self._outgoing(result, (), False)
        await self.producer.send_batch(batch)
        await self.producer.send_batch([], self._state_writes(partition, result))
        if self.on_state is not None and result.writes:
            self.on_state(partition, result.writes)
        return self._report((), result, [], topics)

    def _state_writes(self, partition: int, result: BatchResult) -> list[Partitioned]:
        topic = self.spec.state_topic
        if topic is None or not result.writes:
            return []
        return [(topic, partition, key, value) for key, value in result.writes]

    @staticmethod
    def _outcomes(records: Sequence[Record], result: BatchResult) -> list[bool]:
        """Per input record, in order: was it dead-lettered?"""
        if not result.rejected_offsets:
            return [False] * len(records)
        rejected = set(result.rejected_offsets)
        return [r.offset in rejected for r in records]

    @staticmethod
    def _report(
        records: Sequence[Record],
        result: BatchResult,
        retries: Sequence[Outgoing],
        topics: list[str],
    ) -> BatchReport:
        produced: dict[str, int] = {}
        if topics and topics[0] == topics[-1] and topics.count(topics[0]) == len(topics):
            produced[topics[0]] = len(topics)
        else:
            for topic in topics:
                produced[topic] = produced.get(topic, 0) + 1
        dead: dict[str, int] = {}
        for letter in result.dead:
            dead[letter.reason] = dead.get(letter.reason, 0) + 1
        return BatchReport(records, result, len(retries), produced, dead)
