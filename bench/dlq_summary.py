"""``pipeline dlq summary`` and a backfill's final count: flat as dead letters pile up.

Per history size (``--sizes``, dead letters in parse's DLQ: 10k … 10M), on a fresh
embedded broker, writes that many dead letters as the stages would (record time =
failed-at; :func:`pipeline.testing.history.write_dead_letters`) at a constant
``--per-s`` of failed-at time, ending now: a longer history is a longer time, the
last 24 hours hold the same whatever the size. Then:

* ``summary`` (the default window, the last 24 hours): records and bytes returned
  by the broker (deterministic), bytes the client received, seeks, wall time;
* a backfill run's count: 50 dead letters of a run written after its start
  offsets were recorded (:func:`dlq.summary.run_dead_letters`);
* ``summary --all`` (every dead letter; what ``summary`` did before) for sizes up
  to ``--full-up-to``.

Writes ``bench/results/dlq_summary.json`` and ``.md``.
Run: ``.venv/bin/python bench/dlq_summary.py [--sizes 10000,100000,1000000,10000000]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from historylib import RESULTS, median, pipeline_on_fresh_broker, table, timed

from dlq.read import Filters, iter_dead_letters
from dlq.summary import DEFAULT_WINDOW_MS, dlq_offsets, run_dead_letters, window_summary
from dlq.view import summarize
from pipeline import contract
from pipeline.kafka.seek import PartitionSeeker, ReadCost
from pipeline.testing.history import write_dead_letters

DAY = 86_400_000
#: dead letters per broker batch: the embedded broker slows down past ~20k batches
#: per partition (see lineage_trace.py), and 10M dead letters are in one partition
BATCH = 1024


def one_size(count: int, per_s: float, full_up_to: int, repeats: int) -> dict[str, Any]:
    with pipeline_on_fresh_broker("ds") as settings:
        now = int(time.time() * 1000)
        span = int(count / per_s * 1000)
        _, write_s = timed(
            lambda: write_dead_letters(
                settings, "parse", count, now - span, per_s, batch_records=BATCH
            )
        )
        runs = []
        for _ in range(repeats):
            since = int(time.time() * 1000) - DEFAULT_WINDOW_MS
            got, seconds = timed(lambda s=since: window_summary(settings, ["parse"], Filters(), s))
            got.cost.received_bytes = received_bytes(settings, since)
            runs.append((got, seconds))
        row: dict[str, Any] = {
            "dead_letters": count,
            "history_days": round(span / DAY, 1),
            "write_s": round(write_s, 1),
            "summary": {
                "counted": sum(r.count for r in runs[0][0].rows),
                "records": median([g.cost.records for g, _ in runs]),
                "bytes": median([g.cost.bytes for g, _ in runs]),
                "received_bytes": median([g.cost.received_bytes or 0 for g, _ in runs]),
                "seeks": median([g.cost.seeks for g, _ in runs]),
                "wall_s": round(median([s for _, s in runs]), 3),
            },
        }
        # a backfill run's 50 dead letters, after its start offsets
        source = contract.backfill_source("bench")
        started = dlq_offsets(settings)
        write_dead_letters(settings, "parse", 50, int(time.time() * 1000), 100, source=source)
        counts, seconds = timed(lambda: run_dead_letters(settings, source, started, now))
        assert sum(counts["parse"].values()) == 50, counts
        row["backfill_count_wall_s"] = round(seconds, 3)
        if count <= full_up_to:
            letters = iter_dead_letters(settings, ["parse"])
            rows, seconds = timed(lambda: summarize(letters, settings.stage_ids))
            row["all"] = {"records": sum(r.count for r in rows), "wall_s": round(seconds, 3)}
        print(json.dumps(row), flush=True)
        return row


def received_bytes(settings: Any, since: int) -> int | None:
    """What the client receives for the summary's reads (librdkafka statistics): the
    summary's own reader keeps none, so a measured seeker makes the same reads."""
    cost = ReadCost()
    with PartitionSeeker(settings, cost=cost, measure=True) as seeker:
        tp = (settings.stage("parse").dlq, 0)
        start, _ = seeker.offset_for_time(tp, since - 60_000)
        for _ in seeker.scan(tp, start):
            pass
    return cost.received_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--per-s", type=float, default=0.1)
    parser.add_argument("--full-up-to", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [
        one_size(int(s), args.per_s, args.full_up_to, args.repeats) for s in args.sizes.split(",")
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dlq_summary.json").write_text(
        json.dumps({"per_s": args.per_s, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# dlq summary (bench/dlq_summary.py)",
        "",
        f"Dead letters at {args.per_s:g}/s of failed-at time, ending now, {BATCH} per broker "
        "batch, one DLQ partition; `summary` counts the last 24 hours. Records and bytes: "
        "what the broker returned (deterministic); wall time is noisy here.",
        "",
        *table(
            [
                "dead letters",
                "history days",
                "summary: counted",
                "records read",
                "bytes",
                "received bytes",
                "seeks",
                "s",
                "backfill count s",
                "--all: records",
                "s",
            ],
            [
                [
                    f"{r['dead_letters']:,}",
                    r["history_days"],
                    r["summary"]["counted"],
                    r["summary"]["records"],
                    r["summary"]["bytes"],
                    r["summary"]["received_bytes"],
                    r["summary"]["seeks"],
                    r["summary"]["wall_s"],
                    r["backfill_count_wall_s"],
                    f"{r['all']['records']:,}" if "all" in r else "-",
                    r["all"]["wall_s"] if "all" in r else "-",
                ]
                for r in rows
            ],
        ),
    ]
    (RESULTS / "dlq_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
