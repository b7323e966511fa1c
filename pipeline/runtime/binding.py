"""The binding: one stage's engine (:mod:`pipeline.engine`) on Faust and the broker.

A :class:`StageBinding` resolves the stage's code from ``uses:``, builds its
context (config, lookups), its engine (stateless or stateful) and its
:class:`~pipeline.engine.runner.StageRunner` with a confluent-kafka producer, and
holds what only a worker has: the Faust tables that restore state and lookups, the
lock that keeps batches of one worker in turn, the dead-letter budget's stop, health
and metrics. The app (:mod:`pipeline.runtime.app`) acks a batch only after
:meth:`StageBinding.handle` returned.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import faust

from dlq.reasons import LATE
from pipeline import failpoints
from pipeline.engine.build import build_engine, load_stage
from pipeline.engine.runner import BatchReport, StageRunner
from pipeline.errors import BudgetExceeded, StageStopped, Unavailable
from pipeline.kafka.clients import client_config, producer
from pipeline.kafka.offsets import high_watermarks
from pipeline.kafka.produce import AsyncProducer, Sending
from pipeline.obs import metrics, tracing
from pipeline.obs.failures import FailureLog
from pipeline.obs.health import HEALTH
from pipeline.records import Deliveries, Outgoing, Partitioned, Record
from pipeline.runtime.holding import DependencyWait, HeldBatches
from pipeline.runtime.quiet import PipelineQuiet
from pipeline.runtime.tables import named_global_table, named_table
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.runtime.stage_app import StageApp

log = logging.getLogger("pipeline.binding")

#: a batch of one input partition: (topic, partition, first offset, last offset)
Batch = tuple[str, int, int, int]


def describe(batch: Batch) -> str:
    """``topic[partition] offsets first-last``, for log lines."""
    topic, partition, first, last = batch
    return f"{topic}[{partition}] offsets {first}-{last}"


_new_record = object.__new__
# Record is a frozen dataclass: its __init__ sets each field through
# object.__setattr__; the slots' own setters do the same at half the cost.
(_set_topic, _set_partition, _set_offset, _set_ts, _set_key, _set_value, _set_headers) = (
    getattr(Record, name).__set__
    for name in ("topic", "partition", "offset", "timestamp_ms", "key", "value", "headers")
)


def to_record(r: Any) -> Record:
    """An aiokafka ConsumerRecord as a :class:`Record` (once per consumed record)."""
    record: Record = _new_record(Record)
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
    Cycles are still collected, but late: a cycle whose batch was still in flight at
    a young collection is moved to an older generation and waits for its (much
    rarer) collection. So a batch's path must not make reference cycles; its objects
    are then freed by reference counting as soon as it landed. A cycle per batch
    (a report whose landing's result was the report itself) held 30,000 records in
    the aggregate under load and 60 to 90 MB of its RSS; the engine tests check that a
    landed batch leaves no cyclic garbage. (A landing that fails still leaves one, via
    its exception's traceback; the worker exits then.)
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gc.get_threshold()[0]), gen1, gen2)


class LazyProducer:
    """The stage's confluent-kafka producer, made on first use (building an app
    starts no thread)."""

    def __init__(self, factory: Callable[[], AsyncProducer]) -> None:
        self._factory = factory
        self._producer: AsyncProducer | None = None

    @property
    def made(self) -> AsyncProducer:
        if self._producer is None:
            self._producer = self._factory()
        return self._producer

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        return await self.made.send_batch(records, partitioned)

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Sending:
        return await self.made.submit(records, partitioned)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def _spans(stage_id: str) -> Callable[[Sequence[Record], Any, int], None] | None:
    if not tracing.active():
        return None
    spans = tracing.tracer()

    def record(records: Sequence[Record], result: Any, start_ns: int) -> None:
        tracing.stage_spans(spans, stage_id, records, result, start_ns)

    return record


class StageBinding:
    """What one stage worker does with a partition batch, on Kafka."""

    def __init__(
        self,
        stage_id: str,
        settings: Settings,
        app: StageApp,
        on_fatal: Callable[[str, Batch], None],
    ) -> None:
        """``on_fatal(what, batch)``: the worker exits without committing (app.py), when
        the outputs, state writes or lineage hops of a batch in flight are not
        acknowledged; ``batch`` is that batch's (topic, partition, first, last offset),
        to be noted in the failures topic like a batch the worker crashed on."""
        self.stage_id = stage_id
        self.settings = settings
        self.spec = spec = settings.stage(stage_id)
        self.app = app
        self.definition = definition = load_stage(settings, stage_id)
        self.lookup_tables = {
            name: named_global_table(
                app, f"lookup-{name}", topic, settings.topics[topic].partitions
            )
            for name, topic in spec.lookups.items()
        }
        self.table: Any = None
        if definition.stateful:
            assert spec.state_topic is not None
            self.table = named_table(
                app, "state", spec.state_topic, settings.topics[spec.state_topic].partitions
            )
        self.engine: Any = build_engine(
            stage_id,
            spec,
            definition,
            {name: table.data for name, table in self.lookup_tables.items()},
        )
        self.producer = LazyProducer(lambda: AsyncProducer(producer(settings)))
        self.runner = StageRunner(
            stage_id,
            spec,
            self.engine,
            self.producer,
            lineage_topic=settings.lineage_topic,
            lineage_partitions=(
                settings.topics[settings.lineage_topic].partitions if settings.lineage_topic else 1
            ),
            lane_targets=settings.topology.lane_targets(stage_id),
            on_state=self._apply_state,
            spans=_spans(stage_id),
            failpoint=failpoints.hit,
            landing_failpoint=failpoints.reached,
            max_message_bytes=settings.runner.max_message_bytes,
            topic_limits={
                name: spec.max_message_bytes
                for name, spec in settings.topics.items()
                if spec.max_message_bytes is not None
            },
            dlq_max_bytes=settings.dlq.max_payload_bytes,
        )
        self.lock = asyncio.Lock()
        self._ready_lock = asyncio.Lock()
        self._ready = False
        #: why the stage stopped consuming (the dead-letter budget), or None
        self.stopped: str | None = None
        #: monotonic time the batch being processed started, or None when idle
        self.busy_since: float | None = None
        self._loaded: dict[int, int] = {}  # partition -> consumer generation it was loaded in
        self.pipeline_quiet = PipelineQuiet(
            settings, stage_id, ttl=max(0.5, spec.idle_timeout_s / 2)
        )
        self._quiet_since: float | None = None
        #: the batch being processed
        self.current: Batch | None = None
        self.failures = FailureLog(settings, stage_id)
        HEALTH.watch(f"{stage_id}_batch", self.stuck)
        HEALTH.watch(f"{stage_id}_crash_loop", self.crash_looping)
        runner = settings.runner
        #: waits between runs of a batch whose dependency is unreachable
        self.dependency = DependencyWait(
            stage_id,
            runner.unavailable_backoff_s,
            runner.unavailable_backoff_max_s,
            runner.liveness_timeout_s,
        )
        HEALTH.watch(f"{stage_id}_dependency", self.dependency.problem)
        #: a sink's batches, acked once durable (None: not a sink, ack at once)
        self.held: HeldBatches | None = None
        if definition.kind == "sink":
            self.held = HeldBatches(
                stage_id,
                commit=lambda: app.consumer.commit(),
                on_committed=self.engine.committed,
                drop=self.engine.drop,
                commit_on_release=self.engine.buffers,
            )
        # a stateless stage does not wait for its outputs' acknowledgement (up to
        # runner.batches_in_flight batches) nor its lineage hops before the next batch:
        # a batch is acked (and so committed) only once they land (settle)
        stateless = self.held is None and self.table is None
        self.runner.overlap_hops = runner.overlap_lineage and stateless
        in_flight = runner.batches_in_flight if self.held is None else 1
        if in_flight > 1:
            # counted in full batches' worth of records: small batches (a trickle of
            # live input) fly in numbers, up to small_batches_in_flight times as many
            self.runner.records_in_flight = in_flight * runner.batch_max_records
            in_flight *= runner.small_batches_in_flight
        self.runner.in_flight = in_flight
        # a stateful stage's outputs are always acknowledged before its state writes
        # are sent; those (and the hops) may stay in flight
        self.runner.overlap_state = self.table is not None and runner.batches_in_flight > 1
        #: batches in flight per input partition: (the batch, its landing); the retry
        #: agent runs one fetched batch as several (the records that are due)
        self._landing: dict[tuple[str, int], list[tuple[Batch, asyncio.Future[Any]]]] = {}
        self._acking: set[asyncio.Task[None]] = set()
        #: while a failure is on record: per input partition, the last batch's check
        #: of whether it got past it (see _passed_in_order)
        self._passing: dict[tuple[str, int], asyncio.Future[bool]] = {}
        self.on_fatal = on_fatal
        metrics.BATCHES_IN_FLIGHT.labels(stage_id).set_function(lambda: self.runner.landing)

    @property
    def stateful(self) -> bool:
        return self.table is not None

    @property
    def flushes(self) -> bool:
        """Does the stage flush on a timer (a sink that rolls files by time)?"""
        return self.held is not None and hasattr(self.engine.processor, "flush_due")

    def forget_unacked(self) -> list[Any]:
        """For a rebalance or a stop: the batches that will not be acked (held by a
        sink, or waiting for a dependency), given up; see pipeline.runtime.holding."""
        messages = self.dependency.abandon()
        if self.held is not None:
            messages += self.held.abandon()
        return messages

    async def settle(self, event: Any) -> None:
        """The batch of ``event`` went through: ack it, or hold it until a sink has
        made it durable."""
        if self.held is not None:
            await self.held.hold(event)
            return
        message = event.message
        key = (message.topic, message.partition)
        flying = self._landing.get(key)
        landing = []
        if flying:
            landing = [(b, f) for b, f in flying if b[3] <= message.offset]
            flying[:] = [(b, f) for b, f in flying if b[3] > message.offset]
            if not flying:
                del self._landing[key]
        if all(f.done() and f.exception() is None for _, f in landing):
            event.ack()
            return
        task = asyncio.ensure_future(self._ack_when_landed(landing, event))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _ack_when_landed(
        self, landing: list[tuple[Batch, asyncio.Future[Any]]], event: Any
    ) -> None:
        """Ack a batch once its outputs, state writes and lineage hops are acknowledged;
        if they are not, the worker exits without committing it (the batch is fetched and run
        again), noting the batch that failed to land in the failures topic."""
        for batch, future in landing:
            try:
                await future
            except Exception as exc:
                what = f"outputs, state writes or lineage hops not acknowledged: {exc}"
                self.on_fatal(what, batch)
                return
        event.ack()

    async def flush(self) -> None:
        """A sink's timer: let it flush what is due, then ack what became durable."""
        if self.held is None or self.stopped is not None:
            return
        async with self.lock:
            try:
                report = await self.runner.flush()
            except Unavailable as exc:
                self.dependency.failed(exc, 1)
                return
        if report is None:
            return
        self.dependency.recovered()
        self._account(report, None)
        self.held.made_durable(report.durable)
        await self.held.release()

    @property
    def ticks(self) -> bool:
        """Does the stage's watermark advance while idle (a stateful event-time stage)?"""
        return self.stateful and getattr(self.engine, "_event_time", None) is not None

    def crash_looping(self) -> str | None:
        """A liveness problem while workers keep failing on one batch."""
        looping = [f for f in self.failures.known.values() if f.looping]
        return looping[0].describe() if looping else None

    def stuck(self) -> str | None:
        """A liveness problem if one batch has been processing for too long."""
        since, limit = self.busy_since, self.settings.runner.liveness_timeout_s
        if since is not None and time.monotonic() - since > limit:
            return (
                f"stage {self.stage_id}: one batch has been processing for "
                f"{time.monotonic() - since:.0f}s (runner.liveness_timeout_s={limit:g})"
            )
        return None

    # -- readiness ---------------------------------------------------------------------
    async def ready(self) -> None:
        """Wait for the lookups once, whichever agent gets a batch first; then tune
        the garbage collector for batch work (:func:`tune_gc`)."""
        async with self._ready_lock:
            if not self._ready:
                loop = asyncio.get_running_loop()
                known = await loop.run_in_executor(None, self.failures.load)
                for failure in known.values():
                    metrics.BATCH_FAILURES.labels(
                        self.stage_id, failure.topic, str(failure.partition)
                    ).set(failure.attempts)
                    log.error("%s; processing it again", failure.describe())
                for name, table in self.lookup_tables.items():
                    await self._caught_up(name, table)
                self._ready = True
                tune_gc()

    async def _caught_up(self, name: str, table: Any) -> None:
        """Wait until the lookup holds everything its topic held when we started."""
        topic = self.spec.lookups[name]
        tps = [(topic, p) for p in range(self.settings.topics[topic].partitions)]
        loop = asyncio.get_running_loop()
        ends = await loop.run_in_executor(None, high_watermarks, client_config(self.settings), tps)
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            behind = [
                tp
                for (t, p), end in ends.items()
                for tp in [faust.types.TP(t, p)]
                if end > 0
                and max(
                    recovery.active_offsets.get(tp) or -1, recovery.standby_offsets.get(tp) or -1
                )
                < end - 1
            ]
            if not behind:
                log.info("lookup %s ready: %d entries", name, len(table.data))
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"lookup {name} did not catch up with {topic} in 120s")

    # -- batches ----------------------------------------------------------------------------
    async def handle(self, partition: int, records: Sequence[Record]) -> None:
        """Process one batch; return once its outputs, retries, dead letters, hops
        and state writes are acknowledged by the broker. Raises StageStopped (batch
        not delivered) when the dead-letter budget is exceeded."""
        started = time.perf_counter()
        async with self.lock:
            if self.stopped is not None:
                raise StageStopped(self.stopped)
            self.busy_since = time.monotonic()
            batch = None
            if records:
                first, last = records[0], records[-1]
                batch = self.current = (first.topic, partition, first.offset, last.offset)
            try:
                if self.stateful:
                    await self._load(partition)
                report = await self.runner.handle(partition, records)
            except BudgetExceeded as exc:
                where = self._where()
                self.stop(f"{exc} ({where})" if where else str(exc))
                raise StageStopped(str(exc)) from None
            finally:
                self.busy_since = None
            self.current = None
        self.dependency.recovered()
        if self.held is not None:
            self.held.made_durable(report.durable)
        seconds = time.perf_counter() - started
        landing = report.landing
        if landing is None:
            self._account(report, seconds)
        else:
            # accounted as finally written (refused records became dead letters)
            landing.add_done_callback(partial(self._account_landed, seconds))
        if batch is None:
            return
        key = (batch[0], partition)
        if landing is not None:
            # settle(event) acks the batch once it lands
            self._landing.setdefault(key, []).append((batch, landing))
        if not self.failures.known:
            return
        prior = self._passing.get(key)
        if landing is None and prior is None:
            await self._passed(*batch)
        else:
            # a batch a worker failed on is past only once it and the partition's
            # batches before it landed (landings may complete out of order)
            self._passing[key] = asyncio.ensure_future(self._passed_in_order(prior, landing, batch))

    async def _passed_in_order(
        self,
        prior: asyncio.Future[bool] | None,
        landing: asyncio.Future[Any] | None,
        batch: Batch,
    ) -> bool:
        """Clear a recorded failure the batch covers once it and every batch before it
        of its partition landed; False if one did not (noted by _ack_when_landed)."""
        if prior is not None and not await prior:
            return False
        try:
            if landing is not None:
                await landing
        except Exception:
            return False
        try:
            await self._passed(*batch)
        except Exception:
            log.warning("could not clear the failure on record", exc_info=True)
            return False
        return True

    def _account_landed(self, seconds: float, landing: asyncio.Future[BatchReport]) -> None:
        if not landing.cancelled() and landing.exception() is None:
            self._account(landing.result(), seconds)

    def _where(self) -> str | None:
        """The batch being processed, for a log line."""
        if self.current is None:
            return None
        return f"batch {describe(self.current)}"

    async def _passed(self, topic: str, partition: int, first: int, last: int) -> None:
        loop = asyncio.get_running_loop()
        failure = await loop.run_in_executor(
            None, self.failures.passed, topic, partition, first, last
        )
        if failure is not None:
            metrics.BATCH_FAILURES.labels(self.stage_id, topic, str(partition)).set(0)
            log.warning(
                "stage %s: %s[%d] got past offset %d, where it had failed %d time(s)",
                self.stage_id,
                topic,
                partition,
                failure.offset,
                failure.attempts,
            )

    def record_failure(self, error: str, batch: Batch | None = None) -> str:
        """Before the worker exits on ``batch`` (default: the current one): note it in
        the failures topic; returns the line to log (which batch, which attempt)."""
        batch = batch or self.current
        if batch is None:
            return f"stage {self.stage_id}: {error}"
        topic, partition, first, last = batch
        failure = self.failures.record(topic, partition, first, last, error)
        return (
            f"stage {self.stage_id}: {error} on {describe(batch)} "
            f"(attempt {failure.attempts} on this batch)"
        )

    def _account(self, report: BatchReport, seconds: float | None) -> None:
        result = report.result
        metrics.batch_done(
            self.stage_id,
            report.records,
            report.produced,
            result.duplicates,
            report.retries,
            seconds,
        )
        for reason, count in report.dead_by_reason.items():
            metrics.DLQ_RECORDS.labels(self.stage_id, reason).inc(count)
            if reason == LATE:
                metrics.LATE_READINGS.labels(self.stage_id).inc(count)
        if result.emitted_from_state:
            metrics.WINDOWS_EMITTED.labels(self.stage_id).inc(result.emitted_from_state)
        if result.stored_at:
            metrics.RECORDS_STORED.labels(self.stage_id).inc(len(result.stored_at))

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

    # -- state ---------------------------------------------------------------------------------
    async def _load(self, partition: int) -> None:
        """Load the partition's state into the engine once per consumer generation,
        from the table once every batch in flight has landed in it."""
        generation = self.app.consumer_generation_id
        if self._loaded.get(partition) == generation:
            return
        await self.runner.drain()
        items = [(k, v) for k, v in self.table.data.items() if v]
        quarantined = await self.runner.load(partition, items)
        if quarantined is not None:
            self._account(quarantined, None)
        self._loaded[partition] = generation

    def _apply_state(self, partition: int, writes: list[tuple[bytes, bytes | None]]) -> None:
        """Apply (acknowledged) state writes to the table, in their order. They went
        through the stage's producer, not Faust's (``Table.send_changelog``): the same
        records for Faust's recovery to read, at a tenth of the CPU, acknowledged
        before the batch is acked."""
        data = self.table.data
        for key, value in writes:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value

    def _recovered(self) -> bool:
        """Is the table restored for the current assignment (no rebalance, no recovery)?"""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        return not self.app.rebalancing and not recovery.in_recovery and recovery.completed.is_set()

    def _assigned(self) -> set[int]:
        inputs = self.spec.inputs
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic in inputs}

    async def _load_assigned(self) -> None:
        """Load the restored state of assigned partitions that no batch has brought
        yet: a worker restarted after its input was all processed gets no batch, and
        its open windows must still close when the partition is idle."""
        if not self._recovered():
            return
        generation = self.app.consumer_generation_id
        for partition in self._assigned():
            if self._loaded.get(partition) != generation:
                async with self.lock:
                    if self.stopped is None:
                        await self._load(partition)

    async def tick(self) -> None:
        """Advance the watermark of idle partitions, while the pipeline up to here is
        caught up (a partition quiet because a stage before it is down must not close
        windows its backlog still belongs to)."""
        if self.stopped is None:
            await self._load_assigned()
        if self.stopped is not None or not self.engine.idle_partitions():
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
        assigned = self._assigned()
        for partition, loaded_in in list(self._loaded.items()):
            if loaded_in != generation or partition not in assigned:
                continue
            async with self.lock:
                if self.stopped is not None:
                    return
                report = await self.runner.tick(partition, quiet_since)
            if report is None:
                continue
            self._account(report, None)
            if report.result.emitted_from_state:
                log.info(
                    "partition %d idle, pipeline caught up: %d outputs from state",
                    partition,
                    report.result.emitted_from_state,
                )

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.warning("stage %s: closing the stage failed", self.stage_id, exc_info=True)
        self.producer.close()
