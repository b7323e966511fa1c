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
5. produces the batch's lineage hops (they name the outputs' offsets; each to the
   lineage partition of its id, :mod:`pipeline.lineage.placing`) and its state
   writes (after the outputs: state must not run ahead of outputs never
   acknowledged), and awaits them;
6. applies the state writes to the in-memory table (``on_state``).

Only then may the caller ack the batch (commit its offsets). With ``in_flight``
above 1, steps 4-6 of a batch run in the background (``BatchReport.landing``) while
the next batch is processed: a stateless batch's outputs are handed to the producer
in order and the runner returns; a stateful batch's outputs are still awaited, its
state writes and hops are not. The caller acks only once the landing completed.
A crash anywhere before re-delivers the batch: at-least-once, lineage ids and the
fence make repeats harmless. A batch of the stage's backfill lane writes its outputs
to the lanes of the stages that read them (``lane_targets``), so a backfill never
sits in front of live records downstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from operator import attrgetter
from typing import Any, Protocol

from dlq.budget import Budget
from dlq.envelope import MAX_PAYLOAD_BYTES, DeadLetter, dead_letter_record
from dlq.reasons import STATE_UNREADABLE, UNWRITABLE
from pipeline.engine.result import BatchResult
from pipeline.engine.retry import route_retries
from pipeline.errors import InvalidMessage, RecordsRefused
from pipeline.lineage.hops import batch_hops, state_hops, stored_hops
from pipeline.records import Deliveries, Outgoing, OutRecord, Partitioned, Record
from pipeline.settings import StageSpec


class Sending(Protocol):
    """A batch handed to the producer, awaiting the broker's acknowledgement."""

    async def acknowledged(self) -> Deliveries: ...


class Producer(Protocol):
    """What the runner needs of a producer: a batch in, every acknowledgement out, in
    order; :class:`~pipeline.errors.DeliveryError` if any record was refused.
    ``submit`` hands a batch over in order and returns before the acknowledgement."""

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries: ...

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Sending: ...


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
    #: what of the batch is still in flight (its lineage hops, ``StageRunner.overlap_hops``;
    #: or its outputs and hops, ``StageRunner.in_flight``): the batch is delivered, and
    #: may be committed, only once this completes. Its result is the batch's final
    #: report (records the broker refused for good became dead letters meanwhile).
    landing: asyncio.Future[BatchReport] | None = None

    @property
    def durable(self) -> dict[tuple[str, int], int]:
        """A sink's durable offsets, (topic, partition) -> last offset durable."""
        return self.result.durable_through


log = logging.getLogger("pipeline.engine")
_TOPIC = attrgetter("topic")


def _final(report: BatchReport) -> BatchReport:
    """A landing's result: its batch's report without the landing. The report itself
    points at the landing, so returning it would make a reference cycle per batch,
    which only the cycle collector frees; workers run it rarely (``GC_GEN0_THRESHOLD``),
    and every batch's records stayed in memory until then (in the aggregate under
    load, 30,000 records in 3 seconds)."""
    return replace(report, landing=None)


def _noop(name: str) -> None:
    return None


