"""Bindings: what each stage does with one partition batch on Kafka.

A binding runs the pure stage (``stages/``), produces its outputs and dead letters
and awaits their acknowledgement, and keeps the stage's state in a Faust table
where it has one (registry for enrich, windows for aggregate). The runner
(:mod:`pipeline.runner`) creates one per worker and acks a batch only after
:meth:`Binding.handle` returned.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import faust

from dlq import retry
from dlq.budget import Budget
from dlq.envelope import DeadLetter
from dlq.reasons import Reason
from pipeline import failpoints
from pipeline.errors import BudgetExceeded, StageStopped
from pipeline.kafka.clients import client_config, producer
from pipeline.kafka.offsets import high_watermarks
from pipeline.kafka.produce import AsyncProducer, Deliveries, Partitioned
from pipeline.lineage import hops as lineage
from pipeline.obs import metrics, tracing
from pipeline.obs.health import HEALTH
from pipeline.records import InRecord, StageResult
from pipeline.runtime.quiet import PipelineQuiet
from pipeline.runtime.tables import named_global_table, named_table
from pipeline.settings import Settings
from stages.aggregate import AggregateResult, AggregateStage
from stages.enrich import Device, EnrichStage
from stages.ingest import IngestStage
from stages.parse import ParseStage

if TYPE_CHECKING:
    from pipeline.runtime.app import StageApp

log = logging.getLogger("pipeline.bindings")

Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


_new_in_record = object.__new__
# InRecord is a frozen dataclass: its __init__ sets each field through
# object.__setattr__; the slots' own setters do the same at half the cost.
(_set_topic, _set_partition, _set_offset, _set_ts, _set_key, _set_value, _set_headers) = (
    getattr(InRecord, name).__set__
    for name in ("topic", "partition", "offset", "timestamp_ms", "key", "value", "headers")
)


def to_in_record(r: Any) -> InRecord:
    """An aiokafka ConsumerRecord as an :class:`InRecord` (once per consumed record)."""
    record: InRecord = _new_in_record(InRecord)
    _set_topic(record, r.topic)
    _set_partition(record, r.partition)
    _set_offset(record, r.offset)
    _set_ts(record, r.timestamp or 0)
    _set_key(record, r.key)
    _set_value(record, r.value)
    _set_headers(record, tuple(r.headers or ()))
    return record


#: allocations between two young-generation collections in a worker (Python: 700)
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a worker that handles batches.

    A batch's records, headers and outputs live until the batch is delivered, so
    with Python's default (a young collection every 700 allocations) each of them is
    scanned in gen 0, again in gen 1 and then in full collections, which also walk
    every object Faust, aiokafka and the stage made at startup: profiled, about a
    quarter of a stage's CPU (``gc.disable()`` made a stage ~30 % faster). So, once,
    when the worker is ready: the startup heap is frozen (``gc.freeze()``: never
    scanned again; it lives as long as the process anyway), and a young collection
    runs every :data:`GC_GEN0_THRESHOLD` allocations: by then most of a batch's
    objects were freed by reference counting, which the collector does not scan.
    Cycles are still collected, so memory stays bounded (garbage cycles wait for at
    most that many allocations).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gc.get_threshold()[0]), gen1, gen2)


class Binding:
    """What a stage does with one partition batch; subclasses hold the stage's state."""

    def __init__(self, stage_id: str, settings: Settings, app: StageApp) -> None:
        self.stage_id = stage_id
        self.settings = settings
        self.spec = settings.stage(stage_id)
        self.app = app
        self._producer: AsyncProducer | None = None
        self.lock = asyncio.Lock()
        self._ready_lock = asyncio.Lock()
        self._ready = False
        self.budget = Budget(stage_id, self.spec.dlq_budget)
        self.lineage_topic = settings.lineage_topic
        retry_topic = self.spec.retry.topic if self.spec.retry is not None else ""
        #: output, retry and dead-letter topic, as lineage hops name them
        self._out_topics = (self.spec.output, retry_topic, self.spec.dlq)
        #: a batch of the stage's backfill lane goes to the next stage's lane
        self._lane = self.spec.backfill_lane
        self._lane_output = settings.lane_output(stage_id) if self._lane else self.spec.output
        self._lane_out_topics = (self._lane_output, retry_topic, self.spec.dlq)
        #: why the stage stopped consuming (the dead-letter budget), or None
        self.stopped: str | None = None
        #: monotonic time the batch being processed started, or None when idle
        self.busy_since: float | None = None
        HEALTH.watch(f"{stage_id}_batch", self.stuck)

    def stuck(self) -> str | None:
        """A liveness problem if one batch has been processing for too long."""
        since, limit = self.busy_since, self.settings.runner.liveness_timeout_s
        if since is not None and time.monotonic() - since > limit:
            return (
                f"stage {self.stage_id}: one batch has been processing for "
                f"{time.monotonic() - since:.0f}s (runner.liveness_timeout_s={limit:g})"
            )
        return None

    @property
    def producer(self) -> AsyncProducer:
        if self._producer is None:
            self._producer = AsyncProducer(producer(self.settings))
        return self._producer

    async def on_ready(self) -> None:
        """Called once, before the first batch is processed (after table recovery)."""

    def process(self, partition: int, records: Sequence[InRecord]) -> StageResult:
        raise NotImplementedError

    def state_writes(self, partition: int, result: StageResult) -> list[Partitioned]:
        """Changelog records of the batch's state changes, produced (after the outputs
        were acknowledged) with the lineage hops and acknowledged before the batch is."""
        return []

    def after_delivery(self, partition: int, result: StageResult) -> None:
        """Called after outputs (and state writes) are acknowledged and before the
        batch is acked."""

    async def ready(self) -> None:
        """Run :meth:`on_ready` once, whichever agent gets a batch first; then tune
        the garbage collector for batch work (:func:`tune_gc`)."""
        async with self._ready_lock:
            if not self._ready:
                await self.on_ready()
                self._ready = True
                tune_gc()

    async def handle(self, partition: int, records: Sequence[InRecord]) -> None:
        """Process one batch; return once its outputs, retries and dead letters are
        acknowledged by the broker. Raises StageStopped (batch not delivered) when
        the dead-letter budget is exceeded."""
        started = time.perf_counter()
        stage, out_topic = self.stage_id, self._output_of(records)
        async with self.lock:
            if self.stopped is not None:
                raise StageStopped(self.stopped)
            self.busy_since = time.monotonic()
            try:
                result, retries = await self._process_and_deliver(partition, records)
            finally:
                self.busy_since = None
        metrics.batch_done(
            stage,
            records,
            out_topic,
            len(result.outputs),
            result.duplicates,
            len(retries),
            time.perf_counter() - started,
        )

    async def _process_and_deliver(
        self, partition: int, records: Sequence[InRecord]
    ) -> tuple[StageResult, list[Outgoing]]:
        failpoints.hit("batch-stall")
        start_ns = time.time_ns()
        result = self.process(partition, records)
        if tracing.active():
            tracing.stage_spans(tracing.tracer(), self.stage_id, records, result, start_ns)
        retries = self._route_retries(result)
        try:
            self.budget.check(self._outcomes(records, result))
        except BudgetExceeded as exc:
            self.stop(str(exc))
            raise StageStopped(str(exc)) from None
        out_topic = self._output_of(records)
        delivered = await self.deliver(result, retries, out_topic)
        if result.dead:
            failpoints.hit("dlq-delivered")
        hops: list[Outgoing] = []
        if self.lineage_topic is not None:
            now_ms = int(time.time() * 1000)
            hops = lineage.batch_hops(
                self.stage_id,
                self.lineage_topic,
                records,
                result,
                retries,
                delivered,
                now_ms,
                self._out_topics if out_topic == self.spec.output else self._lane_out_topics,
            )
        # one more round trip: hops name the outputs' offsets, and state must not
        # run ahead of outputs that were never acknowledged
        await self.producer.send_batch(hops, self.state_writes(partition, result))
        self.after_delivery(partition, result)
        return result, retries

    @staticmethod
    def _outcomes(records: Sequence[InRecord], result: StageResult) -> list[bool]:
        """Per input record, in order: was it dead-lettered?"""
        if not result.rejected_offsets:
            return [False] * len(records)
        rejected = set(result.rejected_offsets)
        return [r.offset in rejected for r in records]

    def _route_retries(self, result: StageResult) -> list[Outgoing]:
        """Retryable records go to the retry topic, or are dead-lettered once they
        have used ``max_attempts`` (or at once if the stage has no retry policy)."""
        policy = self.spec.retry
        outgoing: list[Outgoing] = []
        if not result.retryable:
            return outgoing
        now_ms = int(time.time() * 1000)
        for record, exc in result.retryable:
            failed = retry.attempts(record.headers) + 1
            if policy is None or failed >= policy.max_attempts:
                result.reject(self.stage_id, record, exc)
                continue
            at = retry.origin(
                record.headers, record.topic, record.partition, record.offset, record.timestamp_ms
            )
            due = now_ms + int(policy.delay_s(failed) * 1000)
            headers = retry.retry_headers(
                record.headers, at, failed, due, str(exc.reason), str(exc), now_ms
            )
            outgoing.append((policy.topic, record.key, record.value, headers, at.timestamp_ms))
        result.retryable.clear()
        return outgoing

    def stop(self, why: str) -> None:
        """Stop consuming for good (until a restart): the dead-letter budget is spent."""
        self.stopped = why
        metrics.STAGE_STOPPED.labels(self.stage_id).set(1)
        HEALTH.fail("dlq_budget", why)
        log.error(
            "%s; the stage stopped consuming and its last batch is not committed. Inspect "
            "with `pipeline dlq list --stage %s`, fix the cause, then restart the workers "
            "(or raise stages.%s.dlq_budget).",
            why,
            self.stage_id,
            self.stage_id,
        )

    def _output_of(self, records: Sequence[InRecord]) -> str:
        """Where the outputs of a batch go: the stage's output, or for a batch of its
        backfill lane, the next stage's lane (``Settings.lane_output``)."""
        if self._lane is not None and records and records[0].topic == self._lane:
            return self._lane_output
        return self.spec.output

    async def deliver(
        self, result: StageResult, extra: Sequence[Outgoing] = (), out_topic: str | None = None
    ) -> Deliveries:
        """Produce outputs (to ``out_topic``, by default the stage's output), then
        ``extra`` (retries), then dead letters; return the broker's acknowledgements
        of all of them, in that order."""
        now_ms = int(time.time() * 1000)
        out_topic, dlq_topic = out_topic or self.spec.output, self.spec.dlq
        batch: list[Outgoing] = [
            (out_topic, o.key, o.value, o.headers, o.timestamp_ms) for o in result.outputs
        ]
        batch += extra
        batch += [self._dead_letter(d, dlq_topic, now_ms) for d in result.dead]
        delivered = await self.producer.send_batch(batch)
        for dead in result.dead:
            metrics.DLQ_RECORDS.labels(self.stage_id, str(dead.reason)).inc()
            if dead.reason is Reason.LATE:
                metrics.LATE_READINGS.labels(self.stage_id).inc()
        return delivered

    @staticmethod
    def _dead_letter(dead: DeadLetter, topic: str, now_ms: int) -> Outgoing:
        return (
            topic,
            dead.key,
            dead.value,
            dead.envelope_headers(now_ms),
            dead.timestamp_ms or None,
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


class StatelessBinding(Binding):
    def __init__(
        self,
        stage_id: str,
        settings: Settings,
        app: StageApp,
        stage: Callable[[Sequence[InRecord]], StageResult],
    ) -> None:
        super().__init__(stage_id, settings, app)
        self._stage = stage

    def process(self, partition: int, records: Sequence[InRecord]) -> StageResult:
        return self._stage(records)


class EnrichBinding(Binding):
    """Joins the registry, a Faust GlobalTable whose changelog is ``iot.devices``."""

    def __init__(self, stage_id: str, settings: Settings, app: StageApp) -> None:
        super().__init__(stage_id, settings, app)
        topic = self.spec.registry_topic
        assert topic is not None
        partitions = settings.topics[topic].partitions
        self.registry_topic = topic
        self.table = named_global_table(app, "registry", topic, partitions)
        self._cache: dict[str, tuple[bytes, Device]] = {}
        self.stage = EnrichStage(self.lookup)

    def lookup(self, device_id: str) -> Device | None:
        raw = self.table.data.get(device_id.encode("utf-8"))
        if raw is None:
            return None
        cached = self._cache.get(device_id)
        if cached is not None and cached[0] == raw:
            return cached[1]
        device = Device.from_json(raw)
        self._cache[device_id] = (raw, device)
        return device

    async def on_ready(self) -> None:
        """Wait until the registry holds everything the topic held when we started."""
        partitions = self.settings.topics[self.registry_topic].partitions
        tps = [(self.registry_topic, p) for p in range(partitions)]
        loop = asyncio.get_running_loop()
        ends = await loop.run_in_executor(None, high_watermarks, client_config(self.settings), tps)
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            behind = [
                (tp, end)
                for (t, p), end in ends.items()
                for tp in [faust.types.TP(t, p)]
                if end > 0
                and max(
                    recovery.active_offsets.get(tp) or -1, recovery.standby_offsets.get(tp) or -1
                )
                < end - 1
            ]
            if not behind:
                log.info("registry ready: %d devices", len(self.table.data))
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"device registry did not catch up with {self.registry_topic} in 120s")

    def process(self, partition: int, records: Sequence[InRecord]) -> StageResult:
        return self.stage.process(records)


