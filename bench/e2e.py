"""Four stages end to end: ours (``pipeline run`` workers, 1, 2 or 4 per stage), the
same four stages in quixstreams, and as raw confluent-kafka loops (bench/paths4.py).

A run: fresh topics and groups; every process started and settled (our workers
ready, every stage's group STABLE) before anything is measured; then the backlog of
readings is produced to the landing topic and the run lasts until every stage's
group has committed the end of its input, checked in pipeline order (a stage's
outputs are acknowledged before it commits, so the next stage's end is final by
then). Records/s = readings ÷ that time; CPU = every stage process and the broker
over it. Then one reading per device far ahead in event time closes every window,
and the readings counted in the closed windows must equal the readings sent
(``lost``, ``counted_twice``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from benchlib import peak_rss_mb
from confluent_kafka import Producer
from data import (
    DEVICES,
    CommitWatch,
    create_plain_topics,
    delete_topics,
    ends,
    group_stable,
    own_topics,
    produce_all,
    run_config,
)
from paths4 import topics as peer_topics
from procs import (
    BENCH,
    REPO,
    BenchError,
    Child,
    CpuMeter,
    RssWatch,
    log,
    rate,
    ready,
    stop_all,
    wait_until,
)
from single import Bench, Worker, cpu_figures, start_workers

from pipeline.demo.registry import publish_registry
from pipeline.demo.simulator import SimRecord, metric_of
from pipeline.kafka.clients import producer_config
from pipeline.kafka.offsets import committed_offsets, high_watermarks, read_topic
from pipeline.settings import load_settings
from stages.enrich import read_registry_csv

STAGES = ("ingest", "parse", "enrich", "aggregate")
WINDOW_S, GRACE_S = 10, 2

#: what our workers run with in every end-to-end run (the latency runs too)
OUR_ENV = {
    "PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S": str(WINDOW_S),
    "PIPELINE_STAGES__AGGREGATE__CONFIG__ALLOWED_LATENESS_S": str(GRACE_S),
    "PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S": "2",
}


@dataclass
class Running:
    """A four-stage pipeline's processes and where to look at it."""

    kind: str
    landing: str
    aggregates: str
    #: per stage in pipeline order: (group, input topic, partitions)
    groups: list[tuple[str, str, int]]
    children: dict[str, Child]
    topics: list[str]
    workers: list[Worker] = field(default_factory=list)
    producer_config: dict[str, Any] = field(default_factory=dict)
    window_start_field: str = "window_start"
    #: (group, topic) a stage must have committed to the end before the run starts
    preloaded: list[tuple[str, str]] = field(default_factory=list)
    dlqs: list[str] = field(default_factory=list)
    lineage: tuple[str, int] = ("", 0)

    def stage_of(self, name: str) -> str:
        return next(s for s in STAGES if f"-{s}" in name)


def devices_csv() -> list[Any]:
    return read_registry_csv((REPO / "config" / "devices.csv").read_text())


def start_ours(bench: Bench, workers: int, extra: dict[str, str] | None = None) -> Running:
    tag = bench.tag(f"ours{workers}")
    config, settings = run_config(bench.workdir, bench.bootstrap, tag)
    publish_registry(settings, devices_csv())
    running: list[Worker] = []
    for stage in STAGES:
        running += start_workers(bench, stage, config, tag, workers, {**OUR_ENV, **(extra or {})})
    groups = []
    for stage in STAGES:
        topic = settings.stage(stage).inputs[0]
        groups.append((settings.group_id(stage), topic, settings.topics[topic].partitions))
    return Running(
        kind="ours",
        landing=settings.stages["ingest"].inputs[0],
        aggregates=settings.stages["aggregate"].output,
        groups=groups,
        children={w.child.name: w.child for w in running},
        topics=own_topics(settings),
        workers=running,
        producer_config=producer_config(settings),
        dlqs=[settings.stage(s).dlq for s in STAGES],
        lineage=(settings.lineage_topic, settings.topics[settings.lineage_topic].partitions),
    )


