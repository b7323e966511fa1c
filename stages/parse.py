"""Parse: ``iot.raw`` → ``iot.parsed``; decode, validate, normalise to ``reading/1``.

A reading is ``{device_id, ts, seq, metric, value, unit}``: ``device_id`` and
``metric`` non-empty strings, ``ts`` epoch milliseconds (int) within
``[parse.min_ts_ms, now + parse.max_future_ms]``, ``seq`` a non-negative int,
``value`` a finite number (within the metric's range when pipeline.yaml knows
the metric), ``unit`` a string (may be empty). Failures are dead letters with
``decode_error``, ``schema_violation`` or ``out_of_range``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import InvalidMessage, Outputs, OutRecord, Record, StageContext, contract, stage

DECODE_ERROR, SCHEMA_VIOLATION, OUT_OF_RANGE = "decode_error", "schema_violation", "out_of_range"
MAX_ID_LEN = 256
FIELDS = ("device_id", "ts", "seq", "metric", "value", "unit")
_SCHEMA_READING = contract.SCHEMA_READING.encode()


class MetricRange(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> MetricRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class ParseConfig(BaseModel):
    """``stages.parse.config``: ts must lie within ``[min_ts_ms, now + max_future_ms]``;
    ``ranges``: plausible ranges of known metrics (unknown metrics are accepted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_ts_ms: int = 946_684_800_000
    max_future_ms: int = Field(default=86_400_000, ge=0)
    ranges: dict[str, MetricRange] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reading:
    device_id: str
    ts: int
    seq: int
    metric: str
    value: float
    unit: str

    def to_json(self) -> bytes:
        return reading_json(self.device_id, self.ts, self.seq, self.metric, self.value, self.unit)


def reading_json(device_id: str, ts: int, seq: int, metric: str, value: float, unit: str) -> bytes:
    """A ``reading/1`` payload, keys in their fixed order (what parse writes)."""
    return orjson.dumps(
        {
            "device_id": device_id,
            "ts": ts,
            "seq": seq,
            "metric": metric,
            "value": value,
            "unit": unit,
        }
    )


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def decode(payload: bytes) -> dict[str, Any]:
    """A JSON object or CSV line as a dict of raw fields; raise ``decode_error``."""
    if payload[:1] == b"{" or payload.lstrip()[:1] == b"{":
        try:
            parsed: Any = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidMessage(DECODE_ERROR, f"invalid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidMessage(DECODE_ERROR, "JSON payload is not an object")
        return parsed
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage(DECODE_ERROR, "payload is neither JSON nor UTF-8 text") from None
    fields = [f.strip() for f in text.strip().split(",")]
    if len(fields) != len(FIELDS):
        raise InvalidMessage(
            DECODE_ERROR, f"CSV line has {len(fields)} fields, expected {len(FIELDS)}"
        )
    doc: dict[str, Any] = dict(zip(FIELDS, fields, strict=True))
    for name, conv in (("ts", int), ("seq", int), ("value", float)):
        try:
            doc[name] = conv(doc[name])
        except ValueError:
            raise InvalidMessage(SCHEMA_VIOLATION, f"CSV field {name!r} is not a number") from None
    return doc


class Validator:
    """The reading schema and plausibility rules of :class:`ParseConfig`."""

    def __init__(self, settings: ParseConfig) -> None:
        self._settings = settings

    def validate(self, doc: dict[str, Any], now_ms: int) -> Reading:
        """The reading in ``doc``; raise :class:`InvalidMessage` with the first problem."""
        return Reading(*self._fields(doc, now_ms))

    def _fields(self, doc: dict[str, Any], now_ms: int) -> tuple[str, int, int, str, float, str]:
        """:meth:`validate`'s reading as a tuple (no object per record)."""
        get = doc.get
        device_id = get("device_id")
        if type(device_id) is not str and not isinstance(device_id, str):
            raise InvalidMessage(SCHEMA_VIOLATION, "device_id must be a non-empty string")
        if not device_id.strip():
            raise InvalidMessage(SCHEMA_VIOLATION, "device_id must be a non-empty string")
        if len(device_id) > MAX_ID_LEN:
            raise InvalidMessage(SCHEMA_VIOLATION, f"device_id longer than {MAX_ID_LEN}")
        metric = get("metric")
        if type(metric) is not str and not isinstance(metric, str):
            raise InvalidMessage(SCHEMA_VIOLATION, "metric must be a non-empty string")
        if not metric.strip():
            raise InvalidMessage(SCHEMA_VIOLATION, "metric must be a non-empty string")
        if len(metric) > MAX_ID_LEN:
            raise InvalidMessage(SCHEMA_VIOLATION, f"metric longer than {MAX_ID_LEN}")
        ts = get("ts")
        if type(ts) is not int and not _is_int(ts):
            raise InvalidMessage(SCHEMA_VIOLATION, "ts must be an integer (epoch ms)")
        seq = get("seq")
        if (type(seq) is not int and not _is_int(seq)) or seq < 0:
            raise InvalidMessage(SCHEMA_VIOLATION, "seq must be a non-negative integer")
        value = get("value")
        if type(value) is not float:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidMessage(SCHEMA_VIOLATION, "value must be a number")
            value = float(value) if _is_int(value) and abs(value) < 2**53 else value
            if not isinstance(value, float):
                raise InvalidMessage(OUT_OF_RANGE, "value is not a finite float64")
        if not math.isfinite(value):
            raise InvalidMessage(OUT_OF_RANGE, "value is not a finite float64")
        unit = get("unit", "")
        if unit is None:
            unit = ""
        if (type(unit) is not str and not isinstance(unit, str)) or len(unit) > 32:
            raise InvalidMessage(SCHEMA_VIOLATION, "unit must be a string of at most 32")
        s = self._settings
        if not s.min_ts_ms <= ts <= now_ms + s.max_future_ms:
            raise InvalidMessage(OUT_OF_RANGE, f"ts {ts} outside the accepted range")
        bounds = s.ranges.get(metric)
        if bounds is not None and not bounds.min <= value <= bounds.max:
            raise InvalidMessage(
                OUT_OF_RANGE,
                f"{metric} value outside [{bounds.min}, {bounds.max}]",
            )
        return device_id, ts, seq, metric, value, unit


@stage(
    batch=True,
    config=ParseConfig,
    reasons={
        DECODE_ERROR: "not a UTF-8 JSON object or CSV line of six fields",
        SCHEMA_VIOLATION: "a field is missing, has the wrong type, or is empty",
        OUT_OF_RANGE: "ts outside sane bounds, value outside its metric's range",
    },
)
class Parse:
    """Raw readings in; validated ``reading/1`` records out."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.validator = Validator(ctx.config)

    def process_batch(self, records: Sequence[Record], out: Outputs) -> None:
        append = out.append
        now_ms = self.ctx.now_ms()
        fields, next_hop = self.validator._fields, contract.next_hop
        for record in records:
            try:
                if not record.value:
                    raise InvalidMessage(DECODE_ERROR, "empty payload")
                device_id, ts, seq, metric, value, unit = fields(decode(record.value), now_ms)
            except InvalidMessage as exc:
                out.dead_letter(record, exc)
                continue
            append(
                OutRecord(
                    device_id.encode(),
                    reading_json(device_id, ts, seq, metric, value, unit),
                    next_hop(record.headers, _SCHEMA_READING),
                    ts,
                    record.offset,
                )
            )


parse = Parse
