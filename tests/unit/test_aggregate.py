import dataclasses
import random

import orjson
import pytest

from pipeline.records import Record
from stages.aggregate import aggregate
from tests.unit.records import Windows, engine

W = 10_000  # window, ms
L = 2_000  # allowed lateness, ms


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(clock=None) -> Windows:
    config = {"window_s": W // 1000, "allowed_lateness_s": L // 1000}
    return Windows(engine(aggregate, config, clock or Clock(), idle_timeout_s=1))


_offset = iter(range(10**9))


def r(
    ts: int,
    value: float = 1.0,
    lineage: str | None = None,
    device: str = "d1",
    metric: str = "temp",
) -> Record:
    doc = {
        "device_id": device,
        "metric": metric,
        "ts": ts,
        "value": value,
        "site": "s1",
        "unit": "C",
    }
    lid = lineage or f"L{device}{metric}{ts}{value}"
    return Record(
        "iot.enriched",
        0,
        next(_offset),
        ts,
        device.encode(),
        orjson.dumps(doc),
        (("lineage-id", lid.encode()),),
    )


def windows(result) -> list[dict]:
    return [orjson.loads(o.value) for o in result.outputs]


def test_window_emitted_once_when_watermark_passes_end_plus_lateness():
    s = make()
    assert not s.process(0, [r(0), r(W - 1, 3.0), r(W + L - 1)]).outputs  # wm = end + L - 1: open
    out = windows(s.process(0, [r(W + L)]))  # wm = end + L: closes
    assert len(out) == 1
    w = out[0]
    assert (w["window_start"], w["window_end"], w["count"]) == (0, W, 2)
    assert (w["min"], w["max"], w["mean"], w["first_ts"], w["last_ts"]) == (1.0, 3.0, 2.0, 0, W - 1)
    assert w["site"] == "s1" and w["device_id"] == "d1" and w["metric"] == "temp"
    assert all(x["window_start"] != 0 for x in windows(s.process(0, [r(5 * W)])))


def test_boundary_timestamp_belongs_to_the_next_window():
    s = make()
    s.process(0, [r(W - 1, 1.0), r(W, 2.0)])
    out = windows(s.process(0, [r(3 * W + L)]))
    by_start = {w["window_start"]: w for w in out}
    assert by_start[0]["count"] == 1 and by_start[0]["max"] == 1.0
    assert by_start[W]["count"] == 1 and by_start[W]["max"] == 2.0


def test_late_reading_is_dead_lettered_but_within_lateness_is_counted():
    s = make()
    s.process(0, [r(0, 1.0), r(W + L - 1)])
    within = s.process(0, [r(W - 1, 5.0)])  # window 0 still open: counted
    assert not within.dead
    s.process(0, [r(W + L)])  # closes window 0
    late = s.process(0, [r(W - 2, 7.0)])
    assert [str(d.reason) for d in late.dead] == ["late"]
    assert not late.outputs


def test_late_for_a_window_that_never_opened():
    s = make()
    s.process(0, [r(5 * W)])
    late = s.process(0, [r(W, 1.0, device="d2")])
    assert [str(d.reason) for d in late.dead] == ["late"]


def test_duplicate_lineage_counts_once_in_open_and_closed_windows():
    s = make()
    s.process(0, [r(100, 1.0, "A"), r(200, 9.0, "A")])  # same lineage twice: second ignored
    res = s.process(0, [r(W + L, lineage="B")])
    out = windows(res)
    assert out[0]["count"] == 1 and out[0]["max"] == 1.0
    again = s.process(0, [r(100, 1.0, "A")])  # re-delivered after the window closed
    assert again.duplicates == 1 and not again.dead and not again.outputs


def test_idle_partition_closes_its_last_window():
    clock = Clock()
    s = make(clock)
    s.process(0, [r(100), r(5000)])
    assert not s.tick(0, quiet_since=0.0).outputs
    clock.t += 0.5
    assert not s.tick(0, quiet_since=0.0).outputs  # not idle long enough
    clock.t += W / 1000 + L / 1000 + 1  # quiet for longer than end + lateness - wm
    out = windows(s.tick(0, quiet_since=0.0))
    assert [w["count"] for w in out] == [2]
    assert not s.tick(0, quiet_since=0.0).outputs  # emitted once


def test_partitions_have_independent_watermarks():
    s = make()
    s.process(0, [r(0)])
    s.process(1, [r(10 * W, device="d9")])
    assert not s.process(0, [r(1)]).dead  # partition 0 is not late because of partition 1


def test_closed_windows_are_forgotten_after_one_more_window():
    s = make()
    s.process(0, [r(0)])
    s.process(0, [r(W + L)])
    assert ("d1", "temp", 0) in s.partitions[0].windows
    res = s.process(0, [r(2 * W + L)])
    assert ("d1", "temp", 0) not in s.partitions[0].windows
    assert any(v is None for _, v in res.writes)  # a tombstone for the changelog


def stream(n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        ts = i * 700 + rng.randrange(0, 14_000)  # disorder beyond window + lateness: some late
        device = f"d{rng.randrange(3)}"
        lineage = f"id{i}" if i % 7 else f"id{i}\u00e9"  # a few not ASCII
        records.append(r(ts, float(rng.randrange(100)), lineage, device=device))
        if rng.random() < 0.1:  # at-least-once duplicate: written again upstream
            records.append(dataclasses.replace(records[-1], offset=next(_offset)))
    return records


def run(records, batches, crash_at=None):
    """Process records in the given batch sizes; optionally restart from the changelog."""
    s = make()
    changelog: dict[bytes, bytes] = {}
    emitted, dead = [], []
    i = 0
    for n, size in enumerate(batches):
        res = s.process(0, records[i : i + size])
        i += size
        emitted += windows(res)
        dead += [(d.offset, str(d.reason)) for d in res.dead]
        for k, v in res.writes:
            if v is None:
                changelog.pop(k, None)
            else:
                changelog[k] = v
        if crash_at == n:
            s = make()
            s.load(0, changelog.items())
    return emitted, dead


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_results_do_not_depend_on_batching_or_restarts(seed):
    records = stream(400, seed)
    reference = run(records, [1] * len(records))
    rng = random.Random(seed)
    sizes, left = [], len(records)
    while left:
        sizes.append(min(left, rng.randrange(1, 60)))
        left -= sizes[-1]
    assert run(records, sizes) == reference
    assert run(records, sizes, crash_at=len(sizes) // 2) == reference
    emitted, dead = reference
    assert emitted and dead  # the stream exercises both paths
    keys = [(w["device_id"], w["window_start"]) for w in emitted]
    assert len(keys) == len(set(keys))  # each window once


def test_state_writes_are_ordered_updates_watermark_deletions():
    s = make()
    s.process(0, [r(0)])
    res = s.process(0, [r(W), r(3 * W + L)])  # closes window 0 and W, forgets window 0
    kinds = [("delete" if v is None else orjson.loads(k)[0]) for k, v in res.writes]
    # windows W and 0 are closed and then forgotten in this batch (watermark
    # 3W + L): their final states, the new window 3W, the watermark, deletions, and
    # last the fence (the next input offset)
    assert kinds == ["s", "s", "s", "wm", "delete", "delete", "in"], kinds


@pytest.mark.parametrize("crash_batch", [1, 3, 4])
@pytest.mark.parametrize("landed", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_partial_state_write_then_redelivery_gives_the_same_windows(crash_batch, landed):
    """A crash that lost the tail of a batch's state writes (the watermark, and
    some windows) re-delivers the batch; the outcome equals an uninterrupted run."""
    records = stream(300, 7)
    reference = run(records, [50] * 6)
    s = make()
    changelog: dict[bytes, bytes] = {}
    emitted = []
    for n, i in enumerate(range(0, 300, 50)):
        batch = records[i : i + 50]
        res = s.process(0, batch)
        emitted += windows(res)
        items = list(res.writes)
        if n == crash_batch:  # crash: a prefix of this batch's writes landed, no commit
            for k, v in items[: int(len(items) * landed)]:
                if v is None:
                    changelog.pop(k, None)
                else:
                    changelog[k] = v
            s = make()
            s.load(0, [(k, v) for k, v in changelog.items() if v is not None])
            res = s.process(0, batch)  # re-delivered
            emitted += windows(res)
            items = list(res.writes)
        for k, v in items:
            if v is None:
                changelog.pop(k, None)
            else:
                changelog[k] = v
    by_key = {}
    for w in emitted:
        key = (w["device_id"], w["window_start"])
        assert by_key.setdefault(key, w) == w  # re-emitted windows are identical
    assert sorted(by_key.values(), key=lambda w: (w["device_id"], w["window_start"])) == sorted(
        reference[0], key=lambda w: (w["device_id"], w["window_start"])
    )


def test_idle_time_counts_only_while_the_pipeline_is_quiet():
    """A partition quiet because upstream was busy (or down) must not close windows
    for that time: its backlog would arrive late."""
    clock = Clock()
    s = make(clock)
    s.process(0, [r(100), r(5000)])
    clock.t += 60  # a long outage upstream: no input, but the pipeline was not quiet
    quiet_since = clock.t  # the pipeline became quiet only now
    clock.t += 2
    assert not s.tick(0, quiet_since=quiet_since).outputs  # 2 s of quiet: nothing closes yet
    assert s.partitions[0].watermark == 5000
    clock.t += W / 1000 + L / 1000
    out = windows(s.tick(0, quiet_since=quiet_since))
    assert [w["count"] for w in out] == [2]
    late = s.process(0, [r(12_000, lineage="x")])  # watermark moved ~14 s, not ~74 s
    assert not late.dead


def test_a_batch_re_delivered_after_its_windows_were_forgotten_is_skipped_not_late():
    """The state holds the next input offset (the fence): a crash between the state
    write and the offset commit re-delivers records whose windows may be long gone."""
    s = make()
    first = [r(1, 1.0, "A"), r(2, 2.0, "B")]
    later = [r(10 * W, 3.0, "C"), r(20 * W, 4.0, "D")]  # closes and forgets window 0
    results = [s.process(0, first), s.process(0, later)]
    changelog: dict[bytes, bytes | None] = {}
    for result in results:
        changelog.update(result.writes)
    restarted = make()
    restarted.load(0, [(k, v) for k, v in changelog.items() if v is not None])

    again = restarted.process(0, [*first, *later])  # the uncommitted input, again

    assert again.duplicates == 4 and not again.dead and not again.outputs
    new = dataclasses.replace(r(20 * W + 1, 5.0, "E"), offset=later[-1].offset + 1)
    assert restarted.process(0, [new]).duplicates == 0


@pytest.mark.parametrize("seed", [4, 5])
def test_the_tumbling_fast_path_equals_the_plain_operator(seed):
    """The aggregate runs _process_tumbling; the general _process is its oracle."""
    records = stream(400, seed)
    fast, plain = make(), make()
    plain.engine.processor.process = plain.engine.processor._process
    assert fast.engine.processor.fast
    sizes = [37, 1, 80, 200, 82]
    i = 0
    for size in sizes:
        a, b = fast.process(0, records[i : i + size]), plain.process(0, records[i : i + size])
        i += size
        assert windows(a) == windows(b)
        assert [(d.offset, d.reason) for d in a.dead] == [(d.offset, d.reason) for d in b.dead]
        assert a.duplicates == b.duplicates and a.counted == b.counted
        assert a.writes == b.writes


def test_state_writes_take_their_size_in_memory() -> None:
    """The table keeps every state write until the key is written again; encoded by
    orjson, a window of 500 readings took about 10 times its length in memory (see
    pipeline.records.fitted). Measured as what is freed when the writes are dropped."""
    import gc
    import tracemalloc

    readings = [r(1_000 + i, lineage=f"01J{i:023d}") for i in range(500)]
    windows_engine = make()
    windows_engine.engine.process(0, readings[:1])  # the lane and its watermark exist
    gc.collect()
    tracemalloc.start()
    try:
        result = windows_engine.engine.process(0, readings[1:])
        kept = [b for w in result.writes for b in w if b is not None]
        del result
        length = sum(len(b) for b in kept)
        with_writes = tracemalloc.get_traced_memory()[0]
        kept.clear()
        without = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert length > 5_000  # the window with its 500 lineage ids
    assert with_writes - without < 1.5 * length, (with_writes - without, length)


def test_a_changelog_written_with_lineage_ids_is_read_by_fingerprint() -> None:
    """Windows written before fingerprints carry their lineage ids ("ids"): restored
    from such a changelog, the ids they counted are duplicates and a new one counts."""
    s = make()
    changelog = dict(s.process(0, [r(1, 1.0, "A"), r(2, 2.0, "B")]).writes)
    old_layout = {}
    for key, value in changelog.items():
        if value is not None and b'"seen"' in value:
            doc = orjson.loads(value)
            del doc["seen"]
            doc["ids"] = ["A", "B"]
            value = orjson.dumps(doc)
        old_layout[key] = value
    restarted = make()
    restarted.load(0, [(k, v) for k, v in old_layout.items() if v is not None])

    again = restarted.process(0, [r(3, 5.0, "A"), r(4, 5.0, "B"), r(5, 3.0, "C")])

    assert again.duplicates == 2 and not again.dead
    (window,) = restarted.partitions[0].windows.values()
    assert (window.count, window.total, len(window.seen)) == (3, 6.0, 3)
    # written again in the new layout, it reads back the same
    rewritten = dict(again.writes)
    fresh = make()
    fresh.load(0, [(k, v) for k, v in rewritten.items() if v is not None])
    (copy,) = fresh.partitions[0].windows.values()
    assert copy.seen == window.seen and b'"ids"' not in b"".join(
        v or b"" for v in rewritten.values()
    )


def test_fingerprints_are_found_before_and_after_packing_in_8_bytes_each() -> None:
    import random
    import tracemalloc

    from pipeline.operators.window import Fingerprints

    rng = random.Random(3)
    numbers = [rng.getrandbits(64) for _ in range(10_000)]
    absent = [rng.getrandbits(64) for _ in range(1_000)]
    tracemalloc.start()
    try:
        fps = Fingerprints()
        for i, n in enumerate(numbers):
            fps.add(n)
            assert n in fps  # not packed yet
            if i % 1_000 == 999:
                fps.pack()  # as a batch's encoding does
                assert n in fps and numbers[0] in fps
        fps.pack()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(fps) == 10_000 and all(n in fps for n in numbers)
    assert not any(n in fps for n in absent)
    assert held < 12 * 10_000, held  # a set of ints: about 60 bytes each
    again = Fingerprints()
    for n in reversed(numbers):
        again.add(n)
    assert again == fps and list(fps.pack()) == sorted(numbers)


def test_a_window_with_unsorted_or_repeated_fingerprints_is_read_sorted() -> None:
    """Membership bisects the packed fingerprints: a changelog whose ``seen`` is out of
    order (not written by this operator) is sorted when read, not searched wrongly."""
    import base64
    from array import array

    from pipeline.operators.window import WindowCodec

    s = make()
    (value,) = [v for k, v in s.process(0, [r(1, 1.0, "A"), r(2, 2.0, "B")]).writes if b'"s"' in k]
    doc = orjson.loads(value)
    packed = array("Q", base64.b64decode(doc["seen"]))
    shuffled = array("Q", [packed[1], packed[0], packed[1]])
    doc["seen"] = base64.b64encode(shuffled.tobytes()).decode()
    window = WindowCodec().decode(orjson.dumps(doc))
    assert list(window.seen.packed) == sorted(set(packed))
    assert all(fp in window.seen for fp in packed)