def start_peer(bench: Bench, kind: str) -> Running:
    """The quixstreams or raw four-stage pipeline (bench/paths4.py)."""
    tag = bench.tag(kind + "4")
    t = peer_topics(tag)
    one = {"parse.dlq", "enrich.dlq"}
    # quixstreams reads retention.ms of a source topic (for its changelogs): say it
    week = {"retention.ms": "604800000"}
    create_plain_topics(bench.bootstrap, [v for k, v in t.items() if k not in one], 4, week)
    create_plain_topics(bench.bootstrap, [t[k] for k in one], 1, week)
    # the registry, keyed by device id and partitioned as quixstreams' producer does
    # (its join needs both sides co-partitioned), stamped before every reading
    registry = Producer({"bootstrap.servers": bench.bootstrap, "partitioner": "murmur2"})
    for device in devices_csv():
        registry.produce(
            t["devices"], device.to_json(), device.device_id.encode(), timestamp=86_400_000
        )
    if registry.flush(30):
        raise BenchError("the registry was not acknowledged")
    children = {}
    env = {**os.environ, "PYTHONPATH": str(BENCH), "TMPDIR": str(bench.tmpdir)}
    for stage in STAGES:
        name = f"{tag}-{stage}"
        cmd = [sys.executable, str(BENCH / "paths4.py"), kind, stage, "--bootstrap"]
        cmd += [bench.bootstrap, "--tag", tag, "--window-s", str(WINDOW_S)]
        cmd += ["--grace-s", str(GRACE_S)]
        children[name] = Child(name, cmd, env, bench.workdir / f"{name}.log", events=True)
    inputs = {"ingest": "landing", "parse": "raw", "enrich": "parsed", "aggregate": "enriched"}
    return Running(
        kind=kind,
        landing=t["landing"],
        aggregates=t["aggregates"],
        groups=[(f"{tag}-{kind}-{s}", t[inputs[s]], 4) for s in STAGES],
        children=children,
        topics=list(t.values()),
        producer_config={"bootstrap.servers": bench.bootstrap},
        window_start_field="start" if kind == "quix" else "window_start",
        # quixstreams' join reads the registry topic beside the readings, in no set
        # order: like our enrich (which waits for its lookup), start once it is read
        preloaded=[(f"{tag}-{kind}-enrich", t["devices"])] if kind == "quix" else [],
        dlqs=[t["parse.dlq"], t["enrich.dlq"]],
    )


def settled(bench: Bench, run: Running) -> Callable[[], bool]:
    def check() -> bool:
        if run.workers and not all(ready(w.port) for w in run.workers):
            return False
        for group, topic in run.preloaded:
            watch = CommitWatch(bench.bootstrap, group, ends(bench.bootstrap, topic))
            if not watch.done():
                return False
        return all(group_stable(bench.bootstrap, g) for g, _, _ in run.groups)

    return check


class Progress:
    """Has every stage committed the end of its input? (checked in pipeline order)"""

    def __init__(self, bench: Bench, run: Running, expected_first: int) -> None:
        from confluent_kafka.admin import AdminClient

        self.client = AdminClient({"bootstrap.servers": bench.bootstrap})
        self.config = {"bootstrap.servers": bench.bootstrap}
        self.run = run
        self.expected_first = expected_first
        self.lag: dict[str, int] = {}

    def done(self) -> bool:
        for i, (group, topic, partitions) in enumerate(self.run.groups):
            tps = [(topic, p) for p in range(partitions)]
            try:
                committed = committed_offsets(self.client, group, tps, 5.0)
            except Exception:
                return False
            ends = high_watermarks(self.config, tps)
            done = sum(committed.get(tp) or 0 for tp in tps)
            if i == 0 and done < self.expected_first:
                self.lag[group] = self.expected_first - done
                return False
            behind = sum(max(0, end - (committed.get(tp) or 0)) for tp, end in ends.items())
            self.lag[group] = behind
            if behind:
                return False
        return True


def sentinels(records: list[SimRecord]) -> tuple[list[tuple[bytes, bytes]], int]:
    """One reading per device far ahead in event time of ``records`` (closes every
    earlier window), and the start of the window they fall in."""
    return sentinels_after(max(orjson.loads(r.value)["ts"] for r in records[-DEVICES:]))


