"""Where a reading waits on its way from landing to the aggregate, per hop, at 10 %,
50 % and 90 % of the pipeline's sustained rate (our four workers, one per stage).

Readings are produced at a steady rate with ``ts`` = the time they are handed to the
producer; ingest derives the lineage id from it (a ULID whose time part is ``ts``),
so every lineage id names its reading's start. Each stage writes one lineage record
per batch after the batch's outputs were acknowledged (``pipeline/lineage/hops.py``),
with the stage's clock (``at``) and the batch's lineage ids: a reader of the lineage
topic learns, per reading, when each stage was done with it. A sampler of the
aggregate's committed offsets (every 50 ms) adds when its input offset was committed.

Hops of a reading (p50 and p99 over the readings of a level):

* ``ingest``: produced → ingest's outputs acknowledged (the landing produce, the fetch
  wait, queueing in the worker, the batch's work, its produce linger and acks);
* ``parse``, ``enrich``, ``aggregate``: the previous stage done → this one done (the
  same parts, starting when the record was appended to the stage's input);
* ``commit``: the aggregate done → its input offset committed (commit interval);
* for one reading in ten, the ingest hop split: ``landing`` (produced → the broker
  acknowledged it, the producer's linger and the broker's append) and
  ``ingest_after_landing`` (→ ingest done);
* ``to_enriched``, ``to_aggregate``, ``to_committed``: from produced, end to end.

Beside them, per stage, the mean time a batch spends being processed (stage work,
outputs and hops produced and acknowledged: ``pipeline_processing_duration_seconds``)
and the mean batch size: the rest of a hop is waiting (for a fetch, in a queue).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from live import paced_readings
from procs import BenchError, CpuMeter, log, metric_sum, percentile, scrape_text, wait_until

from pipeline.contract import lineage_id
from pipeline.kafka.offsets import committed_offsets, high_watermarks
from pipeline.kafka.produce import produce_or_wait

HOPS = ("ingest", "parse", "enrich", "aggregate", "commit")
#: the ingest hop split, for one reading in ten: produced → acknowledged by the broker,
#: then → ingest done
LANDING = ("landing", "ingest_after_landing")
TOTALS = ("to_enriched", "to_aggregate", "to_committed")
_CROCKFORD = {c: i for i, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}


def ulid_ms(lineage_id: str) -> int:
    """The time part of a ULID (its first ten characters), in ms."""
    value = 0
    for char in lineage_id[:10]:
        value = value * 32 + _CROCKFORD[char]
    return value


class LineageReader:
    """Per lineage id: when each stage was done with it (ms, the stage's clock), and
    for the aggregate's hops the input (partition, offset) they came from."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        config = {"bootstrap.servers": bootstrap}
        starts = high_watermarks(config, [(topic, p) for p in range(partitions)])
        self.consumer = Consumer(
            {
                **config,
                "group.id": f"bench-lineage-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
        self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        self.done: dict[str, dict[str, int]] = {}
        #: aggregate's input: (partition, offset, lineage id)
        self.aggregated: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lineage-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(num_messages=500, timeout=0.05):
                if msg.error() is not None:
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log(f"lineage reader: {msg.error().str()}")
                    continue
                doc = orjson.loads(msg.value() or b"{}")
                if doc.get("v") != 2:
                    continue
                stage, at = doc["stage"], int(doc["at"])
                partition = int(doc["in"][1])
                with self.lock:
                    for group in doc["groups"]:
                        ids = group["ids"].split(" ")
                        for lineage in ids:
                            self.done.setdefault(lineage, {}).setdefault(stage, at)
                        if stage == "aggregate" and "in_offsets" in group:
                            self.aggregated += [
                                (partition, int(o), lineage)
                                for o, lineage in zip(group["in_offsets"], ids, strict=False)
                            ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


class CommitSampler:
    """When the aggregate's committed offset passed each of its input offsets."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.client = AdminClient({"bootstrap.servers": bootstrap})
        self.group = group
        self.tps = [(topic, p) for p in range(partitions)]
        #: per partition: [(time ms, committed offset)] as it moved
        self.moves: dict[int, list[tuple[int, int]]] = {p: [] for p in range(partitions)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                committed = committed_offsets(self.client, self.group, self.tps, 5.0)
            except Exception:  # noqa: S112 - the group may not have committed yet
                continue
            now = int(time.time() * 1000)
            for (_, p), offset in committed.items():
                moves = self.moves[p]
                if offset is not None and (not moves or offset > moves[-1][1]):
                    moves.append((now, offset))

    def committed_at(self, partition: int, offset: int) -> int | None:
        for at, committed in self.moves[partition]:
            if committed > offset:
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def produce_at_rate(
    config: dict[str, Any],
    topic: str,
    per_s: float,
    seconds: float,
    landed: dict[str, int] | None = None,
) -> int:
    """Live readings (``ts`` = now when handed to the producer) at ``per_s``.
    ``landed``: for one reading in ten, its lineage id (as ingest derives it) → when
    the broker acknowledged it (ms): the landing hop."""
    from confluent_kafka import Producer

    client = Producer(config)

    def on_delivery(lineage: str) -> Any:
        def report(err: Any, msg: Any) -> None:
            if err is None and landed is not None:
                landed[lineage] = int(time.time() * 1000)

        return report

    sent = 0
    seq_base = int(time.time() * 1000)  # fresh per level: no repeats across levels
    for name, doc in paced_readings(per_s, seconds, seq_base, lambda: client.poll(0)):
        payload = orjson.dumps(doc)
        extra: dict[str, Any] = {}
        if landed is not None and sent % 10 == 0:
            digest = hashlib.blake2b(payload, digest_size=16).digest()
            lid = lineage_id(doc["ts"], name, str(doc["seq"]), digest)
            extra["on_delivery"] = on_delivery(lid)
        produce_or_wait(client, topic, payload, name.encode(), wait_s=0.01, **extra)
        sent += 1
    if client.flush(60):
        raise BenchError("latency run: readings not acknowledged within 60 s")
    return sent


def hop_times(
    done: dict[str, int], t0: int, committed: int | None, landed: int | None = None
) -> dict[str, float]:
    """A reading's hops and totals in seconds (those its stages reached)."""
    out: dict[str, float] = {}
    previous = t0
    if landed is not None and "ingest" in done:
        out["landing"] = (landed - t0) / 1000
        out["ingest_after_landing"] = (done["ingest"] - landed) / 1000
    for stage in ("ingest", "parse", "enrich", "aggregate"):
        at = done.get(stage)
        if at is None:
            return out
        out[stage] = (at - previous) / 1000
        previous = at
    out["to_enriched"] = (done["enrich"] - t0) / 1000
    out["to_aggregate"] = (done["aggregate"] - t0) / 1000
    if committed is not None:
        out["commit"] = (committed - done["aggregate"]) / 1000
        out["to_committed"] = (committed - t0) / 1000
    return out


def processing_means(ports: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per stage: sums and counts of the processing-duration histogram and consumed."""
    out = {}
    for stage, port in ports.items():
        text = scrape_text(port)
        out[stage] = {
            "seconds": metric_sum(text, "pipeline_processing_duration_seconds_sum") or 0.0,
            "batches": metric_sum(text, "pipeline_processing_duration_seconds_count") or 0.0,
            "records": metric_sum(text, "pipeline_records_consumed_total") or 0.0,
        }
    return out


def level(
    run: Any,
    bench: Any,
    reader: LineageReader,
    commits: CommitSampler,
    per_s: float,
    seconds: float,
    ports: dict[str, int],
) -> dict[str, Any]:
    """Readings at ``per_s`` for ``seconds``; their hops once they all got through.
    First 5 s of the same rate, not measured: the workers' first batches (lookups
    loaded, the garbage collector tuned) and the queues at their level."""
    produce_at_rate(run.producer_config, run.landing, per_s, 5.0)
    before = processing_means(ports)
    meter = CpuMeter({n: c.pid for n, c in run.children.items()}, bench.broker_pid)
    meter.start()
    start_ms = int(time.time() * 1000)
    landed: dict[str, int] = {}
    sent = produce_at_rate(run.producer_config, run.landing, per_s, seconds, landed)
    end_ms = int(time.time() * 1000)

    def mine() -> dict[str, dict[str, int]]:
        """This level's readings: ids of its time that ingest handled (a window's
        lineage id, made by the aggregate, may fall in the same time and must not
        count as a reading: it made the wait below end before the last readings
        were through, and they showed as "lost")."""
        with reader.lock:
            return {
                lid: dict(d)
                for lid, d in reader.done.items()
                if "ingest" in d and start_ms <= ulid_ms(lid) <= end_ms
            }

    def through() -> bool:
        readings = mine()
        return len(readings) >= sent and all("aggregate" in d for d in readings.values())

    try:
        wait_until(through, 90, f"the readings at {per_s:,.0f}/s to reach the aggregate", 0.5)
    except BenchError as exc:
        log(str(exc).splitlines()[0])
    time.sleep(1.5)  # the last commits
    cpu = meter.stop()
    after = processing_means(ports)
    readings = mine()
    with reader.lock:
        where = {lid: (p, o) for p, o, lid in reader.aggregated}
    samples: dict[str, list[float]] = {k: [] for k in (*HOPS, *LANDING, *TOTALS)}
    for lid, done in readings.items():
        at = where.get(lid)
        committed = commits.committed_at(*at) if at is not None else None
        for name, value in hop_times(done, ulid_ms(lid), committed, landed.get(lid)).items():
            samples[name].append(value)
    stages: dict[str, Any] = {}
    for stage in ports:
        a, b = before[stage], after[stage]
        batches = b["batches"] - a["batches"]
        stages[stage] = {
            "batch_processing_mean_s": (b["seconds"] - a["seconds"]) / batches if batches else None,
            "records_per_batch": (b["records"] - a["records"]) / batches if batches else None,
        }
    return {
        "rate_per_s": per_s,
        "seconds": seconds,
        "sent": sent,
        "reached_aggregate": len(samples["to_aggregate"]),
        "lost_before_aggregate": max(0, sent - len(samples["to_aggregate"])),
        "p50_s": {k: percentile(v, 0.50) for k, v in samples.items()},
        "p99_s": {k: percentile(v, 0.99) for k, v in samples.items()},
        "max_s": {k: max(v, default=None) for k, v in samples.items()},
        "stages": stages,
        "others_cores": cpu["others_cores"],
        "bench_cpu_s": cpu["bench_s"],
    }


def run_latency(
    bench: Any,
    max_rate: float,
    seconds: float,
    shares: tuple[int, ...] = (10, 50, 90),
    extra: dict[str, str] | None = None,
    variant: str = "defaults",
) -> dict[str, Any]:
    """Our four workers (one per stage) on fresh topics, then each load level in turn."""
    from data import delete_topics
    from e2e import settled, start_ours
    from procs import stop_all

    run = start_ours(bench, 1, extra)
    children = list(run.children.values())
    reader: LineageReader | None = None
    commits: CommitSampler | None = None
    levels: dict[str, Any] = {}
    try:
        wait_until(settled(bench, run), 240, "the latency run's workers", 0.2, children)
        reader = LineageReader(bench.bootstrap, *run.lineage)
        commits = CommitSampler(bench.bootstrap, *run.groups[-1])
        ports = {w.stage: w.port for w in run.workers}
        for share in shares:
            per_s = max(50.0, max_rate * share / 100)
            log(f"latency ({variant}): {share} % = {per_s:,.0f} readings/s for {seconds:.0f}s")
            try:
                levels[str(share)] = level(run, bench, reader, commits, per_s, seconds, ports)
            except BenchError as exc:
                levels[str(share)] = {"error": str(exc)}
            lv = levels[str(share)]
            if "p50_s" in lv:
                log(
                    f"latency {share} %: to aggregate p50 {lv['p50_s']['to_aggregate']} s, "
                    f"p99 {lv['p99_s']['to_aggregate']} s"
                )
    finally:
        if reader is not None:
            reader.close()
        if commits is not None:
            commits.close()
        stop_all(children)
    delete_topics(bench.bootstrap, run.topics)
    return {
        "variant": variant,
        "env": extra or {},
        "max_rate": max_rate,
        "seconds": seconds,
        "levels": levels,
    }
