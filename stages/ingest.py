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
from collections import OrderedDict
from collections.abc import Callable, Sequence

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pipeline import InvalidMessage, Outputs, OutRecord, Record, StageContext, contract, stage

TOO_LARGE, EMPTY = "too_large", "empty"
_LINEAGE, _TRACEPARENT, _SOURCE = contract.H_LINEAGE, contract.H_TRACEPARENT, contract.H_SOURCE
_SCHEMA, _INGEST_TS = contract.H_SCHEMA, contract.H_INGEST_TS
_LIVE, _SCHEMA_RAW = contract.SOURCE_LIVE.encode(), contract.SCHEMA_RAW.encode()

Identity = tuple[str, str, int | None]


class IngestConfig(BaseModel):
    """``stages.ingest.config``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_payload_bytes: int = Field(default=65536, ge=64)
    dedup_window_s: float = Field(default=600.0, gt=0)
    dedup_max_keys: int = Field(default=200_000, ge=1)


class Deduper:
    """Remembers ``(device_id, seq)`` → payload digest for ``window_s`` seconds, at most
    ``max_keys`` pairs. A record is a duplicate only if the pair *and* the payload match:
    a malformed record that happens to share a pair with a good one must not hide it.

    What a batch saw is kept aside (``pending``) and remembered only once the batch
    is through (:meth:`remember`): if the batch fails and is run again, its records
    are not mistaken for repeats of themselves."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None:
        self._window = window_s
        self._max = max_keys
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def seen(
        self,
        device_id: str,
        seq: str,
        digest: bytes,
        pending: dict[tuple[str, str], tuple[float, bytes]],
    ) -> bool:
        """True if the same pair with the same digest was seen within the window (or
        earlier in this batch: ``pending``); notes it in ``pending`` otherwise."""
        now = self._clock()
        key = (device_id, seq)
        previous = pending.get(key) or self._seen.get(key)
        if previous is not None and previous[0] >= now - self._window and previous[1] == digest:
            return True
        pending[key] = (now, digest)
        return False

    def remember(self, pending: dict[tuple[str, str], tuple[float, bytes]]) -> None:
        """Keep what a finished batch saw; forget what is past the window or the size."""
        seen = self._seen
        for key, entry in pending.items():
            seen.pop(key, None)
            seen[key] = entry
        horizon = self._clock() - self._window
        while seen:
            oldest_key, (oldest_at, _) = next(iter(seen.items()))
            if oldest_at >= horizon and len(seen) <= self._max:
                break
            del seen[oldest_key]

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


@stage(
    batch=True,
    config=IngestConfig,
    reasons={TOO_LARGE: "payload over max_payload_bytes", EMPTY: "empty payload"},
)
class Ingest:
    """Raw device bytes in; keyed by device, with lineage headers, out."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        config: IngestConfig = ctx.config
        self.config = config
        self.deduper = Deduper(config.dedup_window_s, config.dedup_max_keys, ctx.clock)

    def process_batch(self, records: Sequence[Record], out: Outputs) -> None:
        max_bytes = self.config.max_payload_bytes
        now_ms = self.ctx.now_ms()
        ingest_ts = str(now_ms).encode()
        child_traceparent = contract.child_traceparent_bytes
        pending: dict[tuple[str, str], tuple[float, bytes]] = {}
        for record in records:
            payload = record.value
            if not payload or not payload.strip():
                out.dead_letter(record, InvalidMessage(EMPTY, "empty payload"))
                continue
            if len(payload) > max_bytes:
                out.dead_letter(
                    record,
                    InvalidMessage(
                        TOO_LARGE, f"payload of {len(payload)} bytes exceeds {max_bytes}"
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
                if self.deduper.seen(device_id, seq, digest, pending):
                    out.duplicate(record)
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
            out.append(
                OutRecord(key, payload, list(incoming.items()), record.timestamp_ms, record.offset)
            )
        self.deduper.remember(pending)


ingest = Ingest
