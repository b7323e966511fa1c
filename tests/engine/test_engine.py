"""The engine, with no broker: what it gives every stage (pipeline.testing's fake
producer and clock stand in for Kafka and time)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from pydantic import BaseModel

from pipeline import Emit, InvalidMessage, Outputs, Record, RetryableError, StageContext, stage
from pipeline.errors import BudgetExceeded, ConfigError
from pipeline.operators import Reducer, window_stage
from pipeline.testing import MemoryProducer, StageHarness, record, run_stage


@stage(reasons={"odd": "an odd number"})
def evens(record: Record, ctx: StageContext) -> Iterator[Emit]:
    n = record.json()["n"]
    if n % 2:
        raise InvalidMessage("odd", f"{n} is odd")
    yield Emit(key=record.key, value={"n": n, "half": n // 2}, schema="half/1")


@stage
def divide(record: Record, ctx: StageContext) -> Emit:
    n = record.json()["n"]
    return Emit(key=record.key, value={"inverse": 1 / n})  # n == 0: ZeroDivisionError


@stage
def split(record: Record, ctx: StageContext) -> list[Emit]:
    return [Emit(key=record.key, value={"part": i}) for i in range(record.json()["parts"])]


@stage
def drop_all(record: Record, ctx: StageContext) -> None:
    return None


def test_a_per_record_stage_gets_outputs_dead_letters_and_the_contract_headers():
    run = run_stage(
        evens,
        [record({"n": 4}, key="k"), record({"n": 3}, key="k"), record(b"not json")],
        stage_id="evens",
    )
    assert run.values() == [{"n": 4, "half": 2}]
    out = run.outputs[0]
    assert out.header("schema") == "half/1" and out.header("source") == "live"
    assert out.header("lineage-id") and out.header("traceparent")  # assigned where it entered
    assert [(d.reason, d.message[:13]) for d in run.dead_letters] == [
        ("odd", "3 is odd"),
        ("decode_error", "invalid JSON:"),
    ]
    letter = run.dead_letters[0]
    assert letter.header("dlq.stage") == "evens" and letter.header("dlq.original.topic") == "in"
    assert sorted(h["outcome"] for h in run.hops) == ["dead_letter", "dead_letter", "passed"]


def test_a_bug_in_stage_code_is_a_processing_error_dead_letter_by_default():
    run = run_stage(divide, [record({"n": 2}), record({"n": 0}), record({"n": 4})])
    assert run.values() == [{"inverse": 0.5}, {"inverse": 0.25}]
    (letter,) = run.dead_letters
    assert letter.reason == "processing_error" and letter.error_class == "ZeroDivisionError"
    assert letter.message.startswith("ZeroDivisionError: division by zero at test_engine.py:")
    assert "in divide" in letter.message


def test_on_error_crash_raises_and_delivers_nothing():
    harness = StageHarness(divide, on_error="crash")
    with pytest.raises(ZeroDivisionError):
        harness.run([record({"n": 2}), record({"n": 0})])
    assert harness.producer.log == []  # nothing of the batch was produced


def test_a_systematic_bug_trips_the_budget_instead_of_dead_lettering_everything():
    harness = StageHarness(divide, dlq_budget={"max_consecutive": 5})
    with pytest.raises(BudgetExceeded, match="5 consecutive dead letters"):
        harness.run([record({"n": 0}) for _ in range(10)])
    assert harness.producer.log == []


def test_an_undeclared_reason_is_a_processing_error_that_names_it():
    @stage
    def sloppy(record: Record, ctx: StageContext) -> None:
        raise InvalidMessage("whatever", "bad")

    (letter,) = run_stage(sloppy, [record(b"x")]).dead_letters
    assert letter.reason == "processing_error"
    assert "undeclared reason 'whatever'" in letter.message


def test_reason_codes_must_be_snake_case():
    with pytest.raises(ConfigError, match="must be snake_case"):
        stage(reasons={"Bad Reason": "x"})(lambda r, c: None)


def test_fan_out_gives_each_child_its_own_lineage_id_naming_its_parent():
    parent_id = "01KDVDNA001HNZM0H47SFSK2H2"
    run = run_stage(split, [record({"parts": 3}, headers={"lineage-id": parent_id})])
    ids = [o.header("lineage-id") for o in run.outputs]
    assert len(set(ids)) == 3 and parent_id not in ids
    assert all(i[:10] == parent_id[:10] for i in ids)  # the same time part
    assert {o.header("lineage-parent") for o in run.outputs} == {parent_id}
    hops = {h["id"]: h for h in run.hops}
    assert set(hops) == set(ids) and {h["parent"] for h in hops.values()} == {parent_id}
    # the same input split again (a re-delivery) gets the same ids
    again = run_stage(split, [record({"parts": 3}, headers={"lineage-id": parent_id})])
    assert [o.header("lineage-id") for o in again.outputs] == ids


def test_a_record_routed_to_one_output_per_topic_keeps_its_lineage_id():
    @stage
    def tee(record: Record, ctx: StageContext) -> list[Emit]:
        return [Emit(record.key, record.value), Emit(record.key, record.value, topic="archive")]

    run = run_stage(tee, [record(b"v", headers={"lineage-id": "L1"})], outputs=("archive",))
    assert [(o.topic, o.header("lineage-id")) for o in run.outputs] == [
        ("out", "L1"),
        ("archive", "L1"),
    ]
    assert sorted(h["out"][0] for h in run.hops) == ["archive", "out"]


def test_emitting_to_an_undeclared_topic_stops_the_stage_with_what_to_declare():
    @stage
    def stray(record: Record, ctx: StageContext) -> Emit:
        return Emit(record.key, record.value, topic="elsewhere")

    with pytest.raises(ConfigError, match=r"declare it under stages\.stage\.outputs"):
        run_stage(stray, [record(b"v")])


def test_a_filter_drops_records_with_a_dropped_hop():
    run = run_stage(drop_all, [record(b"v", headers={"lineage-id": "L1"})])
    assert run.outputs == [] and run.dead_letters == []
    assert [(h["id"], h["outcome"]) for h in run.hops] == [("L1", "dropped")]


def test_retryable_errors_go_to_the_retry_topic_then_dead_letter():
    @stage(reasons={"not_yet": "a dependency lags"})
    def waits(record: Record, ctx: StageContext) -> None:
        raise RetryableError("not_yet", "come back later")

    harness = StageHarness(waits, retry={"topic": "retry", "max_attempts": 2, "backoff_s": 1})
    first = harness.run([record(b"v")])
    (retried,) = first.retries
    assert retried.header("retry.attempts") == "1" and not first.dead_letters
    again = harness.run(
        [Record("retry", 0, 0, 0, retried.key, retried.value, tuple(retried.headers.items()))]
    )
    (letter,) = again.dead_letters
    assert letter.reason == "not_yet" and letter.header("dlq.attempts") == "2"
    assert letter.header("dlq.original.topic") == "in"  # where it first entered


class Doubler:
    def __init__(self, ctx: StageContext) -> None:
        self.calls = 0

    def process_batch(self, records: list[Record], out: Outputs) -> None:
        self.calls += 1
        for r in records:
            n = r.json()["n"]
            if n < 0:
                raise ValueError("negative")
            out.emit(r, r.key, {"n": 2 * n})


doubler = stage(batch=True)(Doubler)


def test_a_batch_stage_that_raises_is_run_record_by_record_to_find_the_bad_one():
    run = run_stage(doubler, [record({"n": 1}), record({"n": -1}), record({"n": 3})])
    assert run.values() == [{"n": 2}, {"n": 6}]
    assert [d.error_class for d in run.dead_letters] == ["ValueError"]


def test_a_stage_config_is_validated_by_its_model():
    class Limits(BaseModel):
        limit: int

    @stage(config=Limits)
    def capped(record: Record, ctx: StageContext) -> Emit | None:
        return (
            Emit(record.key, record.value) if len(record.value or b"") <= ctx.config.limit else None
        )

    assert (
        len(run_stage(capped, [record(b"ab"), record(b"abcdef")], config={"limit": 3}).outputs) == 1
    )
    with pytest.raises(ConfigError, match=r"stages\.stage\.config\.limit"):
        StageHarness(capped, config={"limit": "lots"})


def test_lookups_are_read_only_tables_the_stage_joins():
    @stage
    def join(record: Record, ctx: StageContext) -> Emit:
        site = ctx.lookup("sites", decode=orjson.loads).get(record.key or b"")
        return Emit(record.key, {"site": site})

    run = run_stage(join, [record(b"x", key="d1")], lookups={"sites": {"d1": {"name": "a"}}})
    assert run.values() == [{"site": {"name": "a"}}]
    with pytest.raises(ConfigError, match=r"declare it under stages\.stage\.lookups"):
        run_stage(join, [record(b"x", key="d1")])


@stage(stateful=True, event_time="ts")
def running_total(record: Record, ctx: StageContext, state) -> Emit:  # type: ignore[no-untyped-def]
    doc = record.json()
    total = state.get(doc["k"], 0) + doc["v"]
    state.set(doc["k"], total)
    if doc.get("boom"):
        raise RuntimeError("after the state changed")
    return Emit(doc["k"], {"k": doc["k"], "total": total})


def test_a_stateful_stage_keeps_state_across_batches_and_restarts_from_its_changelog():
    harness = StageHarness(running_total)
    harness.run([record({"k": "a", "v": 1, "ts": 1}), record({"k": "a", "v": 2, "ts": 2})])
    assert harness.run([record({"k": "a", "v": 3, "ts": 3})]).values() == [{"k": "a", "total": 6}]
    harness.restart()  # in-memory state gone; reloaded from the changelog writes
    assert harness.run([record({"k": "a", "v": 4, "ts": 4})]).values() == [{"k": "a", "total": 10}]


def test_a_failed_record_leaves_no_trace_in_state():
    harness = StageHarness(running_total)
    run = harness.run(
        [record({"k": "a", "v": 1, "ts": 1}), record({"k": "a", "v": 100, "ts": 2, "boom": 1})]
    )
    assert [d.reason for d in run.dead_letters] == ["processing_error"]
    assert harness.run([record({"k": "a", "v": 1, "ts": 3})]).values() == [{"k": "a", "total": 2}]


def test_a_redelivered_batch_is_fenced_off_by_the_state():
    harness = StageHarness(running_total)
    batch = [
        record({"k": "a", "v": 1, "ts": 1}, offset=10),
        record({"k": "a", "v": 2, "ts": 2}, offset=11),
    ]
    harness.run(batch)
    harness.restart()
    again = harness.run(batch)  # committed offsets lost: the same records again
    assert again.outputs == [] and again.duplicates == 2


def test_backfill_lanes_keep_their_own_state_and_end_with_their_hooks():
    seen: list[tuple[str, int]] = []

    @stage(stateful=True, event_time="ts")
    class Lanes:
        def __init__(self, ctx: StageContext) -> None:
            pass

        def process(self, record: Record, state) -> None:  # type: ignore[no-untyped-def]
            state.set("n", state.get("n", 0) + 1)

        def on_end_of_lane(self, state) -> Emit:  # type: ignore[no-untyped-def]
            seen.append((state.lane, state.get("n")))
            return Emit("end", {"lane": state.lane, "n": state.get("n")})

    harness = StageHarness(Lanes, backfill_lane="lane")
    lane = {"source": "backfill:r1"}
    harness.run([record({"ts": 1}), record({"ts": 2}, headers=lane, topic="lane")])
    harness.run([record({"ts": 3}, headers=lane, topic="lane")])
    ended = harness.end_lane("r1")
    assert seen == [("backfill:r1", 2)]
    assert ended.values() == [{"lane": "backfill:r1", "n": 2}]
    assert ended.outputs[0].header("source") == "backfill:r1"
    late = harness.run([record({"ts": 4}, headers=lane, topic="lane")])
    assert [d.reason for d in late.dead_letters] == ["late"]


def test_a_lane_batch_writes_to_the_next_stages_lanes():
    producer = MemoryProducer()
    harness = StageHarness(
        evens,
        backfill_lane="lane.in",
        lane_targets={"out": ("lane.next",)},
        producer=producer,
    )
    harness.run([record({"n": 2}, topic="lane.in", headers={"source": "backfill:r"})])
    harness.run([record({"n": 4})])
    assert [p.topic for p in producer.log if p.topic not in ("lineage",)] == ["lane.next", "out"]


def test_the_windowed_operator_with_hopping_windows_and_a_reducer():
    spread = Reducer(
        init=lambda: [None, None],
        add=lambda acc, v, doc: [
            v if acc[0] is None else min(acc[0], v),
            v if acc[1] is None else max(acc[1], v),
        ],
        result=lambda acc: acc[1] - acc[0],
    )
    hopping = window_stage(key=("k",), window_s=10, hop_s=5, allowed_lateness_s=0,
                           aggregations=("count", "sum", "first", "last"),
                           reducers={"spread": spread}, lineage_bounds=False)  # fmt: skip
    harness = StageHarness(hopping)
    values = [(1_000, 1.0), (6_000, 5.0), (12_000, 2.0), (31_000, 0.0)]
    out = harness.run(
        [
            record({"k": "a", "ts": ts, "value": v}, headers={"lineage-id": f"L{ts}"})
            for ts, v in values
        ]
    )
    windows = {(w["window_start"], w["window_end"]): w for w in out.values()}
    assert windows[(-5_000, 5_000)] == {
        "k": "a", "window_start": -5_000, "window_end": 5_000,
        "count": 1, "sum": 1.0, "first": 1.0, "last": 1.0, "spread": 0.0,
    }  # fmt: skip
    assert windows[(0, 10_000)]["count"] == 2 and windows[(0, 10_000)]["spread"] == 4.0
    assert windows[(5_000, 15_000)]["first"] == 5.0 and windows[(5_000, 15_000)]["last"] == 2.0
    assert windows[(10_000, 20_000)]["sum"] == 2.0
    assert {h["outcome"] for h in out.hops} == {"counted"}
    counted = [h for h in out.hops if h["id"] == "L6000"]
    assert sorted(h["window"] for h in counted) == [["a", 0], ["a", 5_000]]  # in two windows