class AggregateBinding(Binding):
    """Window state in a Faust Table whose changelog is the stage's ``state_topic``.

    The table is written with explicit partitions (the input partition), so that
    windows closed by the idle timer — outside any event — land in the right
    changelog partition.
    """

    def __init__(self, stage_id: str, settings: Settings, app: StageApp) -> None:
        super().__init__(stage_id, settings, app)
        topic = self.spec.state_topic
        assert topic is not None
        partitions = settings.topics[topic].partitions
        self.state_topic = topic
        self.table = named_table(app, "windows", topic, partitions)
        self.stage = AggregateStage(settings.aggregate)
        self._loaded: dict[int, int] = {}  # partition -> consumer generation it was loaded in
        self.pipeline_quiet = PipelineQuiet(
            settings, stage_id, ttl=max(0.5, settings.aggregate.idle_timeout_s / 2)
        )
        self._quiet_since: float | None = None

    def _idle_partitions(self) -> bool:
        now = time.time()
        return any(
            now - state.last_input_at >= self.stage.idle_timeout_s and state.watermark is not None
            for state in self.stage.partitions.values()
        )

    def _ensure_loaded(self, partition: int) -> None:
        generation = self.app.consumer_generation_id
        if self._loaded.get(partition) == generation:
            return
        items = [(k, v) for k, v in self.table.data.items() if v]
        self.stage.load(partition, items)
        self._loaded[partition] = generation

    def process(self, partition: int, records: Sequence[InRecord]) -> StageResult:
        self._ensure_loaded(partition)
        return self.stage.process(partition, records)

    def state_writes(self, partition: int, result: StageResult) -> list[Partitioned]:
        """The state writes, in their order, for the table's changelog partition (the
        input partition). They go through the stage's confluent-kafka producer and are
        awaited, not through Faust's (``Table.send_changelog``, flushed before a
        commit): the same records for Faust's recovery to read, at a tenth of the
        CPU, acknowledged before the batch is acked."""
        assert isinstance(result, AggregateResult)
        topic = self.state_topic
        return [(topic, partition, key, value) for key, value in result.writes]

    def after_delivery(self, partition: int, result: StageResult) -> None:
        """Apply the (acknowledged) state writes to the table, in their order."""
        assert isinstance(result, AggregateResult)
        data = self.table.data
        for key, value in result.writes:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        if result.windows_emitted:
            metrics.WINDOWS_EMITTED.labels(self.stage_id).inc(result.windows_emitted)

    def _recovered(self) -> bool:
        """Is the table restored for the current assignment (no rebalance, no recovery)?"""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        return not self.app.rebalancing and not recovery.in_recovery and recovery.completed.is_set()

    async def _load_assigned(self) -> None:
        """Load the restored state of assigned partitions that no batch has brought
        yet: a worker restarted after its input was all processed gets no batch, and
        its open windows must still close when the partition is idle."""
        if not self._recovered():
            return
        generation = self.app.consumer_generation_id
        for tp in self.app.consumer.assignment():
            if tp.topic in self.spec.inputs and self._loaded.get(tp.partition) != generation:
                async with self.lock:
                    if self.stopped is None:
                        self._ensure_loaded(tp.partition)

    async def tick(self) -> None:
        """Close windows of idle partitions, while the pipeline up to here is caught up."""
        if self.stopped is None:
            await self._load_assigned()
        if self.stopped is not None or not self._idle_partitions():
            self._quiet_since = None
            return
        checked_at = time.time()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.pipeline_quiet):
            self._quiet_since = None
            return
        if self._quiet_since is None:
            self._quiet_since = checked_at
        quiet_since = self._quiet_since
        generation = self.app.consumer_generation_id
        assigned = {
            tp.partition for tp in self.app.consumer.assignment() if tp.topic in self.spec.inputs
        }
        for partition, loaded_in in list(self._loaded.items()):
            if loaded_in != generation or partition not in assigned:
                continue
            async with self.lock:
                if self.stopped is not None:
                    return
                result = self.stage.tick(partition, quiet_since)
                if result.outputs or result.writes:
                    await self.deliver(result)
                    await self.producer.send_batch([], self.state_writes(partition, result))
                    self.after_delivery(partition, result)
            if result.windows_emitted:
                log.info(
                    "partition %d idle, pipeline caught up: watermark %s, %d windows closed",
                    partition,
                    self.stage.partitions[partition].watermark,
                    result.windows_emitted,
                )
            if result.outputs:
                metrics.RECORDS_PRODUCED.labels(self.stage_id, self.spec.output).inc(
                    len(result.outputs)
                )


def make_binding(stage_id: str, settings: Settings, app: StageApp) -> Binding:
    if stage_id == "ingest":
        return StatelessBinding(stage_id, settings, app, IngestStage(settings.ingest).process)
    if stage_id == "parse":
        return StatelessBinding(stage_id, settings, app, ParseStage(settings.parse).process)
    if stage_id == "enrich":
        return EnrichBinding(stage_id, settings, app)
    if stage_id == "aggregate":
        return AggregateBinding(stage_id, settings, app)
    settings.stage(stage_id)  # raises ConfigError naming the known stages
    raise AssertionError("unreachable")
