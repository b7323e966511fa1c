"""Durable backfill run state, on a compacted topic (``backfill.runs_topic``).

Why a topic and not a state file: the controller runs as a Kubernetes Job whose
pod filesystem is gone when the pod is; ``status``, ``list`` and ``cancel`` run
from an operator's laptop or another pod; and the cluster already is the durable,
replicated store every other part of the pipeline trusts. Compaction keeps the
last record per key, so the topic stays as small as the number of runs.

Keys: ``run/<id>`` holds the :class:`RunState` (written only by the controller
that owns the run); ``cancel/<id>`` is a cancel request (written by ``backfill
cancel``), kept apart so that a checkpoint never overwrites a cancel.

A checkpoint is written after a chunk's records are acknowledged by the broker,
so a chunk marked done was sent in full; a chunk in flight when the controller
died is sent again in full on resume (its rows keep their lineage ids, and the
aggregate counts each once).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from confluent_kafka import Message

from pipeline.errors import ConfigError
from pipeline.kafka.clients import producer
from pipeline.kafka.offsets import read_topic
from pipeline.kafka.produce import produce_acked
from pipeline.records import Outgoing
from pipeline.settings import Settings

PLANNED, RUNNING, DRAINING, COMPLETE, FAILED, CANCELLED = (
    "PLANNED",
    "RUNNING",
    "DRAINING",
    "COMPLETE",
    "FAILED",
    "CANCELLED",
)
TERMINAL = frozenset({COMPLETE, FAILED, CANCELLED})


def compress(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as inclusive ``[first, last]`` ranges: small state for long runs."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def expand(ranges: Iterable[Iterable[int]]) -> Iterator[int]:
    for first, last in ranges:
        yield from range(first, last + 1)


@dataclass
class RunState:
    run_id: str
    state: str
    source: dict[str, Any]
    fingerprint: str
    entry_stage: str
    entry_topic: str
    chunk_size: int
    total_chunks: int
    total_rows: int
    rate: float
    openlineage_run_id: str
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: inclusive ranges of chunk indices whose rows were all acknowledged
    done: list[list[int]] = field(default_factory=list)
    rows_sent: int = 0
    #: rows the ingest code rejected (dead-lettered on its DLQ) or dropped as repeats
    rows_dead_lettered: int = 0
    rows_duplicate: int = 0
    #: per entry-topic partition: one past the highest offset produced
    end_offsets: dict[str, int] = field(default_factory=dict)
    #: how far the completion check got: the stage being waited for
    waiting_for: str | None = None
    #: end-of-input records sent to the aggregate's input, per partition offset
    end_markers: dict[str, int] = field(default_factory=dict)
    #: dead letters of this run by stage and reason (filled when the run ends)
    dead_letters: dict[str, dict[str, int]] = field(default_factory=dict)
    #: every DLQ partition's end when the run started, "topic:partition" -> offset: the
    #: run's dead letters are after it (its summary reads from there, not from 0)
    dlq_from: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    attempts: int = 1

    @property
    def done_chunks(self) -> set[int]:
        return set(expand(self.done))

    def mark_done(self, index: int) -> None:
        self.done = compress([*expand(self.done), index])

    @property
    def chunks_done(self) -> int:
        return sum(last - first + 1 for first, last in self.done)

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["chunks_done"] = self.chunks_done
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunState:
        doc = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**doc)


class RunStore:
    """Reads and writes run states and cancel requests on the runs topic."""

    def __init__(self, settings: Settings) -> None:
        topic = settings.backfill.runs_topic
        if topic is None:
            raise ConfigError(
                "backfill.runs_topic is not set in pipeline.yaml; declare the topic "
                "(compacted) and set it"
            )
        self.settings = settings
        self.topic = topic
        self._producer: Any = None

    def _latest(self) -> dict[str, bytes | None]:
        latest: dict[str, bytes | None] = {}
        messages: list[Message] = read_topic(self.settings, self.topic)
        for msg in messages:
            key = msg.key()
            if key is not None:
                latest[key.decode("utf-8", "replace")] = msg.value()
        return latest

    def runs(self) -> list[RunState]:
        """Every run, newest first; a pending cancel request shows as CANCELLED."""
        latest = self._latest()
        out = []
        for key, value in latest.items():
            if not key.startswith("run/") or not value:
                continue
            run = RunState.from_json(orjson.loads(value))
            if run.state not in TERMINAL and latest.get(f"cancel/{run.run_id}"):
                run.state, run.reason = CANCELLED, run.reason or "cancel requested"
            out.append(run)
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def get(self, run_id: str) -> RunState | None:
        latest = self._latest()
        value = latest.get(f"run/{run_id}")
        return RunState.from_json(orjson.loads(value)) if value else None

    def cancel_requested(self, run_id: str) -> bool:
        return bool(self._latest().get(f"cancel/{run_id}"))

    def save(self, run: RunState) -> None:
        run.updated_at = time.time()
        self._write(f"run/{run.run_id}", orjson.dumps(run.as_json()))

    def request_cancel(self, run_id: str) -> None:
        self._write(f"cancel/{run_id}", orjson.dumps({"at": time.time()}))

    def _write(self, key: str, value: bytes) -> None:
        if self._producer is None:
            self._producer = producer(self.settings)
        record: Outgoing = (self.topic, key.encode(), value, [], None)
        produce_acked(self._producer, [record], f"write backfill state to {self.topic}", timeout=30)
