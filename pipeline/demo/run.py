"""``pipeline demo``: the whole pipeline on one machine, start to finish.

Resolves a broker (the embedded one unless one is configured), creates topics,
loads the sample registry, starts each stage as its own worker process, runs the
simulator, shows live counts scraped from each worker's ``/metrics``, waits until
every reading is through and the last windows closed, writes the aggregates to
``OUT/aggregates.parquet`` and checks that every good reading is counted once.

Results also go out the way a deployment sends them: the built-in pipeline gets a
fifth stage for the demo, the framework's Parquet sink (``pipeline.sinks:parquet``),
which writes the windows to ``OUT/lake/`` (Hive directories by date and site), and
the demo checks that the lake holds every window once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.demo.registry import publish_registry
from pipeline.demo.senders import HttpSender, MqttSender, Sender
from pipeline.demo.simulator import run_simulator
from pipeline.edge.auth import token_digest
from pipeline.edge.mosquitto import Mosquitto, start_mosquitto
from pipeline.errors import ConfigError, PipelineError
from pipeline.kafka.clients import admin
from pipeline.kafka.embedded import BrokerHandle, free_port, resolve_broker
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.topics import check_topics, create_topics
from pipeline.settings import Settings, default_config_path, load_settings
from stages.enrich import read_registry_csv

AGGREGATE_COLUMNS = (
    "device_id",
    "metric",
    "site",
    "unit",
    "window_start",
    "window_end",
    "count",
    "min",
    "max",
    "mean",
    "first_ts",
    "last_ts",
    "first_lineage_id",
    "last_lineage_id",
)


@dataclass
class Worker:
    stage: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    counters: dict[str, float] = field(default_factory=dict)
    by_topic: dict[tuple[str, str], float] = field(default_factory=dict)

    def scrape(self) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                text = r.read().decode()
        except OSError:
            return
        counters: dict[str, float] = {}
        by_topic: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
                    if "topic" in sample.labels:
                        key = (sample.name, sample.labels["topic"])
                        by_topic[key] = by_topic.get(key, 0.0) + sample.value
        self.counters, self.by_topic = counters, by_topic

    def get(self, name: str, topic: str | None = None) -> int:
        if topic is None:
            return int(self.counters.get(name, 0.0))
        return int(self.by_topic.get((name, topic), 0.0))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _start_workers(
    settings: Settings, config_path: Path, window_s: int, log_dir: Path
) -> list[Worker]:
    workers = []
    for stage in settings.stage_ids:
        port = free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
            "PIPELINE_CONFIG": str(config_path),
            "PIPELINE_METRICS_PORT": str(port),
            "PIPELINE_METRICS_HOST": "127.0.0.1",
            "PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S": str(window_s),
            "PIPELINE_STAGES__AGGREGATE__CONFIG__ALLOWED_LATENESS_S": str(min(2, window_s)),
            "PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S": "2",
            "PIPELINE_RUNNER__SESSION_TIMEOUT_S": "6",
            "PIPELINE_RUNNER__FETCH_MAX_WAIT_MS": "100",
            # unknown devices: 3 quick attempts, so the demo's dead letters come soon
            "PIPELINE_STAGES__ENRICH__RETRY__MAX_ATTEMPTS": "3",
            "PIPELINE_STAGES__ENRICH__RETRY__BACKOFF_S": "0.5",
            "PIPELINE_LOG_LEVEL": os.environ.get("PIPELINE_LOG_LEVEL", "warning"),
        }
        log_path = log_dir / f"{stage}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", stage],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        workers.append(Worker(stage, port, proc, log_path))
    return workers


def _stop_workers(workers: list[Worker], timeout: float = 20.0) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _view(workers: list[Worker], sim: dict[str, Any], phase: str) -> Table:
    table = Table(
        title=f"IoT pipeline demo — {phase}", caption=f"simulator sent {sim.get('sent', 0)}"
    )
    for col in (
        "stage",
        "consumed",
        "produced",
        "dead letters",
        "duplicates",
        "windows",
        "metrics",
    ):  # windows: emitted by the aggregate, stored by the lake
        table.add_column(col, justify="right" if col not in ("stage", "metrics") else "left")
    for w in workers:
        table.add_row(
            w.stage,
            str(w.get("pipeline_records_consumed_total")),
            str(w.get("pipeline_records_produced_total")),
            str(w.get("pipeline_dlq_records_total")),
            str(w.get("pipeline_duplicates_dropped_total")),
            str(w.get("pipeline_windows_emitted_total") or w.get("pipeline_records_stored_total"))
            if w.stage in ("aggregate", LAKE)
            else "",
            f"http://127.0.0.1:{w.port}/metrics",
        )
    return table


def _drained(settings: Settings, workers: list[Worker], sent: int) -> bool:
    """Every stage consumed what the one before produced, and no retry is pending."""
    by = {w.stage: w for w in workers}
    consumed = "pipeline_records_consumed_total"
    upstream: str | None = None
    for stage in settings.stage_ids:
        spec = settings.stages[stage]
        want = sent if upstream is None else by[upstream].get("pipeline_records_produced_total")
        if sum(by[stage].get(consumed, t) for t in spec.inputs) < want:
            return False
        if spec.retry and by[stage].get(consumed, spec.retry.topic) < by[stage].get(
            "pipeline_retries_total"
        ):
            return False
        upstream = stage
    return True


def _start_door(
    settings: Settings, config: Path, via: str, out_dir: Path, log_dir: Path
) -> tuple[Worker, Sender, Mosquitto | None]:
    """The gateway (with a fresh token) or a Mosquitto and the bridge, as processes,
    ready; and the sender the simulator uses to reach them."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_LOG_LEVEL": os.environ.get("PIPELINE_LOG_LEVEL", "warning"),
    }
    mosquitto: Mosquitto | None = None
    sender_of: Callable[[], Sender]
    if via == "http":
        token = secrets.token_urlsafe(24)
        tokens = out_dir / "gateway-tokens"
        tokens.write_text(token_digest(token) + "\n")
        args = ["serve-http", "--port", str(port), "--tokens-file", str(tokens)]
        name, sender_of = "gateway", lambda: HttpSender(f"http://127.0.0.1:{port}", token)
    elif via == "mqtt":
        mosquitto = start_mosquitto(out_dir / "mosquitto")
        url = mosquitto.url
        args = ["bridge-mqtt", "--mqtt", url, "--topic", "devices/+/readings"]
        args += ["--client-id", "demo-bridge", "--metrics-port", str(port)]
        name, sender_of = "mqtt-bridge", lambda: MqttSender(url)
    else:
        raise ConfigError(f"--via {via!r}: choose kafka, http or mqtt")
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    door = Worker(name, port, proc, log_path)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise ConfigError(f"the {name} exited with {proc.returncode}: {door.log_tail(3)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"the {name} was not ready within 30 s: {door.log_tail(3)}")
        time.sleep(0.2)
    return door, sender_of(), mosquitto


#: the demo's Parquet sink stage (added to the built-in pipeline, see with_lake)
LAKE = "lake"


def with_lake(config: Path, settings: Settings, out_dir: Path) -> tuple[Path, Settings]:
    """The config plus a Parquet sink of the aggregate's windows into ``out_dir/lake``,
    written next to the outputs (the config itself is not changed). Configs without
    the built-in ``aggregate`` stage are returned as they are."""
    spec = settings.stages.get("aggregate")
    if spec is None or spec.output is None or LAKE in settings.stages:
        return config, settings
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    doc["paths"] = [str((config.parent / p).resolve()) for p in doc.get("paths", [])]
    dlq = f"{spec.output}.{LAKE}.dlq"
    doc["topics"][dlq] = {"partitions": 1}
    doc["stages"][LAKE] = {
        "uses": "pipeline.sinks:parquet",
        "inputs": [spec.output],
        "dlq": dlq,
        "config": {
            "path": str((out_dir / "lake").resolve()),
            "partition_by": ["date", "site"],
            "roll_s": 2,
        },
    }
    derived = out_dir / "pipeline.yaml"
    derived.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return derived, load_settings(derived, kafka_bootstrap_servers=settings.kafka_bootstrap_servers)


def lake_windows(path: Path) -> list[dict[str, Any]]:
    """The windows in the demo's lake (none before its first flush)."""
    if not path.exists():
        return []
    table = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    return list(table.to_pylist())


def write_aggregates(records: list[dict[str, Any]], path: Path) -> None:
    columns = {name: [r.get(name) for r in records] for name in AGGREGATE_COLUMNS}
    pq.write_table(pa.table(columns), path)


def run_demo(
    settings: Settings,
    *,
    config_path: str | None,
    duration: float,
    devices: int,
    rate: float,
    bad_ratio: float,
    window_s: int,
    out_dir: Path,
    via: str = "kafka",
) -> int:
    """The demo; ``via`` is how the simulator's readings get in: ``kafka`` (a
    producer), ``http`` (the gateway) or ``mqtt`` (a Mosquitto and the bridge)."""
    console = Console(stderr=True)
    config = Path(config_path).resolve() if config_path else default_config_path().resolve()
    registry_csv = config.parent / "devices.csv"
    if not registry_csv.exists():
        raise ConfigError(
            f"sample registry {registry_csv} is missing; it ships next to pipeline.yaml"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    started = time.monotonic()
    shutil.rmtree(out_dir / "lake", ignore_errors=True)  # a lake of an earlier run
    results = settings.topology.final_topics()  # what the pipeline ends in (no sink)
    config, settings = with_lake(config, settings, out_dir)
    broker: BrokerHandle = resolve_broker(settings.kafka_bootstrap_servers)
    console.print(f"broker: {broker.kind} at {broker.bootstrap}")
    workers: list[Worker] = []
    stop = threading.Event()
    sim: dict[str, Any] = {}
    mosquitto: Mosquitto | None = None
    try:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap})
        check_topics(create_topics(settings, admin(settings)))
        publish_registry(settings, read_registry_csv(registry_csv.read_text(encoding="utf-8")))
        workers = _start_workers(settings, config, window_s, log_dir)
        console.print(
            f"workers: {', '.join(f'{w.stage} (pid {w.proc.pid})' for w in workers)}; "
            f"logs in {log_dir}"
        )
        sender: Sender | None = None
        if via != "kafka":
            door, sender, mosquitto = _start_door(settings, config, via, out_dir, log_dir)
            workers.insert(0, door)  # watched and stopped like the workers
            console.print(f"readings go in through {via}: {door.stage} (pid {door.proc.pid})")

        def simulate() -> None:
            try:
                sim.update(
                    run_simulator(
                        settings,
                        devices=devices,
                        rate=rate,
                        duration=duration,
                        bad_ratio=bad_ratio,
                        stop=stop.is_set,
                        on_progress=lambda n: sim.__setitem__("sent", n),
                        sender=sender,
                    )
                )
            except PipelineError as exc:
                sim["error"] = str(exc)
            finally:
                sim["done"] = True

        thread = threading.Thread(target=simulate, name="simulator", daemon=True)
        thread.start()
        wait_after_drain = window_s + min(2, window_s) + 2 + 2
        drained_at: float | None = None
        last_windows = -1
        phase = "running"
        deadline = time.monotonic() + duration + 180
        # A live table on a terminal; elsewhere (CI, pipes) a progress line every 5 s.
        live = Live(
            _view(workers, sim, phase), console=console, auto_refresh=False, transient=False
        )
        with live if console.is_terminal else contextlib.nullcontext():
            next_plain = 0.0
            while True:
                time.sleep(0.5)
                for w in workers:
                    if w.proc.poll() is not None:
                        console.print(
                            f"[red]stage {w.stage} exited with code {w.proc.returncode}[/]"
                        )
                        console.print(w.log_tail())
                        return 1
                    w.scrape()
                if console.is_terminal:
                    live.update(_view(workers, sim, phase), refresh=True)
                elif time.monotonic() >= next_plain:
                    next_plain = time.monotonic() + 5
                    console.print(
                        " | ".join(
                            f"{w.stage}: {w.get('pipeline_records_consumed_total')}"
                            for w in workers
                        )
                        + f" | sent {sim.get('sent', 0)}"
                    )
                if "error" in sim:
                    console.print(f"[red]simulator failed: {sim['error']}[/]")
                    return 1
                if sim.get("done"):
                    phase = "draining"
                    if drained_at is None and _drained(
                        settings, workers, int(sim["sent"]) - int(sim.get("not_sendable", 0))
                    ):
                        drained_at = time.monotonic()
                        phase = "closing the last windows"
                    windows = sum(w.get("pipeline_windows_emitted_total") for w in workers)
                    if windows != last_windows and drained_at is not None:
                        last_windows = windows
                        drained_at = max(drained_at, time.monotonic() - wait_after_drain / 2)
                    if drained_at is not None and time.monotonic() - drained_at >= wait_after_drain:
                        break
                if time.monotonic() > deadline:
                    console.print("[red]the pipeline did not drain in time; see the logs[/]")
                    return 1
            if console.is_terminal:
                live.update(_view(workers, sim, "done"), refresh=True)
        aggregates = [
            orjson.loads(m.value() or b"null")
            for topic in results
            for m in read_topic(settings, topic)
        ]
        write_aggregates(aggregates, out_dir / "aggregates.parquet")
        counted = sum(a["count"] for a in aggregates)
        lake: list[dict[str, Any]] = []
        if LAKE in settings.stages:  # the sink flushes every 2 s: wait for the last one
            lake_deadline = time.monotonic() + 30
            while time.monotonic() < lake_deadline:
                lake = lake_windows(out_dir / "lake")
                if len(lake) >= len(aggregates):
                    break
                time.sleep(0.5)
        summary = {
            "broker": broker.kind,
            "sent": sim.get("sent", 0),
            "good_readings": sim.get("good", 0),
            "exact_repeats_sent": sim.get("duplicate", 0),
            "via": via,
            "poison_sent": {
                k: v for k, v in sim.items() if k not in ("sent", "good", "duplicate", "done")
            },
            "dead_letters": {w.stage: w.get("pipeline_dlq_records_total") for w in workers},
            "windows": len(aggregates),
            "readings_in_windows": counted,
            "lake_windows": len(lake),
            "lake_readings": sum(int(w["count"]) for w in lake),
            "seconds": round(time.monotonic() - started, 1),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print(json.dumps(summary, indent=2))
        if counted != sim.get("good", 0):
            console.print(
                f"[red]accounting mismatch: {counted} readings in windows, "
                f"{sim.get('good', 0)} good readings sent[/]"
            )
            return 1
        if LAKE in settings.stages and (len(lake), summary["lake_readings"]) != (
            len(aggregates),
            counted,
        ):
            console.print(
                f"[red]the lake holds {len(lake)} windows of {summary['lake_readings']} "
                f"readings; the aggregates topic {len(aggregates)} of {counted}[/]"
            )
            return 1
        lake_note = f" and the lake {out_dir / 'lake'}" if LAKE in settings.stages else ""
        console.print(
            f"[green]ok[/]: {len(aggregates)} windows, every good reading counted once; "
            f"wrote {out_dir / 'aggregates.parquet'}{lake_note}"
        )
        return 0
    except KeyboardInterrupt:
        console.print("interrupted; stopping the workers")
        return 130
    finally:
        stop.set()
        _stop_workers(workers)
        if mosquitto is not None:
            mosquitto.stop()
        broker.stop()
