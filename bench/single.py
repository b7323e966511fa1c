"""One stage's worth of work: the comparison paths (one process each) and our stages
alone (``pipeline run STAGE``, one or more workers), each on a prepared input topic.

Records/s of a run: records ÷ (time its group's committed offsets reach the end of
the input - start). The start is the first consumed record for a one-process path;
for our workers it is the moment every worker answers /readyz and the group is
STABLE (records consumed before that are subtracted), so a second worker's join and
its rebalance are not in the figure. CPU: every measured process (all its threads)
and the broker, from /proc, over the same interval (:class:`procs.CpuMeter`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import peak_rss_mb
from data import (
    CommitWatch,
    create_plain_topics,
    delete_topics,
    ends,
    group_stable,
    own_topics,
    run_config,
    settings_ends,
)
from procs import (
    BENCH,
    BenchError,
    Child,
    CpuMeter,
    metric_sum,
    rate,
    ready,
    scrape_text,
    stop_all,
    thread_cpu,
    wait_until,
)
from profiling import Profiler

from pipeline.demo.registry import publish_registry
from pipeline.kafka.embedded import free_port
from pipeline.settings import Settings
from stages.enrich import read_registry_csv

CONSUMED = "pipeline_records_consumed_total"


@dataclass
class Bench:
    """What every run needs: where the broker is, where logs go, the options."""

    bootstrap: str
    broker_pid: int | None
    workdir: Path
    profile_dir: Path | None = None
    counter: dict[str, int] = field(default_factory=dict)

    @property
    def tmpdir(self) -> Path:
        path = self.workdir / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def tag(self, name: str) -> str:
        """A fresh namespace for a run of ``name`` (its topics and groups)."""
        n = self.counter[name] = self.counter.get(name, 0) + 1
        return f"{name.replace('_', '')}{n}x{os.getpid()}"

    def profiler(self, pid: int, name: str) -> Profiler | None:
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return Profiler(pid, self.profile_dir / f"profile-{name}.txt")


def timeout_for(records: int, slowest_rate: float) -> float:
    return 120.0 + records / slowest_rate


def cpu_figures(cpu: dict[str, Any], records: int) -> dict[str, Any]:
    """CPU µs per record: the path's processes, the broker, both (the primary figure)."""
    path_us = cpu["path_s"] / records * 1e6
    broker_us = cpu["broker_s"] / records * 1e6
    return {
        "cpu_us_per_record": path_us,
        "broker_cpu_us_per_record": broker_us,
        "total_cpu_us_per_record": path_us + broker_us,
        "others_cores": cpu["others_cores"],
        "bench_cpu_s": cpu["bench_s"],
    }


def run_path(bench: Bench, name: str, path: str, source: str) -> dict[str, Any]:
    """One comparison path (bench/paths.py: raw, quix, naive) as its own process."""
    tag = bench.tag(name)
    out_topic, group = f"{tag}.out", f"{tag}-group"
    create_plain_topics(bench.bootstrap, [out_topic], 4)
    input_ends = ends(bench.bootstrap, source)
    total = sum(input_ends.values())
    cmd = [sys.executable, str(BENCH / "paths.py"), path, "--bootstrap", bench.bootstrap]
    cmd += ["--input", source, "--output", out_topic, "--group", group, "--records", str(total)]
    env = {**os.environ, "PYTHONPATH": str(BENCH), "TMPDIR": str(bench.tmpdir)}
    child = Child(tag, cmd, env, bench.workdir / f"{tag}.log", events=True)
    try:
        wait_until(
            lambda: "first" in child.events, 120, f"{name} to start consuming", 0.02, [child]
        )
        t0 = child.events["first"]["t"]
        meter = CpuMeter({name: child.pid}, bench.broker_pid)
        meter.start()
        profiler = bench.profiler(child.pid, name)
        watch = CommitWatch(bench.bootstrap, group, input_ends)
        timeout = timeout_for(total, 500.0 if path == "naive" else 3000.0)
        t_end = wait_until(watch.done, timeout, f"{name}'s commits to reach the end", 0.1, [child])
        cpu = meter.stop()
        peak = peak_rss_mb(child.pid)
        profile = profiler.stop() if profiler else None
        wait_until(lambda: "done" in child.events, 10, f"{name}'s done line", 0.05)
        done = child.events["done"]
    finally:
        child.stop()
    output_records = sum(ends(bench.bootstrap, out_topic).values())
    delete_topics(bench.bootstrap, [out_topic])
    return {
        **({"profile": profile} if profile else {}),
        "records": total,
        "output_records": output_records,
        "seconds": t_end - t0,
        "records_per_s": rate(total, t_end - t0),
        "processed_records_per_s": rate(total, done["t"] - t0),
        **cpu_figures(cpu, total),
        "peak_rss_mb": peak or done.get("peak_rss_mb"),
    }


