from ulid import ULID

from dlq.envelope import DeadLetter
from pipeline import contract


def test_lineage_id_is_deterministic_sortable_ulid():
    a = contract.lineage_id(1_700_000_000_000, "dev-1", "7", b"x")
    assert a == contract.lineage_id(1_700_000_000_000, "dev-1", "7", b"x")
    assert a != contract.lineage_id(1_700_000_000_000, "dev-1", "8", b"x")
    ulid = ULID.from_str(a)
    assert int(ulid.timestamp * 1000) == 1_700_000_000_000
    later = contract.lineage_id(1_700_000_000_001, "dev-0")
    assert later > a  # time-ordered


def test_lineage_id_clamps_out_of_range_time():
    assert ULID.from_str(contract.lineage_id(-5, "x"))
    assert ULID.from_str(contract.lineage_id(10**20, "x"))


def test_child_traceparent_keeps_trace_and_flags_new_span():
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    child = contract.child_traceparent(parent.encode())
    version, trace, span, flags = child.split("-")
    assert (version, trace, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert span != "00f067aa0ba902b7" and len(span) == 16


def test_malformed_traceparent_starts_new_trace():
    for bad in (None, b"", b"garbage", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"\xff"):
        child = contract.child_traceparent(bad)
        assert len(child.split("-")[1]) == 32
        assert child.split("-")[1] != "0" * 32


def test_dead_letter_envelope_replaces_old_envelope_and_keeps_replay_count():
    dead = DeadLetter(
        "parse",
        "decode_error",
        "InvalidMessage",
        "bad",
        b"k",
        b"v",
        (("lineage-id", b"L"), ("dlq.reason", b"old"), ("dlq.replay-count", b"2")),
        "iot.raw",
        3,
        42,
        1000,
    )
    headers = dead.envelope_headers(5000)
    names = [n for n, _ in headers]
    assert names.count("dlq.reason") == 1
    h = dict(headers)
    assert h["dlq.reason"] == b"decode_error"
    assert h["dlq.replay-count"] == b"2"
    assert h["lineage-id"] == b"L"
    assert (h["dlq.original.topic"], h["dlq.original.partition"], h["dlq.original.offset"]) == (
        b"iot.raw",
        b"3",
        b"42",
    )
    assert h["dlq.failed-at"] == b"5000"
