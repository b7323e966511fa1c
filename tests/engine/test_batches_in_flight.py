"""Batches in flight: what of a batch may still be landing when ``StageRunner.handle``
returns, in ``BatchReport.landing``; the runtime acks (commits) a batch only once its
landing completed.

- ``in_flight`` above 1: a stateless stage hands a batch's outputs to the producer,
  in order, and returns; their acknowledgement, and the lineage hops that name their
  offsets, land while the next batch runs. A stateful stage (``overlap_state``)
  awaits its outputs and leaves its state writes and hops in flight.
- ``overlap_hops`` alone (``in_flight`` 1): the batch returns once its outputs are
  acknowledged and leaves only its lineage hops in flight.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence

import pytest

from pipeline import Emit, Record, StageContext, stage
from pipeline.errors import DeliveryError
from pipeline.records import Deliveries, Outgoing, Partitioned
from pipeline.testing import MemoryProducer, StageHarness, record


@stage
def evens(record: Record, ctx: StageContext) -> Iterator[Emit]:
    n = record.json()["n"]
    if n % 2 == 0:
        yield Emit(key=record.key, value={"n": n})


@stage(stateful=True)
def total(record: Record, ctx: StageContext, state) -> Emit:  # type: ignore[no-untyped-def]
    running = state.get("sum", 0) + record.json()["n"]
    state.set("sum", running)
    return Emit(key=b"sum", value={"sum": running})


class GatedSend:
    """A submitted batch: written at once, acknowledged when the gate opens."""

    def __init__(self, producer: GatedAcks, sent: object) -> None:
        self.producer = producer
        self.sent = sent

    async def acknowledged(self) -> Deliveries:
        await self.producer.gate.wait()
        if self.producer.error:
            raise DeliveryError(self.producer.error)
        return await self.sent.acknowledged()  # type: ignore[attr-defined,no-any-return]


class GatedAcks(MemoryProducer):
    """Records are written in the order submitted; acknowledgements wait for ``gate``
    (or fail with ``error``)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.error: str | None = None

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> GatedSend:  # type: ignore[override]
        return GatedSend(self, await super().submit(records, partitioned))

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        return await (await self.submit(records, partitioned)).acknowledged()


def harness(producer: MemoryProducer, in_flight: int, stage_def: object = evens) -> StageHarness:
    h = StageHarness(stage_def, producer=producer)  # type: ignore[arg-type]
    h.runner.in_flight = in_flight
    h.runner.overlap_hops = True
    return h


def numbers(start: int, count: int) -> list[Record]:
    return [record({"n": n}, key=f"k{n}", offset=n) for n in range(start, start + count)]


def test_a_batch_returns_before_its_outputs_are_acknowledged() -> None:
    async def run() -> None:
        producer = GatedAcks()
        h = harness(producer, in_flight=4)
        report = await asyncio.wait_for(h.runner.handle(0, numbers(0, 6)), 2)
        assert [p.topic for p in producer.log] == ["out"] * 3  # handed over, no hops yet
        assert report.landing is not None and not report.landing.done()
        producer.gate.set()
        final = await asyncio.wait_for(report.landing, 2)
        assert final.produced == {"out": 3}
        assert producer.topic("lineage")  # hops only after the outputs' acknowledgement

    asyncio.run(run())


def test_batches_in_flight_keep_their_order_on_every_partition() -> None:
    async def run() -> None:
        producer = GatedAcks(partitions={"out": 2})
        h = harness(producer, in_flight=8)
        reports = [await h.runner.handle(0, numbers(10 * b, 10)) for b in range(5)]
        assert all(r.landing is not None and not r.landing.done() for r in reports)
        producer.gate.set()
        await asyncio.wait_for(asyncio.gather(*(r.landing for r in reports)), 2)  # type: ignore[misc]
        for partition in (0, 1):
            ns = [int(p.value.decode().split(":")[1].strip(" }")) for p in producer.topic("out")
                  if p.partition == partition]  # fmt: skip
            assert ns == sorted(ns) and ns
        assert len(producer.topic("out")) == 25

    asyncio.run(run())


