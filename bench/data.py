"""The benchmark's data and topics: isolated configurations, simulated readings, what
ingest makes of them, producing them, and reading where a group has got to.

Every measured run gets topics and consumer groups of its own (a config namespaced
by a tag, :func:`run_config`), so repeats never share state: a stage run twice on the
same group would start from the first run's commits, and an aggregate that restored
the first run's windows would drop the second run's readings as repeats. The inputs
prepared once (a million records) are shared: a run's stage reads the prepared topic.
Topics of a finished run are deleted (the embedded broker keeps everything in memory).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka.admin import AdminClient, NewTopic
from procs import REPO, BenchError

from pipeline.demo.simulator import SimRecord, generate
from pipeline.engine.build import build_engine, load_stage
from pipeline.kafka.clients import admin, client_config, producer
from pipeline.kafka.offsets import committed_offsets, high_watermarks
from pipeline.kafka.produce import produce_or_wait
from pipeline.kafka.topics import check_topics, create_topics
from pipeline.ops.rewind import group_state
from pipeline.records import Record
from pipeline.settings import Settings, load_settings, namespaced

DEVICES = 100
TP = tuple[str, int]
Outgoing = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None, int | None]


def pipeline_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    return doc


def run_config(
    workdir: Path, bootstrap: str, tag: str, inputs: Mapping[str, str] | None = None
) -> tuple[Path, Settings]:
    """config/pipeline.yaml with topics and groups of its own (``tag``), topics created.
    ``inputs``: stage id → an existing (prepared) topic the stage reads instead."""
    doc = namespaced(pipeline_doc(), tag)
    for stage, topic in (inputs or {}).items():
        spec = doc["stages"][stage]
        own = spec["inputs"][0]
        doc["topics"][topic] = dict(doc["topics"][own], external=True)
        spec["inputs"] = [topic]
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = load_settings(path, kafka_bootstrap_servers=bootstrap)
    check_topics(create_topics(settings, admin(settings)))
    return path, settings


def own_topics(settings: Settings) -> list[str]:
    return [name for name, spec in settings.topics.items() if not spec.external]


def create_plain_topics(
    bootstrap: str, names: Iterable[str], partitions: int, config: dict[str, str] | None = None
) -> None:
    client = AdminClient({"bootstrap.servers": bootstrap})
    topics = [NewTopic(n, partitions, -1, config=config or {}) for n in names]
    for future in client.create_topics(topics, request_timeout=15).values():
        future.result()


def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Best effort: a run's topics, to give the broker's memory back."""
    names = list(names)
    if not names:
        return
    client = AdminClient({"bootstrap.servers": bootstrap})
    for future in client.delete_topics(names, request_timeout=30).values():
        try:
            future.result()
        except Exception:  # noqa: S112 - already gone, or never created
            continue


def simulated(n: int, seed: int = 7) -> list[SimRecord]:
    """``n`` JSON readings from 100 devices, one per device per second of event time,
    ending an hour ago (so no window of them is still open when live readings come)."""
    span_ms = (n // DEVICES + 1) * 1000
    start = int(time.time() * 1000) - 3_600_000 - span_ms
    return list(
        generate(DEVICES, n, start_ms=start, csv_ratio=0.0, bad_ratio=0.0, dup_ratio=0.0, seed=seed)
    )


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
        produce_or_wait(client, topic, value, key, **kwargs)
        n += 1
        if n % 1000 == 0:
            client.poll(0)
    if client.flush(120):
        raise BenchError(f"producing to {topic}: records not acknowledged within 120 s")
    return n


def ends(bootstrap: str, topic: str, partitions: int = 4) -> dict[TP, int]:
    """End offsets from a Fetch response (ListOffsets is wrong on the embedded broker)."""
    config = {"bootstrap.servers": bootstrap}
    return high_watermarks(config, [(topic, p) for p in range(partitions)])


def settings_ends(settings: Settings, topics: Iterable[str]) -> dict[TP, int]:
    tps = [(t, p) for t in topics for p in range(settings.topics[t].partitions)]
    return high_watermarks(client_config(settings), tps)


class CommitWatch:
    """Is the group's committed offset at the end of every input partition?"""

    def __init__(self, bootstrap: str, group: str, ends: dict[TP, int]) -> None:
        self.client = AdminClient({"bootstrap.servers": bootstrap})
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


def group_stable(bootstrap: str, group: str) -> bool:
    """Has the group settled (STABLE: every member joined and was given partitions)?"""
    try:
        state, _ = group_state(AdminClient({"bootstrap.servers": bootstrap}), group, 5.0)
    except Exception:
        return False
    return state == "STABLE"
