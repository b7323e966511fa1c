"""What metrics (and lineage hops) cost the parse stage, side by side in one run.

Times, on the same 2000-record batches of simulated raw records, alternating in
rounds so machine noise hits all variants alike:

* ``bare``: the parse stage's engine alone;
* ``metrics``: plus the per-batch metric updates every worker makes
  (:func:`pipeline.metrics.batch_done` and the dead-letter counters);
* ``metrics+lineage``: plus building the batch's lineage hop records (format 2, one
  per batch; not sending them).

Writes ``bench/results/metrics_overhead.json`` and prints ratios.
Run: ``python bench/metrics_overhead.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline.demo.simulator import generate
from pipeline.engine.build import build_engine, load_stage
from pipeline.engine.result import BatchResult
from pipeline.lineage import hops as lineage
from pipeline.obs import metrics
from pipeline.records import Deliveries, Record
from pipeline.settings import load_settings

BATCH = 2000


def raw_batch(settings) -> list[Record]:
    """Ingest's output for a batch of simulated landing records, as parse sees it."""
    start = int(time.time() * 1000) - 3_600_000
    landing = [
        Record("iot.landing", 0, i, start + i, r.key, r.value, ())
        for i, r in enumerate(
            generate(50, BATCH, start_ms=start, bad_ratio=0.01, dup_ratio=0.0, seed=7)
        )
    ]
    ingest = build_engine("ingest", settings.stages["ingest"], load_stage(settings, "ingest"))
    ingested = ingest.process(0, landing)
    return [
        Record("iot.raw", 0, i, o.timestamp_ms or 0, o.key, o.value, tuple(o.headers))
        for i, o in enumerate(ingested.outputs)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    settings = load_settings()
    stage = build_engine("parse", settings.stages["parse"], load_stage(settings, "parse"))
    batch = raw_batch(settings)

    def bare() -> None:
        stage.process(0, batch)

    def with_metrics() -> BatchResult:
        t0 = time.perf_counter()
        result: BatchResult = stage.process(0, batch)
        for dead in result.dead:
            metrics.DLQ_RECORDS.labels("parse", str(dead.reason)).inc()
        metrics.batch_done(
            "parse",
            batch,
            {"iot.parsed": len(result.outputs)},
            0,
            0,
            time.perf_counter() - t0,
        )
        return result

    def with_lineage() -> None:
        result = with_metrics()
        n = len(result.outputs) + len(result.dead)  # acknowledgements as the producer keeps them
        delivered = Deliveries([("iot.parsed", None, None, [], None)] * n, [0] * n, list(range(n)))
        topics = ["iot.parsed"] * len(result.outputs)
        lineage.batch_hops(
            "parse", "iot.lineage", batch, result, [], delivered, 0, topics, "", "iot.parse.dlq"
        )

    variants = {"bare": bare, "metrics": with_metrics, "metrics+lineage": with_lineage}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "batch_records": len(batch),
        "rounds": args.rounds,
        "median_batch_s": medians,
        "records_per_s": {name: len(batch) / m for name, m in medians.items()},
        "metrics_overhead_ratio": medians["metrics"] / medians["bare"],
        "metrics_lineage_overhead_ratio": medians["metrics+lineage"] / medians["bare"],
    }
    out = Path(__file__).parent / "results" / "metrics_overhead.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"parse stage, {len(batch)}-record batches, median of {args.rounds} rounds")
    for name, m in medians.items():
        ratio = m / medians["bare"]
        print(f"  {name:16s} {m * 1000:8.2f} ms/batch  {len(batch) / m:10.0f} rec/s  x{ratio:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