def test_no_more_than_in_flight_batches_wait_for_the_broker() -> None:
    async def run() -> None:
        producer = GatedAcks()
        h = harness(producer, in_flight=2)
        first = await asyncio.wait_for(h.runner.handle(0, numbers(0, 2)), 2)
        second = await asyncio.wait_for(h.runner.handle(0, numbers(2, 2)), 2)
        third = asyncio.ensure_future(h.runner.handle(0, numbers(4, 2)))
        await asyncio.sleep(0.05)
        assert not third.done()  # two batches already wait for their acknowledgement
        assert len(producer.topic("out")) == 2  # and the third's outputs are not handed over
        producer.gate.set()
        report = await asyncio.wait_for(third, 2)
        assert report.landing is not None
        await asyncio.wait_for(asyncio.gather(first.landing, second.landing, report.landing), 2)  # type: ignore[arg-type]
        assert len(producer.topic("out")) == 3

    asyncio.run(run())


def test_landing_counts_the_batches_that_await_the_broker() -> None:
    async def run() -> None:
        producer = GatedAcks()
        h = harness(producer, in_flight=4)
        assert h.runner.landing == 0
        reports = [await h.runner.handle(0, numbers(2 * b, 2)) for b in range(3)]
        assert h.runner.landing == 3
        producer.gate.set()
        await asyncio.wait_for(asyncio.gather(*(r.landing for r in reports)), 2)  # type: ignore[misc]
        assert h.runner.landing == 0

    asyncio.run(run())


def test_records_refused_for_good_become_dead_letters_in_the_landing() -> None:
    async def run() -> None:
        producer = MemoryProducer(
            refuse=lambda topic, key, value: (
                "Broker: Invalid record" if topic == "out" and key == b"k2" else None
            )
        )
        h = harness(producer, in_flight=4)
        report = await h.runner.handle(0, numbers(0, 6))
        assert report.landing is not None
        final = await asyncio.wait_for(report.landing, 2)
        assert final.produced == {"out": 2}
        assert final.dead_by_reason == {"unwritable": 1}
        dead = producer.topic("dlq")
        assert len(dead) == 1 and dead[0].key == b"k2"
        assert dead[0].headers["dlq.reason"] == b"unwritable"
        assert producer.topic("lineage")  # hops written after the refusal was settled

    asyncio.run(run())


def test_outputs_not_acknowledged_fail_the_landing_and_no_hops_are_written() -> None:
    async def run() -> None:
        producer = GatedAcks()
        producer.error = "broker down"
        h = harness(producer, in_flight=4)
        report = await h.runner.handle(0, numbers(0, 4))
        producer.gate.set()
        assert report.landing is not None
        with pytest.raises(DeliveryError, match="broker down"):
            await report.landing
        assert not producer.topic("lineage")

    asyncio.run(run())


