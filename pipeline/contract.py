"""The message contract every topic of the pipeline follows.

Topics carry bytes. Headers carry what every stage needs without decoding the body:

=============  ==============================================================
``lineage-id``  ULID assigned at ingest, unchanged through every stage
``traceparent`` W3C trace context; each stage writes a child of its input's
``source``      ``live`` or ``backfill:<run-id>``
``schema``      payload schema and version, e.g. ``reading/1``
``ingest-ts``   wall-clock milliseconds when ingest accepted the record
=============  ==============================================================

Lineage ids are *derived*, not random: the same reading (device, seq, ts) always
gets the same id, so a record re-delivered after a crash, or sent twice by a
device, is recognised downstream (the aggregate counts a lineage id once).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping

from ulid import ULID

from dlq.retry import PREFIX as RETRY_PREFIX

H_LINEAGE = "lineage-id"
H_TRACEPARENT = "traceparent"
H_SOURCE = "source"
H_SCHEMA = "schema"
H_INGEST_TS = "ingest-ts"

SCHEMA_RAW = "raw/1"
SCHEMA_READING = "reading/1"
SCHEMA_ENRICHED = "enriched/1"
SCHEMA_AGGREGATE = "aggregate/1"

SOURCE_LIVE = "live"

Headers = list[tuple[str, bytes]]

_MAX_ULID_MS = (1 << 48) - 1


def header_map(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Headers as a dict (last value wins), skipping null values."""
    if not headers:
        return {}
    return {k: v for k, v in headers if v is not None}


def lineage_id(ts_ms: int, *identity: object) -> str:
    """A ULID whose time part is ``ts_ms`` and whose random part is a hash of ``identity``.

    Deterministic: equal inputs give equal ids. ``ts_ms`` outside the ULID range is
    clamped so that any input still gets a valid id.
    """
    ts = min(max(int(ts_ms), 0), _MAX_ULID_MS)
    digest = hashlib.blake2b(repr(identity).encode("utf-8"), digest_size=10).digest()
    return str(ULID.from_bytes(ts.to_bytes(6, "big") + digest))


def new_traceparent() -> str:
    """A new W3C trace context (sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: bytes | str | None) -> str:
    """A child span of ``parent``: same trace id and flags, new span id.

    A missing or malformed parent starts a new trace, as W3C Trace Context asks.
    """
    if isinstance(parent, bytes):
        try:
            parent = parent.decode("ascii")
        except UnicodeDecodeError:
            parent = None
    if parent:
        parts = parent.split("-")
        if (
            len(parts) == 4
            and len(parts[0]) == 2
            and len(parts[1]) == 32
            and len(parts[2]) == 16
            and len(parts[3]) == 2
            and parts[1] != "0" * 32
            and all(c in "0123456789abcdef" for c in "".join(parts))
        ):
            return f"{parts[0]}-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return new_traceparent()


def next_hop_headers(incoming: Mapping[str, bytes], schema: str) -> Headers:
    """Headers for a stage's output: the input's (minus ``retry.*``), with a child
    trace span and the output's schema."""
    if any(k.startswith(RETRY_PREFIX) for k in incoming):
        incoming = {k: v for k, v in incoming.items() if not k.startswith(RETRY_PREFIX)}
    return with_headers(
        incoming,
        {H_TRACEPARENT: child_traceparent(incoming.get(H_TRACEPARENT)), H_SCHEMA: schema},
    )


def with_headers(headers: Mapping[str, bytes], updates: Mapping[str, str | bytes]) -> Headers:
    """A header list with ``updates`` replacing or adding keys."""
    merged = dict(headers)
    for key, value in updates.items():
        merged[key] = value if isinstance(value, bytes) else value.encode()
    return list(merged.items())


# -- backfill (pipeline.backfill) ---------------------------------------------------
#: ``source`` of a backfilled record: ``backfill:<run-id>``
SOURCE_BACKFILL_PREFIX = "backfill:"
#: on a backfilled record: the run's chunk it was sent in
H_BACKFILL_CHUNK = "backfill-chunk"
#: a control record (no payload) the backfill controller sends to the aggregate's
#: input at the end of a run; its ``source`` names the run
H_CONTROL = "control"
CONTROL_END_OF_INPUT = "end-of-input"


def backfill_source(run_id: str) -> str:
    return f"{SOURCE_BACKFILL_PREFIX}{run_id}"
