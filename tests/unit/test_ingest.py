import orjson

from pipeline import contract
from stages.ingest import ingest, sniff_identity
from tests.unit.records import Batchwise, engine, reading, rec


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stage(clock=None, **kw) -> Batchwise:
    return Batchwise(engine(ingest, kw, clock or Clock(), stage_id="ingest"))


def test_json_and_csv_are_keyed_and_get_lineage_headers():
    s = stage()
    result = s.process(
        [
            rec(reading("dev-0001", seq=1)),
            rec(b"dev-0002,1700000000000,5,humidity,40.5,%"),
        ]
    )
    assert not result.dead and result.duplicates == 0
    keys = [o.key for o in result.outputs]
    assert keys == [b"dev-0001", b"dev-0002"]
    for out in result.outputs:
        h = contract.header_map(out.headers)
        assert h["source"] == b"live"
        assert h["schema"] == b"raw/1"
        assert h["ingest-ts"] == b"1000000"
        assert len(h["lineage-id"]) == 26
        assert len(h["traceparent"].split(b"-")) == 4
    assert result.outputs[1].value == b"dev-0002,1700000000000,5,humidity,40.5,%"  # bytes untouched


def test_lineage_id_is_stable_across_redelivery():
    payload = orjson.dumps(reading(seq=3))
    first = stage().process([rec(payload)]).outputs[0]
    again = stage().process([rec(payload)]).outputs[0]  # another worker, after a crash
    assert (
        contract.header_map(first.headers)["lineage-id"]
        == contract.header_map(again.headers)["lineage-id"]
    )


def test_incoming_source_and_trace_are_kept():
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out = stage().process(
        [rec(reading(), headers=(("source", b"backfill:r1"), ("traceparent", parent)))]
    )
    h = contract.header_map(out.outputs[0].headers)
    assert h["source"] == b"backfill:r1"
    assert h["traceparent"].split(b"-")[1] == parent.split(b"-")[1]


def test_too_large_and_empty_are_dead_letters():
    s = stage(max_payload_bytes=100)
    big = rec(b"{" + b" " * 200 + b"}")
    result = s.process([big, rec(b""), rec(None), rec(b"   \n")])
    assert [str(d.reason) for d in result.dead] == ["too_large", "empty", "empty", "empty"]
    assert result.dead[0].value == big.value
    assert result.dead[0].offset == big.offset
    assert not result.outputs


def test_exact_repeat_is_dropped_within_window_only():
    clock = Clock()
    s = stage(clock, dedup_window_s=10)
    payload = orjson.dumps(reading(seq=1))
    assert len(s.process([rec(payload), rec(payload)]).outputs) == 1
    clock.t += 5
    assert s.process([rec(payload)]).duplicates == 1
    clock.t += 11
    assert len(s.process([rec(payload)]).outputs) == 1  # window passed: accepted again


def test_same_pair_different_payload_is_not_a_duplicate():
    s = stage()
    good = orjson.dumps(reading(seq=1, value=20.0))
    other = orjson.dumps(reading(seq=1, value=999.0))
    result = s.process([rec(other), rec(good)])
    assert len(result.outputs) == 2 and result.duplicates == 0


def test_dedup_memory_is_bounded():
    s = stage(dedup_max_keys=3)
    for i in range(10):
        s.process([rec(reading(seq=i))])
    assert len(s.engine.processor.deduper) <= 3


def test_unreadable_payload_passes_through_for_parse_to_reject():
    s = stage()
    bad = rec(b"\xff\xfe\x00", key=b"k")
    result = s.process([bad])
    assert not result.dead and len(result.outputs) == 1
    out = result.outputs[0]
    assert out.value == bad.value and out.key == b"k"
    expected = contract.lineage_id(bad.timestamp_ms, bad.topic, bad.partition, bad.offset)
    assert contract.header_map(out.headers)["lineage-id"] == expected.encode()


def test_sniff_identity():
    assert sniff_identity(b'{"device_id": "d", "seq": 4, "ts": 9}') == ("d", "4", 9)
    assert sniff_identity(b"d,9,4,m,1.0,u") == ("d", "4", 9)
    assert sniff_identity(b'{"device_id": "", "seq": 1}') is None
    assert sniff_identity(b"[1,2]") is None
    assert sniff_identity(b'{"device_id": "d", "seq": {"x": 1}}') is None
    assert sniff_identity(b"a,b") is None