class EachAck(MemoryProducer):
    """Every submitted batch is written at once and acknowledged when the test says:
    ``release(i)`` acknowledges the i-th submitted batch."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []
        self.kinds: list[str] = []

    async def submit(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Released:  # type: ignore[override]
        gate = asyncio.Event()
        self.gates.append(gate)
        self.kinds.append("outputs" if records else "state")
        return Released(gate, await super().submit(records, partitioned))

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        return await (await self.submit(records, partitioned)).acknowledged()

    def release(self, index: int) -> None:
        self.gates[index].set()


class Released:
    def __init__(self, gate: asyncio.Event, sent: object) -> None:
        self.gate = gate
        self.sent = sent

    async def acknowledged(self) -> Deliveries:
        await self.gate.wait()
        return await self.sent.acknowledged()  # type: ignore[attr-defined,no-any-return]


async def until(condition: object, what: str) -> None:
    for _ in range(200):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def sum_of(state: dict[bytes, bytes]) -> bytes:
    """The running sum in the stage's table (keys are the engine's encoding)."""
    (value,) = [v for k, v in state.items() if b'"sum"' in k]
    return value


def stateful(producer: MemoryProducer) -> StageHarness:
    h = harness(producer, in_flight=4, stage_def=total)
    h.runner.overlap_state = True
    return h


def test_a_stateful_batch_waits_for_its_outputs_then_leaves_its_state_writes_in_flight() -> None:
    async def run() -> None:
        producer = EachAck()
        h = stateful(producer)
        task = asyncio.ensure_future(h.runner.handle(0, numbers(0, 2)))
        await until(lambda: producer.kinds == ["outputs"], "the outputs to be sent")
        await asyncio.sleep(0.05)
        assert not task.done()  # its outputs first, acknowledged before any state write
        producer.release(0)
        report = await asyncio.wait_for(task, 2)
        assert producer.kinds == ["outputs", "state"]
        assert report.landing is not None and not report.landing.done()
        assert h.state == {}  # the table gets the writes once they land
        producer.release(1)
        await asyncio.wait_for(report.landing, 2)
        assert h.state == {p.key: p.value for p in producer.topic("state")}
        assert sum_of(h.state) == b"1"

    asyncio.run(run())


def test_state_writes_reach_the_table_in_batch_order_whichever_lands_first() -> None:
    async def run() -> None:
        producer = EachAck()
        h = stateful(producer)
        first = asyncio.ensure_future(h.runner.handle(0, numbers(0, 2)))  # sum 1
        await until(lambda: len(producer.gates) == 1, "batch 1's outputs")
        producer.release(0)
        one = await asyncio.wait_for(first, 2)
        second = asyncio.ensure_future(h.runner.handle(0, numbers(2, 2)))  # sum 6
        await until(lambda: len(producer.gates) == 3, "batch 2's outputs")
        producer.release(2)
        two = await asyncio.wait_for(second, 2)
        assert one.landing is not None and two.landing is not None
        producer.release(3)  # batch 2's state lands first
        await asyncio.sleep(0.05)
        assert not two.landing.done() and h.state == {}  # it waits for batch 1's
        producer.release(1)
        await asyncio.wait_for(asyncio.gather(one.landing, two.landing), 2)
        assert sum_of(h.state) == b"6"  # batch 2's value, applied after batch 1's

    asyncio.run(run())


def test_an_idle_tick_waits_for_the_batches_in_flight() -> None:
    async def run() -> None:
        producer = EachAck()
        h = stateful(producer)
        task = asyncio.ensure_future(h.runner.handle(0, numbers(0, 2)))
        await until(lambda: len(producer.gates) == 1, "the outputs")
        producer.release(0)
        report = await asyncio.wait_for(task, 2)
        tick = asyncio.ensure_future(h.runner.tick(0, 0.0))
        await asyncio.sleep(0.05)
        assert not tick.done()
        producer.release(1)
        await asyncio.wait_for(tick, 2)
        assert report.landing is not None and report.landing.done()

    asyncio.run(run())


def test_without_overlap_state_a_stateful_batch_awaits_everything() -> None:
    async def run() -> None:
        producer = GatedAcks()
        h = harness(producer, in_flight=4, stage_def=total)
        task = asyncio.ensure_future(h.runner.handle(0, numbers(0, 2)))
        await asyncio.sleep(0.05)
        assert not task.done()  # its outputs, then its state writes: awaited
        producer.gate.set()
        assert (await asyncio.wait_for(task, 2)).landing is None
        assert h.state

    asyncio.run(run())


# -- lineage hops alone in flight (overlap_hops) ------------------------------------


class GatedHops(MemoryProducer):
    """Outputs are acknowledged at once; lineage hops (the partitioned sends) only
    once ``gate`` is set, or fail with ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.hops_error: str | None = None

    async def send_batch(
        self, records: Sequence[Outgoing], partitioned: Sequence[Partitioned] = ()
    ) -> Deliveries:
        if partitioned:
            await self.gate.wait()
            if self.hops_error:
                raise DeliveryError(self.hops_error)
        return await super().send_batch(records, partitioned)


def hops_harness(producer: GatedHops, overlap: bool) -> StageHarness:
    h = StageHarness(evens, producer=producer)
    h.runner.overlap_hops = overlap
    return h


def test_the_batch_returns_before_its_hops_land_and_the_landing_says_when() -> None:
    async def run() -> None:
        producer = GatedHops()
        h = hops_harness(producer, overlap=True)
        batch = [record({"n": n}, offset=n) for n in range(6)]
        report = await asyncio.wait_for(h.runner.handle(0, batch), 2)
        assert [p.topic for p in producer.log] == ["out"] * 3  # outputs, no hops yet
        assert report.landing is not None and not report.landing.done()
        producer.gate.set()
        await asyncio.wait_for(report.landing, 2)
        hops = [p for p in producer.log if p.topic == "lineage"]
        assert hops  # the batch's hops, written once its landing completed

    asyncio.run(run())


def test_without_overlap_the_batch_waits_for_its_hops() -> None:
    async def run() -> None:
        producer = GatedHops()
        h = hops_harness(producer, overlap=False)
        task = asyncio.ensure_future(h.runner.handle(0, [record({"n": 2}, offset=0)]))
        await asyncio.sleep(0.05)
        assert not task.done()
        producer.gate.set()
        report = await asyncio.wait_for(task, 2)
        assert report.landing is None
        assert [p.topic for p in producer.log] == ["out", "lineage"]

    asyncio.run(run())


