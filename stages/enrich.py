"""Enrich: ``iot.parsed`` → ``iot.enriched``; join the device registry.

The registry maps ``device_id`` to :class:`Device` (site, device_type, unit,
calibration offset and any extra attributes). The calibrated value is
``value + calibration_offset``; the raw value is kept as ``raw_value``. An unknown
device is a :class:`RetryableError` (the registry may lag); the runner decides
whether to retry or dead-letter it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline import (
    InvalidMessage,
    Outputs,
    OutRecord,
    Record,
    RetryableError,
    StageContext,
    contract,
    stage,
)

SCHEMA_VIOLATION, UNKNOWN_DEVICE = "schema_violation", "unknown_device"
#: the lookup table (``stages.enrich.lookups``) that holds the device registry
REGISTRY = "devices"
REQUIRED_COLUMNS = ("device_id", "site", "device_type", "unit")
_SCHEMA_ENRICHED = contract.SCHEMA_ENRICHED.encode()


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    site: str
    device_type: str
    unit: str
    calibration_offset: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "device_id": self.device_id,
                "site": self.site,
                "device_type": self.device_type,
                "unit": self.unit,
                "calibration_offset": self.calibration_offset,
                "attributes": self.attributes,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Device:
        doc = orjson.loads(raw)
        return cls(
            device_id=doc["device_id"],
            site=doc["site"],
            device_type=doc["device_type"],
            unit=doc["unit"],
            calibration_offset=float(doc.get("calibration_offset", 0.0)),
            attributes=dict(doc.get("attributes", {})),
        )


def read_registry_csv(text: str) -> list[Device]:
    """Devices from CSV text; extra columns become attributes.

    Raises ValueError naming the line when a required column or value is missing.
    """
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"registry CSV lacks column(s) {missing}; it has {columns}")
    devices: list[Device] = []
    for line_no, row in enumerate(reader, start=2):
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not values.get("device_id") or not values.get("site"):
            raise ValueError(f"line {line_no}: device_id and site must not be empty")
        raw_offset = values.pop("calibration_offset", "") or "0"
        try:
            offset = float(raw_offset)
        except ValueError:
            raise ValueError(
                f"line {line_no}: calibration_offset {raw_offset!r} is not a number"
            ) from None
        if not math.isfinite(offset):
            raise ValueError(f"line {line_no}: calibration_offset must be finite")
        devices.append(
            Device(
                device_id=values.pop("device_id"),
                site=values.pop("site"),
                device_type=values.pop("device_type"),
                unit=values.pop("unit"),
                calibration_offset=offset,
                attributes=values,
            )
        )
    return devices


class Enricher:
    """The join itself, on any lookup of device ids."""

    def __init__(self, lookup: Callable[[str], Device | None]) -> None:
        self._lookup = lookup

    def enrich(self, record: Record) -> OutRecord:
        """The enriched record; raises RetryableError for an unknown device."""
        if not record.value:
            raise InvalidMessage(SCHEMA_VIOLATION, "empty reading")
        try:
            reading: dict[str, Any] = orjson.loads(record.value)
            device_id = reading["device_id"]
            value = float(reading["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidMessage(SCHEMA_VIOLATION, "input is not a reading/1 record") from None
        device = self._lookup(device_id) if isinstance(device_id, str) else None
        if device is None:
            raise RetryableError(UNKNOWN_DEVICE, "device_id is not in the registry")
        reading["raw_value"] = value
        reading["value"] = value + device.calibration_offset
        reading["site"] = device.site
        reading["device_type"] = device.device_type
        reading["unit"] = reading.get("unit") or device.unit
        if device.attributes:
            reading["attributes"] = device.attributes
        headers = contract.next_hop(record.headers, _SCHEMA_ENRICHED)
        return OutRecord(
            record.key, orjson.dumps(reading), headers, reading.get("ts"), record.offset
        )


@stage(
    batch=True,
    reasons={
        SCHEMA_VIOLATION: "input is not a reading/1 record",
        UNKNOWN_DEVICE: "device_id not in the registry after every retry",
    },
)
class Enrich:
    """Readings in; readings with their device's site, type, unit and calibration out.
    An unknown device is retryable: the registry may lag."""

    def __init__(self, ctx: StageContext) -> None:
        self.enricher = Enricher(ctx.lookup(REGISTRY, decode=Device.from_json).get)

    def process_batch(self, records: Sequence[Record], out: Outputs) -> None:
        enrich, append = self.enricher.enrich, out.append
        for record in records:
            try:
                append(enrich(record))
            except InvalidMessage as exc:
                out.dead_letter(record, exc)
            except RetryableError as exc:
                out.retry(record, exc)


enrich = Enrich


def devices_from(items: Iterable[tuple[str, bytes]]) -> dict[str, Device]:
    return {k: Device.from_json(v) for k, v in items}
