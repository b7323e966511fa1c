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

from dlq.reasons import Reason
from pipeline import contract
from pipeline.errors import InvalidMessage, RetryableError
from pipeline.records import InRecord, OutRecord, StageResult

STAGE = "enrich"
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


class EnrichStage:
    def __init__(self, lookup: Callable[[str], Device | None]) -> None:
        self._lookup = lookup

    def enrich(self, record: InRecord) -> OutRecord:
        """The enriched record; raises RetryableError for an unknown device."""
        if not record.value:
            raise InvalidMessage(Reason.SCHEMA_VIOLATION, "empty reading")
        try:
            reading: dict[str, Any] = orjson.loads(record.value)
            device_id = reading["device_id"]
            value = float(reading["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidMessage(
                Reason.SCHEMA_VIOLATION, "input is not a reading/1 record"
            ) from None
        device = self._lookup(device_id)
        if device is None:
            raise RetryableError(Reason.UNKNOWN_DEVICE, "device_id is not in the registry")
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

    def process(self, records: Sequence[InRecord]) -> StageResult:
        """Enrich a batch. An unknown device is retryable: the registry may lag."""
        result = StageResult()
        for record in records:
            try:
                result.outputs.append(self.enrich(record))
            except InvalidMessage as exc:
                result.reject(STAGE, record, exc)
            except RetryableError as exc:
                result.retryable.append((record, exc))
        return result


def devices_from(items: Iterable[tuple[str, bytes]]) -> dict[str, Device]:
    return {k: Device.from_json(v) for k, v in items}
