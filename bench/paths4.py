"""The four-stage peers of our pipeline, one process per stage, run by ``e2e.py``.

``python bench/paths4.py {quix|raw} STAGE --bootstrap B --tag T [--window-s 10 --grace-s 2]``

Topics (``T.`` + name): ``landing`` → ingest → ``raw`` → parse → ``parsed`` →
enrich → ``enriched`` → aggregate → ``aggregates``; ``parse.dlq``, ``enrich.dlq``;
``devices`` (the registry, keyed by device id). The same work as ours:

* ingest: reads the device id and seq, drops a repeated (device, seq) within a
  bounded in-memory window (as ours: not kept across restarts), keys by device, adds
  a lineage id and an ingest time as headers;
* parse: parse's own decode and validation (``stages.parse``); a bad reading goes to
  the DLQ topic with its reason in a header;
* enrich: joins the device registry (site, type, unit, calibration); an unknown
  device goes to the DLQ topic;
* aggregate: event-time tumbling windows per device with a grace period, emitted once
  when they close (count, min, max, mean, site, unit).

``quix``: quixstreams as its documentation shows it: JSON (de)serialisers, branches
for the DLQ, ``join_asof`` against the registry topic (state in RocksDB),
``tumbling_window(...).agg(...).final()`` with changelog topics (as our aggregate
keeps its windows in a changelog), commit interval 1 s, at-least-once.

``raw``: confluent-kafka loops (consume a batch of up to 2000, work, produce, await
every ack, commit): the ceiling for four Python processes. No lineage hops, no
traceparent, no metrics, no dead-letter budget, windows in memory only.

Prints JSON event lines (``ready``, ``first``) like ``paths.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from benchlib import emit, enrich_reading, parse_reading, parse_validator, path_main

from pipeline import contract

BATCH = 2000
DEDUP_MAX = 200_000


def topics(tag: str) -> dict[str, str]:
    names = ("landing", "raw", "parsed", "enriched", "aggregates", "parse.dlq", "enrich.dlq")
    return {n: f"{tag}.{n}" for n in (*names, "devices")}


class Dedup:
    """(device id, seq) pairs seen lately, at most DEDUP_MAX, oldest forgotten first."""

    def __init__(self) -> None:
        self.seen: OrderedDict[tuple[str, Any], None] = OrderedDict()

    def repeat(self, device: str, seq: Any) -> bool:
        key = (device, seq)
        if key in self.seen:
            return True
        self.seen[key] = None
        if len(self.seen) > DEDUP_MAX:
            self.seen.popitem(last=False)
        return False


def lineage_of(doc: dict[str, Any]) -> str:
    return contract.lineage_id(doc.get("ts") or 0, doc.get("device_id"), doc.get("seq"))


# -- raw confluent-kafka loops ---------------------------------------------------------

Out = tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]


def raw_loop(args: argparse.Namespace, source: str, work: Callable[[Any], list[Out]]) -> None:
    from confluent_kafka import Consumer, Producer

    from pipeline.kafka.clients import producer_config
    from pipeline.settings import load_settings

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"{args.tag}-raw-{args.stage}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 100,
        }
    )
    producer = Producer(producer_config(load_settings(kafka_bootstrap_servers=args.bootstrap)))
    consumer.subscribe([source])
    emit("ready")
    first = True
    produce = producer.produce
    while True:
        messages = consumer.consume(num_messages=BATCH, timeout=0.5)
        if not messages:
            continue
        if first:
            emit("first")
            first = False
        for msg in messages:
            if msg.error() is not None:
                continue
            for topic, key, value, headers in work(msg):
                while True:
                    try:
                        produce(topic, value, key, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.01)
        if producer.flush(60):  # every output acknowledged before the commit
            raise SystemExit("raw: outputs not acknowledged within 60 s")
        consumer.commit(asynchronous=True)


def read_registry(bootstrap: str, topic: str) -> dict[bytes, dict[str, Any]]:
    """The registry topic, read until it has been idle for a second."""
    from confluent_kafka import Consumer

    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"registry-{os.getpid()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([topic])
    out: dict[bytes, dict[str, Any]] = {}
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.0 or not out:
        msg = reader.poll(0.1)
        if msg is None or msg.error() is not None:
            continue
        idle_since = time.monotonic()
        out[msg.key()] = orjson.loads(msg.value())
    reader.close()
    return out


def run_raw(args: argparse.Namespace) -> None:
    t = topics(args.tag)
    stage = args.stage
    if stage == "ingest":
        dedup = Dedup()

        def ingest(msg: Any) -> list[Out]:
            value = msg.value()
            try:
                doc = orjson.loads(value)
                device, seq = doc["device_id"], doc["seq"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return [(t["raw"], msg.key(), value, msg.headers())]  # parse dead-letters it
            if dedup.repeat(device, seq):
                return []
            headers = [
                ("lineage-id", lineage_of(doc).encode()),
                ("ingest-ts", str(int(time.time() * 1000)).encode()),
            ]
            return [(t["raw"], device.encode(), value, headers)]

        raw_loop(args, t["landing"], ingest)
    elif stage == "parse":
        validator = parse_validator()
        from stages.parse import reading_json

        def parse(msg: Any) -> list[Out]:
            fields = parse_reading(msg.value(), validator, int(time.time() * 1000))
            headers = msg.headers() or []
            if isinstance(fields, str):
                return [(t["parse.dlq"], msg.key(), msg.value(), [*headers, ("reason", fields)])]
            return [(t["parsed"], msg.key(), reading_json(*fields), headers)]

        raw_loop(args, t["raw"], parse)
    elif stage == "enrich":
        registry = read_registry(args.bootstrap, t["devices"])

        def enrich(msg: Any) -> list[Out]:
            reading = orjson.loads(msg.value())
            device = registry.get(msg.key())
            if device is None:
                reason = [*(msg.headers() or []), ("reason", b"unknown_device")]
                return [(t["enrich.dlq"], msg.key(), msg.value(), reason)]
            doc = enrich_reading(reading, device)
            return [(t["enriched"], msg.key(), orjson.dumps(doc), msg.headers())]

        raw_loop(args, t["parsed"], enrich)
    elif stage == "aggregate":
        windows = Windows(args.window_s * 1000, args.grace_s * 1000)

        def aggregate(msg: Any) -> list[Out]:
            doc = orjson.loads(msg.value())
            closed = windows.add(msg.partition(), msg.key(), doc)
            return [(t["aggregates"], key, orjson.dumps(w), None) for key, w in closed]

        raw_loop(args, t["enriched"], aggregate)


class Windows:
    """Tumbling event-time windows per key, closed once a partition's newest reading
    is past their end plus the grace period (in memory: the ceiling keeps no state)."""

    def __init__(self, size_ms: int, grace_ms: int) -> None:
        self.size, self.grace = size_ms, grace_ms
        self.open: dict[int, dict[tuple[bytes, int], dict[str, Any]]] = {}
        self.watermark: dict[int, int] = {}

    def add(self, partition: int, key: bytes, doc: dict[str, Any]) -> list[tuple[bytes, Any]]:
        ts, value = int(doc["ts"]), float(doc["value"])
        start = ts - ts % self.size
        mark = max(self.watermark.get(partition, 0), ts - self.grace)
        self.watermark[partition] = mark
        windows = self.open.setdefault(partition, {})
        if start + self.size > mark:
            w = windows.get((key, start))
            if w is None:
                windows[(key, start)] = {
                    "device_id": doc["device_id"],
                    "window_start": start,
                    "window_end": start + self.size,
                    "count": 1,
                    "min": value,
                    "max": value,
                    "sum": value,
                    "site": doc.get("site"),
                    "unit": doc.get("unit"),
                }
            else:
                w["count"] += 1
                w["sum"] += value
                w["min"] = min(w["min"], value)
                w["max"] = max(w["max"], value)
        closed = [k for k in windows if k[1] + self.size <= mark]
        out = []
        for k in closed:
            w = windows.pop(k)
            w["mean"] = w.pop("sum") / w["count"]
            out.append((k[0], w))
        return out


# -- quixstreams -----------------------------------------------------------------------


def run_quix(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Latest, Max, Mean, Min

    t = topics(args.tag)
    stage = args.stage
    first = [True]

    def on_processed(topic: str, partition: int, offset: int) -> None:
        if first[0]:
            emit("first")
            first[0] = False

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"{args.tag}-quix-{stage}",
        auto_offset_reset="earliest",
        commit_interval=1.0,
        loglevel="WARNING",
        use_changelog_topics=True,
        auto_create_topics=True,
        state_dir=tempfile.mkdtemp(prefix="bench-quix4-"),
        consumer_extra_config={"session.timeout.ms": 6000, "fetch.wait.max.ms": 100},
        on_message_processed=on_processed,
    )
    if stage == "ingest":
        dedup = Dedup()
        source = app.topic(t["landing"], key_deserializer="bytes", value_deserializer="json")
        sink = app.topic(t["raw"], key_serializer="bytes", value_serializer="json")

        def ingest(value: Any) -> Any:
            device, seq = value.get("device_id"), value.get("seq")
            if isinstance(device, str) and seq is not None and dedup.repeat(device, seq):
                return None
            return value

        def headers(value: Any, key: Any, timestamp: int, old: Any) -> Any:
            now = str(int(time.time() * 1000)).encode()
            return [("lineage-id", lineage_of(value).encode()), ("ingest-ts", now)]

        sdf = app.dataframe(source).apply(ingest).filter(lambda v: v is not None)
        sdf = sdf.set_headers(headers)
        sdf.to_topic(sink)
    elif stage == "parse":
        validator = parse_validator()
        source = app.topic(t["raw"], key_deserializer="bytes", value_deserializer="bytes")
        good_topic = app.topic(t["parsed"], key_serializer="bytes", value_serializer="json")
        dlq = app.topic(t["parse.dlq"], key_serializer="bytes", value_serializer="bytes")
        names = ("device_id", "ts", "seq", "metric", "value", "unit")

        def parse(value: bytes) -> dict[str, Any]:
            fields = parse_reading(value, validator, int(time.time() * 1000))
            if isinstance(fields, str):
                return {"reason": fields, "raw": value}
            return dict(zip(names, fields, strict=True))

        sdf = app.dataframe(source).apply(parse)
        bad = sdf[sdf.apply(lambda v: "reason" in v)]
        bad = bad.set_headers(lambda v, k, ts, h: [*(h or []), ("reason", v["reason"].encode())])
        bad.apply(lambda v: v["raw"]).to_topic(dlq)
        sdf[sdf.apply(lambda v: "reason" not in v)].to_topic(good_topic)
    elif stage == "enrich":
        readings = app.dataframe(
            app.topic(t["parsed"], key_deserializer="bytes", value_deserializer="json")
        )
        devices = app.dataframe(
            app.topic(t["devices"], key_deserializer="bytes", value_deserializer="json")
        )
        good_topic = app.topic(t["enriched"], key_serializer="bytes", value_serializer="json")
        dlq = app.topic(t["enrich.dlq"], key_serializer="bytes", value_serializer="json")

        def merge(reading: Any, device: Any) -> Any:
            if device is None:
                return {**reading, "unknown_device": True}
            return enrich_reading(dict(reading), device)

        joined = readings.join_asof(devices, how="left", on_merge=merge)
        joined[joined.apply(lambda v: "unknown_device" in v)].to_topic(dlq)
        joined[joined.apply(lambda v: "unknown_device" not in v)].to_topic(good_topic)
    elif stage == "aggregate":
        source = app.topic(
            t["enriched"],
            key_deserializer="bytes",
            value_deserializer="json",
            timestamp_extractor=lambda value, headers, ts, kind: int(value["ts"]),
        )
        sink = app.topic(t["aggregates"], key_serializer="bytes", value_serializer="json")
        sdf = app.dataframe(source)
        sdf = sdf.tumbling_window(
            timedelta(seconds=args.window_s), grace_ms=timedelta(seconds=args.grace_s)
        )
        sdf = sdf.agg(
            count=Count(),
            min=Min("value"),
            max=Max("value"),
            mean=Mean("value"),
            site=Latest("site"),
            unit=Latest("unit"),
        ).final()
        sdf.to_topic(sink)
    emit("ready")
    app.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["quix", "raw"])
    parser.add_argument("stage", choices=["ingest", "parse", "enrich", "aggregate"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--window-s", type=int, default=10)
    parser.add_argument("--grace-s", type=int, default=2)
    args = parser.parse_args()
    path_main({"quix": run_quix, "raw": run_raw}[args.path], args)


if __name__ == "__main__":
    main()
