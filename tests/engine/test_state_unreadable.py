"""A state record that cannot be read when a partition is loaded: it becomes a
``state_unreadable`` dead letter and is deleted from the changelog, and the partition
goes on. Before, it raised in the load, and the worker would crash on it at every
restart (a crash loop on one record)."""

from __future__ import annotations

import orjson
import pytest

from pipeline.engine.state import ended_key
from pipeline.errors import DeliveryError, StateUnreadable
from pipeline.records import Record
from pipeline.testing import StageHarness
from stages.aggregate import aggregate

CONFIG = {"window_s": 10, "allowed_lateness_s": 2}


def reading(ts: int, value: float, lineage: str, device: str = "d1") -> Record:
    doc = {"device_id": device, "metric": "temp", "ts": ts, "value": value, "unit": "C"}
    return Record(
        "in",
        0,
        ts,  # offsets rise with the time here
        ts,
        device.encode(),
        orjson.dumps(doc),
        (("lineage-id", lineage.encode()),),
    )


def harness() -> StageHarness:
    return StageHarness(aggregate, stage_id="aggregate", config=CONFIG)


def keys_of(h: StageHarness, kind: bytes) -> list[bytes]:
    return [k for k in h.state if k.startswith(b'["' + kind + b'"')]


def test_an_unreadable_window_is_a_dead_letter_and_the_partition_goes_on() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A", "d1"), reading(1_100, 5.0, "B", "d2")])
    (broken, kept) = sorted(keys_of(h, b"s"), key=lambda k: b"d2" in k)
    good = h.state[kept]
    h.state[broken] = b'{"start": 0, "seen": "not base64!"'  # cut short, not JSON
    h.restart()

    after = h.run([reading(1_200, 2.0, "C", "d1"), reading(1_300, 7.0, "D", "d2")])

    (letter,) = after.dead_letters
    assert letter.reason == "state_unreadable"
    assert (letter.key, letter.value) == (broken, b'{"start": 0, "seen": "not base64!"')
    assert letter.header("dlq.original.topic") == "state"
    assert letter.header("dlq.original.partition") == "0"
    assert "could not be read" in letter.message and letter.error_class == "JSONDecodeError"
    # deleted from the changelog (a tombstone), before the batch's own writes
    assert after.state_writes[0] == (broken, None)
    # the readable window kept what it counted; the broken one started again
    assert h.state[kept] != good
    after_d2 = orjson.loads(h.state[kept])
    assert after_d2["count"] == 2 and after_d2["total"] == 12.0
    restarted_d1 = orjson.loads(h.state[broken])
    assert restarted_d1["count"] == 1 and restarted_d1["total"] == 2.0
    assert after.report is not None and after.report.dead_by_reason == {}  # the batch's own


def test_unreadable_watermark_and_fence_are_dead_letters_and_start_empty() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A")])
    (watermark,) = keys_of(h, b"wm")
    (fence,) = keys_of(h, b"in")
    h.state[watermark] = b'{"watermark": "soon"}'
    h.state[fence] = b"[]"
    h.restart()

    # A again (its offset is below the lost fence) and a new reading
    after = h.run([reading(1_000, 1.0, "A"), reading(1_001, 1.0, "B")])

    assert sorted((d.key, d.reason) for d in after.dead_letters) == sorted(
        [(watermark, "state_unreadable"), (fence, "state_unreadable")]
    )
    assert orjson.loads(h.state[watermark]) == {"watermark": 1_001}
    assert orjson.loads(h.state[fence]) == {"next": 1_002}
    # without its fence, the window still held recognises A by its lineage id
    assert after.duplicates == 1
    (window,) = keys_of(h, b"s")
    assert orjson.loads(h.state[window])["count"] == 2


def test_a_load_that_reads_everything_writes_no_dead_letter() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A")])
    h.restart()
    after = h.run([reading(1_001, 1.0, "B")])
    assert after.dead_letters == []
    assert all(v is not None for _, v in after.state_writes)


