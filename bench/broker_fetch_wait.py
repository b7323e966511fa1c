"""What a consumer's Fetch wait costs on the embedded broker (Tansu), in latency and
in the broker's CPU: why the latency targets at half load stop where they do here.

One embedded broker, one topic of 4 partitions, a producer at ``--rate`` records/s
(each record carries the time it was made) and one aiokafka consumer (what a stage
worker's Faust runs) with ``fetch_max_wait_ms`` = each of ``--waits``, interleaved
over ``--rounds`` rounds (A B C … A B C …). Per run: the broker's CPU (user + system
from ``/proc``, in cores) while the consumer reads live records for ``--seconds``,
then while it waits on an idle topic, and the records' latency (made → consumed) p50
and p99, and the producer's acknowledgements (produce call → acknowledged) p50 and
p99. A row without a consumer gives the producer's own share of the broker.

Writes ``bench/results/broker_fetch_wait.json`` and ``.md``.
Run: ``.venv/bin/python bench/broker_fetch_wait.py [--rate 1500] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.kafka.embedded import start_embedded

RESULTS = Path(__file__).parent / "results"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int:
    """The embedded broker: our only child process."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return int(children[0])


def produce(bootstrap: str, topic: str, rate: float, seconds: float, acks: list[float]) -> None:
    """``rate`` records/s for ``seconds``; ``acks``: each one's time from the produce
    call to the broker's acknowledgement (ms)."""
    client = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})

    def acked(made: float) -> Any:
        return lambda err, msg: acks.append(time.time() * 1000 - made) if err is None else None

    start, sent = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        while sent < rate * elapsed:
            made = time.time() * 1000
            stamp = f"{made:020.3f}".encode()
            client.produce(
                topic, stamp + b"x" * 80, str(sent % 100).encode(), on_delivery=acked(made)
            )
            sent += 1
        client.poll(0)
        time.sleep(0.002)
    client.flush(30)


async def one_run(bootstrap: str, topic: str, wait: int | None, args: Any) -> dict[str, Any]:
    pid = broker_pid()
    latencies: list[float] = []
    consumer = None
    reader = None
    if wait is not None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"fw-{wait}-{time.monotonic_ns()}",
            auto_offset_reset="latest",
            fetch_max_wait_ms=wait,
            session_timeout_ms=6000,
        )
        await consumer.start()
        while not consumer.assignment():
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)

        async def read() -> None:
            assert consumer is not None
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                now = time.time() * 1000
                for records in batch.values():
                    latencies.extend(now - float(r.value[:20]) for r in records)

        reader = asyncio.ensure_future(read())
    idle0, t0 = cpu_s(pid), time.monotonic()
    await asyncio.sleep(args.idle_seconds)
    idle = (cpu_s(pid) - idle0) / (time.monotonic() - t0)
    latencies.clear()
    live0, t0 = cpu_s(pid), time.monotonic()
    acks: list[float] = []
    feeder = threading.Thread(
        target=produce, args=(bootstrap, topic, args.rate, args.seconds, acks)
    )
    feeder.start()
    while feeder.is_alive():
        await asyncio.sleep(0.1)
    live = (cpu_s(pid) - live0) / (time.monotonic() - t0)
    await asyncio.sleep(1.5)
    if reader is not None and consumer is not None:
        reader.cancel()
        await consumer.stop()
    latencies.sort()
    acks.sort()
    return {
        "fetch_max_wait_ms": wait,
        "broker_cores_idle": idle,
        "broker_cores_live": live,
        "records": len(latencies),
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else None,
        "ack_p50_ms": statistics.median(acks),
        "ack_p99_ms": acks[int(len(acks) * 0.99)],
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# A consumer's Fetch wait on the embedded broker: latency and broker CPU",
        "",
        f"`bench/broker_fetch_wait.py`: {doc['rate']:.0f} records/s on 4 partitions, one "
        f"aiokafka consumer, {doc['rounds']} interleaved rounds of {doc['seconds']:.0f} s; "
        "medians (min to max).",
        "",
        "| fetch_max_wait_ms | broker cores, consumer waiting on an idle topic | "
        "broker cores, live | latency p50 ms | p99 ms | producer's acks p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"

    for wait in [None, *doc["waits"]]:
        runs = [r for r in doc["runs"] if r["fetch_max_wait_ms"] == wait]
        p50 = [r["p50_ms"] for r in runs if r["p50_ms"] is not None]
        p99 = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
        lines.append(
            f"| {'no consumer' if wait is None else wait} | "
            f"{cell([r['broker_cores_idle'] for r in runs], '.2f')} | "
            f"{cell([r['broker_cores_live'] for r in runs], '.2f')} | "
            f"{cell(p50, '.0f')} | {cell(p99, '.0f')} | "
            f"{cell([r['ack_p50_ms'] for r in runs], '.1f')} | "
            f"{cell([r['ack_p99_ms'] for r in runs], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


async def main_async(args: Any) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with start_embedded() as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for rnd in range(args.rounds):
            for wait in [None, *args.waits]:
                topic = f"fw-{rnd}-{wait}"
                admin.create_topics([NewTopic(topic, 4, 1)])[topic].result()
                result = await one_run(broker.bootstrap, topic, wait, args)
                result["round"] = rnd + 1
                runs.append(result)
                print(json.dumps(result), flush=True)
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "waits": args.waits,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--waits", type=lambda s: [int(x) for x in s.split(",")], default=[500, 250, 100, 50]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "broker_fetch_wait")
    args = parser.parse_args()
    doc = asyncio.run(main_async(args))
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
