"""Backfill benchmark: live latency with and without a backfill, and backfill rows/s.

In one run, on one embedded broker, the four stages each in its own worker:

1. **live alone**: live readings at ``--live-rate`` for ``--live-s`` seconds;
   end-to-end latency (produced → enriched) p50/p99;
2. **backfill, unlimited, with live**: ``pipeline backfill run`` of a Parquet file
   of ``--rows`` readings (``--rate 0``) while the same live stream runs; live
   latency again, and the backfill's rows/s end to end (start of the command to
   COMPLETE, i.e. until the aggregate committed everything);
3. **backfill, rate-limited, with live**: the same file as a new run at
   ``--limited-rate`` rows/s, with live: latency and rows/s;
4. **backfill alone**: the same file as a new run, no live traffic: rows/s.

Writes ``bench/results/backfill.json`` and ``bench/results/backfill.md`` and
prints the table. Run with ``make bench-backfill`` (or ``python bench/backfill.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from data import DEVICES, run_config, simulated
from live import LatencyReader, produce_at_rate
from procs import (  # the benchmark's pieces: workers, polling, CPU
    BENCH,
    REPO,
    Child,
    broker_pid,
    cpu_of,
    log,
    percentile,
    ready,
    stop_children,
    wait_until,
)
from report import environment
from single import Bench, start_workers

from pipeline.demo.registry import publish_registry
from pipeline.kafka.embedded import start_embedded
from stages.enrich import read_registry_csv
from stages.parse import decode

STAGE_IDS = ("ingest", "parse", "enrich", "aggregate")  # the built-in pipeline
RESULTS = BENCH / "results"

COLUMNS = ("device_id", "ts", "seq", "metric", "value", "unit")


def write_parquet(path: Path, rows: int) -> None:
    """``rows`` readings of DEVICES devices, a day old, in time order, 50k per row group."""
    records = simulated(rows, seed=21)
    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for r in records:
        doc = decode(r.value)
        doc["ts"] -= 86_400_000
        for c in COLUMNS:
            cols[c].append(doc[c])
    pq.write_table(pa.table(cols), path, row_group_size=50_000)


class Live:
    """Live readings at a rate in a thread, latency measured at the enriched topic."""

    def __init__(self, settings: Any, rate: float, seconds: float, seq_base: int) -> None:
        self.reader = LatencyReader(settings, settings.stages["enrich"].output, seq_base)
        self.sent = 0
        landing = settings.stages["ingest"].inputs[0]

        def produce() -> None:
            self.sent = produce_at_rate(settings, landing, rate, seconds, seq_base)

        self.thread = threading.Thread(target=produce, name="live", daemon=True)
        self.thread.start()

    def finish(self, children: list[Child]) -> dict[str, Any]:
        self.thread.join()
        wait_until(lambda: len(self.reader.seen) >= self.sent, 180, "live readings", 0.2, children)
        self.reader.close()
        lat = self.reader.latency
        return {
            "readings": self.sent,
            "p50_s": percentile(lat, 0.50),
            "p99_s": percentile(lat, 0.99),
            "max_s": max(lat, default=None),
        }


def backfill(
    config: Path, bootstrap: str, data: Path, run_id: str, rate: float, workdir: Path
) -> dict[str, Any]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_OPENLINEAGE__TRANSPORT": "none",
        "PIPELINE_BACKFILL__STALL_TIMEOUT_S": "120",
    }
    cmd = [sys.executable, "-m", "pipeline.cli", "backfill", "run", "--from-parquet", str(data),
           "--rate", str(rate), "--run-id", run_id, "--json"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - t0
    (workdir / f"backfill-{run_id}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"backfill {run_id} exited {proc.returncode}: {proc.stderr[-2000:]}")
    state = json.loads(proc.stdout)
    return {
        "run_id": run_id,
        "state": state["state"],
        "rows": state["rows_sent"],
        "rate_limit": rate,
        "seconds_to_complete": seconds,
        "rows_per_s": state["rows_sent"] / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=120_000, help="backfill rows (≥ 100k)")
    parser.add_argument("--live-rate", type=float, default=500.0, help="live readings/s")
    parser.add_argument("--live-s", type=float, default=30.0, help="seconds of live traffic")
    parser.add_argument("--limited-rate", type=float, default=2000.0, help="rows/s of phase 3")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-backfill-"))
    results: dict[str, Any] = {"environment": environment(), "args": {
        "rows": args.rows, "live_rate": args.live_rate, "live_s": args.live_s,
        "limited_rate": args.limited_rate, "devices": DEVICES}}  # fmt: skip
    broker = start_embedded()
    try:
        log(f"broker at {broker.bootstrap}; logs in {workdir}")
        config, settings = run_config(workdir, broker.bootstrap, f"bf{os.getpid()}")
        publish_registry(settings, read_registry_csv((REPO / "config" / "devices.csv").read_text()))
        data = workdir / "readings.parquet"
        write_parquet(data, args.rows)
        bench = Bench(broker.bootstrap, broker_pid(), workdir)
        extra = {
            "PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S": "10",
            "PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S": "2",
        }
        workers = {}
        for s in STAGE_IDS:
            worker = start_workers(bench, s, config, "bf", 1, extra)[0]
            workers[s] = (worker.child, worker.port)
        children = [c for c, _ in workers.values()]
        wait_until(
            lambda: all(ready(port) for _, port in workers.values()), 120, "workers", 0.2, children
        )

        log("warm-up: 5 s of live readings, not measured")
        Live(settings, args.live_rate, 5.0, 1_000_000).finish(children)
        log(f"1. live alone: {args.live_rate:g}/s for {args.live_s:g}s")
        live = Live(settings, args.live_rate, args.live_s, 10_000_000)
        results["live_alone"] = live.finish(children)

        log(f"2. backfill of {args.rows} rows, unlimited, with live")
        live = Live(settings, args.live_rate, args.live_s, 20_000_000)
        cpu0 = {s: cpu_of(c.pid) for s, (c, _) in workers.items()}
        results["backfill_unlimited"] = backfill(
            config, broker.bootstrap, data, "unlimited", 0, workdir
        )
        results["live_with_unlimited_backfill"] = live.finish(children)
        cpu1 = {s: cpu_of(c.pid) for s, (c, _) in workers.items()}
        results["backfill_unlimited"]["worker_cpu_s"] = {s: cpu1[s] - cpu0[s] for s in cpu0}

        log(f"3. backfill at {args.limited_rate:g} rows/s, with live")
        live = Live(settings, args.live_rate, args.live_s, 30_000_000)
        results["backfill_limited"] = backfill(
            config, broker.bootstrap, data, "limited", args.limited_rate, workdir
        )
        results["live_with_limited_backfill"] = live.finish(children)

        log("4. backfill alone")
        results["backfill_alone"] = backfill(config, broker.bootstrap, data, "alone", 0, workdir)
    finally:
        stop_children()
        broker.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backfill.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (args.out / "backfill.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    a = r["args"]

    def lat(key: str) -> str:
        x = r[key]
        return f"{x['p50_s']:.3f} s / {x['p99_s']:.3f} s (max {x['max_s']:.3f} s)"

    base = r["live_alone"]["p99_s"]
    lines = [
        f"# Backfill benchmark {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "",
        f"{env.get('cpus', '?')} cores, Python {env.get('python', '?')}, embedded broker; "
        f"{a['rows']:,} Parquet rows ({a['devices']} devices), live {a['live_rate']:g} "
        f"readings/s for {a['live_s']:g} s; four stage workers, one each.",
        "",
        "| phase | live latency p50 / p99 (produced → enriched) | live p99 ÷ alone |"
        " backfill rows/s to COMPLETE |",
        "|---|---|---:|---:|",
        f"| live alone | {lat('live_alone')} | 1.00x | |",
        f"| backfill unlimited + live | {lat('live_with_unlimited_backfill')} | "
        f"{r['live_with_unlimited_backfill']['p99_s'] / base:.2f}x | "
        f"{r['backfill_unlimited']['rows_per_s']:,.0f} |",
        f"| backfill at {a['limited_rate']:g} rows/s + live | {lat('live_with_limited_backfill')} "
        f"| {r['live_with_limited_backfill']['p99_s'] / base:.2f}x | "
        f"{r['backfill_limited']['rows_per_s']:,.0f} |",
        f"| backfill alone | | | {r['backfill_alone']['rows_per_s']:,.0f} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
