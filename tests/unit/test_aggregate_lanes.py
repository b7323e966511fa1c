"""Backfill lanes in the aggregate: own watermark and windows, closed by end-of-input."""

import dataclasses

import orjson

from pipeline import contract
from pipeline.records import Record
from tests.unit.records import Windows
from tests.unit.test_aggregate import Clock, W, _offset, make, r, windows

RUN = contract.backfill_source("run-1")


def b(ts: int, value: float = 1.0, lineage: str | None = None, device: str = "d1") -> Record:
    """A backfilled reading of run-1."""
    rec = r(ts, value, lineage, device)
    return dataclasses.replace(rec, headers=(*rec.headers, ("source", RUN.encode())))


def end_of_input(source: str = RUN) -> Record:
    return Record(
        "iot.enriched",
        0,
        next(_offset),
        0,
        None,
        b"",
        (("source", source.encode()), ("control", b"end-of-input")),
    )


def replay_changelog(stage: Windows, results, fresh: Windows) -> None:
    log: dict[bytes, bytes | None] = {}
    for result in results:
        for k, v in result.writes:
            log[k] = v
    fresh.load(0, [(k, v) for k, v in log.items() if v is not None])


def test_old_backfilled_readings_are_not_late_against_the_live_watermark():
    s = make()
    live = s.process(0, [r(10 * W + 1)])  # live is far ahead
    old = s.process(0, [b(1), b(2, 3.0), b(W + 1)])  # a month ago, in its own lane

    assert not old.dead
    assert live.outputs == [] and windows(old) == []  # nothing closes yet (lateness 1 h)
    assert s.partitions[0].watermark == 10 * W + 1
    assert s.lanes[(0, RUN)].watermark == W + 1


def test_end_of_input_emits_the_lanes_windows_tagged_with_the_run_and_forgets_it():
    s = make()
    s.process(0, [r(5 * W)])
    result = s.process(0, [b(1, 2.0), b(3, 4.0), b(W + 1, 5.0), end_of_input()])

    got = sorted((w["window_start"], w["count"], w["mean"], w["source"]) for w in windows(result))
    assert got == [(0, 2, 3.0, RUN), (W, 1, 5.0, RUN)]
    assert all(("source", RUN.encode()) in o.headers for o in result.outputs)
    assert (0, RUN) not in s.lanes
    assert s.partitions[0].watermark == 5 * W  # live untouched
    # and a reading of the ended run is a dead letter, never a second count
    after = s.process(0, [b(2, 9.0, lineage="new")])
    assert [d.reason for d in after.dead] == ["late"] and not after.outputs


def test_same_windows_as_the_live_lane_would_compute():
    readings = [(t, float(t % 7)) for t in range(0, 3 * W, 997)]
    live, backfill = make(), make()
    live_result = live.process(0, [r(t, v) for t, v in readings] + [r(10 * W)])
    back_result = backfill.process(0, [b(t, v) for t, v in readings] + [end_of_input()])

    def strip(ws):
        return sorted(
            ({k: v for k, v in w.items() if k != "source"} for w in windows(ws)),
            key=lambda w: w["window_start"],
        )

    assert strip(back_result) == strip(live_result)
    assert len(strip(back_result)) == 3


def test_a_resent_reading_of_a_running_lane_is_a_duplicate():
    s = make()
    s.process(0, [b(1, 1.0, "A"), b(2, 2.0, "B")])
    again = s.process(0, [b(1, 1.0, "A"), b(2, 2.0, "B")])
    assert again.duplicates == 2
    result = s.process(0, [end_of_input()])
    assert [w["count"] for w in windows(result)] == [2]


def test_lane_state_and_its_end_survive_a_restart_from_the_changelog():
    clock = Clock()
    s = make(clock)
    first = s.process(0, [b(1, 1.0, "A"), r(W * 3)])
    fresh = make(clock)
    replay_changelog(s, [first], fresh)
    assert fresh.lanes[(0, RUN)].watermark == 1
    assert fresh.partitions[0].watermark == W * 3

    second = fresh.process(0, [b(1, 1.0, "A"), b(2, 2.0, "B"), end_of_input()])
    assert second.duplicates == 1
    assert [w["count"] for w in windows(second)] == [2]

    third = make(clock)
    replay_changelog(s, [first, second], third)
    assert (0, RUN) not in third.lanes and RUN in third.ended[0]
    # an end-of-input delivered again (a re-delivered batch) emits nothing twice
    assert windows(third.process(0, [end_of_input()])) == []


def test_two_runs_do_not_share_windows():
    s = make()
    other = contract.backfill_source("run-2")
    rec = r(5, 7.0, "X")
    in_other = dataclasses.replace(rec, headers=(*rec.headers, ("source", other.encode())))
    s.process(0, [b(1, 1.0, "A"), in_other])
    result = s.process(0, [end_of_input(other)])
    assert [(w["count"], w["source"]) for w in windows(result)] == [(1, other)]
    assert (0, RUN) in s.lanes


