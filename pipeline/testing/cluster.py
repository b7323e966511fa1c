"""A whole topology on a real broker, for integration tests of your own stages.

:class:`TopologyCluster` takes a pipeline.yaml, gives every topic a prefix of its
own (so tests share a broker without sharing topics or consumer groups), creates
the topics, and runs each declared stage as a real ``pipeline run`` worker
process, exactly as production does. The broker is ``KAFKA_BOOTSTRAP_SERVERS`` if
set, else Kafka in Docker if an engine answers, else the embedded broker (the
``iot-pipeline[broker]`` extra)::

    from pipeline.testing import TopologyCluster

    def test_alerts(tmp_path):
        with TopologyCluster("pipeline.yaml", tmp_path) as cluster:
            cluster.produce("windows", [{"mean": 31.0}, {"mean": 20.0}])
            alerts = cluster.wait_for_records("alerts", 1)
            assert [a.json()["mean"] for a in alerts] == [31.0]

With pytest, the ``pipeline_topology`` fixture (``pipeline.testing.pytest_plugin``)
makes one per test and stops it after.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.embedded import BrokerHandle, free_port, resolve_broker
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.topics import check_topics, create_topics
from pipeline.records import to_bytes
from pipeline.settings import Settings, load_settings, namespaced
from pipeline.testing.memory import Produced

_counter = itertools.count()

#: what makes workers quick on a test broker (overridable with ``env``)
FAST = {
    "PIPELINE_RUNNER__SESSION_TIMEOUT_S": "6",
    "PIPELINE_RUNNER__COMMIT_INTERVAL_S": "0.5",
    "PIPELINE_RUNNER__FETCH_MAX_WAIT_MS": "100",
    "PIPELINE_RUNNER__LAG_INTERVAL_S": "0.5",
}


class TopologyCluster:
    """A pipeline.yaml's stages as worker processes on a real broker (see above)."""

    def __init__(
        self,
        config: str | Path,
        work_dir: str | Path,
        *,
        stages: Sequence[str] | None = None,
        bootstrap: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.source = Path(config).resolve()
        self.work_dir = Path(work_dir)
        self.only = stages
        self._bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        self.env = {**FAST, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.tag = f"c{os.getpid()}x{next(_counter)}"
        self.broker: BrokerHandle | None = None
        self.settings: Settings | None = None
        self.config_path: Path | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> TopologyCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.broker = resolve_broker(self._bootstrap)
        doc = namespaced(yaml.safe_load(self.source.read_text(encoding="utf-8")), self.tag)
        doc["paths"] = [str((self.source.parent / p).resolve()) for p in doc.get("paths", [])]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.work_dir / f"{self.tag}.yaml"
        self.config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        self.settings = load_settings(self.config_path, kafka_bootstrap_servers=self.bootstrap)
        check_topics(create_topics(self.settings, admin(self.settings)))
        for stage_id in self.only or self.settings.stage_ids:
            self.start_stage(stage_id)
        deadline = time.monotonic() + self.ready_timeout_s
        for stage_id in list(self.workers):
            while self._get(stage_id, "/readyz") != 200:
                if self.workers[stage_id].poll() is not None or time.monotonic() > deadline:
                    raise PipelineError(
                        f"stage {stage_id} did not become ready: {self.log(stage_id)[-800:]}"
                    )
                time.sleep(0.2)

    def start_stage(self, stage_id: str) -> None:
        assert self.config_path is not None
        port = self.ports[stage_id] = free_port()
        log = (self.work_dir / f"{self.tag}-{stage_id}.log").open("ab")
        self.workers[stage_id] = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", stage_id],
            env={
                **os.environ,
                **self.env,
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "PIPELINE_CONFIG": str(self.config_path),
                "PIPELINE_METRICS_PORT": str(port),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def stop(self, timeout: float = 30.0) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker is not None:
            self.broker.stop()

    # -- talking to it --------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        assert self.broker is not None, "start the cluster first"
        return self.broker.bootstrap

    def topic(self, name: str) -> str:
        """The cluster's name for pipeline.yaml's topic ``name``."""
        return f"{self.tag}.{name}"

    def produce(self, topic: str, values: Iterable[Any], key: Any = None) -> int:
        """Write ``values`` (bytes, str or JSON-able) to pipeline.yaml's ``topic`` and
        wait for the broker's acknowledgement."""
        assert self.settings is not None
        client = producer(self.settings)
        n = 0
        for value in values:
            client.produce(self.topic(topic), to_bytes(value), to_bytes(key))
            client.poll(0)
            n += 1
        if client.flush(30):
            raise PipelineError(f"records to {topic} were not acknowledged within 30 s")
        return n

    def read(self, topic: str) -> list[Produced]:
        """Every record of pipeline.yaml's ``topic`` so far."""
        assert self.settings is not None
        return [
            Produced(
                topic,
                m.partition() or 0,
                m.offset() or 0,
                m.key(),
                m.value(),
                _headers(m),
                m.timestamp()[1],
            )
            for m in read_topic(self.settings, self.topic(topic))
        ]

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = ""
    ) -> None:
        """Poll ``predicate`` until it holds; AssertionError (with the workers' logs)
        after ``timeout`` seconds, or at once if a worker died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [s for s, p in self.workers.items() if p.poll() is not None]
            if dead:
                raise AssertionError(f"stage {dead[0]} exited: {self.log(dead[0])[-1500:]}")
            time.sleep(0.3)
        logs = "\n".join(f"--- {s}\n{self.log(s)[-800:]}" for s in self.workers)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def wait_for_records(self, topic: str, count: int, timeout: float = 60.0) -> list[Produced]:
        """The records of ``topic`` once there are at least ``count``."""
        found: list[Produced] = []

        def enough() -> bool:
            found[:] = self.read(topic)
            return len(found) >= count

        self.wait_for(enough, timeout, f"{count} record(s) on {topic}")
        return found

    def dead_letters(self, stage_id: str) -> list[Produced]:
        assert self.settings is not None
        dlq = self.settings.stage(stage_id).dlq
        return self.read(dlq.removeprefix(f"{self.tag}."))

    def metrics_text(self, stage_id: str) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.ports[stage_id]}/metrics", timeout=2
        ) as response:
            return str(response.read().decode())

    def log(self, stage_id: str) -> str:
        path = self.work_dir / f"{self.tag}-{stage_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _get(self, stage_id: str, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports[stage_id]}{path}", timeout=2
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0


def _headers(message: Any) -> dict[str, bytes]:
    pairs: list[tuple[str, Any]] = list(message.headers() or [])
    return {k: v if isinstance(v, bytes) else b"" for k, v in pairs}
