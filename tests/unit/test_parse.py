import math

import orjson
import pytest

from pipeline import contract
from stages.parse import parse
from tests.unit.records import Batchwise, engine, reading, rec

NOW_S = 1_700_000_100.0


def stage() -> Batchwise:
    config = {"ranges": {"humidity": {"min": 0, "max": 100}}}
    return Batchwise(engine(parse, config, lambda: NOW_S, stage_id="parse"))


def test_json_and_csv_normalise_to_one_schema():
    result = stage().process(
        [
            rec(reading("d1", seq=1, value=21)),
            rec(b" d2 , 1700000000000 , 2 , humidity , 40.5 , % \n"),
        ]
    )
    assert not result.dead
    docs = [orjson.loads(o.value) for o in result.outputs]
    assert docs[0] == {
        "device_id": "d1",
        "ts": 1_700_000_000_000,
        "seq": 1,
        "metric": "temperature",
        "value": 21.0,
        "unit": "C",
    }
    assert docs[1]["device_id"] == "d2" and docs[1]["value"] == 40.5 and docs[1]["unit"] == "%"
    assert [o.key for o in result.outputs] == [b"d1", b"d2"]
    assert contract.header_map(result.outputs[0].headers)["schema"] == b"reading/1"


def test_unknown_metric_is_accepted_and_missing_unit_defaults_empty():
    doc = reading(metric="vibration", value=1e9)
    del doc["unit"]
    result = stage().process([rec(doc)])
    assert not result.dead
    assert orjson.loads(result.outputs[0].value)["unit"] == ""


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "decode_error"),
        (b"[1, 2]", "decode_error"),
        (b"a,b,c", "decode_error"),
        (b"\xff\xfe", "decode_error"),
        (b"", "decode_error"),
        (b"d,notanumber,1,m,1.0,u", "schema_violation"),
        (orjson.dumps({**reading(), "device_id": ""}), "schema_violation"),
        (orjson.dumps({**reading(), "device_id": 5}), "schema_violation"),
        (orjson.dumps({**reading(), "metric": None}), "schema_violation"),
        (orjson.dumps({**reading(), "ts": "1700000000000"}), "schema_violation"),
        (orjson.dumps({**reading(), "ts": True}), "schema_violation"),
        (orjson.dumps({**reading(), "seq": -1}), "schema_violation"),
        (orjson.dumps({**reading(), "value": "hot"}), "schema_violation"),
        (orjson.dumps({**reading(), "value": False}), "schema_violation"),
        (orjson.dumps({**reading(), "unit": 7}), "schema_violation"),
        (orjson.dumps({**reading(), "ts": 5}), "out_of_range"),
        (orjson.dumps({**reading(), "ts": int(NOW_S * 1000) + 2 * 86_400_000}), "out_of_range"),
        (orjson.dumps({**reading(), "metric": "humidity", "value": 100.01}), "out_of_range"),
        (orjson.dumps({**reading(), "value": 2**60}), "out_of_range"),
        (b"d,1700000000000,1,m,nan,u", "out_of_range"),
        (b"d,1700000000000,1,m,inf,u", "out_of_range"),
        (
            b'{"device_id":"d","ts":1700000000000,"seq":1,"metric":"m","value":1e999}',
            "decode_error",
        ),
        (b"[" * 5000 + b"]" * 5000, "decode_error"),
    ],
)
def test_bad_readings_become_dead_letters_with_reason(payload, reason):
    record = rec(payload)
    result = stage().process([record])
    assert not result.outputs
    assert [str(d.reason) for d in result.dead] == [reason]
    dead = result.dead[0]
    assert dead.stage == "parse" and dead.value == payload and dead.offset == record.offset
    assert dead.error_message and "\n" not in dead.error_message


def test_boundaries_are_inclusive():
    s = stage()
    ok = [
        reading(metric="humidity", value=0),
        reading(metric="humidity", value=100),
        reading(ts=946_684_800_000),
        reading(ts=int(NOW_S * 1000) + 86_400_000),
    ]
    result = s.process([rec(d) for d in ok])
    assert not result.dead and len(result.outputs) == 4
    assert all(math.isfinite(orjson.loads(o.value)["value"]) for o in result.outputs)