def worker_env(bench: Bench, config: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bench.bootstrap,
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_METRICS_PORT": str(port),
        "PIPELINE_METRICS_HOST": "127.0.0.1",
        "PIPELINE_RUNNER__SESSION_TIMEOUT_S": "6",
        # the default level; at warning Faust's terminal spinner sets the root
        # logger to DEBUG (see bench/paths.py)
        "PIPELINE_LOG_LEVEL": "info",
        "PIPELINE_OPENLINEAGE__TRANSPORT": "none",
        "TMPDIR": str(bench.tmpdir),  # Faust's datadir: removed with the workdir
        **extra,
    }


@dataclass
class Worker:
    stage: str
    child: Child
    port: int


def start_workers(
    bench: Bench,
    stage: str,
    config: Path,
    tag: str,
    count: int,
    extra: dict[str, str] | None = None,
) -> list[Worker]:
    workers = []
    for i in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "pipeline.cli", "run", stage]
        env = worker_env(bench, config, port, extra or {})
        name = f"{tag}-{stage}-{i}"
        workers.append(Worker(stage, Child(name, cmd, env, bench.workdir / f"{name}.log"), port))
    return workers


def settled(bench: Bench, settings: Settings, workers: list[Worker]) -> Callable[[], bool]:
    """Every worker ready and every stage's group STABLE (no rebalance under way)."""
    groups = {settings.group_id(w.stage) for w in workers}

    def check() -> bool:
        return all(ready(w.port) for w in workers) and all(
            group_stable(bench.bootstrap, g) for g in groups
        )

    return check


def consumed(workers: list[Worker], match: str = "") -> float:
    return sum(metric_sum(scrape_text(w.port), CONSUMED, match) or 0.0 for w in workers)


def run_stage_alone(
    bench: Bench,
    stage: str,
    source: str,
    workers: int = 1,
    name: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``pipeline run STAGE`` (``workers`` of them) on a prepared input, until the
    group's commits reach its end."""
    name = name or stage
    tag = bench.tag(name)
    config, settings = run_config(bench.workdir, bench.bootstrap, tag, {stage: source})
    if settings.stage(stage).lookups:
        devices = read_registry_csv((Path(BENCH).parent / "config" / "devices.csv").read_text())
        publish_registry(settings, devices)
    spec = settings.stage(stage)
    input_ends = settings_ends(settings, spec.inputs)
    total = sum(input_ends.values())
    if total == 0:
        raise BenchError(f"stage {stage}: its input {list(spec.inputs)} is empty")
    group = settings.group_id(stage)
    running = start_workers(bench, stage, config, tag, workers, extra)
    children = [w.child for w in running]
    try:
        t0 = wait_until(settled(bench, settings, running), 180, f"{name}'s workers", 0.05, children)
        c0 = consumed(running)
        meter = CpuMeter({w.child.name: w.child.pid for w in running}, bench.broker_pid)
        meter.start()
        threads0 = thread_cpu(running[0].child.pid)
        profiler = bench.profiler(running[0].child.pid, name) if workers == 1 else None
        watch = CommitWatch(bench.bootstrap, group, input_ends)
        processed_at: list[float] = []

        def finished() -> bool:
            if not processed_at and consumed(running) >= total:
                processed_at.append(time.time())
            return watch.done()

        t_end = wait_until(
            finished, timeout_for(total, 1000.0), f"{name}'s commits to reach the end", 0.1
        )
        cpu = meter.stop()
        threads1 = thread_cpu(running[0].child.pid)
        peak = max(peak_rss_mb(c.pid) or 0.0 for c in children)
        profile = profiler.stop() if profiler else None
        batches = sum(
            metric_sum(scrape_text(w.port), "pipeline_processing_duration_seconds_count") or 0.0
            for w in running
        )
    finally:
        stop_all(children)
    counted = total - c0
    output_records = sum(settings_ends(settings, [spec.output]).values())
    delete_topics(bench.bootstrap, own_topics(settings))
    return {
        **({"profile": profile} if profile else {}),
        "workers": workers,
        "records": total,
        "counted_records": counted,
        "output_records": output_records,
        "seconds": t_end - t0,
        "records_per_s": rate(counted, t_end - t0),
        "processed_records_per_s": rate(counted, processed_at[0] - t0) if processed_at else None,
        **cpu_figures(cpu, int(counted)),
        "peak_rss_mb": peak,
        "records_per_batch": total / batches if batches else None,
        # where one worker's CPU went, µs per record it counted, by thread name
        "thread_cpu_us_per_record": {
            name: round((threads1[name] - threads0.get(name, 0.0)) * workers / counted * 1e6, 2)
            for name in threads1
        }
        if counted
        else None,
    }