def test_hops_in_flight_are_counted_and_drained() -> None:
    async def run() -> None:
        producer = GatedHops()
        h = hops_harness(producer, overlap=True)
        for b in range(2):
            await h.runner.handle(0, [record({"n": 2}, offset=b)])
        assert h.runner.landing == 2
        drained = asyncio.ensure_future(h.runner.drain())
        await asyncio.sleep(0.05)
        assert not drained.done()  # the hops have not landed
        producer.gate.set()
        await asyncio.wait_for(drained, 2)
        assert h.runner.landing == 0
        assert len([p for p in producer.log if p.topic == "lineage"]) == 2

    asyncio.run(run())


def test_hops_not_acknowledged_fail_the_landing_not_the_batch() -> None:
    async def run() -> None:
        producer = GatedHops()
        producer.hops_error = "broker down"
        h = hops_harness(producer, overlap=True)
        report = await h.runner.handle(0, [record({"n": 2}, offset=0)])
        producer.gate.set()
        assert report.landing is not None
        with pytest.raises(DeliveryError, match="broker down"):
            await report.landing

    asyncio.run(run())


def test_a_stateful_batch_never_overlaps_its_state_writes() -> None:
    async def run() -> None:
        producer = GatedHops()
        h = StageHarness(total, producer=producer)
        h.runner.overlap_hops = True
        task = asyncio.ensure_future(h.runner.handle(0, [record({"n": 2}, offset=0)]))
        await asyncio.sleep(0.05)
        assert not task.done()  # hops and state writes go together, awaited
        producer.gate.set()
        assert (await asyncio.wait_for(task, 2)).landing is None

    asyncio.run(run())


def _cyclic_garbage(run: Callable[[], Awaitable[None]]) -> Counter[str]:
    """What ``run`` leaves that only the cycle collector frees, by type name.

    Workers collect cycles rarely (``GC_GEN0_THRESHOLD``): a batch kept alive by a
    reference cycle holds its records well after it landed.
    """
    gc.collect()
    gc.disable()
    try:
        asyncio.run(run())
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return found


@pytest.mark.parametrize("kind", ["stateless", "stateful", "hops only"])
def test_a_landed_batch_is_freed_without_the_cycle_collector(kind: str) -> None:
    """A batch's report, its records and its landing are freed by reference counting
    once the batch landed and nobody holds the report; before, the landing's result
    was the report that pointed at the landing (a cycle per batch: the stateful and
    hops-only landings; the stateless one, which builds a new report, is a guard)."""

    async def run() -> None:
        producer = GatedAcks()
        if kind == "stateful":
            h = stateful(producer)
        else:
            h = harness(producer, in_flight=4 if kind == "stateless" else 1)
        producer.gate.set()
        for n in range(5):
            report = await asyncio.wait_for(h.runner.handle(0, numbers(n * 4, 4)), 2)
            assert report.landing is not None  # something was left in flight
            await asyncio.wait_for(report.landing, 2)
        await h.runner.drain()

    garbage = _cyclic_garbage(run)
    assert not {t: garbage[t] for t in ("BatchReport", "Record", "BatchResult") if garbage[t]}


def test_small_batches_fly_in_numbers_while_the_records_held_stay_bounded() -> None:
    """``records_in_flight``: batches of a trickle of input do not each take a slot of
    ``in_flight`` (the runtime counts it in full batches' worth of records)."""

    async def run() -> None:
        producer = GatedAcks()
        h = harness(producer, in_flight=8)
        h.runner.records_in_flight = 4
        flying = [await asyncio.wait_for(h.runner.handle(0, numbers(i, 1)), 2) for i in range(4)]
        fifth = asyncio.ensure_future(h.runner.handle(0, numbers(4, 1)))
        await asyncio.sleep(0.05)
        assert not fifth.done()  # four records await their acknowledgement: the limit
        assert h.runner.held_records == 4 and h.runner.landing == 4
        producer.gate.set()
        report = await asyncio.wait_for(fifth, 2)
        landings = [r.landing for r in [*flying, report]]
        await asyncio.wait_for(asyncio.gather(*landings), 2)  # type: ignore[arg-type]
        assert h.runner.held_records == 0
        # a batch larger than the limit alone goes when nothing is in flight
        producer.gate.clear()
        big = await asyncio.wait_for(h.runner.handle(0, numbers(10, 6)), 2)
        assert big.landing is not None and h.runner.held_records == 6
        producer.gate.set()
        await asyncio.wait_for(big.landing, 2)

    asyncio.run(run())
