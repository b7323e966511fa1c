"""Pieces of the history benchmarks (``lineage_trace.py``, ``dlq_summary.py``): a broker
per history size, an isolated pipeline on it, and tables.

Each size gets a fresh embedded broker (it keeps everything in memory; one per
size keeps the sizes apart), or the broker at ``KAFKA_BOOTSTRAP_SERVERS`` with a
fresh set of topics.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.kafka.clients import admin
from pipeline.kafka.embedded import resolve_broker
from pipeline.kafka.topics import create_topics
from pipeline.settings import Settings, load_settings, namespaced

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
T = TypeVar("T")


@contextmanager
def pipeline_on_fresh_broker(tag: str) -> Iterator[Settings]:
    """Settings of the built-in pipeline with topics of its own, created, on a broker
    of its own (unless KAFKA_BOOTSTRAP_SERVERS names one)."""
    handle = resolve_broker(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), allow_docker=False)
    try:
        raw = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
        doc = namespaced(raw, f"{tag}{os.getpid()}x{int(time.time())}")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipeline.yaml"
            path.write_text(yaml.safe_dump(doc))
            settings = load_settings(path, kafka_bootstrap_servers=handle.bootstrap)
            create_topics(settings, admin(settings))
            yield settings
    finally:
        handle.stop()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
