"""A state record that cannot be read when a partition is loaded: it becomes a
``state_unreadable`` dead letter and is deleted from the changelog, and the partition
goes on. Before, it raised in the load, and the worker would crash on it at every
restart (a crash loop on one record)."""

from __future__ import annotations

import orjson

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

    after = h.run([reading(1_001, 1.0, "B")])

    assert sorted((d.key, d.reason) for d in after.dead_letters) == sorted(
        [(watermark, "state_unreadable"), (fence, "state_unreadable")]
    )
    assert orjson.loads(h.state[watermark]) == {"watermark": 1_001}
    assert orjson.loads(h.state[fence]) == {"next": 1_002}
    # the window still counts each reading once: A was in it already
    (window,) = keys_of(h, b"s")
    assert orjson.loads(h.state[window])["count"] == 2


def test_a_load_that_reads_everything_writes_no_dead_letter() -> None:
    h = harness()
    h.run([reading(1_000, 1.0, "A")])
    h.restart()
    after = h.run([reading(1_001, 1.0, "B")])
    assert after.dead_letters == []
    assert all(v is not None for _, v in after.state_writes)
