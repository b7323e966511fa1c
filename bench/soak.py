"""Memory of the four workers after minutes at their maximum rate (issue 16: worker
RSS < 250 MB after 10 minutes at max rate).

One embedded broker, our four stages (one worker each, the e2e bench's settings),
and a feeder that keeps a backlog in front of ingest (``--backlog`` readings, 100k
by default) for ``--minutes``: the workers never wait for input, so they run at
their maximum rate the whole time. Readings are made as they are sent: 100
devices, event time = the time they are sent, one sequence per device (the repeat
cache remembers up to its default 200,000 of them; the aggregate holds one 10 s
window per device and key plus those in their allowed lateness).

Every ``--sample-s`` the bench notes each worker's RSS (``/proc``), the broker's,
and how many readings the aggregate has consumed (its metrics). At the end the
feeder stops, the pipeline drains, one reading per device far ahead in event time
closes every window, and the readings counted in the windows plus the late dead
letters must equal the readings sent (``lost``).

Writes ``bench/results/soak.json`` and ``.md``. Run (about ``--minutes`` + 2 min):
``make .venv-bench/.installed-stamp && .venv-bench/bin/python bench/soak.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from benchlib import rss_mb
from data import DEVICES, delete_topics, ends, produce_all
from e2e import (
    OUR_ENV,
    counted_in_windows,
    dead_letters,
    sentinels_after,
    settled,
    start_ours,
)
from procs import (
    BenchError,
    CpuMeter,
    broker_pid,
    log,
    metric_sum,
    scrape_text,
    stop_all,
    stop_children,
    wait_until,
)
from report import environment
from single import CONSUMED, Bench

from pipeline.demo.simulator import device_ids, metric_of
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.embedded import start_embedded
from pipeline.kafka.offsets import committed_offsets
from pipeline.kafka.produce import produce_or_wait
from pipeline.settings import load_settings

RESULTS = Path(__file__).parent / "results"
CHUNK = 10_000
#: event time is the send time and the backlog is seconds deep: lateness must cover it
SOAK_ENV = {**OUR_ENV, "PIPELINE_STAGES__AGGREGATE__CONFIG__ALLOWED_LATENESS_S": "60"}


class Feeder:
    """Keeps about ``backlog`` readings in the landing topic ahead of ingest's commits."""

    def __init__(self, bench: Bench, landing: str, group: str, backlog: int) -> None:
        self.settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
        self.bootstrap = bench.bootstrap
        self.landing, self.group, self.backlog = landing, group, backlog
        self.ids = device_ids(DEVICES)
        self.seqs = dict.fromkeys(self.ids, 0)
        self.rng = random.Random(11)
        self.sent = 0
        self.behind = 0
        self.last_ts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def readings(self, n: int) -> list[tuple[bytes, bytes]]:
        now = int(time.time() * 1000)
        out = []
        for i in range(n):
            device = self.ids[(self.sent + i) % DEVICES]
            metric, unit, mean, spread = metric_of(device)
            seq = self.seqs[device]
            self.seqs[device] = seq + 1
            doc = {"device_id": device, "ts": now, "seq": seq, "metric": metric}
            doc |= {"value": round(self.rng.gauss(mean, spread / 3), 3), "unit": unit}
            out.append((device.encode(), orjson.dumps(doc)))
        self.last_ts = now
        return out

    def _run(self) -> None:
        client = producer(self.settings)
        watch = admin(self.settings)
        tps = [(self.landing, p) for p in range(4)]
        try:
            while not self._stop.is_set():
                committed = committed_offsets(watch, self.group, tps, 5.0)
                done = sum(committed.get(tp) or 0 for tp in tps)
                self.behind = self.sent - done
                if self.behind >= self.backlog:
                    self._stop.wait(0.2)
                    continue
                for key, value in self.readings(CHUNK):
                    produce_or_wait(client, self.landing, value, key)
                if client.flush(60):
                    raise BenchError("readings not acknowledged within 60 s")
                self.sent += CHUNK
        except Exception as exc:  # reported in the results
            self.error = f"{type(exc).__name__}: {exc}"


