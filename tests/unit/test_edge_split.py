"""Bodies into records (pipeline.edge.split): what is split, what is refused whole."""

from __future__ import annotations

import gzip

import orjson
import pytest

from pipeline.edge.split import (
    BodyError,
    content_kind,
    decode_content,
    device_of,
    split_body,
    with_device_id,
)

LIMITS = {"max_records": 100, "max_record_bytes": 1000}


def _refused(body: bytes, kind: str = "json", **limits: int) -> BodyError:
    with pytest.raises(BodyError) as excinfo:
        split_body(body, kind, **{**LIMITS, **limits})  # type: ignore[arg-type]
    return excinfo.value


def test_one_object_an_array_ndjson_and_csv_split_into_records_with_their_devices() -> None:
    one = split_body(b' {"device_id": "d1", "value": 1.5} ', "json", **LIMITS)
    array = split_body(b'[{"device_id":"d1"}, {"device_id":"d2"}, 5]', "json", **LIMITS)
    ndjson = split_body(b'{"device_id":"d1"}\r\n\n{not json\n', "ndjson", **LIMITS)
    csv = split_body(
        b"device_id,ts,seq,metric,value,unit\nd1,1,2,t,1.0,C\r\n\nd2,1,3,t,2,C", "csv", **LIMITS
    )

    assert one == [(b'{"device_id":"d1","value":1.5}', "d1")]
    assert array == [(b'{"device_id":"d1"}', "d1"), (b'{"device_id":"d2"}', "d2"), (b"5", None)]
    # lines pass byte for byte; an unreadable one still goes on (parse dead-letters it)
    assert ndjson == [(b'{"device_id":"d1"}', "d1"), (b"{not json", None)]
    assert csv == [(b"d1,1,2,t,1.0,C", "d1"), (b"d2,1,3,t,2,C", "d2")]


def test_splitting_is_deterministic_so_a_retried_request_gives_the_same_bytes() -> None:
    body = orjson.dumps([{"device_id": "d", "value": 0.1, "seq": i} for i in range(50)])
    assert split_body(body, "json", **LIMITS) == split_body(body, "json", **LIMITS)


@pytest.mark.parametrize(
    ("body", "kind", "status", "words"),
    [
        (b"", "json", 400, "no record"),
        (b"  \n ", "ndjson", 400, "no record"),
        (b"[]", "json", 400, "no record"),
        (b"\n\n", "csv", 400, "no record"),
        (b'{"a": ', "json", 400, "invalid JSON"),
        (b"42", "json", 400, "object or an array"),
        (b'{"device_id": "\xff"}', "json", 400, "UTF-8"),
        (b"d1,1,2,t,1,C\n\xc3\x28,1", "csv", 400, "UTF-8 (byte 13)"),
    ],
)
def test_a_body_that_cannot_be_split_is_refused_with_the_first_problem(
    body: bytes, kind: str, status: int, words: str
) -> None:
    error = _refused(body, kind)
    assert error.status == status
    assert words in error.message


def test_record_count_and_record_size_limits_refuse_the_whole_request() -> None:
    assert _refused(b"1\n" * 101, "ndjson").status == 413
    assert _refused(orjson.dumps([{}] * 101), "json").reason == "too_many_records"
    assert len(split_body(b"1\n" * 100, "ndjson", **LIMITS)) == 100
    big = _refused(b'{"device_id":"d","pad":"' + b"x" * 1000 + b'"}', "json")
    assert (big.status, big.reason) == (413, "too_large")


def test_a_million_tiny_records_are_refused_without_building_a_million_records() -> None:
    error = _refused(b"{}\n" * 1_000_000, "ndjson", max_records=10_000)
    assert (error.status, error.reason) == (413, "too_many_records")


def test_content_types_and_their_parameters() -> None:
    assert content_kind("application/json; charset=utf-8") == "json"
    assert content_kind("application/x-ndjson") == "ndjson"
    assert content_kind("text/csv; charset=UTF-8; header=present") == "csv"
    for bad in (None, "", "text/plain", "application/json; charset=latin-1"):
        with pytest.raises(BodyError) as excinfo:
            content_kind(bad)
        assert excinfo.value.status == 415


def test_gzip_is_decoded_within_its_bound_and_a_bomb_stops_there() -> None:
    assert decode_content(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert decode_content(b"abc", None, 10) == b"abc"
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(BodyError) as excinfo:
        decode_content(bomb, "gzip", 4_194_304)
    assert (excinfo.value.status, excinfo.value.reason) == (413, "too_large")
    for broken in (b"not gzip", gzip.compress(b"x" * 1000)[:-12]):
        with pytest.raises(BodyError) as excinfo:
            decode_content(broken, "gzip", 100_000)
        assert excinfo.value.status == 400
    with pytest.raises(BodyError) as excinfo:
        decode_content(b"x", "br", 10)
    assert excinfo.value.status == 415


def test_a_payload_without_a_device_gets_the_topics_and_one_with_a_device_keeps_it() -> None:
    assert with_device_id(b'{"ts": 1, "seq": 2}', "d9") == (
        b'{"device_id":"d9","ts":1,"seq":2}',
        "d9",
    )
    assert with_device_id(b"1,2,t,1.5,C", "d9") == (b"d9,1,2,t,1.5,C", "d9")
    named = b'{"device_id": "d1", "ts": 1}'
    assert with_device_id(named, "d9") == (named, "d1")
    assert with_device_id(b"d1,1,2,t,1.5,C", "d9") == (b"d1,1,2,t,1.5,C", "d1")
    for unreadable in (b"{broken", b"\xff\xfe", b"[1, 2]", b'{"device_id": 5}'):
        assert with_device_id(unreadable, "d9") == (unreadable, "d9")
    # deterministic: a redelivered message gives the same bytes (and lineage id)
    assert with_device_id(b'{"ts":1}', "d9") == with_device_id(b'{"ts":1}', "d9")
    assert device_of(b'{"device_id":"d1"}') == "d1"
    assert device_of(b"d2,1,2,t,1,C") == "d2"
    assert device_of(b"garbage") is None
