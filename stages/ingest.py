"""Ingest: raw bytes from devices → ``iot.raw`` with lineage headers.

Accepts a JSON object or a CSV line (``device_id,ts,seq,metric,value,unit``). It
does not validate the reading (parse does, and dead-letters it with a reason);
it only looks for ``device_id``, ``seq`` and ``ts`` to key the record, derive its
lineage id and drop exact repeats (same ``(device_id, seq)`` and payload) within a
bounded window. The lineage id is derived from ``(device_id, seq, payload)``, so a
repeat that gets past the window (or a re-delivery after a crash) keeps its id and
the aggregate counts it once.
A payload it cannot read is passed on unchanged for parse to dead-letter.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import orjson

from dlq.reasons import Reason
from pipeline import contract
from pipeline.errors import InvalidMessage
from pipeline.records import InRecord, OutRecord, StageResult
from pipeline.settings import IngestSettings

STAGE = "ingest"
_LINEAGE, _TRACEPARENT, _SOURCE = contract.H_LINEAGE, contract.H_TRACEPARENT, contract.H_SOURCE
_SCHEMA, _INGEST_TS = contract.H_SCHEMA, contract.H_INGEST_TS
_LIVE, _SCHEMA_RAW = contract.SOURCE_LIVE.encode(), contract.SCHEMA_RAW.encode()

Identity = tuple[str, str, int | None]


class Deduper:
    """Remembers ``(device_id, seq)`` → payload digest for ``window_s`` seconds, at most
    ``max_keys`` pairs. A record is a duplicate only if the pair *and* the payload match:
    a malformed record that happens to share a pair with a good one must not hide it."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None:
        self._window = window_s
        self._max = max_keys
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def seen(self, device_id: str, seq: str, digest: bytes) -> bool:
        """True if the same pair with the same digest was seen within the window;
        remembers it otherwise."""
        now = self._clock()
        horizon = now - self._window
        seen = self._seen
        while seen:
            oldest_key, (oldest_at, _) = next(iter(seen.items()))
            if oldest_at >= horizon and len(seen) < self._max:
                break
            del seen[oldest_key]
        key = (device_id, seq)
        previous = seen.get(key)
        if previous is not None and previous[0] >= horizon and previous[1] == digest:
            return True
        seen.pop(key, None)
        seen[key] = (now, digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def sniff_identity(payload: bytes) -> Identity | None:
    """``(device_id, seq, ts)`` from a JSON object or CSV line, or None if unreadable."""
    head = payload.lstrip()[:1]
    if head == b"{":
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        device_id, seq, ts = doc.get("device_id"), doc.get("seq"), doc.get("ts")
    else:
        try:
            fields = payload.decode("utf-8").strip().split(",")
        except UnicodeDecodeError:
            return None
        if len(fields) != 6:
            return None
        device_id, seq, ts = fields[0].strip(), fields[2].strip(), fields[1].strip()
        try:
            ts = int(ts)
        except ValueError:
            ts = None
    if (
        not isinstance(device_id, str)
        or not device_id
        or seq is None
        or isinstance(seq, dict | list)
    ):
        return None
    ts_int = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
    return device_id, str(seq), ts_int


class IngestStage:
    def __init__(self, settings: IngestSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self.deduper = Deduper(settings.dedup_window_s, settings.dedup_max_keys, clock)

    def process(self, records: Sequence[InRecord]) -> StageResult:
        result = StageResult()
        max_bytes = self._settings.max_payload_bytes
        now_ms = int(self._clock() * 1000)
        ingest_ts = str(now_ms).encode()
        child_traceparent = contract.child_traceparent_bytes
        for record in records:
            payload = record.value
            if not payload or not payload.strip():
                result.reject(STAGE, record, InvalidMessage(Reason.EMPTY, "empty payload"))
                continue
            if len(payload) > max_bytes:
                result.reject(
                    STAGE,
                    record,
                    InvalidMessage(
                        Reason.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {max_bytes}"
                    ),
                )
                continue
            incoming = contract.header_map(record.headers)
            identity = sniff_identity(payload)
            if identity is None:
                # Unreadable: parse dead-letters it with the precise reason. The id is
                # derived from the landing coordinates, so a re-delivery keeps it.
                key = record.key
                lineage = contract.lineage_id(
                    record.timestamp_ms, record.topic, record.partition, record.offset
                )
            else:
                device_id, seq, ts = identity
                digest = hashlib.blake2b(payload, digest_size=16).digest()
                if self.deduper.seen(device_id, seq, digest):
                    result.duplicates += 1
                    continue
                key = device_id.encode("utf-8")
                lineage = contract.lineage_id(
                    ts if ts is not None else record.timestamp_ms, device_id, seq, digest
                )
            # as contract.with_headers(incoming, {lineage, traceparent, source, schema,
            # ingest-ts}) does, on the fresh dict header_map made
            incoming[_LINEAGE] = lineage.encode()
            incoming[_TRACEPARENT] = child_traceparent(incoming.get(_TRACEPARENT))
            incoming[_SOURCE] = incoming.get(_SOURCE, _LIVE)
            incoming[_SCHEMA] = _SCHEMA_RAW
            incoming[_INGEST_TS] = ingest_ts
            result.outputs.append(
                OutRecord(key, payload, list(incoming.items()), record.timestamp_ms, record.offset)
            )
        return result
