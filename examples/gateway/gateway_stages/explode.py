"""explode: one gateway message in, one reading per metric out (a fan-out).

A gateway sends ``{"gateway": "gw-1", "device_id": "d-7", "ts": 1767225600000,
"metrics": {"temperature": 21.5, "humidity": 40}}``. Each metric becomes its own
reading ``{"gateway", "device_id", "ts", "metric", "value"}``, keyed by device; the
engine gives each its own lineage id (with ``lineage-parent`` naming the message's),
so every reading counts once downstream and traces back to its message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from pipeline import Emit, InvalidMessage, Record, StageContext, stage


@stage(
    reasons={
        "bad_payload": "not a gateway message (device_id, ts, metrics)",
        "no_metrics": "a gateway message with no numeric metric",
    }
)
def explode(record: Record, ctx: StageContext) -> Iterator[Emit]:
    message = record.json()  # not JSON: a decode_error dead letter
    if not isinstance(message, dict):
        raise InvalidMessage("bad_payload", "not a JSON object")
    device, ts, metrics = message.get("device_id"), message.get("ts"), message.get("metrics")
    if not isinstance(device, str) or not device or not isinstance(ts, int):
        raise InvalidMessage("bad_payload", "device_id (text) and ts (epoch ms) are required")
    if not isinstance(metrics, dict):
        raise InvalidMessage("bad_payload", "metrics must be an object")
    readings = {
        name: float(value)
        for name, value in sorted(metrics.items())
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }
    if not readings:
        raise InvalidMessage("no_metrics", "no numeric metric in the message")
    for name, value in readings.items():
        yield Emit(
            key=device,
            value={
                "gateway": message.get("gateway", ""),
                "device_id": device,
                "ts": ts,
                "metric": name,
                "value": value,
            },
            timestamp_ms=ts,
            schema="reading/1",
        )
