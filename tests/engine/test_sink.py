"""Sinks in the engine, with no broker and no database: durable offsets, stored hops,
the one-at-a-time fallback, Unavailable, on_error (a sink of lists stands in for a
table; the real sinks have tests of their own on a real server and filesystem)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from pipeline import InvalidMessage, Record, StageContext, stage
from pipeline.errors import ConfigError, Unavailable
from pipeline.stage import SinkOutputs
from pipeline.testing import StageHarness, record


@stage(reasons={"negative": "n < 0"})
class ListSink:
    """Stores each record's n; n < 0 is bad input; n == 13 is a bug; ``down`` makes
    the destination unreachable."""

    buffers = False

    def __init__(self, ctx: StageContext) -> None:
        self.rows: list[int] = []
        self.down = False

    def write(self, records: Sequence[Record], out: SinkOutputs) -> None:
        if self.down:
            raise Unavailable("list", "the list is down")
        staged = []
        for r in records:
            n = r.json()["n"]
            if n < 0:
                out.dead_letter(r, InvalidMessage("negative", f"{n} < 0"))
                continue
            if n == 13:
                raise ZeroDivisionError("unlucky")
            staged.append((r, n))
        self.rows += [n for _, n in staged]  # only once nothing can fail
        for r, n in staged:
            out.stored(r, ["list", n])


@stage
class BufferSink:
    """Buffers; flushes every 3 records or after 10 s."""

    buffers = True

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.pending: list[Record] = []
        self.first_at = 0.0
        self.files: list[list[int]] = []
        self.dropped = 0

    def write(self, records: Sequence[Record], out: SinkOutputs) -> None:
        if not self.pending:
            self.first_at = self.ctx.clock()
        self.pending += records
        if len(self.pending) >= 3:
            self._flush(out)

    def flush_due(self, now: float, out: Any) -> None:
        if self.pending and now - self.first_at >= 10:
            self._flush(out)

    def _flush(self, out: Any) -> None:
        self.files.append([r.offset for r in self.pending])
        for r in self.pending:
            out.stored(r, f"file-{len(self.files)}")
        last = self.pending[-1]
        out.durable(last.topic, last.partition, last.offset)
        self.pending = []

    def drop(self) -> None:
        self.pending = []
        self.dropped += 1


def _harness(sink: Any, **kw: Any) -> StageHarness:
    return StageHarness(sink, stage_id="sink", output=None, **kw)


def test_a_sink_stores_dead_letters_and_makes_the_batch_durable_at_once():
    h = _harness(ListSink)
    run = h.run(
        [record({"n": 1}, offset=10), record({"n": -1}, offset=11), record({"n": 2}, offset=12)]
    )
    assert h.engine.processor.rows == [1, 2]
    assert [d.reason for d in run.dead_letters] == ["negative"]
    assert run.report is not None and run.report.durable == {("in", 0): 12}
    stored = [(hop["in"][2], hop["ref"]) for hop in run.hops if hop["outcome"] == "stored"]
    assert stored == [(10, ["list", 1]), (12, ["list", 2])]
    assert run.outputs == []


def test_a_bug_in_a_sink_dead_letters_only_the_record_that_fails_alone():
    h = _harness(ListSink)
    run = h.run([record({"n": 1}), record({"n": 13}), record({"n": 2})])
    assert h.engine.processor.rows == [1, 2]  # nothing of the failed attempt remained
    assert [(d.reason, d.error_class) for d in run.dead_letters] == [
        ("processing_error", "ZeroDivisionError")
    ]


def test_on_error_crash_raises_the_bug():
    h = _harness(ListSink, on_error="crash")
    with pytest.raises(ZeroDivisionError):
        h.run([record({"n": 13})])


def test_unavailable_goes_up_whole_and_nothing_is_delivered():
    h = _harness(ListSink)
    h.engine.processor.down = True
    with pytest.raises(Unavailable) as caught:
        h.run([record({"n": 1}), record({"n": -1})])
    assert caught.value.dependency == "list"
    assert h.producer.log == []  # no dead letter, no hop: the batch is run again later
    h.engine.processor.down = False
    run = h.run([record({"n": 1}), record({"n": -1})])
    assert h.engine.processor.rows == [1] and len(run.dead_letters) == 1


def test_a_buffering_sink_is_durable_only_when_it_flushes():
    h = _harness(BufferSink)
    first = h.run([record({"n": 1}, offset=0), record({"n": 2}, offset=1)])
    assert first.report is not None and first.report.durable == {}
    assert first.hops == []
    second = h.run([record({"n": 3}, offset=2)])
    assert second.report is not None and second.report.durable == {("in", 0): 2}
    assert [hop["ref"] for hop in second.hops] == ["file-1"] * 3
    h.run([record({"n": 4}, offset=3)])
    assert h.flush(5).report is None  # not due yet
    due = h.flush(6)
    assert due.report is not None and due.report.durable == {("in", 0): 3}
    assert [hop["in"][2] for hop in due.hops] == [3]
    assert h.engine.processor.files == [[0, 1, 2], [3]]


def test_a_sink_may_not_declare_an_output():
    with pytest.raises(ConfigError, match="is a sink"):
        StageHarness(ListSink, stage_id="sink", output="out")


def test_a_stateful_sink_is_refused():
    with pytest.raises(ConfigError, match="cannot be stateful"):

        @stage(stateful=True)
        class Bad:
            def write(self, records: Sequence[Record], out: SinkOutputs) -> None: ...
