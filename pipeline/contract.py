"""The message contract every topic of the pipeline follows.

Topics carry bytes. Headers carry what every stage needs without decoding the body:

=============  ==============================================================
``lineage-id``  ULID assigned at ingest, unchanged through every stage
``traceparent`` W3C trace context; each stage writes a child of its input's
``source``      ``live`` or ``backfill:<run-id>``
``schema``      payload schema and version, e.g. ``reading/1``
``ingest-ts``   wall-clock milliseconds when the record entered the pipeline
=============  ==============================================================

and, where they apply, ``lineage-parent`` (a fan-out's child: its parent's id) and
``state-ref`` (an output made from state, e.g. a window: which one).

Lineage ids are *derived*, not random: the same reading (device, seq, ts) always
gets the same id, so a record re-delivered after a crash, or sent twice by a
device, is recognised downstream (the aggregate counts a lineage id once).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from dlq.retry import PREFIX as RETRY_PREFIX

H_LINEAGE = "lineage-id"
H_TRACEPARENT = "traceparent"
H_SOURCE = "source"
H_SCHEMA = "schema"
H_INGEST_TS = "ingest-ts"
#: on one of several outputs a stage made of one record: the input's lineage id
H_LINEAGE_PARENT = "lineage-parent"
#: on an output made from state: the state it came from (e.g. a window's key and
#: start), as a JSON array; a ``counted`` lineage hop names the same
H_STATE_REF = "state-ref"

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


# Crockford's base32 (the ULID alphabet), two digits (10 bits) per entry
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = tuple(range(120, -1, -10))


def ulid_str(raw: bytes) -> str:
    """The canonical 26-character text of a 16-byte ULID (as ``str(ulid.ULID)``):
    the 128 bits as 26 base32 digits, the first holding 3 bits. A few times faster
    than the ulid package; ingest makes one per record."""
    n = int.from_bytes(raw, "big")
    pairs = _PAIRS
    return "".join([pairs[(n >> s) & 1023] for s in _SHIFTS])


_DIGITS = {c: i for i, c in enumerate(_CROCKFORD)} | {
    c.lower(): i for i, c in enumerate(_CROCKFORD)
}


def ulid_ms(text: str) -> int | None:
    """The time part of a ULID's text (ms since the epoch: for a lineage id, the
    reading's own time); None if ``text`` is not a ULID."""
    if len(text) != 26:
        return None
    n = 0
    for char in text[:10]:
        digit = _DIGITS.get(char)
        if digit is None:
            return None
        n = n * 32 + digit
    return n if n <= _MAX_ULID_MS else None


def lineage_id(ts_ms: int, *identity: object) -> str:
    """A ULID whose time part is ``ts_ms`` and whose random part is a hash of ``identity``.

    Deterministic: equal inputs give equal ids. ``ts_ms`` outside the ULID range is
    clamped so that any input still gets a valid id.
    """
    ts = min(max(int(ts_ms), 0), _MAX_ULID_MS)
    digest = hashlib.blake2b(repr(identity).encode("utf-8"), digest_size=10).digest()
    return ulid_str(ts.to_bytes(6, "big") + digest)


def entry_lineage_id(ts_ms: int, topic: str, partition: int, offset: int) -> str:
    """The lineage id of a record that entered a stage without one (it came from
    outside the pipeline): derived from where it entered, so a re-delivery, its
    outputs, its lineage hop and its dead letter all name the same id."""
    return lineage_id(ts_ms, topic, partition, offset)


# Trace and span ids: W3C Trace Context asks for random, non-zero ids. They come
# from os.urandom in bulk (one call per 1024 span ids, a syscall per record cost
# ~0.5 µs); a forked child starts a pool of its own.
_ZERO_SPAN = b"0" * 16
_POOL = 1024
_spans: Iterator[bytes] = iter(())
_fork_hook = False