async def _landing_noop(name: str) -> None:
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
        lineage_partitions: int = 1,
        lane_targets: Mapping[str, tuple[str, ...]] | None = None,
        budget: Budget | None = None,
        clock: Callable[[], float] = time.time,
        on_state: Callable[[int, list[tuple[bytes, bytes | None]]], None] | None = None,
        spans: Callable[[Sequence[Record], BatchResult, int], None] | None = None,
        failpoint: Callable[[str], None] = _noop,
        landing_failpoint: Callable[[str], Awaitable[None]] = _landing_noop,
        max_message_bytes: int = 1_000_000,
        topic_limits: Mapping[str, int] | None = None,
        dlq_max_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.stage_id = stage_id
        self.spec = spec
        self.engine = engine
        self.producer = producer
        self.lineage_topic = lineage_topic
        #: the lineage topic's declared partition count (where each id's hops go)
        self.lineage_partitions = lineage_partitions
        self.default_output = spec.default_output
        self.lane = spec.backfill_lane
        self.lane_targets = dict(lane_targets or {})
        self.budget = budget or Budget(stage_id, spec.dlq_budget)
        self.clock = clock
        self.on_state = on_state
        self.spans = spans
        self.failpoint = failpoint
        #: awaited in a landing once its outputs are acknowledged (a test's failpoint)
        self.landing_failpoint = landing_failpoint
        self.retry_topic = spec.retry.topic if spec.retry is not None else ""
        #: the largest record the producer writes, and topics that take less
        self.max_message_bytes = max_message_bytes
        self.topic_limits = dict(topic_limits or {})
        self.dlq_max_bytes = min(dlq_max_bytes, self._limit(spec.dlq))
        #: a sink: run the stage in a thread (it may block on I/O)
        self.blocking = bool(getattr(engine, "blocking", False))
        #: return once the outputs are acknowledged and leave the lineage hops in
        #: flight (``BatchReport.landing``), so the next batch does not wait for
        #: them; only for batches with no state writes. Set by the runtime.
        self.overlap_hops = False
        #: how many batches may wait for the broker's acknowledgement at once. Above 1,
        #: a batch with no state writes returns once its outputs are handed to the
        #: producer (in order): their acknowledgement and the lineage hops after it
        #: land in ``BatchReport.landing`` while the next batch runs. Set by the runtime.
        self.in_flight = 1
        #: also hold while this many input records await their acknowledgement (None:
        #: count batches only). With it, small batches fly in numbers up to
        #: ``in_flight`` while the records held stay bounded. Set by the runtime.
        self.records_in_flight: int | None = None
        self._flying: deque[asyncio.Future[BatchReport]] = deque()
        #: input records of the landings not yet done (the hops-only ones count 0)
        self.held_records = 0
        #: how many batches await the broker's acknowledgement now (their landing);
        #: an int, so another thread (the metrics endpoint) can read it
        self.landing = 0
        #: a stateful stage (``in_flight`` above 1): once a batch's outputs are
        #: acknowledged, its state writes and hops are left in flight; the table
        #: (``on_state``) gets each batch's writes once they land, in batch order
        self.overlap_state = False
        self._state_landing: dict[int, asyncio.Future[BatchReport]] = {}

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

    def _dead_letter(self, dead: DeadLetter, now_ms: int, max_bytes: int | None = None) -> Outgoing:
        return dead_letter_record(dead, self.spec.dlq, now_ms, max_bytes or self.dlq_max_bytes)

    # -- records that cannot be written ------------------------------------------------------
    def _limit(self, topic: str) -> int:
        return min(self.max_message_bytes, self.topic_limits.get(topic, self.max_message_bytes))

    def _too_large(self, records: Sequence[Record], result: BatchResult, lane_batch: bool) -> None:
        """Outputs larger than their topic takes become ``unwritable`` dead letters of the
        records they were made from, before anything is sent (a broker would refuse
        them, and the batch would fail again on every retry)."""
        # headers are small: only outputs near a limit are measured whole
        near = min([self.max_message_bytes, *self.topic_limits.values()]) - 65_536
        suspects = [i for i, o in enumerate(result.outputs) if len(o.value or b"") > near]
        if not suspects:
            return
        refused: dict[int, str] = {}
        for i in suspects:
            out = result.outputs[i]
            topic = self._targets(out.topic, lane_batch)[0]
            size = len(out.key or b"") + len(out.value or b"") + _header_bytes(out.headers)
            if size > self._limit(topic):
                refused[i] = f"{topic}: an output of {size} bytes is over {self._limit(topic)}"
        self._unwritable(records, result, refused)

    def _unwritable(
        self, records: Sequence[Record], result: BatchResult, refused: Mapping[int, str]
    ) -> list[DeadLetter]:
        """Replace the outputs at ``refused`` (index -> why) by ``unwritable`` dead letters
        of their sources (of themselves, for outputs made from state); returns them."""
        if not refused:
            return []
        by_offset = {r.offset: r for r in records}
        made: list[DeadLetter] = []
        for index, why in refused.items():
            out = result.outputs[index]
            source = by_offset.get(out.source_offset) if out.source_offset is not None else None
            exc = InvalidMessage(UNWRITABLE, why)
            if source is not None and source.offset not in result.rejected_offsets:
                result.reject(source, exc)
                made.append(result.dead[-1])
            elif source is None:
                made.append(_from_output(self.stage_id, out, why, self.default_output or ""))
                result.dead.append(made[-1])
        result.outputs[:] = [o for i, o in enumerate(result.outputs) if i not in refused]
        return made

    # -- a batch ---------------------------------------------------------------------------
    async def handle(self, partition: int, records: Sequence[Record]) -> BatchReport:
        """Process and deliver one batch; see the module docstring. Raises
        BudgetExceeded (nothing delivered) or DeliveryError (not acknowledged)."""
        self.failpoint("batch-stall")
        start_ns = time.time_ns()
        if self.blocking:  # a sink: it may wait on I/O, the event loop must not
            result = await asyncio.to_thread(self.engine.process, partition, records)
        else:
            result = self.engine.process(partition, records)
        if self.spans is not None:
            self.spans(records, result, start_ns)
        retry_limit = self._limit(self.retry_topic) if self.retry_topic else None
        retries = route_retries(self.spec.retry, result, int(self.clock() * 1000), retry_limit)
        lane_batch = self.lane is not None and bool(records) and records[0].topic == self.lane
        self._too_large(records, result, lane_batch)
        if result.rejected_offsets:
            self.budget.check(self._outcomes(records, result))
        else:
            self.budget.check_clean(len(records))
        batch, topics = self._outgoing(result, retries, lane_batch)
        if self.in_flight > 1 and self.spec.state_topic is None and not self.blocking:
            await self._room(len(records))
            sending = await self.producer.submit(batch)
            report = self._report(records, result, retries, topics)
            report.landing = self._fly(
                self._land(sending, partition, records, result, retries, topics, lane_batch),
                len(records),
            )
            return report
        try:
            delivered = await self.producer.send_batch(batch)
        except RecordsRefused as exc:
            retries, batch, topics, delivered = await self._after_refusal(
                exc, records, result, retries, lane_batch
            )
        return await self._after_outputs(
            partition, records, result, retries, delivered, topics, self.overlap_hops
        )

    async def drain(self) -> None:
        """Wait until no batch is in flight (their failures are the caller's landings')."""
        flying = self._flying
        while flying:
            await asyncio.wait([flying[0]])
            flying.popleft()
        self._state_landing.clear()

    def _fly(
        self, landing: Coroutine[Any, Any, BatchReport], records: int = 0
    ) -> asyncio.Future[BatchReport]:
        """Start a batch's landing: counted in ``landing`` and waited for by ``drain``
        until done; ``_room`` holds a stage's batches in flight to ``in_flight`` and
        their ``records`` to ``records_in_flight`` (the hops of ``overlap_hops`` alone
        are not held)."""
        self._prune()
        future = asyncio.ensure_future(landing)
        self._flying.append(future)
        self.held_records += records
        self.landing += 1
        future.add_done_callback(partial(self._landed, records))
        return future

    def _landed(self, records: int, _: asyncio.Future[BatchReport]) -> None:
        self.landing -= 1
        self.held_records -= records

    def _prune(self) -> None:
        """Forget the landings at the head of the queue that are done."""
        flying = self._flying
        while flying and flying[0].done():
            flying.popleft()

    async def _room(self, records: int = 0) -> None:
        """Wait until fewer than ``in_flight`` batches await their acknowledgement and,
        with ``records_in_flight``, until ``records`` more fit beside theirs (a batch
        larger than that alone waits for every landing before it)."""
        flying = self._flying
        limit = self.records_in_flight
        self._prune()
        while flying and (
            len(flying) >= self.in_flight
            or (limit is not None and self.held_records + records > limit)
        ):
            await asyncio.wait([flying[0]])
            flying.popleft()
            self._prune()

    async def _land(
        self,
        sending: Sending,
        partition: int,
        records: Sequence[Record],
        result: BatchResult,
        retries: list[Outgoing],
        topics: list[str],
        lane_batch: bool,
    ) -> BatchReport:
        """A submitted batch's second half: its outputs acknowledged (refused ones made
        dead letters), then its lineage hops; returns the batch's final report."""
        try:
            delivered = await sending.acknowledged()
        except RecordsRefused as exc:
            retries, _, topics, delivered = await self._after_refusal(
                exc, records, result, retries, lane_batch
            )
        await self.landing_failpoint("landing-fail")
        return await self._after_outputs(
            partition, records, result, retries, delivered, topics, False
        )

    async def _after_outputs(
        self,
        partition: int,
        records: Sequence[Record],
        result: BatchResult,
        retries: list[Outgoing],
        delivered: Deliveries,
        topics: list[str],
        overlap_hops: bool,
    ) -> BatchReport:
        """The outputs are acknowledged: the lineage hops and state writes, then the
        state applied; with ``overlap_hops`` (and no state writes) the hops are left in
        flight as the report's landing."""
        if result.dead:
            self.failpoint("dlq-delivered")
        hops: list[Partitioned] = []
        if self.lineage_topic is not None:
            now_ms = int(self.clock() * 1000)
            hops = batch_hops(
                self.stage_id,
                self.lineage_topic,
                records,
                result,
                retries,
                delivered,
                now_ms,
                topics,
                self.retry_topic,
                self.spec.dlq,
                self.lineage_partitions,
            )
            if result.stored_at:
                hops += stored_hops(
                    self.stage_id,
                    self.lineage_topic,
                    result.stored_at,
                    now_ms,
                    self.lineage_partitions,
                )
        writes = self._state_writes(partition, result)
        report = self._report(records, result, retries, topics)
        if hops and not writes and overlap_hops:
            report.landing = self._fly(self._hops_land(hops, report))
            return report
        if writes and self.overlap_state:
            await self._room(len(records))
            sending = await self.producer.submit((), [*hops, *writes])
            before = self._state_landing.get(partition)
            landing = self._fly(
                self._state_land(sending, partition, result.writes, report, before), len(records)
            )
            self._state_landing[partition] = landing
            landing.add_done_callback(partial(self._landed_state, partition))
            report.landing = landing
            return report
        await self.producer.send_batch((), [*hops, *writes] if hops else writes)
        if self.on_state is not None and result.writes:
            self.on_state(partition, result.writes)
        return report

    def _landed_state(self, partition: int, landing: asyncio.Future[BatchReport]) -> None:
        if self._state_landing.get(partition) is landing:
            del self._state_landing[partition]

    async def _state_land(
        self,
        sending: Sending,
        partition: int,
        writes: list[tuple[bytes, bytes | None]],
        report: BatchReport,
        before: asyncio.Future[BatchReport] | None,
    ) -> BatchReport:
        """A stateful batch's state writes and hops acknowledged, then its writes
        applied to the table after those of the partition's batch before (which must
        land too)."""
        await sending.acknowledged()
        await self.landing_failpoint("landing-fail")
        if before is not None:
            await before
        if self.on_state is not None:
            self.on_state(partition, writes)
        return _final(report)

    async def _hops_land(self, hops: list[Partitioned], report: BatchReport) -> BatchReport:
        await self.landing_failpoint("landing-fail")
        await self.producer.send_batch((), hops)
        return _final(report)

    async def _after_refusal(
        self,
        exc: RecordsRefused,
        records: Sequence[Record],
        result: BatchResult,
        retries: list[Outgoing],
        lane_batch: bool,
    ) -> tuple[list[Outgoing], list[Outgoing], list[str], Deliveries]:
        """The broker refused some records of the batch for good: the rest are written.
        Refused outputs and retries become ``unwritable`` dead letters, refused dead
        letters are sent again smaller; only those are produced now. Returns the
        batch as it was finally written (for lineage hops and metrics)."""
        first = exc.deliveries
        assert isinstance(first, Deliveries)
        n_out, n_retry, n_dead = len(result.outputs), len(retries), len(result.dead)
        refused = exc.refused
        outputs_refused = {i: why for i, why in refused.items() if i < n_out}
        retries_refused = {
            i - n_out: why for i, why in refused.items() if n_out <= i < n_out + n_retry
        }
        dead_refused = {
            i - n_out - n_retry for i in refused if n_out + n_retry <= i < n_out + n_retry + n_dead
        }
        kept_out = [i for i in range(n_out) if i not in outputs_refused]
        kept_retry = [i for i in range(n_retry) if i not in retries_refused]
        old_dead = list(result.dead)
        for i, why in retries_refused.items():
            result.reject(result.retried[i], InvalidMessage(UNWRITABLE, why))
        self._unwritable(records, result, outputs_refused)
        new_dead = result.dead[n_dead:]
        now_ms = int(self.clock() * 1000)
        resend = [self._dead_letter(old_dead[i], now_ms, 4096) for i in sorted(dead_refused)]
        resend += [self._dead_letter(d, now_ms) for d in new_dead]
        try:
            more = await self.producer.send_batch(resend)
        except RecordsRefused:
            # the smallest a dead letter can be: the envelope, no payload
            bare = [(topic, None, None, headers, ts) for topic, _, _, headers, ts in resend]
            more = await self.producer.send_batch(bare)
        log.error(
            "stage %s: %d record(s) refused by the broker for good (first: %s); written as "
            "unwritable dead letters",
            self.stage_id,
            len(refused),
            min(refused.items())[1],
        )
        # the batch as written: kept outputs, kept retries, dead letters (re-sent ones
        # where they were), then the new ones
        kept_retries = [retries[i] for i in kept_retry]
        result.retried = [result.retried[i] for i in kept_retry]
        coords: list[tuple[int, int]] = [(first.partitions[i], first.offsets[i]) for i in kept_out]
        coords += [(first.partitions[n_out + i], first.offsets[n_out + i]) for i in kept_retry]
        resent = iter(range(len(dead_refused)))
        for i in range(n_dead):
            if i in dead_refused:
                j = next(resent)
                coords.append((more.partitions[j], more.offsets[j]))
            else:
                coords.append(
                    (first.partitions[n_out + n_retry + i], first.offsets[n_out + n_retry + i])
                )
        coords += [
            (more.partitions[j], more.offsets[j]) for j in range(len(dead_refused), len(more))
        ]
        batch, topics = self._outgoing(result, kept_retries, lane_batch)
        written = Deliveries(batch, [p for p, _ in coords], [o for _, o in coords])
        return kept_retries, batch, topics, written

    async def tick(self, partition: int, quiet_since: float) -> BatchReport | None:
        """Advance an idle partition of a stateful stage; deliver what that emits."""
        await self.drain()  # its writes go to the table after those in flight
        tick = getattr(self.engine, "tick", None)
        result = tick(partition, quiet_since) if tick is not None else None
        if result is None:
            return None
        batch, topics = self._outgoing(result, (), False)
        delivered = await self.producer.send_batch(batch)
        writes = self._state_writes(partition, result)
        if self.lineage_topic is not None and result.emitted_from_state:
            emitted = state_hops(
                self.stage_id,
                self.lineage_topic,
                partition,
                result.outputs,
                delivered,
                topics,
                int(self.clock() * 1000),
                self.lineage_partitions,
            )
            writes = [*emitted, *writes]
        await self.producer.send_batch([], writes)
        if self.on_state is not None and result.writes:
            self.on_state(partition, result.writes)
        return self._report((), result, [], topics)

    async def load(
        self, partition: int, items: Iterable[tuple[bytes, bytes]]
    ) -> BatchReport | None:
        """(Re)load a stateful stage's partition from its changelog items, then
        :meth:`quarantine` what the load could not read. Returns the quarantine's report
        (its dead letters), or None."""
        self.engine.load(partition, items)
        return await self.quarantine(partition)

    async def quarantine(self, partition: int) -> BatchReport | None:
        """Move the state records of ``partition`` that its load could not read to the
        stage's dead-letter topic (``state_unreadable``, the record's key and value as
        they were), then delete them from the changelog and the table, in that order:
        one unreadable record neither stops the partition (a worker that crashed on
        it would crash again on every restart) nor disappears unseen. A record too
        large for the dead-letter topic whole is dead-lettered cut short and *not*
        deleted (it is reported again at the next load, until the stage writes that
        key again). None when the load read everything."""
        topic = self.spec.state_topic
        unreadable = getattr(self.engine, "unreadable", None)
        if topic is None or unreadable is None:
            return None
        found = unreadable(partition)
        if not found:
            return None
        now_ms = int(self.clock() * 1000)
        limit = self._limit(self.spec.dlq)
        result = self.engine.new_result()
        for bad in found:
            result.dead.append(
                DeadLetter(
                    stage=self.stage_id,
                    reason=STATE_UNREADABLE,
                    error_class=bad.error_class,
                    error_message=f"state record of partition {partition} could not be read "
                    f"({bad.error}); it was deleted from the state, which starts empty there",
                    key=bad.key,
                    value=bad.value,
                    headers=(),
                    topic=topic,
                    partition=partition,
                    offset=-1,
                    timestamp_ms=now_ms,
                )
            )
        await self.producer.send_batch([self._dead_letter(d, now_ms, limit) for d in result.dead])
        # what the dead-letter topic took whole (with room for the envelope) is deleted
        whole = [b for b in found if len(b.key) + len(b.value) + _ENVELOPE_ROOM <= limit]
        tombstones: list[tuple[bytes, bytes | None]] = [(b.key, None) for b in whole]
        if tombstones:
            await self.producer.send_batch([], [(topic, partition, k, v) for k, v in tombstones])
            if self.on_state is not None:
                self.on_state(partition, tombstones)
        self.engine.quarantined(partition, len(found))
        log.error(
            "stage %s, partition %d: %d state records could not be read (first: %s: %s); "
            "they were moved to %s (reason %s)%s. Inspect with "
            "`pipeline dlq list --stage %s --reason %s`.",
            self.stage_id,
            partition,
            len(found),
            found[0].error_class,
            found[0].error,
            self.spec.dlq,
            STATE_UNREADABLE,
            " and deleted from the state"
            if len(whole) == len(found)
            else f"; {len(found) - len(whole)} too large to keep whole there stay in the state",
            self.stage_id,
            STATE_UNREADABLE,
        )
        return self._report((), result, [], [])

    async def flush(self) -> BatchReport | None:
        """Let a sink flush what is due (time-based rolling); deliver its dead letters
        and ``stored`` hops. None when the stage is no sink or nothing was due."""
        flush = getattr(self.engine, "flush", None)
        if flush is None:
            return None
        result = await asyncio.to_thread(flush, self.clock())
        if result is None:
            return None
        now_ms = int(self.clock() * 1000)
        batch = [self._dead_letter(d, now_ms) for d in result.dead]
        if batch:
            await self.producer.send_batch(batch)
        if self.lineage_topic is not None and result.stored_at:
            hops = stored_hops(
                self.stage_id,
                self.lineage_topic,
                result.stored_at,
                now_ms,
                self.lineage_partitions,
            )
            await self.producer.send_batch((), hops)
        return self._report((), result, [], [])

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


#: room left for a dead letter's envelope headers when judging whether a record fits
_ENVELOPE_ROOM = 4096


def _header_bytes(headers: Sequence[tuple[str, bytes]]) -> int:
    return sum(len(k) + len(v) for k, v in headers)


def _from_output(stage_id: str, out: OutRecord, why: str, topic: str) -> DeadLetter:
    """A dead letter of an output with no input record behind it (made from state)."""
    return DeadLetter(
        stage=stage_id,
        reason=UNWRITABLE,
        error_class="RecordsRefused",
        error_message=why,
        key=out.key,
        value=out.value,
        headers=tuple(out.headers),
        topic=out.topic or topic,
        partition=-1,
        offset=-1,
        timestamp_ms=out.timestamp_ms or 0,
    )
