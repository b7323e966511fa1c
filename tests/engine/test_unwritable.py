"""One record must never stop a partition: dead letters always fit, and a record the
broker refuses for good is a dead letter, not a failed batch (no broker: the
in-memory producer refuses the way a broker does)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlq.envelope import MAX_PAYLOAD_BYTES, bounded
from pipeline import Emit, Record, StageContext, stage
from pipeline.errors import DeliveryError
from pipeline.testing import MemoryProducer, StageHarness, record


@stage
def copy(record: Record, ctx: StageContext) -> Emit:
    return Emit(record.key, record.value)


@stage(reasons={"too_big": "over the stage's own limit"})
def reject_big(record: Record, ctx: StageContext) -> Emit:
    from pipeline import InvalidMessage

    if len(record.value or b"") > 1000:
        raise InvalidMessage("too_big", "big")
    return Emit(record.key, record.value)


def size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)


def test_an_output_too_large_to_write_is_an_unwritable_dead_letter_of_its_source():
    harness = StageHarness(copy, topic_limits={"out": 100_000}, dlq_max_bytes=1_000_000)
    big = b"x" * 300_000
    run = harness.run([record(b"small", key="k"), record(big, key="k"), record(b"also")])
    assert [o.value for o in run.outputs] == [b"small", b"also"]
    (letter,) = run.dead_letters
    assert letter.reason == "unwritable" and "over 100000" in letter.message
    assert letter.value == big  # within this stage's dead-letter budget: whole
    assert letter.header("dlq.payload.truncated") is None


def test_a_dead_letter_past_the_budget_keeps_a_prefix_with_its_size_and_digest():
    harness = StageHarness(reject_big, dlq_max_bytes=64 * 1024)
    huge = bytes(range(256)) * 8192  # 2 MiB, not UTF-8
    (letter,) = harness.run([record(huge, key="dev-1")]).dead_letters
    assert letter.reason == "too_big"
    assert letter.header("dlq.payload.truncated") == "true"
    assert letter.header("dlq.payload.size") == str(len(huge))
    assert letter.header("dlq.payload.sha256") == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(letter.value or b"x")
    assert size(letter.key, letter.value, list(letter.headers.items())) <= 64 * 1024


def test_a_record_the_broker_refuses_for_good_becomes_a_dead_letter_and_the_rest_are_written():
    producer = MemoryProducer(
        refuse=lambda topic, key, value: (
            "Broker: Invalid record" if topic == "out" and value == b"bad" else None
        )
    )
    harness = StageHarness(copy, producer=producer)
    run = harness.run(
        [record(b"a", headers={"lineage-id": "L1"}), record(b"bad", headers={"lineage-id": "L2"}),
         record(b"c", headers={"lineage-id": "L3"})]
    )  # fmt: skip
    assert [o.value for o in run.outputs] == [b"a", b"c"]
    (letter,) = run.dead_letters
    assert letter.reason == "unwritable" and "Invalid record" in letter.message
    assert letter.value == b"bad" and letter.header("lineage-id") == "L2"
    hops = {h["id"]: h for h in run.hops}
    assert hops["L1"]["outcome"] == hops["L3"]["outcome"] == "passed"
    assert hops["L2"]["outcome"] == "dead_letter" and hops["L2"]["reason"] == "unwritable"
    # the hops name where the outputs really are
    out = {o.value: (o.partition, o.offset) for o in run.outputs}
    assert tuple(hops["L3"]["out"][1:]) == out[b"c"]


def test_a_dead_letter_the_dlq_refuses_is_sent_again_smaller():
    producer = MemoryProducer(
        refuse=lambda topic, key, value: (
            "Broker: Message size too large"
            if topic == "dlq" and len(value or b"") > 5000
            else None
        )
    )
    harness = StageHarness(reject_big, producer=producer)
    (letter,) = harness.run([record(b"y" * 200_000)]).dead_letters
    assert letter.reason == "too_big"
    assert letter.header("dlq.payload.truncated") == "true"
    assert letter.header("dlq.payload.size") == "200000"
    assert len(letter.value or b"") < 5000


def test_a_lost_broker_still_fails_the_batch_with_nothing_written():
    producer = MemoryProducer(fail=lambda: "Local: Message timed out")
    harness = StageHarness(copy, producer=producer)
    with pytest.raises(DeliveryError, match="timed out"):
        harness.run([record(b"a")])
    assert producer.log == []


def test_a_retry_too_large_for_the_retry_topic_is_an_unwritable_dead_letter():
    from pipeline import RetryableError

    @stage(reasons={"later": "a dependency lags"})
    def later(record: Record, ctx: StageContext) -> None:
        raise RetryableError("later", "not yet")

    harness = StageHarness(
        later, retry={"topic": "retry", "max_attempts": 3}, topic_limits={"retry": 10_000}
    )
    run = harness.run([record(b"z" * 20_000), record(b"small")])
    assert [d.reason for d in run.dead_letters] == ["unwritable"]
    assert len(run.retries) == 1


@settings(max_examples=200, deadline=None)
@given(
    value=st.integers(0, 600_000).map(lambda n: b"v" * n),
    key=st.integers(0, 80_000).map(lambda n: b"k" * n),
    header_bytes=st.integers(0, 200_000),
    budget=st.sampled_from([4096, 65_536, MAX_PAYLOAD_BYTES, 1_000_000]),
)
def test_dead_letters_always_fit_their_budget(value, key, header_bytes, budget):
    headers = [("note", b"h" * header_bytes), ("dlq.stage", b"parse"), ("lineage-id", b"L" * 26)]
    out_key, out_value, out_headers = bounded(key, value, headers, budget)
    assert size(out_key, out_value, out_headers) <= budget
    named = dict(out_headers)
    if out_value != value:
        assert named["dlq.payload.truncated"] == b"true"
        assert named["dlq.payload.size"] == str(len(value)).encode()
        assert value.startswith(out_value or b"")
    if size(key, value, headers) <= budget:
        assert (out_key, out_value, out_headers) == (key, value, headers)  # untouched
    assert named["dlq.stage"] == b"parse" and named["lineage-id"] == b"L" * 26


LIMIT, DLQ_BUDGET = 100_000, 20_000


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([0, 1, DLQ_BUDGET - 300, DLQ_BUDGET, DLQ_BUDGET + 1, LIMIT - 200])
        | st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT])
        | st.integers(0, 3 * LIMIT),
        min_size=1,
        max_size=8,
    )
)
def test_every_record_is_written_or_a_dead_letter_that_fits_whatever_its_size(sizes):
    """Around every limit (the output topic's, the dead-letter budget): each input is
    one output no larger than the topic takes, or one dead letter within budget."""
    harness = StageHarness(copy, topic_limits={"out": LIMIT}, dlq_max_bytes=DLQ_BUDGET)
    values = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    run = harness.run([record(v, key="k") for v in values])
    assert len(run.outputs) + len(run.dead_letters) == len(values)
    for out in run.outputs:
        assert size(out.key, out.value, list(out.headers.items())) <= LIMIT
    for letter in run.dead_letters:
        assert letter.reason == "unwritable"
        assert size(letter.key, letter.value, list(letter.headers.items())) <= DLQ_BUDGET
        original = int(letter.header("dlq.payload.size") or len(letter.value or b""))
        assert original > LIMIT - 1000  # only what cannot be written is refused
    written = {o.value for o in run.outputs}
    assert all(v in written for v in values if len(v) <= LIMIT - 1000)
