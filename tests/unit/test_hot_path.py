"""The per-record hot path of a stage: fast header, id and hop building must give
what the plain versions give, and the producer must hand back every
acknowledgement in order (pipeline/contract.py, kafka.py, lineage.py, bindings.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import random
import threading

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from ulid import ULID

from dlq import retry
from dlq.envelope import DeadLetter
from pipeline import contract
from pipeline.engine.result import BatchResult
from pipeline.errors import DeliveryError, RecordsRefused
from pipeline.kafka.produce import AsyncProducer
from pipeline.lineage import hops as lineage
from pipeline.lineage import placing
from pipeline.records import Delivered, Deliveries, OutRecord, Record
from pipeline.runtime import binding as bindings
from pipeline.settings import load_settings
from stages.parse import Reading, Validator, decode, parse
from tests.unit.records import Batchwise, engine

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- ids and headers --------------------------------------------------------------


def test_ulid_text_is_the_ulid_packages():
    for raw in [os.urandom(16) for _ in range(2000)] + [b"\0" * 16, b"\xff" * 16]:
        assert contract.ulid_str(raw) == str(ULID.from_bytes(raw))


def test_lineage_id_is_unchanged():
    # the id is derived, so a new version must give the ids an old one gave
    digest = bytes(range(16))
    assert contract.lineage_id(1_764_400_000_123, "dev-1", "7", digest) == str(
        ULID.from_bytes(
            (1_764_400_000_123).to_bytes(6, "big")
            + __import__("hashlib")
            .blake2b(repr(("dev-1", "7", digest)).encode(), digest_size=10)
            .digest()
        )
    )


def test_span_ids_are_random_non_zero_hex():
    spans = [contract._span_id() for _ in range(3000)]  # more than one pool
    assert len(set(spans)) == len(spans)
    for span in spans:
        assert len(span) == 16 and span != b"0" * 16
        int(span, 16)


def test_child_traceparent_bytes_keeps_trace_and_flags():
    child = contract.child_traceparent_bytes(PARENT)
    assert child[:36] == PARENT[:36] and child[52:] == PARENT[52:]
    assert child[36:52] != PARENT[36:52]
    assert contract.child_traceparent(PARENT.decode()).encode()[:36] == PARENT[:36]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        b"",
        b"garbage",
        PARENT.upper(),
        PARENT + b"\n",
        PARENT.replace(b"-01", b"--1"),
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6-3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"\xff" * 55,
    ],
)
def test_malformed_parent_starts_a_new_trace(bad):
    child = contract.child_traceparent_bytes(bad)
    version, trace, span, flags = child.split(b"-")
    assert (version, flags, len(trace), len(span)) == (b"00", b"01", 32, 16)
    assert bad is None or trace not in bad


def test_next_hop_is_next_hop_headers_of_header_map(monkeypatch):
    monkeypatch.setattr(contract, "_span_id", lambda: b"1234567890abcdef")
    names = ["lineage-id", "traceparent", "schema", "source", "retry.attempts", "x"]
    values = [b"v", None, PARENT, b"bad", b"raw/1"]
    rng = random.Random(5)
    for _ in range(5000):
        headers = tuple((rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 6)))
        others = [n for n, _ in headers if n not in ("traceparent", "schema")]
        if len(set(others)) != len(others):
            continue  # other repeated names pass through as they came
        want = contract.next_hop_headers(contract.header_map(headers), "reading/1")
        assert contract.next_hop(headers, b"reading/1") == want, headers


def test_next_hop_keeps_order_and_reuses_pairs():
    headers = (
        ("lineage-id", b"L"),
        ("traceparent", PARENT),
        ("source", b"live"),
        ("schema", b"raw/1"),
        ("retry.attempts", b"1"),
        ("ingest-ts", b"1"),
    )
    out = contract.next_hop(headers, b"reading/1")
    assert [n for n, _ in out] == ["lineage-id", "traceparent", "source", "schema", "ingest-ts"]
    assert out[0] is headers[0]
    assert dict(out)["schema"] == b"reading/1"


# -- records in, results out ------------------------------------------------------


def test_to_record_is_a_normal_frozen_record():
    r = ConsumerRecord("t", 1, 5, 17, 0, b"k", b"v", None, 1, 1, [("a", b"b")])
    record = bindings.to_record(r)
    assert record == Record("t", 1, 5, 17, b"k", b"v", (("a", b"b"),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.offset = 6  # type: ignore[misc]
    assert bindings.to_record(dataclasses.replace(r, timestamp=None, headers=[])).headers == ()


def test_parse_output_is_reading_to_json():
    settings = load_settings()
    config = settings.stages["parse"].config
    stage = Batchwise(engine(parse, config, lambda: 1764400000.001, stage_id="parse"))
    validator = Validator(parse.make_config("parse", config))
    value = b'{"device_id": "d", "ts": 1764400000000, "seq": 3, "metric": "temp", "value": 21}'
    record = Record("iot.raw", 0, 7, 0, b"d", value, (("traceparent", PARENT),))
    out = stage.process([record]).outputs[0]
    assert out.value == validator.validate(decode(value), 1764400000001).to_json()
    assert isinstance(validator.validate(decode(value), 1764400000001), Reading)
    assert (out.key, out.timestamp_ms, out.source_offset) == (b"d", 1764400000000, 7)


def test_tune_gc_freezes_the_startup_heap_and_raises_gen0():
    before = gc.get_threshold()
    try:
        bindings.tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= bindings.GC_GEN0_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# -- the producer -----------------------------------------------------------------


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._t, self._p, self._o = topic, partition, offset

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class FakeProducer:
    """Acknowledges from its poll thread, partitions in any order."""

    def __init__(self, fail: set[int] | None = None, code: int = -192) -> None:
        self.pending: list[tuple[object, str, dict]] = []
        self.lock = threading.Lock()
        self.fail = fail or set()
        self.code = code  # of the failures: _MSG_TIMED_OUT (transient) by default
        self.produced = 0

    def produce(self, topic, value, key, partition=None, **kwargs):
        with self.lock:
            self.pending.append((kwargs["on_delivery"], topic, {**kwargs, "partition": partition}))
            self.produced += 1

    def poll(self, timeout):
        with self.lock:
            batch, self.pending = self.pending, []
        random.shuffle(batch)
        for n, (callback, topic, _) in enumerate(batch):
            index = callback.args[0]
            err = None
            if index in self.fail:

                class Err:
                    def __init__(self, code: int) -> None:
                        self._code = code

                    def str(self) -> str:
                        return "broker said no"

                    def code(self) -> int:
                        return self._code

                err = Err(self.code)
            callback(err, FakeMessage(topic, index % 3, 1000 + index))
            del n
        threading.Event().wait(min(timeout, 0.01))

    def flush(self, timeout):
        return 0


def outgoing(n: int) -> list[tuple[str, bytes, bytes, list[tuple[str, bytes]], int | None]]:
    return [("t", b"k%d" % i, b"v", [("h", b"1")], 1000 + i if i % 2 else None) for i in range(n)]


def test_send_batch_returns_every_ack_in_produce_order():
    producer = AsyncProducer(FakeProducer())  # type: ignore[arg-type]
    try:
        delivered = asyncio.run(producer.send_batch(outgoing(500)))
    finally:
        producer.close()
    assert isinstance(delivered, Deliveries) and len(delivered) == 500
    assert delivered.offsets == [1000 + i for i in range(500)]
    assert delivered.partitions == [i % 3 for i in range(500)]
    assert delivered[7] == Delivered("t", 7 % 3, 1007)
    assert delivered[-1] == Delivered("t", 499 % 3, 1499)
    assert delivered[1:3] == [Delivered("t", 1, 1001), Delivered("t", 2, 1002)]


def test_send_batch_also_produces_to_given_partitions():
    fake = FakeProducer()
    producer = AsyncProducer(fake)  # type: ignore[arg-type]
    seen: list[dict] = []
    real_produce = fake.produce

    def produce(topic, value, key, partition=None, **kwargs):
        seen.append({"topic": topic, "key": key, "value": value, "partition": partition})
        real_produce(topic, value, key, partition, **kwargs)

    fake.produce = produce  # type: ignore[method-assign]
    try:
        delivered = asyncio.run(
            producer.send_batch(outgoing(2), [("state", 3, b"w1", b"s"), ("state", 3, b"w2", None)])
        )
    finally:
        producer.close()
    assert len(delivered) == 4 and delivered.offsets == [1000, 1001, 1002, 1003]
    assert delivered.topic(2) == "state" and delivered[3].topic == "state"
    assert seen[2:] == [
        {"topic": "state", "key": b"w1", "value": b"s", "partition": 3},
        {"topic": "state", "key": b"w2", "value": None, "partition": 3},  # a tombstone
    ]
    assert seen[0]["partition"] is None


def test_send_batch_raises_when_a_record_is_not_acknowledged():
    producer = AsyncProducer(FakeProducer(fail={3, 9}))  # type: ignore[arg-type]
    try:
        with pytest.raises(DeliveryError, match="2 record"):
            asyncio.run(producer.send_batch(outgoing(20)))
        assert len(asyncio.run(producer.send_batch([]))) == 0
    finally:
        producer.close()


def test_records_refused_for_good_are_told_apart_from_a_failed_batch():
    producer = AsyncProducer(FakeProducer(fail={3, 9}, code=10))  # type: ignore[arg-type]
    try:
        with pytest.raises(RecordsRefused) as refused:
            asyncio.run(producer.send_batch(outgoing(20)))
    finally:
        producer.close()
    assert sorted(refused.value.refused) == [3, 9]
    delivered = refused.value.deliveries
    assert delivered.offsets[4] == 1004  # the others were written


# -- lineage hops -----------------------------------------------------------------


def _batch() -> tuple[list[Record], BatchResult, list, Deliveries]:
    records = [
        Record("iot.raw", 2, 100 + i, 0, b"k", b"v", (("lineage-id", b"L%d" % i),))
        for i in range(6)
    ]
    result = BatchResult("parse", {"schema_violation": ""})
    for i in (0, 1, 3):
        result.outputs.append(
            OutRecord(b"k", b"o", [("lineage-id", b"L%d" % i), ("schema", b"s")], 0, 100 + i)
        )
    result.outputs.append(OutRecord(b"k", b"o", [("schema", b"s")], 0, 104))  # no lineage id
    at = retry.origin((), "iot.raw", 2, 102, 0)
    retry_headers = retry.retry_headers(
        (("lineage-id", b"L2"),), at, 1, 5, "unknown_device", "no device", 1
    )
    retries = [("iot.parse.retry", b"k", b"v", retry_headers, None)]
    result.dead.append(
        DeadLetter(
            "parse", "schema_violation", "InvalidMessage", "bad", b"k", b"v",
            (("lineage-id", b"L5"),), "iot.raw", 2, 105, 0,
        )
    )  # fmt: skip
    topics = ["iot.parsed"] * 4 + ["iot.parse.retry", "iot.parse.dlq"]
    delivered = Deliveries(
        [(t, None, None, [], None) for t in topics], [1, 0, 3, 2, 0, 1], [10, 11, 12, 13, 14, 15]
    )
    return records, result, retries, delivered


def test_hops_of_a_batch_expand_to_one_hop_per_record():
    records, result, retries, delivered = _batch()
    out = lineage.batch_hops(
        "parse", "iot.lineage", records, result, retries, delivered, 77,
        ["iot.parsed"] * 4, "iot.parse.retry", "iot.parse.dlq",
    )  # fmt: skip
    assert len(out) == 1  # one lineage partition: one record
    topic, partition, key, value = out[0]
    assert (topic, partition, key) == ("iot.lineage", 0, b"parse/iot.raw/2")
    hops = {h["id"]: h for h in lineage.expand(value)}
    assert hops["L0"] == {
        "id": "L0",
        "stage": "parse",
        "in": ["iot.raw", 2, 100],
        "out": ["iot.parsed", 1, 10],
        "outcome": "passed",
        "at": 77,
    }
    assert hops["L3"]["out"] == ["iot.parsed", 3, 12]
    assert hops["L2"] == {
        "id": "L2",
        "stage": "parse",
        "in": ["iot.raw", 2, 102],
        "out": ["iot.parse.retry", 0, 14],
        "outcome": "retry",
        "reason": "unknown_device",
        "at": 77,
    }
    assert hops["L5"]["outcome"] == "dead_letter" and hops["L5"]["reason"] == "schema_violation"
    assert hops["L5"]["out"] == ["iot.parse.dlq", 1, 15]
    assert sorted(hops) == ["L0", "L1", "L2", "L3", "L5"]  # the output without an id: none
    # the same with Delivered objects
    named = lineage.batch_hops(
        "parse", "iot.lineage", records, result, retries, list(delivered), 77,
        ["iot.parsed"] * 4, "iot.parse.retry", "iot.parse.dlq",
    )  # fmt: skip
    assert lineage.expand(named[0][3]) == lineage.expand(value)


def test_counted_hops_and_chunks(monkeypatch):
    monkeypatch.setattr(placing, "MAX_HOPS", 4)
    records = [Record("iot.enriched", 1, i, 0, b"k", b"v", ()) for i in range(10)]
    result = BatchResult("aggregate", {})
    result.counted = [(i, f"L{i}", ["dev", "temp", 60_000]) for i in range(10)]
    out = lineage.batch_hops(
        "aggregate", "iot.lineage", records, result, [], Deliveries([], [], []), 5, [], "", "dlq"
    )
    assert len(out) == 3
    hops = [h for _, _, _, value in out for h in lineage.expand(value)]
    assert [h["id"] for h in hops] == [f"L{i}" for i in range(10)]
    assert hops[9] == {
        "id": "L9",
        "stage": "aggregate",
        "in": ["iot.enriched", 1, 9],
        "out": None,
        "outcome": "counted",
        "window": ["dev", "temp", 60_000],
        "at": 5,
    }


def test_expand_reads_format_1_hops():
    old = {"id": "L", "stage": "parse", "in": ["t", 0, 1], "out": None, "outcome": "passed"}
    assert lineage.expand(orjson.dumps(old)) == [old]
    assert lineage.expand(b"") == [] and lineage.expand(b"[1]") == []