def test_live_output_has_no_source_field():
    s = make()
    result = s.process(0, [r(1), r(5 * W)])
    assert windows(result) and all("source" not in w for w in windows(result))
    assert orjson.loads(result.outputs[0].value)["count"] == 1


def test_backfill_input_does_not_keep_the_live_lane_from_closing_idle_windows():
    clock = Clock()
    s = make(clock)
    s.process(0, [r(1)])
    clock.t += 0.5
    s.process(0, [b(2)])  # backfill traffic only from here on
    clock.t += W / 1000 + 3  # past the window's end + lateness (2 s) at wall-clock rate
    s.process(0, [b(3)])
    result = s.tick(0, quiet_since=0.0)
    assert [w["window_start"] for w in windows(result)] == [0]  # the live window closed


# -- ended-lane markers expire ---------------------------------------------------------
DAY_S = 86_400


def kept(stage: Windows, results) -> dict[bytes, bytes]:
    """The changelog as compaction leaves it: last value per key, tombstones gone."""
    log: dict[bytes, bytes | None] = {}
    for result in results:
        for k, v in result.writes:
            log[k] = v
    return {k: v for k, v in log.items() if v is not None}


def make_kept_for(clock: Clock, retention_s: float) -> Windows:
    from stages.aggregate import aggregate
    from tests.unit.records import engine
    from tests.unit.test_aggregate import L

    config = {"window_s": W // 1000, "allowed_lateness_s": L // 1000}
    return Windows(
        engine(aggregate, config, clock, idle_timeout_s=1, ended_lane_retention_s=retention_s)
    )


def test_a_late_record_of_an_ended_run_is_refused_for_the_whole_retention_even_after_restarts():
    clock = Clock()
    s = make_kept_for(clock, 7 * DAY_S)
    results = [s.process(0, [b(1, 1.0, "A"), end_of_input()])]
    ended_at = clock.t
    for days in (1, 3, 6.99):  # a dead letter of the run redriven days later: still late
        clock.t = ended_at + days * DAY_S
        restarted = make_kept_for(clock, 7 * DAY_S)  # from the changelog, as a new worker
        restarted.load(0, kept(s, results).items())
        late = restarted.process(0, [b(2, 9.0, lineage=f"redriven-{days}")])
        assert [d.reason for d in late.dead] == ["late"] and not late.outputs
        results.append(late)
        s = restarted
    marker = b'["end",0,"%s"]' % RUN.encode()
    assert orjson.loads(kept(s, results)[marker]) == {"at": int(ended_at * 1000)}


def test_an_ended_marker_is_deleted_after_the_retention_in_the_batch_before_its_fence():
    clock = Clock()
    s = make_kept_for(clock, 7 * DAY_S)
    results = [s.process(0, [b(1, 1.0, "A"), end_of_input()])]
    clock.t += 7 * DAY_S
    expiring = s.process(0, [r(5)])  # any batch of the partition
    results.append(expiring)
    marker = b'["end",0,"%s"]' % RUN.encode()
    keys = [k for k, _ in expiring.writes]
    assert (marker, None) in expiring.writes
    assert keys.index(marker) < keys.index(b'["in",0,"iot.enriched"]')  # before the fence
    assert RUN not in s.ended[0] and marker not in kept(s, results)
    # promised no longer: a record of the run opens a lane again
    again = s.process(0, [b(3, 2.0, "B")])
    assert not again.dead and (0, RUN) in s.lanes


def test_state_does_not_grow_with_the_number_of_runs():
    clock = Clock()
    s = make_kept_for(clock, 2 * DAY_S)
    results = []
    sizes = []
    for n in range(60):  # one backfill run a day for two months
        run = contract.backfill_source(f"run-{n}")
        rec = r(1, 1.0, f"L{n}")
        rec = dataclasses.replace(rec, headers=(*rec.headers, ("source", run.encode())))
        results.append(s.process(0, [rec, end_of_input(run)]))
        sizes.append(len(kept(s, results)))
        clock.t += DAY_S
    assert max(sizes[10:]) == max(sizes[:10])  # flat: runs ended days ago are forgotten
    assert len(s.ended[0]) <= 3


def test_a_marker_written_before_markers_had_a_time_expires_a_retention_after_loading():
    clock = Clock()
    s = make_kept_for(clock, DAY_S)
    s.load(0, [(b'["end",0,"%s"]' % RUN.encode(), b"{}")])
    assert [d.reason for d in s.process(0, [b(1)]).dead] == ["late"]
    clock.t += DAY_S
    assert (b'["end",0,"%s"]' % RUN.encode(), None) in s.process(0, [r(2)]).writes
