"""Ingest's compact repeat cache against a plain one (the oracle) on random streams.

The plain cache keeps every accepted record whole, ``(device_id, seq, digest)``
with its batch's time, in acceptance order: the semantics written in
:class:`stages.ingest.Deduper`'s docstring, with nothing hashed. Both must take
the same records for repeats, batch by batch, whatever the stream.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.ingest import Deduper

Key = tuple[str, str, bytes]


class PlainRepeats:
    """The oracle: whole keys, exact by construction."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None:
        self.window, self.max, self.clock = window_s, max_keys, clock
        self.now = 0.0
        self.accepted: OrderedDict[Key, float] = OrderedDict()

    def begin(self) -> dict[Key, None]:
        self.now = self.clock()
        while self.accepted:
            key, at = next(iter(self.accepted.items()))
            if at >= self.now - self.window:
                break
            del self.accepted[key]
        return {}

    def seen(self, device_id: str, seq: str, digest: bytes, pending: dict[Key, None]) -> bool:
        key = (device_id, seq, digest)
        if key in self.accepted or key in pending:
            return True
        pending[key] = None
        return False

    def remember(self, pending: dict[Key, None]) -> None:
        for key in pending:
            self.accepted[key] = self.now
        while len(self.accepted) > self.max:
            self.accepted.popitem(last=False)

    def __len__(self) -> int:
        return len(self.accepted)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def digest(payload: str) -> bytes:
    return hashlib.blake2b(payload.encode(), digest_size=16).digest()


def run(stream: list[tuple[float, list[tuple[int, int, int]]]], window: float, keys: int):
    """Feed both caches the same batches; return their verdicts and sizes."""
    clocks = Clock(), Clock()
    compact, plain = Deduper(window, keys, clocks[0]), PlainRepeats(window, keys, clocks[1])
    verdicts: list[tuple[list[bool], list[bool]]] = []
    for advance, batch in stream:
        for clock in clocks:
            clock.t += advance
        got = []
        for cache in (compact, plain):
            pending = cache.begin()
            marks = [
                cache.seen(f"dev-{d}", str(s), digest(f"payload-{p}"), pending) for d, s, p in batch
            ]
            cache.remember(pending)
            got.append(marks)
        verdicts.append((got[0], got[1]))
        assert len(compact) == len(plain)
    return verdicts


batches = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 3.0, 9.99, 10.0, 10.01, 25.0]),
        st.lists(
            st.tuples(
                st.integers(0, 3),  # device
                st.integers(0, 6),  # seq
                st.integers(0, 2),  # payload: the same pair with another payload
            ),
            max_size=12,
        ),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(stream=batches, keys=st.integers(1, 30))
def test_compact_cache_takes_the_same_records_for_repeats_as_the_plain_one(stream, keys):
    for compact, plain in run(stream, 10.0, keys):
        assert compact == plain


def test_long_random_streams_agree_and_repeats_are_found():
    rng = random.Random(16)
    for _ in range(20):
        stream = [
            (
                rng.choice([0.0, 0.2, 1.0, 4.0, 30.0]),
                [(rng.randrange(50), rng.randrange(200), rng.randrange(2)) for _ in range(200)],
            )
            for _ in range(60)
        ]
        verdicts = run(stream, 20.0, rng.choice([100, 1000, 100_000]))
        assert all(c == p for c, p in verdicts)
        assert any(any(c) for c, _ in verdicts)  # the streams do hold repeats


def test_a_repeat_after_the_window_or_past_max_keys_is_accepted_again():
    clock = Clock()
    cache = Deduper(10.0, 2, clock)
    for advance, expected in [(0, False), (5, True), (5, True), (0.01, False)]:
        clock.t += advance
        pending = cache.begin()
        assert cache.seen("d", "1", b"x", pending) is expected
        cache.remember(pending)
    for seq in ("2", "3"):  # two more records push the first out (max_keys=2)
        pending = cache.begin()
        cache.seen("d", seq, b"x", pending)
        cache.remember(pending)
    pending = cache.begin()
    assert cache.seen("d", "1", b"x", pending) is False
    assert len(cache) == 2


def test_memory_per_remembered_record_is_small():
    """The compact cache holds 200000 records in under 100 bytes each (the plain
    pair-and-digest map took ~400)."""
    clock = Clock()
    tracemalloc.start()
    try:
        cache = Deduper(600.0, 200_000, clock)
        base = tracemalloc.get_traced_memory()[0]
        for b in range(100):
            pending = cache.begin()
            for i in range(2000):
                n = b * 2000 + i
                cache.seen(f"dev-{n % 5000:05d}", str(n), digest(str(n)), pending)
            cache.remember(pending)
            clock.t += 1
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(cache) == 200_000
    assert used / len(cache) < 100
