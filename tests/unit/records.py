"""Helpers to build stage inputs."""

from __future__ import annotations

import itertools

import orjson

from pipeline.records import InRecord

_offsets = itertools.count()


def rec(
    value: bytes | dict | None,
    key: bytes | None = None,
    topic: str = "in",
    partition: int = 0,
    headers: tuple[tuple[str, bytes], ...] = (),
    ts: int = 1_700_000_000_000,
) -> InRecord:
    if isinstance(value, dict):
        value = orjson.dumps(value)
    return InRecord(topic, partition, next(_offsets), ts, key, value, headers)


def reading(
    device: str = "dev-0001",
    ts: int = 1_700_000_000_000,
    seq: int = 0,
    metric: str = "temperature",
    value: float = 21.5,
    unit: str = "C",
) -> dict:
    return {
        "device_id": device,
        "ts": ts,
        "seq": seq,
        "metric": metric,
        "value": value,
        "unit": unit,
    }
