"""Every hop of one lineage id in one partition of the lineage topic, and where the
results of ``counted`` hops were written (``emitted`` records)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from pipeline import Emit, Record, StageContext, contract, stage
from pipeline.engine.result import BatchResult
from pipeline.lineage import hops as lineage
from pipeline.lineage import placing
from pipeline.lineage.placing import lineage_partition
from pipeline.operators import window_stage
from pipeline.records import Deliveries, OutRecord
from pipeline.testing import StageHarness, record

N = 4


def ids(n: int) -> list[str]:
    return [contract.lineage_id(1_764_400_000_000 + i, "dev", i) for i in range(n)]


def passed_batch(lineage_ids: list[str]) -> tuple[list[Record], BatchResult, Deliveries]:
    records = [
        Record("iot.raw", 1, 100 + i, 0, b"k", b"v", (("lineage-id", lid.encode()),))
        for i, lid in enumerate(lineage_ids)
    ]
    result = BatchResult("parse", {})
    for i, lid in enumerate(lineage_ids):
        result.outputs.append(OutRecord(b"k", b"o", [("lineage-id", lid.encode())], 0, 100 + i))
    delivered = Deliveries(
        [("iot.parsed", None, None, [], None)] * len(lineage_ids),
        [i % 3 for i in range(len(lineage_ids))],
        list(range(len(lineage_ids))),
    )
    return records, result, delivered


def hops_of(records: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(partition, h) for _, partition, _, value in records for h in lineage.expand(value)]


def test_each_hop_lands_in_its_ids_partition_and_none_is_lost():
    chosen = ids(500)
    records, result, delivered = passed_batch(chosen)
    args = (records, result, [], delivered, 9, ["iot.parsed"] * 500, "", "dlq")
    placed = lineage.batch_hops("parse", "iot.lineage", *args, lineage_partitions=N)
    single = lineage.batch_hops("parse", "iot.lineage", *args, lineage_partitions=1)
    assert len(placed) == N and len(single) == 1  # one record per partition, not per hop
    assert {key for _, _, key, _ in placed} == {b"parse/iot.raw/1"}
    got = hops_of(placed)
    assert all(p == lineage_partition(h["id"], N) for p, h in got)
    assert sorted((h["id"], h["out"]) for _, h in got) == sorted(
        (h["id"], h["out"]) for _, h in hops_of(single)
    )
    spread = Counter(p for p, _ in got)
    assert len(spread) == N and min(spread.values()) > 500 / N / 2  # crc32 spreads ids


def test_a_partition_with_more_than_max_hops_gets_several_records(monkeypatch):
    monkeypatch.setattr(placing, "MAX_HOPS", 10)
    chosen = ids(100)
    records, result, delivered = passed_batch(chosen)
    placed = lineage.batch_hops(
        "parse", "iot.lineage", records, result, [], delivered, 9, ["iot.parsed"] * 100, "", "d", N
    )
    sizes = Counter(p for p, _ in hops_of(placed))
    per_partition = Counter(p for _, p, _, _ in placed)
    assert all(per_partition[p] == -(-sizes[p] // 10) for p in sizes)
    assert sorted(h["id"] for _, h in hops_of(placed)) == sorted(chosen)


@stage
def split(record: Record, ctx: StageContext) -> list[Emit]:
    return [Emit(record.key, {"part": i}) for i in range(3)]


def test_a_fan_out_childs_hop_is_also_in_its_parents_partition():
    harness = StageHarness(split, lineage_partitions=N)
    producer = harness.producer
    parent = ids(1)[0]
    run = harness.run([record({"x": 1}, headers={"lineage-id": parent})])
    children = [o.header("lineage-id") for o in run.outputs]
    assert len(children) == 3 and parent not in children
    where: dict[str, set[int]] = {}
    for p in producer.topic("lineage"):
        for hop in lineage.expand(p.value):
            assert hop["parent"] == parent
            where.setdefault(hop["id"], set()).add(p.partition)
    for child in children:
        assert where[child] == {lineage_partition(child, N), lineage_partition(parent, N)}


@stage(stateful=True, event_time="ts")
class Totals:
    """Counts per key; emits a key's total, made from state, when asked to."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def process(self, record: Record, state: Any) -> None:
        doc = record.json()
        if doc.get("flush"):
            for key in list(state.keys()):
                ref = orjson.dumps([key]).decode()
                state.emit(Emit(key, {"key": key, "n": state[key]}, headers={"state-ref": ref}))
            return
        state.set(doc["k"], state.get(doc["k"], 0) + 1)
        self.ctx.counted(orjson.dumps([doc["k"]]).decode())


def test_outputs_made_from_state_are_recorded_where_their_reference_says():
    harness = StageHarness(Totals, lineage_partitions=N)
    harness.run([record({"k": k, "ts": 1}) for k in ("a", "b", "a")])
    run = harness.run([record({"flush": 1, "ts": 2})])
    outputs = {o.header("state-ref"): o for o in run.outputs}
    assert set(outputs) == {'["a"]', '["b"]'}
    assert {e["ref"] for e in run.emitted} == set(outputs)
    for entry in run.emitted:
        output = outputs[entry["ref"]]
        assert entry["out"] == ["out", output.partition, output.offset]
        assert entry["stage"] == "stage"
    for p in harness.producer.topic("lineage"):
        for entry in placing.emitted(p.value):
            assert p.partition == lineage_partition(entry["ref"], N)
    assert all(h["outcome"] != placing.EMITTED for h in run.hops)  # not hops of a record


def test_windows_closed_by_an_idle_tick_are_recorded_too():
    tumbling = window_stage(key=("k",), window_s=10, allowed_lateness_s=0)
    harness = StageHarness(tumbling, lineage_partitions=N, idle_timeout_s=1)
    now_ms = int(harness.clock() * 1000)
    counted = harness.run([record({"k": "a", "ts": now_ms, "value": 1.0})])
    (hop,) = counted.hops
    assert hop["outcome"] == "counted" and counted.outputs == []
    closed = harness.tick(30)  # idle: the watermark moves with the clock, the window closes
    (output,) = closed.outputs
    (entry,) = closed.emitted
    assert entry["ref"] == orjson.dumps(hop["window"]).decode() == output.header("state-ref")
    assert entry["out"] == ["out", output.partition, output.offset]
