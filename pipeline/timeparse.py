"""Instants and durations typed by operators, parsed strictly.

An instant needs a timezone (``2026-11-29T10:00:00Z``, ``…+01:00``): a naive time
means something different on every machine it is typed on, so it is refused.
Durations are ISO 8601 (``PT10M``, ``P1DT2H``), parsed by pydantic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigError

_DURATION = TypeAdapter(timedelta)


def parse_instant(text: str, what: str = "time") -> datetime:
    """An aware datetime from ISO 8601 text; ConfigError (one line) otherwise."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not an ISO 8601 date-time; e.g. 2026-11-29T10:00:00Z"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        example = text.strip()
        raise ConfigError(
            f"{what} {text!r} has no timezone; add one, e.g. {example}Z or {example}+01:00"
        )
    return value


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """A positive timedelta from an ISO 8601 duration such as ``PT10M``."""
    stripped = text.strip()
    if not stripped.upper().startswith("P"):
        raise ConfigError(f"{what} {text!r} is not an ISO 8601 duration; e.g. PT10M or P1DT2H")
    try:
        value = _DURATION.validate_python(stripped)
    except ValidationError:
        raise ConfigError(
            f"{what} {text!r} is not an ISO 8601 duration; e.g. PT10M or P1DT2H"
        ) from None
    if value <= timedelta(0):
        raise ConfigError(f"{what} {text!r} must be positive")
    return value


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