def sample(run: Any, feeder: Feeder, t0: float, broker: int | None) -> dict[str, Any]:
    aggregate = next(w for w in run.workers if w.stage == "aggregate")
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "rss_mb": {w.stage: rss_mb(w.child.pid) for w in run.workers},
        "broker_rss_mb": rss_mb(broker) if broker else None,
        "sent": feeder.sent,
        "behind": feeder.behind,
        "aggregated": metric_sum(scrape_text(aggregate.port), CONSUMED) or 0.0,
    }


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (MB per minute) of (seconds, MB) points."""
    if len(points) < 3:
        return None
    xs = [x / 60 for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def summarise(samples: list[dict[str, Any]], minutes: float) -> dict[str, Any]:
    stages = list(samples[0]["rss_mb"])
    out: dict[str, Any] = {}
    settled_after = min(120.0, minutes * 60 / 5)  # the first fifth (at most 2 min): warm-up
    for stage in stages:
        series = [(s["t_s"], s["rss_mb"][stage]) for s in samples if s["rss_mb"][stage]]
        later = [(t, v) for t, v in series if t >= settled_after]
        out[stage] = {
            "start_mb": series[0][1],
            "at_1_min_mb": next((v for t, v in series if t >= 60), None),
            "end_mb": series[-1][1],
            "peak_mb": max(v for _, v in series),
            "slope_mb_per_min_after_warmup": slope(later),
        }
    rates = []
    for a, b in itertools.pairwise(samples):
        if b["t_s"] > a["t_s"]:
            rates.append((b["aggregated"] - a["aggregated"]) / (b["t_s"] - a["t_s"]))
    return {
        "workers": out,
        "readings_per_s_median": statistics.median(rates) if rates else None,
        "readings_per_s_min_max": [min(rates), max(rates)] if rates else None,
        "broker_rss_end_mb": samples[-1]["broker_rss_mb"],
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# Soak: four workers at their maximum rate for {result['minutes']:g} min",
        "",
        f"Commit {result['commit']}, {result['started']}; command: `{result['command']}`.",
        f"Workers' environment beyond the e2e settings: {result.get('worker_env') or 'none'}.",
        f"Readings sent {result['sent']:,}, counted in windows {result['in_windows']:,}, "
        f"dead letters {result['dead_letters']:,}, lost {result['lost']:,}, counted twice "
        f"{result['counted_twice']:,}; aggregate rate "
        f"(per {result['sample_s']:g} s sample) median {s['readings_per_s_median'] or 0:,.0f}"
        f" readings/s (range {s['readings_per_s_min_max'] or '-'}).",
        "",
        "| worker | RSS at start | at 1 min | at the end | peak | slope after warm-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, w in s["workers"].items():
        at1 = f"{w['at_1_min_mb']:.0f} MB" if w["at_1_min_mb"] else "-"
        sl = w["slope_mb_per_min_after_warmup"]
        lines.append(
            f"| {stage} | {w['start_mb']:.0f} MB | {at1} | {w['end_mb']:.0f} MB | "
            f"{w['peak_mb']:.0f} MB | {'-' if sl is None else f'{sl:+.2f} MB/min'} |"
        )
    lines += ["", f"Broker (embedded, in memory) RSS at the end: {s['broker_rss_end_mb']:.0f} MB."]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the workers (repeatable)"
    )
    parser.add_argument("--name", default="soak", help="results file name (without suffix)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-soak-"))
    broker = start_embedded()
    bench = Bench(broker.bootstrap, broker_pid(), workdir)
    result: dict[str, Any] = {
        "environment": environment(),
        "commit": environment()["git_commit"],
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "minutes": args.minutes,
        "backlog": args.backlog,
        "sample_s": args.sample_s,
        "errors": [],
    }
    samples: list[dict[str, Any]] = []
    code = 0
    try:
        extra = dict(pair.split("=", 1) for pair in args.env)
        result["worker_env"] = extra
        run = start_ours(bench, 1, {**SOAK_ENV, **extra})
        children = list(run.children.values())
        wait_until(settled(bench, run), 240, "the stages to settle", 0.2, children)
        settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
        feeder = Feeder(bench, run.landing, run.groups[0][0], args.backlog)
        meter = CpuMeter({n: c.pid for n, c in run.children.items()}, bench.broker_pid)
        meter.start()
        t0 = time.monotonic()
        feeder.start()
        log(f"feeding for {args.minutes:g} min, {args.backlog:,} readings ahead of ingest")
        while time.monotonic() - t0 < args.minutes * 60:
            for child in children:
                child.check()
            samples.append(sample(run, feeder, t0, bench.broker_pid))
            last = samples[-1]
            log(
                f"{last['t_s']:.0f}s: sent {last['sent']:,}, aggregated {last['aggregated']:,.0f},"
                f" RSS {', '.join(f'{k} {v:.0f}' for k, v in last['rss_mb'].items() if v)} MB"
            )
            if feeder.error:
                raise BenchError(f"feeder: {feeder.error}")
            time.sleep(args.sample_s)
        feeder.stop()
        samples.append(sample(run, feeder, t0, bench.broker_pid))
        cpu = meter.stop()
        result["cpu_us_per_reading"] = {
            name: seconds / max(1, feeder.sent) * 1e6 for name, seconds in cpu["procs_s"].items()
        }
        result["sent"] = feeder.sent
        # drain, then close every window and count
        aggregate_in = run.groups[-1]
        tps = [(aggregate_in[1], p) for p in range(aggregate_in[2])]

        def drained() -> bool:
            done = committed_offsets(admin(settings), aggregate_in[0], tps, 5.0)
            end = ends(bench.bootstrap, aggregate_in[1], aggregate_in[2])
            return all((done.get(tp) or 0) >= e for tp, e in end.items()) and sum(end.values()) > 0

        wait_until(drained, 600, "the pipeline to drain", 1.0, children)
        closing, before = sentinels_after(feeder.last_ts)
        produce_all(settings, run.landing, ((k, v, None, None) for k, v in closing))
        counted = [0, 0]

        def complete() -> bool:
            counted[0] = counted_in_windows(bench, run, before)
            counted[1] = sum(sum(ends(bench.bootstrap, t, 1).values()) for t in run.dlqs)
            return counted[0] + counted[1] >= feeder.sent

        try:
            wait_until(complete, 180, "the windows to close", 3.0, children)
        except BenchError as exc:
            result["errors"].append(str(exc).splitlines()[0])
        result["in_windows"], result["dead_letters"] = counted
        result["dead_letter_topics"] = dead_letters(bench, run)
        result["lost"] = max(0, feeder.sent - counted[0] - counted[1])
        result["counted_twice"] = max(0, counted[0] - feeder.sent)
        stop_all(children)
        delete_topics(bench.bootstrap, run.topics)
    except BenchError as exc:
        log(f"soak failed: {exc}")
        result["errors"].append(str(exc).splitlines()[0])
        code = 1
    finally:
        stop_children()
        broker.stop()
    result["samples"] = samples
    if samples:
        result["summary"] = summarise(samples, args.minutes)
    result.setdefault("sent", 0)
    for key in ("in_windows", "dead_letters", "lost", "counted_twice"):
        result.setdefault(key, 0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if "summary" in result:
        text = markdown(result)
        (args.out / f"{args.name}.md").write_text(text)
        print(text)
    if code == 0 and not result["errors"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"logs kept in {workdir}")
        code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
