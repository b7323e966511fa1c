"""Running a stage in memory: the engine a worker runs, with a fake producer and clock.

No broker, no Faust: :class:`StageHarness` builds the same engine and runner a
worker builds (:mod:`pipeline.engine`) around a :class:`MemoryProducer` that
acknowledges every record with an offset per topic partition, so outputs, dead
letters (with their envelope), retries, lineage hops and state writes are what a
worker would produce. Time is a :class:`FakeClock` you move::

    from pipeline.testing import StageHarness, record

    harness = StageHarness(alert, config={"threshold": 30})
    run = harness.run([record({"mean": 31.5}), record({"count": 1})])
    assert [o.json()["mean"] for o in run.outputs] == [31.5]
    assert [d.reason for d in run.dead_letters] == ["no_mean"]
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from dlq import envelope
from pipeline import contract
from pipeline.engine.build import build_engine
from pipeline.engine.runner import BatchReport, StageRunner
from pipeline.errors import DeliveryError, RecordsRefused
from pipeline.lineage.hops import expand
from pipeline.lineage.placing import emitted
from pipeline.records import Deliveries, Outgoing, Partitioned, Record
from pipeline.registry import resolve
from pipeline.settings import DlqBudget, RetryPolicy, StageSpec
from pipeline.stage import StageDef

_offsets = itertools.count()


class FakeClock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record(
    value: Any,
    key: Any = None,
    headers: Mapping[str, bytes | str] | Sequence[tuple[str, bytes]] = (),
    *,
    topic: str = "in",
    partition: int = 0,
    offset: int | None = None,
    timestamp_ms: int = 1_767_225_600_000,
) -> Record:
    """A consumed record for a test: ``value``/``key`` as :class:`~pipeline.Emit` takes
    them (bytes, str, or JSON-able); offsets count up unless given."""
    from pipeline.records import header_pairs, to_bytes

    return Record(
        topic,
        partition,
        next(_offsets) if offset is None else offset,
        timestamp_ms,
        to_bytes(key),
        to_bytes(value),
        tuple(header_pairs(headers)),
    )


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


def _murmur2_partition(key: bytes | None, partitions: int) -> int:
    if key is None or partitions == 1:
        return 0
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Produced:
    """One record the fake broker acknowledged."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int | None

    def json(self) -> Any:
        return orjson.loads(self.value or b"null")

    def header(self, name: str) -> str | None:
        raw = self.headers.get(name)
        return None if raw is None else raw.decode("utf-8", "replace")


