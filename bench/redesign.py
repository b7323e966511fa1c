"""Each built-in stage's CPU per record, before and after a change, in one run.

``python bench/redesign.py --before REV [--repeats 3] [--records 200000]`` checks out
REV in a temporary git worktree and runs ``bench/run.py --only
ingest,parse,enrich,aggregate`` (each stage alone as a ``pipeline run`` worker on
its pre-filled input, on a broker of its own) alternately on REV and on this
checkout, ``--repeats`` times each, the order flipped every round (A B, B A, …) so
drift of a noisy machine falls on both. Each run imports its own tree's code
(``PYTHONPATH``; worker processes inherit it). CPU µs per record of the worker
process (user + system, all threads) is the figure; records/s beside it.

Writes ``bench/results/redesign.json`` and ``.md``: per stage and version the
median, min and max over the repeats, and the after ÷ before ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STAGES = ("ingest", "parse", "enrich", "aggregate")


def run_once(root: Path, records: int, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        str(root / "bench" / "run.py"),
        "--only",
        ",".join(STAGES),
        "--records",
        str(records),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    result_file = out / "latest.json"
    if done.returncode != 0 or not result_file.exists():
        raise SystemExit(f"{root}: bench/run.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    doc: dict[str, Any] = json.loads(result_file.read_text())
    return doc


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="redesign-"))
    before_root = work / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(before_root), args.before],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    versions = {"before": before_root, "after": REPO}
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    started = time.time()
    try:
        for r in range(args.repeats):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                doc = run_once(versions[name], args.records, work / f"{name}-{r}")
                runs[name].append(doc)
                cpu = {s: round(doc["stages"][s]["cpu_us_per_record"], 1) for s in STAGES}
                print(f"round {r + 1} {name}: {cpu}", file=sys.stderr)
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(before_root)], cwd=REPO, check=False
        )
    table: dict[str, Any] = {}
    for stage in STAGES:
        row: dict[str, Any] = {}
        for name in versions:
            row[name] = {
                "cpu_us_per_record": summary(
                    [d["stages"][stage]["cpu_us_per_record"] for d in runs[name]]
                ),
                "records_per_s": summary([d["stages"][stage]["records_per_s"] for d in runs[name]]),
            }
        row["cpu_ratio_after_to_before"] = (
            row["after"]["cpu_us_per_record"]["median"]
            / row["before"]["cpu_us_per_record"]["median"]
        )
        table[stage] = row
    result = {
        "before": args.before,
        "after": head,
        "repeats": args.repeats,
        "records": args.records,
        "seconds": round(time.time() - started),
        "environment": runs["after"][0].get("environment"),
        "stages": table,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "redesign.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Stage CPU before ({args.before}) and after ({head}) the change",
        "",
        f"Each stage alone (`bench/run.py --only {','.join(STAGES)}`), {args.records:,} records, "
        f"{args.repeats} interleaved repeats per version; median (min to max).",
        "",
        "| stage | CPU µs/record before | after | after ÷ before | records/s before | after |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(s: dict[str, float], digits: int) -> str:
        return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f} to {s['max']:,.{digits}f})"

    for stage, row in table.items():
        lines.append(
            f"| {stage} | {cell(row['before']['cpu_us_per_record'], 1)} "
            f"| {cell(row['after']['cpu_us_per_record'], 1)} "
            f"| {row['cpu_ratio_after_to_before']:.2f} "
            f"| {cell(row['before']['records_per_s'], 0)} "
            f"| {cell(row['after']['records_per_s'], 0)} |"
        )
    (RESULTS / "redesign.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