@pytest.mark.parametrize(
    "change",
    [{"end": None}, {"end": "x"}, {"count": 0}, {"carry": [1]}, {"total": "x"}, {"closed": 1}],
    ids=["end-null", "end-text", "count-0", "carry-list", "total-text", "closed-int"],
)
def test_a_window_that_decodes_but_is_not_one_is_set_aside_at_load(change: dict) -> None:
    """Wrong types would fail later, where no record is to blame: restoring the lane
    (on_restore), or closing the window (the result, its mean), and the worker would
    exit on it at every restart."""
    h = harness()
    h.run([reading(1_000, 1.0, "A", "d1"), reading(1_000, 2.0, "B", "d2")])
    broken = next(k for k in keys_of(h, b"s") if b"d1" in k)
    h.state[broken] = orjson.dumps({**orjson.loads(h.state[broken]), **change})
    h.restart()

    after = h.run([reading(30_000, 1.0, "C", "d1")])  # closes the first windows

    assert [(d.key, d.reason) for d in after.dead_letters] == [(broken, "state_unreadable")]
    assert {v["device_id"]: v["count"] for v in after.values()} == {"d2": 1}


def test_a_float_watermark_is_read_as_the_integer_it_is() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A")])
    (watermark,) = keys_of(h, b"wm")
    h.state[watermark] = b'{"watermark": 1000.0}'
    h.restart()
    after = h.run([reading(1_001, 1.0, "B")])
    assert after.dead_letters == []


def test_an_unreadable_ended_marker_keeps_its_lane_ended() -> None:
    h = harness()
    lane = "backfill:r1"
    h.state[ended_key(0, lane)] = b"\x00garbage"
    backfill = Record(
        "in", 0, 5, 1_000, b"d1", reading(1_000, 1.0, "A").value, (("source", lane.encode()),)
    )
    after = h.run([backfill])
    assert [d.reason for d in after.dead_letters] == ["late"]


def test_too_many_unreadable_records_stop_the_load_and_set_nothing_aside() -> None:
    """Every window failing is a codec or version problem, not a corrupt record:
    setting them all aside would empty the state."""
    h = harness()
    h.run([reading(1_000, 1.0, f"L{i}", f"d{i}") for i in range(12)])
    for key in keys_of(h, b"s"):
        h.state[key] = b"{}"
    kept = dict(h.state)
    h.restart()

    with pytest.raises(StateUnreadable, match="12 of the 14 state records of partition 0"):
        h.run([reading(1_001, 1.0, "B")])
    assert h.producer.topic("dlq") == [] and h.state == kept


def test_a_record_too_large_for_the_dlq_whole_is_dead_lettered_cut_and_kept() -> None:
    h = StageHarness(aggregate, stage_id="aggregate", config=CONFIG, topic_limits={"dlq": 8_192})
    h.run([reading(1_000, 1.0, "A")])
    (window,) = keys_of(h, b"s")
    garbage = b"\xff" * 20_000
    h.state[window] = garbage
    h.restart()

    after = h.run([reading(1_001, 1.0, "B")])

    (letter,) = after.dead_letters
    assert letter.reason == "state_unreadable"
    assert letter.header("dlq.payload.truncated") == "true"
    assert (window, None) not in after.state_writes  # not deleted: the letter is a prefix
    assert orjson.loads(h.state[window])["count"] == 1  # the batch wrote the window anew


def test_a_quarantine_that_fails_is_tried_again_at_the_next_load() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A")])
    (window,) = keys_of(h, b"s")
    h.state[window] = b"nope"
    h.restart()
    h.producer.fail = lambda: "the broker is gone"
    with pytest.raises(DeliveryError):
        h.run([reading(1_001, 1.0, "B")])
    assert h.state[window] == b"nope"  # nothing deleted before its dead letter landed
    h.producer.fail = None
    h.restart()
    after = h.run([reading(1_001, 1.0, "B")])
    assert [(d.key, d.value) for d in after.dead_letters] == [(window, b"nope")]
