"""Ingest's repeat cache: memory per remembered record, flat as the stream grows,
and how often two different records collide.

* ``memory``: the cache after streams of 10k … 10M distinct readings (``--sizes``),
  at the default ``dedup_max_keys`` (200000), for the compact cache
  (:class:`stages.ingest.Deduper`) and the map it replaced (``(device_id, seq)`` →
  ``(time, 16-byte digest)`` in an ``OrderedDict``, rebuilt here as it was).
  Bytes are traced allocations (``tracemalloc``), deterministic for a given
  Python; CPU µs per record beside them (wall clock, noisy here).
* ``collisions``: the compact cache keeps 64-bit fingerprints; a different record
  is taken for a repeat when its fingerprint equals one of the ``n`` remembered
  ones, probability ``n / 2**64``. Too small to observe, so the same cache is run
  with its fingerprints cut to 16 and 20 bits, on distinct records against a full
  cache: the measured rate must match ``n / 2**bits``, which then holds at 64.

Writes ``bench/results/repeat_cache.json`` and ``.md``.
Run: ``.venv/bin/python bench/repeat_cache.py [--sizes 10000,100000,1000000,10000000]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.ingest import Deduper

RESULTS = Path(__file__).parent / "results"
MAX_KEYS = 200_000
BATCH = 2000


class PairMap:
    """The cache before: ``(device_id, seq)`` → ``(time, digest)``, oldest first."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None:
        self._window, self._max, self._clock = window_s, max_keys, clock
        self._seen: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def begin(self) -> dict[Any, Any]:
        return {}

    def seen(self, device_id: str, seq: str, digest: bytes, pending: dict[Any, Any]) -> bool:
        now = self._clock()
        key = (device_id, seq)
        previous = pending.get(key) or self._seen.get(key)
        if previous is not None and previous[0] >= now - self._window and previous[1] == digest:
            return True
        pending[key] = (now, digest)
        return False

    def remember(self, pending: dict[Any, Any]) -> None:
        seen = self._seen
        for key, entry in pending.items():
            seen.pop(key, None)
            seen[key] = entry
        horizon = self._clock() - self._window
        while seen:
            oldest_key, (oldest_at, _) = next(iter(seen.items()))
            if oldest_at >= horizon and len(seen) <= self._max:
                break
            del seen[oldest_key]

    def __len__(self) -> int:
        return len(self._seen)


def digest(n: int) -> bytes:
    return hashlib.blake2b(b"%d" % n, digest_size=16).digest()


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def stream(cache: Any, clock: Clock, records: int) -> float:
    """``records`` distinct readings of 5000 devices in batches; CPU s per record."""
    cpu = 0.0
    n = 0
    while n < records:
        size = min(BATCH, records - n)
        # the work ingest does anyway (digest, the pair as text) is not timed
        batch = [(f"dev-{(n + i) % 5000:05d}", str(n + i), digest(n + i)) for i in range(size)]
        start = time.process_time()
        pending = cache.begin()
        for device_id, seq, payload_digest in batch:
            cache.seen(device_id, seq, payload_digest, pending)
        cache.remember(pending)
        cpu += time.process_time() - start
        n += size
        clock.t += 0.2  # 10k readings/s: the 600 s window holds 6M, the cap binds
    return cpu / records


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name, kind in (("compact", Deduper), ("pair map (before)", PairMap)):
        for size in sizes:
            clock = Clock()
            tracemalloc.start()
            cache = kind(600.0, MAX_KEYS, clock)
            base = tracemalloc.get_traced_memory()[0]
            cpu = stream(cache, clock, size)
            used = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
            rows.append(
                {
                    "cache": name,
                    "stream_records": size,
                    "keys": len(cache),
                    "bytes": used,
                    "bytes_per_key": round(used / len(cache), 1),
                    "cpu_us_per_record_traced": round(cpu * 1e6, 2),
                }
            )
            print(rows[-1], flush=True)
            del cache
    return rows


class Truncated(Deduper):
    """The compact cache with its fingerprints cut to ``bits`` bits."""

    bits = 64

    def seen(self, device_id: str, seq: str, digest: bytes, pending: dict[int, None]) -> bool:
        fingerprint = hash((device_id, seq, digest)) & ((1 << self.bits) - 1)
        if fingerprint in self._seen or fingerprint in pending:
            return True
        pending[fingerprint] = None
        return False


def collisions(bits: int, keys: int, lookups: int) -> dict[str, Any]:
    clock = Clock()
    cache = type("T", (Truncated,), {"bits": bits})(1e9, keys, clock)
    stream(cache, clock, keys)  # fill it with `keys` distinct records
    wrong = 0
    n = 0
    while n < lookups:
        cache.begin()
        for i in range(BATCH):
            seq = str(10**12 + n + i)  # never seen before: any hit is a collision
            if cache.seen("dev-x", seq, b"d", {}):  # nothing pending, nothing remembered:
                wrong += 1  # the cache stays at `keys` records
        n += BATCH
    return {
        "fingerprint_bits": bits,
        "keys": len(cache),
        "lookups": n,
        "false_repeats": wrong,
        "measured_rate": wrong / n,
        "predicted_rate": len(cache) / 2**bits,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    mem = memory(sizes)
    coll = [collisions(16, 2000, 400_000), collisions(20, 20_000, 400_000)]
    for row in coll:
        print(row, flush=True)
    at_64 = MAX_KEYS / 2**64
    out = {
        "memory": mem,
        "collisions": coll,
        "false_repeat_probability_per_record_at_64_bits": at_64,
        "expected_false_repeats_per_year_at_10k_per_s": at_64 * 10_000 * 3600 * 24 * 365,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "repeat_cache.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Ingest repeat cache (bench/repeat_cache.py)",
        "",
        f"dedup_max_keys = {MAX_KEYS}; bytes are tracemalloc-traced allocations.",
        "",
        "| cache | stream records | keys held | bytes/key | MiB | CPU µs/record (traced) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in mem:
        lines.append(
            f"| {r['cache']} | {r['stream_records']:,} | {r['keys']:,} | {r['bytes_per_key']} | "
            f"{r['bytes'] / 2**20:.1f} | {r['cpu_us_per_record_traced']} |"
        )
    lines += [
        "",
        "| fingerprint bits | keys | lookups | false repeats | measured rate | n/2^bits |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in coll:
        lines.append(
            f"| {c['fingerprint_bits']} | {c['keys']:,} | {c['lookups']:,} | "
            f"{c['false_repeats']} | {c['measured_rate']:.2e} | {c['predicted_rate']:.2e} |"
        )
    lines += [
        "",
        f"At 64 bits and {MAX_KEYS} keys: {at_64:.2e} per record, "
        f"{out['expected_false_repeats_per_year_at_10k_per_s']:.1e} per year at 10k readings/s.",
    ]
    (RESULTS / "repeat_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