def sentinels_after(last_ts: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """:func:`sentinels` for readings whose latest event time is ``last_ts``."""
    ts = last_ts + 10 * WINDOW_S * 1000
    out = []
    for i in range(1, DEVICES + 1):
        name = f"dev-{i:04d}"
        metric, unit, mean, _ = metric_of(name)
        doc = {"device_id": name, "ts": ts, "seq": 10**9, "metric": metric, "value": mean}
        out.append((name.encode(), orjson.dumps({**doc, "unit": unit})))
    return out, ts - ts % (WINDOW_S * 1000)


def counted_in_windows(bench: Bench, run: Running, before: int) -> int:
    settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
    total = 0
    for msg in read_topic(settings, run.aggregates, timeout=60):
        doc = orjson.loads(msg.value())
        if int(doc[run.window_start_field]) < before:
            total += int(doc["count"])
    return total


def dead_letters(bench: Bench, run: Running) -> dict[str, Any]:
    """Dead letters per DLQ topic, with the reason of the first (a run should have none)."""
    settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
    out: dict[str, Any] = {}
    for topic in run.dlqs:
        count = sum(ends(bench.bootstrap, topic, 1).values())
        if count:
            first = read_topic(settings, topic, timeout=30)[0]
            headers = {
                k: (v or b"")[:200].decode(errors="replace") for k, v in first.headers() or []
            }
            out[topic] = {"count": count, "first": headers}
    return out


def run_e2e(
    bench: Bench,
    kind: str,
    records: list[SimRecord],
    workers: int = 1,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One end-to-end run of ``kind`` (ours, quix, raw) on ``records``; ``extra``:
    environment of our workers."""
    run = start_ours(bench, workers, extra) if kind == "ours" else start_peer(bench, kind)
    children = list(run.children.values())
    rss = RssWatch({name: c.pid for name, c in run.children.items()})
    n = len(records)
    out: dict[str, Any] = {"kind": kind, "workers_per_stage": workers, "records": n}
    try:
        wait_until(settled(bench, run), 240, f"{kind}'s stages to settle", 0.2, children)
        meter = CpuMeter({name: c.pid for name, c in run.children.items()}, bench.broker_pid)
        meter.start()
        t0 = time.time()
        settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
        produce_all(settings, run.landing, ((r.key, r.value, None, None) for r in records))
        produced_s = time.time() - t0
        progress = Progress(bench, run, n)
        try:
            t_end = wait_until(
                progress.done, 120 + n / 1000, f"{kind}: every stage's commits", 0.1, children
            )
        except BenchError as exc:
            raise BenchError(f"{exc}\nlag by group: {progress.lag}") from None
        cpu = meter.stop()
        per_stage: dict[str, float] = {}
        for name, seconds in cpu["procs_s"].items():
            stage = run.stage_of(name)
            per_stage[stage] = per_stage.get(stage, 0.0) + seconds / n * 1e6
        out.update(
            {
                "produce_s": produced_s,
                "seconds": t_end - t0,
                "records_per_s": rate(n, t_end - t0),
                **cpu_figures(cpu, n),
                "stage_cpu_us_per_record": per_stage,
            }
        )
        log(
            f"e2e {kind} x{workers}: {out['records_per_s']:,.0f} readings/s, "
            f"{out['total_cpu_us_per_record']:.0f} µs CPU/reading"
        )

        # close every window and count what they hold
        closing, before = sentinels(records)
        settings = load_settings(kafka_bootstrap_servers=bench.bootstrap)
        produce_all(settings, run.landing, ((k, v, None, None) for k, v in closing))
        counted = [0]

        def complete() -> bool:
            counted[0] = counted_in_windows(bench, run, before)
            return counted[0] >= n

        try:
            wait_until(complete, 90, f"{kind}: the windows to close", 2.0, children)
        except BenchError as exc:
            log(str(exc).splitlines()[0])
        out["dead_letters"] = dead_letters(bench, run)
        out["readings_in_windows"] = counted[0]
        out["lost_records"] = max(0, n - counted[0])
        out["counted_twice"] = max(0, counted[0] - n)
        out["peak_rss_mb"] = {
            name: peak_rss_mb(c.pid) or rss.peak[name] for name, c in run.children.items()
        }
    finally:
        rss.stop()
        stop_all(children)
    delete_topics(bench.bootstrap, run.topics)
    return out
