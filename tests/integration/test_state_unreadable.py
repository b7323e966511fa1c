"""A record of the aggregate's state changelog that cannot be read (here: garbage
written over a window) must not stop the worker that loads it, on a real broker with
a real worker. It becomes a ``state_unreadable`` dead letter, a tombstone deletes it
from the changelog, the window starts again from the readings after it, and every
other window is whole. Before, the load raised and every restart of the worker
crashed on the same record."""

from __future__ import annotations

import time

import orjson

from dlq.redrive import replay
from pipeline.kafka.offsets import read_topic
from tests.integration.harness import Pipeline, aggregates, dead_letters, isolated_config, wait_for
from tests.integration.test_dlq_runtime import header, parsed, send

GARBAGE = b"\xff not a window"
DEVICES = ("d-a", "d-b", "d-c")


def readings(start_ms: int, seq: int) -> list:
    """Five readings per device, a millisecond apart: all in one window."""
    return [parsed(d, start_ms + seq + i, seq + i) for d in DEVICES for i in range(5)]


def state_keys(settings, topic: str) -> dict[bytes, bytes | None]:
    """The changelog's last value per key."""
    last: dict[bytes, bytes | None] = {}
    for message in read_topic(settings, topic):
        last[message.key()] = message.value()
    return last


def test_an_unreadable_window_is_dead_lettered_and_the_worker_goes_on(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    spec = settings.stages["aggregate"]
    topic, state = spec.inputs[0], spec.state_topic
    assert state is not None
    pipe = Pipeline(config, settings, tmp_path)
    worker = pipe.start("aggregate")
    # ahead of the wall clock: an idle worker's watermark follows the clock, and
    # must not close these windows before the test does
    window_start = (int(time.time() * 1000) // 60_000 + 30) * 60_000
    try:
        send(settings, topic, readings(window_start, 0), partition=0)
        wait_for(
            lambda: (
                worker.counter("pipeline_records_consumed_total") >= 15
                and sum(b'"s"' in k for k in state_keys(settings, state)) == len(DEVICES)
            ),
            60,
            "the aggregate to write its three windows",
            pipe.logs,
        )
        worker.stop()
        # garbage over device d-a's window, written as the last value of its key
        (victim,) = [k for k in state_keys(settings, state) if b'"d-a"' in k]
        send(settings, state, [(victim, GARBAGE, [])], partition=0)

        restarted = pipe.start("aggregate")
        send(settings, topic, readings(window_start, 100), partition=0)
        # far ahead in event time: the window closes
        send(settings, topic, [parsed("d-z", window_start + 600_000, 0)], partition=0)
        wait_for(
            lambda: len([a for a in aggregates(settings) if a["device_id"] in DEVICES]) == 3,
            90,
            "the three windows to be emitted",
            lambda: f"{aggregates(settings)}\n{pipe.logs()}",
        )
        pipe.check_alive()
        (letter,) = dead_letters(settings, "aggregate")
        assert header(letter, "dlq.reason") == b"state_unreadable"
        assert (letter.key(), letter.value()) == (victim, GARBAGE)
        assert header(letter, "dlq.original.topic") == state.encode()
        counts = {a["device_id"]: a["count"] for a in aggregates(settings)}
        # d-a's window started again from the readings after the garbage; the others
        # are whole
        assert counts == {"d-a": 5, "d-b": 10, "d-c": 10, "d-z": 1} or counts == {
            "d-a": 5,
            "d-b": 10,
            "d-c": 10,
        }, counts
        assert restarted.counter("pipeline_dlq_records_total") == 1
        # the garbage is gone from the changelog: its tombstone follows it, then the
        # window that started again (deleted in turn once closed and retained)
        history = [m.value() for m in read_topic(settings, state) if m.key() == victim]
        at = history.index(GARBAGE)
        assert history[at + 1] is None, history
        again = [orjson.loads(v) for v in history[at + 2 :] if v is not None]
        assert again and again[-1]["count"] == 5
        # a replay refuses it: it is state, not an input record
        replayed = replay(settings, "aggregate")
        assert replayed.sent == {} and len(replayed.skipped) == 1
        (why,) = replayed.skipped.values()
        assert "cannot be replayed" in why and "state" in why
    finally:
        pipe.stop_all()
