"""A request body into records: pure functions, no I/O.

The gateway judges only whether a body can be *split*; whether each record is a
good reading is ingest's and parse's business (they dead-letter bad ones with a
reason), so nothing is judged twice. :class:`BodyError` carries the HTTP status
and the first problem:

* 400: not UTF-8, invalid JSON, a JSON scalar, a broken gzip stream, no records;
* 413: over ``max_bytes`` after decompression, more than ``max_records`` records,
  a record over ``max_record_bytes``;
* 415: a content type or encoding the gateway does not read.

Content types (``Content-Type``, parameters other than ``charset=utf-8`` refused):

* ``application/json``: one object (one record) or an array (one record per
  element); each record is the element re-encoded compactly (orjson), so the same
  request always gives the same bytes (lineage ids are derived from them);
* ``application/x-ndjson`` (also ``application/ndjson``, ``application/jsonl``):
  one record per non-blank line, passed byte for byte;
* ``text/csv``: one record per non-blank line (``device_id,ts,seq,metric,value,unit``),
  a first line ``device_id,...`` is a header and skipped.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import orjson

Kind = Literal["json", "ndjson", "csv"]
#: one record: its bytes and the device id it names (None when unreadable)
Piece = tuple[bytes, str | None]

CONTENT_TYPES: dict[str, Kind] = {
    "application/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/x-jsonlines": "ndjson",
    "text/csv": "csv",
}
_BOM = b"\xef\xbb\xbf"


class BodyError(Exception):
    """A body the gateway refuses whole: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def content_kind(content_type: str | None) -> Kind:
    """The kind of body a ``Content-Type`` announces; BodyError 415 otherwise."""
    if not content_type:
        raise BodyError(415, "unsupported", "no Content-Type; " + _accepted())
    media, *params = (p.strip() for p in content_type.split(";"))
    kind = CONTENT_TYPES.get(media.lower())
    if kind is None:
        raise BodyError(415, "unsupported", f"Content-Type {media[:60]!r}; " + _accepted())
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise BodyError(415, "unsupported", "only charset=utf-8 is accepted")
    return kind


def _accepted() -> str:
    return "send application/json, application/x-ndjson or text/csv"


def decode_content(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body after its ``Content-Encoding`` (identity or gzip), at most
    ``max_bytes``: decompression stops there (a gzip bomb costs ``max_bytes``)."""
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        return body
    if name not in ("gzip", "x-gzip"):
        raise BodyError(415, "unsupported", f"Content-Encoding {name[:30]!r}; use gzip or none")
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BodyError(400, "bad_body", f"the gzip body is corrupt ({exc})") from None
    if len(out) > max_bytes:
        raise BodyError(413, "too_large", f"the body is over {max_bytes} bytes once decompressed")
    if not inflater.eof:
        raise BodyError(400, "bad_body", "the gzip body is truncated")
    return out


def split_body(body: bytes, kind: Kind, *, max_records: int, max_record_bytes: int) -> list[Piece]:
    """The records of a (decompressed) body; BodyError if it cannot be split, has no
    record, too many, or one too large. Nothing about a record's content beyond that."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(
            400, "bad_body", f"the body is not valid UTF-8 (byte {exc.start})"
        ) from None
    if kind == "json":
        pieces = _split_json(body, max_records)
    else:
        if body.count(b"\n") >= max_records + 1 and _count_lines(body) > max_records:
            raise _too_many(max_records)
        pieces = _split_lines(body, kind)
    if not pieces:
        raise BodyError(400, "bad_body", "the body holds no record")
    if len(pieces) > max_records:
        raise _too_many(max_records)
    for i, (value, _) in enumerate(pieces):
        if len(value) > max_record_bytes:
            raise BodyError(
                413,
                "too_large",
                f"record {i} has {len(value)} bytes, over the limit of {max_record_bytes}",
            )
    return pieces


def _too_many(max_records: int) -> BodyError:
    return BodyError(
        413, "too_many_records", f"more than {max_records} records in one request; split it"
    )


def _count_lines(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if line.strip())


def _split_json(body: bytes, max_records: int) -> list[Piece]:
    if not body.strip():
        return []
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "bad_body", f"invalid JSON: {exc}") from None
    if isinstance(doc, dict):
        return [(orjson.dumps(doc), _device(doc))]
    if not isinstance(doc, list):
        raise BodyError(400, "bad_body", "a JSON body must be an object or an array of objects")
    if len(doc) > max_records:
        raise _too_many(max_records)
    dumps = orjson.dumps
    return [(dumps(item), _device(item)) for item in doc]


def _split_lines(body: bytes, kind: Kind) -> list[Piece]:
    pieces: list[Piece] = []
    first = True
    sniff = device_of_json if kind == "ndjson" else device_of_csv
    for raw in body.split(b"\n"):
        line = raw.strip()
        if not line:
            continue
        if first and kind == "csv" and line.startswith(b"device_id,"):
            first = False
            continue
        first = False
        pieces.append((line, sniff(line)))
    return pieces


def _device(doc: Any) -> str | None:
    if isinstance(doc, dict):
        device = doc.get("device_id")
        if isinstance(device, str) and device:
            return device
    return None


def device_of_json(line: bytes) -> str | None:
    """The ``device_id`` of a JSON object, None if unreadable."""
    if not line.startswith(b"{"):
        return None
    try:
        return _device(orjson.loads(line))
    except orjson.JSONDecodeError:
        return None


def device_of_csv(line: bytes) -> str | None:
    """The first field of a CSV line, None if empty or not UTF-8."""
    head = line.split(b",", 1)[0].strip()
    if not head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        return None


def device_of(payload: bytes) -> str | None:
    """The device a raw payload names: a JSON object's ``device_id`` or a CSV line's
    first field (six fields), None if it names none."""
    stripped = payload.strip()
    if stripped.startswith(b"{"):
        return device_of_json(stripped)
    if stripped.count(b",") == 5:
        return device_of_csv(stripped)
    return None


def with_device_id(payload: bytes, device_id: str) -> tuple[bytes, str]:
    """``payload`` naming ``device_id`` if it names no device; the payload and the
    device it names. A JSON object gets ``device_id`` first (re-encoded compactly);
    a CSV line of five fields (``ts,seq,metric,value,unit``) gets it as its first
    field. Deterministic: a redelivered message gives the same bytes (and lineage id).
    Anything else is returned unchanged (parse dead-letters what it cannot read)."""
    stripped = payload.strip()
    if stripped.startswith(b"{"):
        try:
            doc = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return payload, device_id
        if not isinstance(doc, dict):
            return payload, device_id
        named = _device(doc)
        if named is not None:
            return payload, named
        if "device_id" in doc:  # present but not a usable id: leave it to parse
            return payload, device_id
        return orjson.dumps({"device_id": device_id, **doc}), device_id
    commas = stripped.count(b",")
    if commas == 5:
        named = device_of_csv(stripped)
        return payload, named or device_id
    if commas == 4 and b"\n" not in stripped:
        return device_id.encode("utf-8") + b"," + stripped, device_id
    return payload, device_id
