"""CPU per record of a stage's hot path, per batch, against a real (embedded) broker.

What a stage worker does with one fetched partition batch, minus Faust and the
aiokafka fetch: turn the fetched records into :class:`Record` (``to_record``),
then :meth:`StageBinding.handle` — run the stage, produce the outputs and dead letters
with the stage's ``AsyncProducer`` and await every acknowledgement, produce the
lineage hops and await them, update the metrics. CPU is the process's user+system
time over all its threads (librdkafka's too), so it is much less noisy than wall
time on a shared machine; the broker is another process and not counted.

The Faust app of the stage is built (not started) first, so the heap the cyclic GC
walks is about as large as in a worker.

Run: ``python bench/stage_cpu.py [--stage parse] [--rounds 40] [--batch 2000]``.
Writes ``bench/results/stage_cpu.json`` and prints µs of CPU per record.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiokafka.structs import ConsumerRecord

from pipeline.demo.simulator import generate
from pipeline.engine.build import build_engine, load_stage
from pipeline.kafka.clients import admin, producer
from pipeline.kafka.embedded import start_embedded
from pipeline.kafka.produce import AsyncProducer
from pipeline.kafka.topics import check_topics, create_topics
from pipeline.records import Record
from pipeline.runtime.app import build_app
from pipeline.settings import load_settings, namespaced

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def landing_records(n: int, topic: str) -> list[Record]:
    start = int(time.time() * 1000) - 3_600_000 - n * 20
    sims = generate(50, n, start_ms=start, bad_ratio=0.01, dup_ratio=0.0, seed=7)
    return [Record(topic, 0, i, start + i, r.key, r.value, ()) for i, r in enumerate(sims)]


def fetched(records: list[Record]) -> list[Any]:
    """``records`` as aiokafka hands them to the transport."""
    return [
        ConsumerRecord(
            r.topic,
            r.partition,
            r.offset,
            r.timestamp_ms,
            0,
            r.key,
            r.value,
            None,
            len(r.key or b""),
            len(r.value or b""),
            list(r.headers),
        )
        for r in records
    ]


async def measure(
    stage: str,
    rounds: int,
    batch_size: int,
    settings: Any,
    gc_mode: str,
    overrides: dict[str, str],
) -> dict[str, Any]:
    from pipeline.runtime.binding import to_record

    _app, binding = build_app(settings, stage)  # the app makes the heap a worker has
    if overrides:
        binding.runner.producer = AsyncProducer(producer(settings, **overrides))
    in_topic = settings.stages[stage].inputs[0]
    # distinct records in every round: ingest drops repeats
    landing = landing_records(batch_size * (rounds + 1), settings.stages["ingest"].inputs[0])
    if stage == "ingest":
        records = [
            Record(in_topic, 0, r.offset, r.timestamp_ms, r.key, r.value, ()) for r in landing
        ]
    elif stage == "parse":
        ingest_engine = build_engine(
            "ingest", settings.stages["ingest"], load_stage(settings, "ingest")
        )
        out = ingest_engine.process(0, landing).outputs
        records = [
            Record(in_topic, 0, i, o.timestamp_ms or 0, o.key, o.value, tuple(o.headers))
            for i, o in enumerate(out)
        ]
    else:
        raise SystemExit(f"--stage {stage}: only ingest and parse (stateless) are measured")
    batches = [fetched(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    await binding.ready()  # what the runner does before the first batch
    if gc_mode == "default":
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
    elif gc_mode == "off":
        gc.disable()
    await binding.handle(0, [to_record(r) for r in batches[0]])  # warm up, connect
    cpu: list[float] = []
    wall: list[float] = []
    gcs = [0, 0, 0]
    for raw in batches[1 : rounds + 1]:
        before = [s["collections"] for s in gc.get_stats()]
        c0, w0 = time.process_time(), time.perf_counter()
        await binding.handle(0, [to_record(r) for r in raw])
        c1, w1 = time.process_time(), time.perf_counter()
        cpu.append((c1 - c0) / len(raw) * 1e6)
        wall.append((w1 - w0) / len(raw) * 1e6)
        for g, s in enumerate(gc.get_stats()):
            gcs[g] += s["collections"] - before[g]
    binding.close()
    return {
        "stage": stage,
        "batch_records": batch_size,
        "rounds": rounds,
        "cpu_us_per_record_median": statistics.median(cpu),
        "cpu_us_per_record_min": min(cpu),
        "wall_us_per_record_median": statistics.median(wall),
        "gc_collections_per_batch": [g / rounds for g in gcs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="parse")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--no-lineage", action="store_true")
    parser.add_argument(
        "-X",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="producer setting to override (e.g. -X linger.ms=1)",
    )
    parser.add_argument(
        "--gc",
        default="worker",
        choices=["worker", "default", "off"],
        help="worker: as a stage worker tunes it; default: Python's; off: disabled",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "stage_cpu.json")
    args = parser.parse_args()
    with start_embedded() as broker, tempfile.TemporaryDirectory() as tmp:
        doc = namespaced(yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text()), "cpu")
        if args.no_lineage:
            doc.pop("lineage_topic", None)
        path = Path(tmp) / "cpu.yaml"
        path.write_text(yaml.safe_dump(doc))
        settings = load_settings(path, kafka_bootstrap_servers=broker.bootstrap)
        check_topics(create_topics(settings, admin(settings)))
        overrides = dict(o.split("=", 1) for o in args.overrides)
        result = asyncio.run(
            measure(args.stage, args.rounds, args.batch, settings, args.gc, overrides)
        )
    result["lineage"] = not args.no_lineage
    result["gc"] = args.gc
    result["producer_overrides"] = overrides
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{args.stage}{'' if result['lineage'] else ' (no lineage)'}, gc {args.gc}, "
        f"batch {args.batch} {' '.join(args.overrides)}: "
        f"{result['cpu_us_per_record_median']:.1f} µs CPU/record median "
        f"(min {result['cpu_us_per_record_min']:.1f}), "
        f"wall {result['wall_us_per_record_median']:.1f} µs/record, "
        f"gc per batch {result['gc_collections_per_batch']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
