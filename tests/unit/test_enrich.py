import orjson
import pytest

from dlq import retry
from pipeline import contract
from stages.enrich import Device, enrich, read_registry_csv
from tests.unit.records import Batchwise, engine, rec


def parsed(device="dev-1", value=20.0, unit="C"):
    return {
        "device_id": device,
        "ts": 1_700_000_000_000,
        "seq": 1,
        "metric": "temperature",
        "value": value,
        "unit": unit,
    }


def EnrichStage(registry: dict[str, Device]) -> Batchwise:
    """The enrich stage with ``registry`` as its ``devices`` lookup."""
    table = {k.encode(): d.to_json() for k, d in registry.items()}
    return Batchwise(engine(enrich, lookups={"devices": table}, stage_id="enrich"))


def test_registry_csv_keeps_extra_columns_as_attributes():
    devices = read_registry_csv(
        "device_id,site,device_type,unit,calibration_offset,firmware,floor\n"
        "dev-1,site-a,thermometer,C,-0.5,1.2.0,3\n"
        "dev-2,site-b,hygrometer,%,,1.0.0,1\n"
    )
    assert devices[0] == Device(
        "dev-1", "site-a", "thermometer", "C", -0.5, {"firmware": "1.2.0", "floor": "3"}
    )
    assert devices[1].calibration_offset == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device_id,site,unit\nd,s,C\n", "lacks column"),
        ("device_id,site,device_type,unit\n,s,t,C\n", "line 2"),
        ("device_id,site,device_type,unit,calibration_offset\nd,s,t,C,abc\n", "not a number"),
        ("device_id,site,device_type,unit,calibration_offset\nd,s,t,C,inf\n", "finite"),
    ],
)
def test_registry_csv_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        read_registry_csv(text)


def test_device_round_trips_through_json():
    d = Device("dev-1", "s", "t", "C", 0.25, {"a": "b"})
    assert Device.from_json(d.to_json()) == d


def test_enrich_joins_registry_and_calibrates():
    registry = {"dev-1": Device("dev-1", "site-a", "thermometer", "C", -0.5, {"floor": "3"})}
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    record = rec(
        parsed(value=20.0), key=b"dev-1", headers=(("traceparent", parent), ("lineage-id", b"L"))
    )
    result = EnrichStage(registry).process([record])
    assert not result.dead
    out = orjson.loads(result.outputs[0].value)
    assert out["value"] == 19.5 and out["raw_value"] == 20.0
    assert (out["site"], out["device_type"], out["attributes"]) == (
        "site-a",
        "thermometer",
        {"floor": "3"},
    )
    h = contract.header_map(result.outputs[0].headers)
    assert h["lineage-id"] == b"L" and h["schema"] == b"enriched/1"
    assert h["traceparent"].split(b"-")[1] == parent.split(b"-")[1]


def test_registry_unit_fills_a_missing_unit():
    registry = {"dev-1": Device("dev-1", "s", "t", "hPa")}
    out = EnrichStage(registry).process([rec(parsed(unit=""))]).outputs[0]
    assert orjson.loads(out.value)["unit"] == "hPa"


def test_unknown_device_is_retryable_and_garbage_is_a_dead_letter():
    ghost, garbage = rec(parsed("ghost")), rec(b"nope")
    result = EnrichStage({}).process([ghost, garbage])
    assert [(r, str(e.reason)) for r, e in result.retryable] == [(ghost, "unknown_device")]
    assert [str(d.reason) for d in result.dead] == ["schema_violation"]
    assert result.dead[0].error_class == "InvalidMessage"
    assert result.rejected_offsets == [garbage.offset]
    assert not result.outputs


def test_a_failed_retry_is_dead_lettered_with_its_first_coordinates():
    first = rec(parsed("ghost"), topic="iot.parsed", partition=2)
    headers = retry.retry_headers(
        first.headers,
        retry.origin((), first.topic, first.partition, first.offset, first.timestamp_ms),
        failed_attempts=4,
        due_at=0,
        reason="unknown_device",
        message="device_id is not in the registry",
        now_ms=1,
    )
    again = rec(parsed("ghost"), topic="iot.enrich.retry", headers=tuple(headers))
    result = EnrichStage({}).process([again])
    ((record, exc),) = result.retryable
    result.reject(record, exc)
    dead = result.dead[0]
    assert (dead.topic, dead.partition, dead.offset) == ("iot.parsed", 2, first.offset)
    assert dead.attempts == 5
    headers = dead.envelope_headers(2)
    assert not [n for n, _ in headers if n.startswith("retry.")], headers
    assert dict(headers)["dlq.attempts"] == b"5"
