"""Live readings at a steady rate and their latency at one topic (used by
``backfill.py``: live traffic beside a backfill run).

:class:`LatencyReader` reads a topic from its current end; per reading with
``seq`` ≥ ``seq_base``: seconds from its ``ts`` (set when it was produced) to its
arrival, once per lineage id. :func:`produce_at_rate` produces such readings.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from data import DEVICES, settings_ends
from procs import BenchError, log

from pipeline.demo.simulator import metric_of
from pipeline.kafka.clients import client_config, producer
from pipeline.kafka.produce import produce_or_wait
from pipeline.settings import Settings


class LatencyReader:
    """Reads ``topic`` from its current end; per reading of the run (``seq`` ≥
    ``seq_base``): seconds from its ``ts`` and from its ``ingest-ts`` header to now."""

    def __init__(self, settings: Settings, topic: str, seq_base: int) -> None:
        ends = settings_ends(settings, [topic])
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


def paced_readings(
    per_s: float,
    seconds: float,
    seq_base: int,
    between: Callable[[], None],
    devices: int = DEVICES,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Live readings (``ts`` = now when made) at ``per_s`` for ``seconds``, as
    (device name, reading), each when it is due; ``between()`` runs after each burst,
    before a 2 ms sleep (a producer's poll)."""
    rng = random.Random(11)
    seqs = [seq_base] * devices
    names = [f"dev-{i:04d}" for i in range(1, devices + 1)]
    shapes = [metric_of(name) for name in names]
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        due = int(per_s * elapsed)
        while sent < due:
            i = sent % devices
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
            yield names[i], doc
            sent += 1
        between()
        time.sleep(0.002)


def produce_at_rate(
    settings: Settings, topic: str, per_s: float, seconds: float, seq_base: int
) -> int:
    """Live readings (``ts`` = now when produced) at ``per_s`` for ``seconds``."""
    client = producer(settings)
    sent = 0
    for name, doc in paced_readings(per_s, seconds, seq_base, lambda: client.poll(0)):
        produce_or_wait(client, topic, orjson.dumps(doc), name.encode(), wait_s=0.01)
        sent += 1
    if client.flush(60):
        raise BenchError("live readings not acknowledged within 60 s")
    return sent
