"""A device simulator: realistic readings, a known mix of bad ones, to ``iot.landing``.

:func:`generate` is deterministic for a seed and says what each record *is*
(good, duplicate, or which dead-letter reason it must get), so tests can check
the pipeline's output against it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.demo.senders import Sender

METRICS = (
    ("temperature", "C", 21.0, 4.0),
    ("humidity", "%", 45.0, 10.0),
    ("power", "W", 800.0, 300.0),
    ("pressure", "hPa", 1013.0, 8.0),
)
BAD_KINDS: tuple[tuple[str, str], ...] = (
    ("decode_error", "parse"),
    ("schema_violation", "parse"),
    ("out_of_range", "parse"),
    ("too_large", "ingest"),
    ("empty", "ingest"),
    ("unknown_device", "enrich"),
)


@dataclass(frozen=True, slots=True)
class SimRecord:
    key: bytes | None
    value: bytes
    kind: str  # "good", "duplicate", or a dead-letter reason
    stage: str | None = None  # the stage that must dead-letter it
    device_id: str | None = None
    metric: str | None = None
    ts: int | None = None
    seq: int | None = None
    value_num: float | None = None


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(1, n + 1)]


def metric_of(device_id: str) -> tuple[str, str, float, float]:
    index = int(device_id.rsplit("-", 1)[1]) - 1
    return METRICS[index % len(METRICS)]


def generate(
    devices: int,
    count: int,
    *,
    start_ms: int,
    interval_ms: int = 1000,
    bad_ratio: float = 0.0,
    dup_ratio: float = 0.0,
    disorder_ratio: float = 0.05,
    csv_ratio: float = 0.2,
    seed: int = 1,
    max_payload: int = 65536,
) -> Iterator[SimRecord]:
    """``count`` records from ``devices`` devices, one reading per device per
    ``interval_ms`` of event time starting at ``start_ms``, with jitter, some out of
    order, ``bad_ratio`` poison records and ``dup_ratio`` exact repeats."""
    rng = random.Random(seed)
    ids = device_ids(devices)
    seqs = dict.fromkeys(ids, 0)
    held: SimRecord | None = None
    emitted = 0
    tick = 0
    while emitted < count:
        device_id = ids[tick % devices]
        round_no = tick // devices
        tick += 1
        roll = rng.random()
        if roll < bad_ratio:
            reason, stage = BAD_KINDS[rng.randrange(len(BAD_KINDS))]
            yield _bad(
                rng, reason, stage, device_id, start_ms + round_no * interval_ms, max_payload
            )
            emitted += 1
            continue
        metric, unit, mean, spread = metric_of(device_id)
        ts = start_ms + round_no * interval_ms + rng.randrange(0, max(1, interval_ms // 2))
        seq = seqs[device_id]
        seqs[device_id] = seq + 1
        value = round(rng.gauss(mean, spread / 3), 3)
        if rng.random() < csv_ratio:
            payload = f"{device_id},{ts},{seq},{metric},{value},{unit}".encode()
        else:
            payload = orjson.dumps(
                {
                    "device_id": device_id,
                    "ts": ts,
                    "seq": seq,
                    "metric": metric,
                    "value": value,
                    "unit": unit,
                }
            )
        record = SimRecord(
            device_id.encode(), payload, "good", None, device_id, metric, ts, seq, value
        )
        if held is None and rng.random() < disorder_ratio:
            held = record  # sent after the next record: out of order
            continue
        for r in (record, held) if held is not None else (record,):
            yield r
            emitted += 1
            if emitted < count and rng.random() < dup_ratio:
                yield SimRecord(
                    r.key,
                    r.value,
                    "duplicate",
                    None,
                    r.device_id,
                    r.metric,
                    r.ts,
                    r.seq,
                    r.value_num,
                )
                emitted += 1
        held = None
    if held is not None:
        yield held


def _bad(
    rng: random.Random, reason: str, stage: str, device_id: str, ts: int, max_payload: int
) -> SimRecord:
    """A poison record; each is unique (its own seq), so ingest never drops one as a repeat."""
    key = device_id.encode()
    seq = rng.randrange(10**6, 10**12)
    if reason == "decode_error":
        value = rng.choice([b"{not json", b"\xff\xfe\x00binary", b"a,b,c", b"[1,2,3]"])
    elif reason == "schema_violation":
        value = orjson.dumps(
            rng.choice(
                [
                    {"device_id": device_id, "ts": ts, "seq": seq, "value": 1.0, "unit": "C"},
                    {"device_id": "", "ts": ts, "seq": seq, "metric": "temperature", "value": 1.0},
                    {
                        "device_id": device_id,
                        "ts": str(ts),
                        "seq": seq,
                        "metric": "temperature",
                        "value": 1.0,
                    },
                    {
                        "device_id": device_id,
                        "ts": ts,
                        "seq": seq,
                        "metric": "temperature",
                        "value": "hot",
                    },
                ]
            )
        )
    elif reason == "out_of_range":
        value = orjson.dumps(
            rng.choice(
                [
                    {
                        "device_id": device_id,
                        "ts": ts,
                        "seq": seq,
                        "metric": "humidity",
                        "value": 250.0,
                        "unit": "%",
                    },
                    {
                        "device_id": device_id,
                        "ts": 5,
                        "seq": seq,
                        "metric": "temperature",
                        "value": 20.0,
                        "unit": "C",
                    },
                ]
            )
        )
    elif reason == "too_large":
        value = orjson.dumps(
            {
                "device_id": device_id,
                "ts": ts,
                "seq": seq,
                "metric": "x",
                "value": 1.0,
                "unit": "",
                "pad": "x" * (max_payload + 10),
            }
        )
    elif reason == "empty":
        value = b""
    else:  # UNKNOWN_DEVICE
        ghost = f"ghost-{rng.randrange(1_000_000):06d}"
        key = ghost.encode()
        value = orjson.dumps(
            {
                "device_id": ghost,
                "ts": ts,
                "seq": seq,
                "metric": "temperature",
                "value": 20.0,
                "unit": "C",
            }
        )
    return SimRecord(key, value, str(reason), stage)


def now_ms() -> int:
    return int(time.time() * 1000)


def run_simulator(
    settings: Settings,
    *,
    devices: int,
    rate: float,
    duration: float,
    bad_ratio: float = 0.0,
    dup_ratio: float = 0.005,
    seed: int = 1,
    stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int], None] | None = None,
    sender: Sender | None = None,
) -> dict[str, int]:
    """Produce readings at ``rate``/s for ``duration`` s (live event times) to the
    ingest input, or through ``sender`` (a door, :mod:`pipeline.demo.senders`);
    return counts by kind. Waits for every record to be acknowledged."""
    from pipeline.demo.senders import KafkaSender

    entry = settings.topology.entry_stages()[0]
    topic = settings.stage(entry).inputs[0]
    out = sender if sender is not None else KafkaSender(settings, topic)
    total = max(1, int(rate * duration))
    interval_ms = max(1, int(1000 * devices / rate))
    start = time.monotonic()
    counts: dict[str, int] = {}
    records = generate(
        devices,
        total,
        start_ms=now_ms(),
        interval_ms=interval_ms,
        bad_ratio=bad_ratio,
        dup_ratio=dup_ratio,
        seed=seed,
        max_payload=int(settings.stage(entry).config.get("max_payload_bytes", 65536)),
    )
    for sent, record in enumerate(records, start=1):
        if stop():
            break
        out.send(record)
        counts[record.kind] = counts.get(record.kind, 0) + 1
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        if on_progress is not None and sent % 50 == 0:
            on_progress(sent)
    out.close()
    counts["sent"] = sum(counts.values())
    if out.not_sendable:
        counts["not_sendable"] = out.not_sendable
    return counts