class Sent:
    """A batch :class:`MemoryProducer` wrote at once: its deliveries, or the error
    ``acknowledged`` raises (as :class:`pipeline.kafka.produce.Sending` would)."""

    def __init__(self, outcome: Deliveries | BaseException) -> None:
        self.outcome = outcome

    async def acknowledged(self) -> Deliveries:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class MemoryProducer:
    """The runner's producer, in memory: every record acknowledged at once with the
    next offset of its topic partition (keys partitioned as Kafka does). A record
    larger than ``max_message_bytes`` (key, value and headers), or one ``refuse``
    names a reason for, is refused for good as a broker would (the others are
    written; :class:`RecordsRefused`); ``fail`` makes a whole batch fail as a lost
    broker would (:class:`DeliveryError`, nothing written)."""

    def __init__(
        self,
        partitions: Mapping[str, int] | None = None,
        refuse: Callable[[str, bytes | None, bytes | None], str | None] | None = None,
        max_message_bytes: int | None = None,
        fail: Callable[[], str | None] | None = None,
    ) -> None:
        self.partitions = dict(partitions or {})
        self.refuse = refuse
        self.max_message_bytes = max_message_bytes
        self.fail = fail
        self.log: list[Produced] = []
        self._next: dict[tuple[str, int], int] = {}

    def _append(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        ts: int | None,
    ) -> Produced:
        if partition is None:
            partition = _murmur2_partition(key, self.partitions.get(topic, 1))
        offset = self._next.get((topic, partition), 0)
        self._next[(topic, partition)] = offset + 1
        produced = Produced(topic, partition, offset, key, value, dict(headers), ts)
        self.log.append(produced)
        return produced

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        return await (await self.submit(records, partitioned)).acknowledged()

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Sent:
        """Write the batch now (in submission order, as the client would); its
        outcome is what :meth:`Sent.acknowledged` returns or raises."""
        try:
            return Sent(self._write(records, partitioned))
        except (DeliveryError, RecordsRefused) as exc:
            return Sent(exc)

    def _write(self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned]) -> Deliveries:
        if self.fail is not None and (why := self.fail()):
            raise DeliveryError(f"{len(records)} record(s) not acknowledged: {why}")
        refused: dict[int, str] = {}
        parts: list[int] = []
        offs: list[int] = []
        for index, (topic, key, value, headers, ts) in enumerate(records):
            why = self._refused(topic, key, value, headers)
            if why:
                refused[index] = f"{topic}: {why}"
                parts.append(-1)
                offs.append(-1)
                continue
            p = self._append(topic, None, key, value, headers, ts)
            parts.append(p.partition)
            offs.append(p.offset)
        for topic, partition, key, value in partitioned:
            p = self._append(topic, partition, key, value, (), None)
            parts.append(p.partition)
            offs.append(p.offset)
        produced: list[Outgoing | Partitioned] = [*records, *partitioned]
        deliveries = Deliveries(produced, parts, offs)
        if refused:
            first = min(refused.items())[1]
            raise RecordsRefused(
                f"{len(refused)} record(s) not acknowledged: {first}", refused, deliveries
            )
        return deliveries

    def _refused(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> str | None:
        if self.max_message_bytes is not None:
            size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
            if size > self.max_message_bytes:
                return f"Broker: Message size too large ({size} > {self.max_message_bytes})"
        return self.refuse(topic, key, value) if self.refuse is not None else None

    def topic(self, name: str) -> list[Produced]:
        return [p for p in self.log if p.topic == name]


@dataclass(frozen=True)
class DeadLetterView:
    """A dead letter as the DLQ holds it: the original record and the envelope."""

    reason: str
    message: str
    error_class: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    def header(self, name: str) -> str | None:
        raw = self.headers.get(name)
        return None if raw is None else raw.decode("utf-8", "replace")


@dataclass
class RunResult:
    """What one :meth:`StageHarness.run` (or tick) produced."""

    outputs: list[Produced] = field(default_factory=list)
    dead_letters: list[DeadLetterView] = field(default_factory=list)
    retries: list[Produced] = field(default_factory=list)
    hops: list[dict[str, Any]] = field(default_factory=list)
    #: where outputs made from state went (:func:`pipeline.lineage.placing.emitted`)
    emitted: list[dict[str, Any]] = field(default_factory=list)
    state_writes: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    duplicates: int = 0
    report: BatchReport | None = None

    def values(self) -> list[Any]:
        """The outputs' values as JSON."""
        return [o.json() for o in self.outputs]


class StageHarness:
    """One stage, its engine and runner, in memory; keeps state across runs."""

    def __init__(
        self,
        stage: StageDef | str,
        *,
        stage_id: str = "stage",
        config: Mapping[str, Any] | None = None,
        inputs: Sequence[str] = ("in",),
        output: str | None = "out",
        outputs: Sequence[str] = (),
        dlq: str = "dlq",
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        lookups: Mapping[str, Mapping[bytes | str, bytes | str | Any]] | None = None,
        on_error: str = "dead_letter",
        dlq_budget: DlqBudget | Mapping[str, Any] | None = None,
        backfill_lane: str | None = None,
        idle_timeout_s: float = 5.0,
        clock: FakeClock | None = None,
        lineage_topic: str | None = "lineage",
        lineage_partitions: int = 1,
        lane_targets: Mapping[str, tuple[str, ...]] | None = None,
        producer: MemoryProducer | None = None,
        max_message_bytes: int = 1_000_000,
        topic_limits: Mapping[str, int] | None = None,
        dlq_max_bytes: int = 262_144,
    ) -> None:
        definition = resolve(stage_id, stage) if isinstance(stage, str) else stage
        self.clock = clock or FakeClock()
        self.spec = StageSpec(
            uses=definition.name,
            inputs=tuple(inputs),
            output=output,
            outputs=tuple(outputs),
            dlq=dlq,
            retry=retry,  # type: ignore[arg-type]
            on_error=on_error,  # type: ignore[arg-type]
            dlq_budget=dlq_budget or DlqBudget(),  # type: ignore[arg-type]
            backfill_lane=backfill_lane,
            state_topic="state" if definition.stateful else None,
            lookups={name: f"lookup.{name}" for name in lookups or {}},
            idle_timeout_s=idle_timeout_s,
            config=dict(config or {}),
        )
        self.lookups: dict[str, dict[bytes, bytes]] = {
            name: {
                (k.encode() if isinstance(k, str) else k): (
                    v
                    if isinstance(v, bytes)
                    else v.encode()
                    if isinstance(v, str)
                    else orjson.dumps(v)
                )
                for k, v in table.items()
            }
            for name, table in (lookups or {}).items()
        }
        self.engine = build_engine(stage_id, self.spec, definition, self.lookups, self.clock)
        self.producer = producer or MemoryProducer()
        self.state: dict[bytes, bytes] = {}
        self.runner = StageRunner(
            stage_id,
            self.spec,
            self.engine,
            self.producer,
            lineage_topic=lineage_topic,
            lineage_partitions=lineage_partitions,
            lane_targets=lane_targets,
            clock=self.clock,
            on_state=self._apply_state,
            max_message_bytes=max_message_bytes,
            topic_limits=topic_limits,
            dlq_max_bytes=dlq_max_bytes,
        )

    def _apply_state(self, partition: int, writes: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in writes:
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value

    def _collect(self, start: int, report: BatchReport | None) -> RunResult:
        spec = self.spec
        retry_topic = spec.retry.topic if spec.retry else None
        result = RunResult(report=report)
        for p in self.producer.log[start:]:
            if p.topic == spec.dlq:
                h = p.headers
                result.dead_letters.append(
                    DeadLetterView(
                        h[envelope.REASON].decode(),
                        h[envelope.ERROR_MESSAGE].decode("utf-8", "replace"),
                        h[envelope.ERROR_CLASS].decode(),
                        p.key,
                        p.value,
                        h,
                    )
                )
            elif p.topic == retry_topic:
                result.retries.append(p)
            elif p.topic == self.runner.lineage_topic:
                result.hops.extend(expand(p.value))
                result.emitted.extend(emitted(p.value))
            elif p.topic == spec.state_topic:
                result.state_writes.append((p.key or b"", p.value))
            else:
                result.outputs.append(p)
        if report is not None:
            result.duplicates = report.result.duplicates
        return result

    def run(self, records: Iterable[Record], partition: int = 0) -> RunResult:
        """One batch of ``partition`` through the stage, delivered; raises what a
        worker would (BudgetExceeded; the bug, with ``on_error: crash``)."""
        batch = list(records)
        start = len(self.producer.log)
        if self.engine.stateful and partition not in self.engine.stores:
            asyncio.run(self.runner.load(partition, list(self.state.items())))
        report = asyncio.run(self.runner.handle(partition, batch))
        return self._collect(start, report)

    def tick(self, seconds: float, partition: int = 0, quiet_since: float = 0.0) -> RunResult:
        """Let ``seconds`` pass with no input, then advance idle partitions (as a
        worker does while the pipeline upstream is caught up)."""
        self.clock.advance(seconds)
        start = len(self.producer.log)
        report = asyncio.run(self.runner.tick(partition, quiet_since))
        return self._collect(start, report)

    def flush(self, seconds: float = 0.0) -> RunResult:
        """Let ``seconds`` pass, then let a sink flush what is due (as a worker's
        timer does); ``report.durable`` says which offsets became durable."""
        self.clock.advance(seconds)
        start = len(self.producer.log)
        report = asyncio.run(self.runner.flush())
        return self._collect(start, report)

    def end_lane(self, run_id: str, partition: int = 0) -> RunResult:
        """A backfill run's end-of-input control record, on the stage's lane."""
        headers = [
            (contract.H_SOURCE, contract.backfill_source(run_id).encode()),
            (contract.H_CONTROL, contract.CONTROL_END_OF_INPUT.encode()),
        ]
        topic = self.spec.backfill_lane or self.spec.inputs[0]
        return self.run([record(b"", headers=headers, topic=topic, partition=partition)], partition)

    def restart(self) -> None:
        """Forget the in-memory state and reload it from the changelog writes, as a
        worker restarted on another machine would."""
        if self.engine.stateful:
            self.engine.stores.clear()

    def close(self) -> None:
        """Close the stage (a sink's connection)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def run_stage(stage: StageDef | str, records: Iterable[Record], **options: Any) -> RunResult:
    """One batch through a fresh :class:`StageHarness` (``options`` are its own)."""
    harness = StageHarness(stage, **options)
    try:
        return harness.run(records)
    finally:
        harness.close()
