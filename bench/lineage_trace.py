"""``pipeline lineage trace``: its cost flat as the lineage topic's history grows.

Per history size (``--sizes``, lineage hops: 10k … 10M), on a fresh embedded
broker, writes that many hops straight to the lineage topic (one producer, as the
stages would place them; :func:`pipeline.testing.history.write_lineage`) at a
constant ``--hops-per-s`` of record time, so a longer history is a longer time and
one hour of lineage holds the same whatever the size; three traced readings sit at
25, 50 and 75 % of it. Then, per traced reading:

* ``trace`` (the default: one partition, stops once the path is complete) and
  ``trace --within PT1H`` (the whole hour after the first hop): records and bytes
  returned by the broker (deterministic), seeks (bisection steps), wall time;
* ``--all`` (every partition, the whole topic; what ``trace`` did before), for
  sizes up to ``--full-up-to``.

Writes ``bench/results/lineage_trace.json`` and ``.md``.
Run: ``.venv/bin/python bench/lineage_trace.py [--sizes 10000,100000,1000000,10000000]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from historylib import RESULTS, median, pipeline_on_fresh_broker, table, timed

from pipeline import contract
from pipeline.lineage.find import Search, find
from pipeline.lineage.trace import trace_many
from pipeline.testing.history import TracedReading, write_lineage

HOUR = 3_600_000
#: lineage records per broker batch. A probe fetches one whole batch; workers make
#: batches of a few records, but the embedded broker slows down past ~20k batches
#: per partition (a fetch took 5 s at 25k, none came within 20 s at 50k), so the
#: 10M-hop history (200k records per partition) is written in batches of 64.
BATCH = 64


def one_size(hops: int, hops_per_s: float, full_up_to: int, repeats: int) -> dict[str, Any]:
    with pipeline_on_fresh_broker("lt") as settings:
        span_ms = int(hops / hops_per_s * 1000)
        start = int(time.time() * 1000) - span_ms - HOUR
        traced = [
            TracedReading(
                contract.lineage_id(start + span_ms * q // 4, "bench", q),
                entered_ms=start + span_ms * q // 4 + 1_500,
                window=(f"dev-{q}", "temperature", start + span_ms * q // 4 - 30_000),
            )
            for q in (1, 2, 3)
        ]
        records, write_s = timed(
            lambda: write_lineage(settings, hops, start, hops_per_s, traced, batch_records=BATCH)
        )
        row: dict[str, Any] = {
            "hops": hops,
            "lineage_records": records,
            "history_hours": round(span_ms / HOUR, 2),
            "write_s": round(write_s, 1),
        }
        for name, search in (
            ("trace", Search()),
            ("trace_within_1h", Search(within_ms=HOUR, whole_window=True)),
        ):
            runs = []
            for reading in traced:
                for _ in range(repeats):  # wall time is noisy here: medians
                    found, seconds = timed(
                        lambda r=reading, s=search: find(settings, r.lineage_id, s, measure=True)
                    )
                    assert found.trace.end == "window", (name, found.trace.as_dict())
                    runs.append((found, seconds))
            row[name] = {
                "records": median([f.cost.records for f, _ in runs]),
                "bytes": median([f.cost.bytes for f, _ in runs]),
                "received_bytes": median([f.cost.received_bytes or 0 for f, _ in runs]),
                "received_records": median([f.cost.received_records or 0 for f, _ in runs]),
                "seeks": median([f.cost.seeks for f, _ in runs]),
                "partitions": median([len(f.cost.partitions) for f, _ in runs]),
                "wall_s": round(median([s for _, s in runs]), 3),
            }
        if hops <= full_up_to:
            ids = [r.lineage_id for r in traced]
            found_all, seconds = timed(lambda: trace_many(settings, ids))
            assert all(t.end == "window" for t in found_all.values())
            row["all"] = {"records": records, "wall_s": round(seconds, 3)}
        print(json.dumps(row), flush=True)
        return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--hops-per-s", type=float, default=50.0)
    parser.add_argument("--full-up-to", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [
        one_size(int(s), args.hops_per_s, args.full_up_to, args.repeats)
        for s in args.sizes.split(",")
    ]
    RESULTS.mkdir(exist_ok=True)
    out = {
        "hops_per_s": args.hops_per_s,
        "hops_per_batch": 50,
        "records_per_broker_batch": BATCH,
        "rows": rows,
    }
    (RESULTS / "lineage_trace.json").write_text(json.dumps(out, indent=2) + "\n")

    def cell(row: dict[str, Any], name: str, key: str) -> Any:
        return row[name][key] if name in row else "-"

    lines = [
        "# lineage trace (bench/lineage_trace.py)",
        "",
        f"History at {args.hops_per_s:g} hops/s of record time (50 per stage batch, 4 "
        f"lineage partitions, {BATCH} lineage records per broker batch); medians of three "
        f"traced readings, each traced {args.repeats} times. Records and bytes: what the "
        "broker returned to the command (deterministic); wall time is noisy here.",
        "",
        *table(
            [
                "hops",
                "lineage records",
                "history h",
                "trace: records",
                "bytes",
                "seeks",
                "s",
                "--within PT1H: records",
                "s",
                "--all: records",
                "s",
            ],
            [
                [
                    f"{r['hops']:,}",
                    f"{r['lineage_records']:,}",
                    r["history_hours"],
                    r["trace"]["records"],
                    r["trace"]["bytes"],
                    r["trace"]["seeks"],
                    r["trace"]["wall_s"],
                    r["trace_within_1h"]["records"],
                    r["trace_within_1h"]["wall_s"],
                    cell(r, "all", "records"),
                    cell(r, "all", "wall_s"),
                ]
                for r in rows
            ],
        ),
    ]
    (RESULTS / "lineage_trace.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
