"""The comparison paths of the benchmark, each run by ``run.py`` as its own process.

``python bench/paths.py PATH --bootstrap B --input T --output T --group G --records N``

* ``raw``: confluent-kafka consume (batches of up to 2000) → :func:`transform` →
  produce (idempotent, acks=all, lz4, linger 5 ms: the stage producer's settings)
  → wait for every ack → commit. At-least-once; the practical ceiling of Python.
* ``quix``: a quixstreams ``StreamingDataFrame`` doing the same transform, to a topic
  (at-least-once, its default; commit interval 1 s like the stages).
* ``naive``: a plain Faust agent, ``async for`` per event and ``send`` per record
  (default aiokafka transport, no fixes, commit interval 1 s).

Each prints JSON event lines (``ready``, ``first`` when the first record was
consumed, ``done`` after ``--records`` records with its CPU seconds); the driver
measures the end from the group's committed offsets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from benchlib import emit, path_main, peak_rss_mb, process_cpu_s, transform

BATCH = 2000


def producer_config(bootstrap: str) -> dict[str, Any]:
    """The settings of the stages' producer (:func:`pipeline.kafka.producer_config`)."""
    from pipeline.kafka.clients import producer_config as stage_producer_config
    from pipeline.settings import load_settings

    return stage_producer_config(load_settings(kafka_bootstrap_servers=bootstrap))


def run_raw(args: argparse.Namespace) -> None:
    from confluent_kafka import Consumer, Producer

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    producer = Producer(producer_config(args.bootstrap))
    consumer.subscribe([args.input])
    emit("ready")
    processed = produced = 0
    out_topic = args.output
    produce = producer.produce
    while processed < args.records:
        messages = consumer.consume(num_messages=BATCH, timeout=0.5)
        if not messages:
            continue
        if processed == 0:
            emit("first")
        for msg in messages:
            if msg.error() is not None:
                continue
            processed += 1
            out = transform(msg.value())
            if out is None:
                continue
            while True:
                try:
                    produce(out_topic, out, msg.key(), headers=msg.headers())
                    break
                except BufferError:
                    producer.poll(0.01)
            produced += 1
        if producer.flush(60):  # every output acknowledged before the commit
            raise SystemExit("raw: outputs not acknowledged within 60 s")
        consumer.commit(asynchronous=True)
    consumer.commit(asynchronous=False)
    emit(
        "done",
        processed=processed,
        produced=produced,
        cpu_s=process_cpu_s(),
        peak_rss_mb=peak_rss_mb(os.getpid()),
    )
    consumer.close()


def run_quix(args: argparse.Namespace) -> None:
    from quixstreams import Application

    processed = [0]
    state_dir = tempfile.mkdtemp(prefix="bench-quix-")

    def on_processed(topic: str, partition: int, offset: int) -> None:
        processed[0] += 1
        if processed[0] == 1:
            emit("first")
        if processed[0] >= args.records:
            emit(
                "done",
                processed=processed[0],
                cpu_s=process_cpu_s(),
                peak_rss_mb=peak_rss_mb(os.getpid()),
            )
            app.stop()

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        commit_interval=1.0,
        loglevel="WARNING",
        use_changelog_topics=False,
        auto_create_topics=False,
        state_dir=state_dir,
        consumer_extra_config={"session.timeout.ms": 6000},
        on_message_processed=on_processed,
    )
    source = app.topic(args.input, key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(args.output, key_serializer="bytes", value_serializer="bytes")
    sdf = app.dataframe(source)
    sdf = sdf.apply(transform).filter(lambda value: value is not None)
    sdf.to_topic(sink)
    emit("ready")
    app.run()


def run_naive(args: argparse.Namespace) -> None:
    import faust

    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        autodiscover=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=6,
        broker_commit_interval=1.0,
        store="memory://",
        datadir=tempfile.mkdtemp(prefix="bench-faust-"),
    )
    source = app.topic(args.input, key_serializer="raw", value_serializer="raw")
    sink = app.topic(args.output, key_serializer="raw", value_serializer="raw")
    target = args.records

    @app.agent(source, name="naive")
    async def naive(stream: Any) -> None:
        processed = 0
        async for event in stream.events():
            out = transform(event.value)
            if out is not None:
                await sink.send(key=event.key, value=out, headers=event.headers)
            processed += 1
            if processed == 1:
                emit("first")
            if processed == target:
                emit(
                    "done",
                    processed=processed,
                    cpu_s=process_cpu_s(),
                    peak_rss_mb=peak_rss_mb(os.getpid()),
                )

    emit("ready")
    # INFO, as the stage workers: at WARNING and above Faust's terminal spinner sets
    # the root logger to DEBUG, and every debug call of Faust and aiokafka then
    # builds a log record (about a tenth of a worker's CPU)
    worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["raw", "quix", "naive"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--records", type=int, required=True)
    args = parser.parse_args()
    path_main({"raw": run_raw, "quix": run_quix, "naive": run_naive}[args.path], args)


if __name__ == "__main__":
    main()
