"""A stateless stage leaves its lineage hops in flight (``StageRunner.overlap_hops``):
the batch returns once its outputs are acknowledged, and the report carries the hops'
landing, which the runtime awaits before it acks (commits) the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from pipeline import Emit, Record, StageContext, stage
from pipeline.errors import DeliveryError
from pipeline.records import Deliveries, Outgoing, Partitioned
from pipeline.testing import MemoryProducer, StageHarness, record


@stage
def evens(record: Record, ctx: StageContext) -> Iterator[Emit]:
    if record.json()["n"] % 2 == 0:
        yield Emit(key=record.key, value=record.json())


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


def harness(producer: GatedHops, overlap: bool) -> StageHarness:
    h = StageHarness(evens, producer=producer)
    h.runner.overlap_hops = overlap
    return h


def test_the_batch_returns_before_its_hops_land_and_the_landing_says_when() -> None:
    async def run() -> None:
        producer = GatedHops()
        h = harness(producer, overlap=True)
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
        h = harness(producer, overlap=False)
        task = asyncio.ensure_future(h.runner.handle(0, [record({"n": 2}, offset=0)]))
        await asyncio.sleep(0.05)
        assert not task.done()
        producer.gate.set()
        report = await asyncio.wait_for(task, 2)
        assert report.landing is None
        assert [p.topic for p in producer.log] == ["out", "lineage"]

    asyncio.run(run())


def test_hops_not_acknowledged_fail_the_landing_not_the_batch() -> None:
    async def run() -> None:
        producer = GatedHops()
        producer.hops_error = "broker down"
        h = harness(producer, overlap=True)
        report = await h.runner.handle(0, [record({"n": 2}, offset=0)])
        producer.gate.set()
        assert report.landing is not None
        with pytest.raises(DeliveryError, match="broker down"):
            await report.landing

    asyncio.run(run())


@stage(stateful=True)
def total(record: Record, ctx: StageContext, state) -> Emit:  # type: ignore[no-untyped-def]
    running = state.get("sum", 0) + record.json()["n"]
    state.set("sum", running)
    return Emit(key=b"sum", value={"sum": running})


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
