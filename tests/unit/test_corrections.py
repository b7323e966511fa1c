"""Late records as corrections (``late: correct``): a closed window is emitted again,
one version up, while it closed less than the horizon ago; beyond it, a ``late``
dead letter; restarts from the changelog keep versions and the horizon."""

from __future__ import annotations

import orjson

from pipeline.operators import window_stage
from pipeline.records import Record
from stages.aggregate import aggregate
from tests.unit.records import Windows, engine

W = 10_000  # window, ms
L = 2_000  # allowed lateness, ms
H = 30_000  # correction horizon, ms


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(late: str = "correct", definition=aggregate) -> Windows:
    config = {
        "window_s": W // 1000,
        "allowed_lateness_s": L // 1000,
        "late": late,
        "correction_horizon_s": H // 1000,
    }
    return Windows(engine(definition, config, Clock(), idle_timeout_s=1))


_offset = iter(range(10**9))


def r(ts: int, value: float = 1.0, device: str = "d1") -> Record:
    doc = {"device_id": device, "metric": "temp", "ts": ts, "value": value, "site": "s1"}
    doc["unit"] = "C"
    lid = f"L{device}{ts}{value}"
    return Record(
        "iot.enriched",
        0,
        next(_offset),
        ts,
        device.encode(),
        orjson.dumps(doc),
        (("lineage-id", lid.encode()),),
    )


def docs(result) -> list[dict]:
    return [orjson.loads(o.value) for o in result.outputs]


def test_a_late_record_within_the_horizon_corrects_the_window():
    s = make()
    first = docs(s.process(0, [r(1000, 2.0), r(5000, 4.0), r(W + L)]))
    assert [(w["window_start"], w["count"], w["version"]) for w in first] == [(0, 2, 1)]
    assert "corrects" not in first[0]
    late = s.process(0, [r(3000, 9.0)])
    again = docs(late)
    assert [(w["count"], w["max"], w["version"], w["corrects"]) for w in again] == [(3, 9.0, 2, 1)]
    assert late.emitted_from_state == 1 and not late.dead
    assert [ref for _, _, ref in late.counted] == [("d1", "temp", 0)]  # traced into it
    # a record it already counted changes nothing
    repeat = s.process(0, [r(3000, 9.0)])
    assert repeat.duplicates == 1 and not repeat.outputs
    # the corrected window is a new trace (its own lineage id), with the same state ref
    out = late.outputs[0]
    assert dict(out.headers)["lineage-id"] != b"Ld13000" + b"9.0"
    assert dict(out.headers)["state-ref"] == orjson.dumps(["d1", "temp", 0])


def test_beyond_the_horizon_a_late_record_is_a_dead_letter():
    s = make()
    s.process(0, [r(1000), r(W + L)])
    s.process(0, [r(W + L + H)])  # window [0, W) closed H ago: beyond the horizon
    late = s.process(0, [r(2000, 5.0)])
    assert not late.outputs and [d.reason for d in late.dead] == ["late"]
    assert "correction_horizon_s" in late.dead[0].error_message


def test_a_late_record_for_a_window_that_had_none_gives_it_at_version_one():
    s = make()
    s.process(0, [r(1000), r(3 * W + L)])  # [W, 2W) never had a record, and is closed
    born = docs(s.process(0, [r(W + 500, 7.0)]))
    assert [(w["window_start"], w["count"], w["version"]) for w in born] == [(W, 1, 1)]
    assert "corrects" not in born[0]


def test_without_corrections_late_records_are_dead_letters_and_windows_have_no_version():
    s = make(late="dead_letter")
    first = docs(s.process(0, [r(1000), r(W + L)]))
    assert "version" not in first[0]
    late = s.process(0, [r(2000, 5.0)])
    assert [d.reason for d in late.dead] == ["late"]


def test_versions_and_the_horizon_survive_a_restart_from_the_changelog():
    s = make()
    res = [s.process(0, [r(1000, 1.0), r(W + L)]), s.process(0, [r(2000, 2.0)])]
    writes = [w for result in res for w in result.writes]
    state = {}
    for key, value in writes:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    restarted = make()
    restarted.load(0, state.items())
    again = docs(restarted.process(0, [r(3000, 3.0)]))
    assert [(w["count"], w["version"], w["corrects"]) for w in again] == [(3, 3, 2)]
    # the closed window is forgotten once the horizon passed
    restarted.process(0, [r(W + L + H + 1)])
    assert ("d1", "temp", 0) not in restarted.partitions[0].windows


def test_a_failing_record_after_a_correction_rolls_the_correction_back():
    def explode(acc, value, doc):
        if value < 0:
            raise ZeroDivisionError("negative")
        return acc + value

    from pipeline.operators import Reducer

    stage = window_stage(
        key=("device_id", "metric"), reducers={"total": Reducer(init=lambda: 0.0, add=explode)}
    )
    s = make(definition=stage)
    s.process(0, [r(1000, 1.0), r(W + L)])
    bad = s.process(0, [r(2000, -1.0)])
    assert not bad.outputs and [d.reason for d in bad.dead] == ["processing_error"]
    good = docs(s.process(0, [r(3000, 2.0)]))
    assert [(w["count"], w["total"], w["version"]) for w in good] == [(2, 3.0, 2)]


def test_hopping_windows_count_a_record_in_the_open_one_and_correct_the_closed_one():
    stage = window_stage(key=("device_id", "metric"), hop_s=5)
    s = make(definition=stage)
    # windows of 10 s every 5 s: [0,10) and [5,15) hold ts 7000
    s.process(0, [r(7000, 1.0), r(W + L)])  # [0, 10) closes; [5, 15) stays open
    result = s.process(0, [r(8000, 2.0)])
    corrected = docs(result)
    assert [(w["window_start"], w["count"], w["version"]) for w in corrected] == [(0, 2, 2)]
    assert sorted(ref[-1] for _, _, ref in result.counted) == [0, 5000]
