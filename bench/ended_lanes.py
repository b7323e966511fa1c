"""Ended-lane markers of the aggregate's state: flat as backfill runs accumulate.

Runs the aggregate's engine (no broker) through ``--runs`` backfill runs on one
partition, one run every ``--every-h`` hours of (fake) wall clock, each a few
backfilled readings and its end-of-input, with live readings between them.
After 10, 100, 1000 … runs it reports the changelog's live keys (what compaction
keeps, what a restarted worker loads), the markers held in memory and the CPU
per batch, for markers kept forever (as before) and for the default
``ended_lane_retention_s`` (30 days). Deterministic except the CPU column.

Writes ``bench/results/ended_lanes.json`` and ``.md``.
Run: ``.venv/bin/python bench/ended_lanes.py [--runs 10000] [--every-h 1]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline import contract
from pipeline.engine.build import build_engine
from pipeline.records import Record
from pipeline.registry import resolve
from pipeline.settings import StageSpec

RESULTS = Path(__file__).parent / "results"
FOREVER = 1e15


class Clock:
    def __init__(self) -> None:
        self.t = 1_767_225_600.0

    def __call__(self) -> float:
        return self.t


def reading(offset: int, ts: int, source: str | None) -> Record:
    value = orjson.dumps(
        {"device_id": "d1", "metric": "temp", "ts": ts, "value": 1.0, "site": "s", "unit": "C"}
    )
    headers = [("lineage-id", f"L{offset}".encode())]
    if source:
        headers.append(("source", source.encode()))
    return Record("iot.enriched", 0, offset, ts, b"d1", value, tuple(headers))


def end_of_input(offset: int, source: str) -> Record:
    headers = (("source", source.encode()), ("control", b"end-of-input"))
    return Record("iot.enriched", 0, offset, 0, None, b"", headers)


def run(runs: int, every_h: float, retention_s: float) -> list[dict[str, Any]]:
    clock = Clock()
    spec = StageSpec(
        uses="stages.aggregate:aggregate",
        inputs=("iot.enriched",),
        output="iot.aggregates",
        dlq="iot.aggregate.dlq",
        state_topic="iot.aggregate.state",
        ended_lane_retention_s=retention_s,
    )
    engine = build_engine("aggregate", spec, resolve("aggregate", spec.uses), clock=clock)
    changelog: dict[bytes, bytes] = {}
    offset = 0
    rows = []
    marks = {10**k for k in range(1, 8)} | {runs}
    cpu = 0.0
    batches = 0
    for n in range(1, runs + 1):
        source = contract.backfill_source(f"run-{n}")
        now_ms = int(clock.t * 1000)
        batch = [reading(offset + i, now_ms - 86_400_000 + i, source) for i in range(3)]
        batch.append(end_of_input(offset + 3, source))
        batch.append(reading(offset + 4, now_ms, None))  # live
        offset += 5
        start = time.process_time()
        result = engine.process(0, batch)
        cpu += time.process_time() - start
        batches += 1
        for key, value in result.writes:
            if value is None:
                changelog.pop(key, None)
            else:
                changelog[key] = value
        clock.t += every_h * 3600
        if n in marks:
            markers = sum(1 for k in changelog if k.startswith(b'["end"'))
            rows.append(
                {
                    "retention_s": None if retention_s >= FOREVER else retention_s,
                    "runs": n,
                    "changelog_keys": len(changelog),
                    "ended_markers": markers,
                    "markers_in_memory": len(engine.stores[0].ended),
                    "changelog_bytes": sum(len(k) + len(v) for k, v in changelog.items()),
                    "cpu_us_per_batch": round(cpu / batches * 1e6, 1),
                }
            )
            print(rows[-1], flush=True)
            cpu, batches = 0.0, 0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--every-h", type=float, default=1.0)
    args = parser.parse_args()
    rows = run(args.runs, args.every_h, FOREVER) + run(args.runs, args.every_h, 30 * 86400.0)
    RESULTS.mkdir(exist_ok=True)
    out = {"runs_every_hours": args.every_h, "rows": rows}
    (RESULTS / "ended_lanes.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Ended-lane markers (bench/ended_lanes.py)",
        "",
        f"One backfill run every {args.every_h} h on one partition of the aggregate.",
        "",
        "| markers kept | runs | changelog keys | ended markers | in memory | changelog bytes "
        "| CPU µs/batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kept = "forever (before)" if r["retention_s"] is None else f"{r['retention_s']:.0f} s"
        lines.append(
            f"| {kept} | {r['runs']:,} | {r['changelog_keys']:,} | {r['ended_markers']:,} | "
            f"{r['markers_in_memory']:,} | {r['changelog_bytes']:,} | {r['cpu_us_per_batch']} |"
        )
    (RESULTS / "ended_lanes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
