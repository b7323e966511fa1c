"""Finding a time in a partition (pipeline.kafka.seek.time_offset) on partitions held
in memory: what a broker's records are, with gaps (compaction) and repeated times.

The embedded broker's ``offsets_for_times`` always answers 0 (its path, bisection,
runs against it in tests/integration/test_lineage_search.py); real Kafka answers
right, and a right answer must be taken after two probes, a wrong one never.
"""

from __future__ import annotations

import bisect
import math
import random

from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka.seek import time_offset


class Partition:
    """Records at ``offsets`` (ascending, gaps allowed) with non-decreasing times."""

    def __init__(self, offsets: list[int], stamps: list[int]) -> None:
        self.offsets, self.stamps = offsets, stamps
        self.probes = 0

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.offsets[0], self.offsets[-1] + 1) if self.offsets else (0, 0)

    def probe(self, offset: int, end: int) -> tuple[int, int | None] | None:
        self.probes += 1
        i = bisect.bisect_left(self.offsets, offset)
        if i == len(self.offsets) or self.offsets[i] >= end:
            return None
        return self.offsets[i], self.stamps[i]

    def truth(self, target: int) -> int:
        i = bisect.bisect_left(self.stamps, target)
        return self.offsets[i] if i < len(self.offsets) else self.bounds[1]


partitions = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 5)), min_size=1, max_size=300
).map(
    lambda steps: Partition(
        [sum(gap for gap, _ in steps[: i + 1]) for i in range(len(steps))],
        [sum(dt for _, dt in steps[: i + 1]) for i in range(len(steps))],
    )
)


@given(
    partition=partitions,
    target=st.integers(-5, 1600),
    answer=st.integers(-1, 1000),
    slack=st.sampled_from([0, 0, 1, 5, 64]),
)
def test_the_first_offset_at_or_after_a_time_whatever_the_broker_answers(
    partition, target, answer, slack
):
    low, high = partition.bounds
    want = partition.truth(target)
    got, how = time_offset(target, answer, low, high, partition.probe, slack)
    if how == "broker" or slack == 0:
        assert got == want
    else:  # reading on from ``got`` finds it, past at most ``slack`` earlier records
        # (in records, not offsets: a compacted partition has gaps)
        assert got <= want
        assert sum(1 for o in partition.offsets if got <= o < want) <= slack
        assert all(
            ts < target
            for o, ts in zip(partition.offsets, partition.stamps, strict=True)
            if o < got
        )
    if how == "broker":
        assert answer == want
    assert partition.probes <= 2 + 2 * math.ceil(math.log2(high - low + 1)) + 2


def test_a_right_answer_costs_two_probes_a_wrong_one_a_search():
    rng = random.Random(4)
    offsets = list(range(100, 1_000_100))
    stamps = sorted(rng.randrange(10**9) for _ in offsets)
    target = stamps[654_321]
    right = Partition(offsets, stamps)
    low, high = right.bounds
    assert time_offset(target, right.truth(target), low, high, right.probe) == (
        right.truth(target),
        "broker",
    )
    assert right.probes == 2
    wrong = Partition(offsets, stamps)  # the embedded broker: always 0
    assert time_offset(target, 0, low, high, wrong.probe) == (right.truth(target), "search")
    assert 2 < wrong.probes <= 2 + 12  # interpolation: far fewer than bisection's 20
    near = Partition(offsets, stamps)
    start, _ = time_offset(target, 0, low, high, near.probe, slack=64)
    assert right.truth(target) - 64 <= start <= right.truth(target)
    assert near.probes <= wrong.probes