def _refill() -> Iterator[bytes]:
    global _spans, _fork_hook
    if not _fork_hook and hasattr(os, "register_at_fork"):  # at first use, not at import
        os.register_at_fork(after_in_child=_forget_pool)
        _fork_hook = True
    text = os.urandom(8 * _POOL).hex().encode()
    _spans = iter([s for i in range(0, 16 * _POOL, 16) if (s := text[i : i + 16]) != _ZERO_SPAN])
    return _spans


def _forget_pool() -> None:  # pragma: no cover - runs in a forked child
    global _spans
    _spans = iter(())


def _span_id() -> bytes:
    """A random, non-zero 8-byte span id as 16 lowercase hex digits."""
    try:
        return next(_spans)
    except StopIteration:
        return next(_refill())


def new_traceparent_bytes() -> bytes:
    """A new W3C trace context (sampled), as a header value."""
    return b"00-" + _span_id() + _span_id() + b"-" + _span_id() + b"-01"


def new_traceparent() -> str:
    """A new W3C trace context (sampled)."""
    return new_traceparent_bytes().decode("ascii")


#: a traceparent a child can be made of: ``vv-<trace id>-<span id>-ff`` in lowercase
#: hex, the trace id not all zeros
_PARENT = re.compile(rb"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_is_parent = _PARENT.fullmatch


def child_traceparent_bytes(parent: bytes | None) -> bytes:
    """:func:`child_traceparent` as a header value, from a header value: same trace
    id and flags as ``parent``, a new span id; a new trace if ``parent`` is missing
    or malformed."""
    if parent is not None and _is_parent(parent) is not None:
        return parent[:36] + _span_id() + parent[52:]
    return new_traceparent_bytes()


def child_traceparent(parent: bytes | str | None) -> str:
    """A child span of ``parent``: same trace id and flags, new span id.

    A missing or malformed parent starts a new trace, as W3C Trace Context asks.
    """
    if isinstance(parent, str):
        try:
            parent = parent.encode("ascii")
        except UnicodeEncodeError:
            parent = None
    return child_traceparent_bytes(parent or None).decode("ascii")


def next_hop_headers(incoming: Mapping[str, bytes], schema: str) -> Headers:
    """Headers for a stage's output: the input's (minus ``retry.*``), with a child
    trace span and the output's schema."""
    if any(k.startswith(RETRY_PREFIX) for k in incoming):
        incoming = {k: v for k, v in incoming.items() if not k.startswith(RETRY_PREFIX)}
    return with_headers(
        incoming,
        {H_TRACEPARENT: child_traceparent(incoming.get(H_TRACEPARENT)), H_SCHEMA: schema},
    )


def next_hop(headers: Sequence[tuple[str, bytes | None]], schema: bytes) -> Headers:
    """Headers for a 1:1 stage's output, straight from its input record's header
    pairs (what :func:`next_hop_headers` makes of :func:`header_map` of them): in
    their order, with a child ``traceparent`` and the output's ``schema`` in place
    (or added at the end, in that order), null values and ``retry.*`` dropped. The
    pairs that stay are reused as they are; other repeated names pass through."""
    out: Headers = []
    parent: bytes | None = None
    at_trace = at_schema = -1
    for pair in headers:
        name, value = pair
        if name == H_TRACEPARENT:
            if at_trace >= 0 or value is None:
                return next_hop_headers(header_map(headers), schema.decode())
            at_trace = len(out)
            parent = value
            out.append(pair)  # type: ignore[arg-type]  # replaced below
        elif name == H_SCHEMA:
            if at_schema >= 0 or value is None:
                return next_hop_headers(header_map(headers), schema.decode())
            at_schema = len(out)
            out.append((name, schema))
        elif value is None or name.startswith(RETRY_PREFIX):
            if value is None and any(n == name and v is not None for n, v in headers):
                return next_hop_headers(header_map(headers), schema.decode())
            continue
        else:
            out.append(pair)  # type: ignore[arg-type]
    child = (H_TRACEPARENT, child_traceparent_bytes(parent))
    if at_trace >= 0:
        out[at_trace] = child
    else:
        out.append(child)
    if at_schema < 0:
        out.append((H_SCHEMA, schema))
    return out


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
