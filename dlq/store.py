"""Dead letters at rest: read, summarize, export, replay and (logically) purge them.

A dead letter is addressed by a REF, ``<stage>:<dlq partition>:<dlq offset>``
(``parse:0:17``): the stage whose dead-letter topic holds it and its place there.

Purging is logical. Deleting records (DeleteRecords) crashes the embedded broker,
so each dead-letter partition has a *floor*: an offset stored as the committed
offset of the consumer group ``<app_prefix>-dlq-floor``. Everything here ignores
records below the floor; the broker removes them physically when the topic's
``retention.ms`` expires. A floor never moves backwards.

Dead letters whose ``dlq.*`` headers are missing or malformed are still read:
unknown fields are ``None``, the reason is ``"?"`` and :attr:`problems` says what
is wrong. Nothing here lets one odd record stop a command.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from dlq import envelope
from dlq.reasons import Reason
from dlq.retry import PREFIX as RETRY_PREFIX
from pipeline.errors import BrokerError, ConfigError, PipelineError
from pipeline.kafka import admin, client_config, consumer, high_watermarks, producer
from pipeline.lag import committed_offsets
from pipeline.settings import STAGE_IDS, Settings
from pipeline.timeparse import from_ms, parse_instant, to_ms

#: The reason shown for a dead letter whose ``dlq.reason`` is missing or unknown.
UNKNOWN_REASON = "?"
REASONS: tuple[str, ...] = tuple(str(r) for r in Reason)
PREVIEW_BYTES = 512

Header = tuple[str, bytes | None]


def floor_group(settings: Settings) -> str:
    """The consumer group whose committed offsets are the purge floors."""
    return f"{settings.app_prefix}-dlq-floor"


# --------------------------------------------------------------------------- refs


@dataclass(frozen=True, slots=True)
class Ref:
    stage: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.stage}:{self.partition}:{self.offset}"


_REF = re.compile(r"([a-z_]+):(\d{1,9}):(\d{1,19})")


def parse_ref(text: str) -> Ref:
    """``parse:0:17`` → Ref; ConfigError (one line) for anything else."""
    match = _REF.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"bad dead-letter reference {text!r}; expected <stage>:<partition>:<offset>, "
            "e.g. parse:0:17"
        )
    stage = match.group(1)
    if stage not in STAGE_IDS:
        raise ConfigError(
            f"bad dead-letter reference {text!r}: unknown stage {stage!r}; "
            f"choose one of: {', '.join(STAGE_IDS)}"
        )
    return Ref(stage, int(match.group(2)), int(match.group(3)))


# ----------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One record of a dead-letter topic, its envelope parsed."""

    stage: str  # the stage whose dead-letter topic holds it
    topic: str  # the dead-letter topic
    partition: int
    offset: int
    timestamp_ms: int | None  # the dead-letter record's own timestamp
    reason: str  # a Reason value, or "?"
    error_class: str | None
    error_message: str | None
    original_topic: str | None
    original_partition: int | None
    original_offset: int | None
    original_timestamp_ms: int | None
    failed_at_ms: int | None
    attempts: int | None
    replay_count: int  # 0 when the header is missing or malformed
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]  # every header, as on the record
    problems: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.stage}:{self.partition}:{self.offset}"

    @property
    def malformed(self) -> bool:
        return bool(self.problems)

    @property
    def header_stage(self) -> str | None:
        value = _last_header(self.headers, envelope.STAGE)
        return None if value is None else value.decode("utf-8", "replace")

    def original_headers(self) -> list[Header]:
        """The record's headers before it was dead-lettered (no ``dlq.*``)."""
        return [(n, v) for n, v in self.headers if not n.startswith(envelope.PREFIX)]


def _last_header(headers: Sequence[Header], name: str) -> bytes | None:
    found: bytes | None = None
    for n, v in headers:
        if n == name:
            found = v if v is not None else b""
    return found


def parse_dead_letter(
    stage: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None,
    timestamp_ms: int | None = None,
) -> StoredDeadLetter:
    """Parse one consumed record; never raises on odd headers (see :attr:`problems`)."""
    hdrs: tuple[Header, ...] = tuple((str(n), v) for n, v in (headers or ()))
    problems: list[str] = []

    def text(name: str) -> str | None:
        raw = _last_header(hdrs, name)
        if raw is None:
            problems.append(f"{name} missing")
            return None
        return raw.decode("utf-8", "replace")

    def integer(name: str) -> int | None:
        raw = text(name)
        if raw is None:
            return None
        try:
            number = int(raw.strip())
        except ValueError:
            problems.append(f"{name} {raw[:40]!r} is not an integer")
            return None
        if number < 0:
            problems.append(f"{name} {number} is negative")
            return None
        return number

    reason = text(envelope.REASON)
    if reason is not None and reason not in REASONS:
        problems.append(f"{envelope.REASON} {reason[:40]!r} is not a known reason")
        reason = None
    text(envelope.STAGE)  # the stage comes from the topic; a missing header is a problem
    error_class = text(envelope.ERROR_CLASS)
    error_message = text(envelope.ERROR_MESSAGE)
    original_topic = text(envelope.ORIGINAL_TOPIC)
    original_partition = integer(envelope.ORIGINAL_PARTITION)
    original_offset = integer(envelope.ORIGINAL_OFFSET)
    original_timestamp = integer(envelope.ORIGINAL_TIMESTAMP)
    failed_at = integer(envelope.FAILED_AT)
    attempts = integer(envelope.ATTEMPTS)
    replay_count = integer(envelope.REPLAY_COUNT)
    return StoredDeadLetter(
        stage=stage,
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms if timestamp_ms is not None and timestamp_ms > 0 else None,
        reason=reason if reason is not None else UNKNOWN_REASON,
        error_class=error_class,
        error_message=error_message,
        original_topic=original_topic,
        original_partition=original_partition,
        original_offset=original_offset,
        original_timestamp_ms=original_timestamp,
        failed_at_ms=failed_at,
        attempts=attempts,
        replay_count=replay_count or 0,
        key=key,
        value=value,
        headers=hdrs,
        problems=tuple(problems),
    )


# ----------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command acts on. ``since`` inclusive, ``until`` exclusive,
    both on ``dlq.failed-at``; a dead letter without a failed-at never matches a
    time bound. ``limit`` keeps the first N matches (stage, partition, offset order)."""

    reasons: frozenset[str] = frozenset()  # empty: any
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int | None = None

    def matches(self, letter: StoredDeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.since_ms is not None or self.until_ms is not None:
            at = letter.failed_at_ms
            if at is None:
                return False
            if self.since_ms is not None and at < self.since_ms:
                return False
            if self.until_ms is not None and at >= self.until_ms:
                return False
        return True

    def apply(self, letters: Iterable[StoredDeadLetter]) -> Iterator[StoredDeadLetter]:
        if self.limit is not None and self.limit <= 0:
            return
        taken = 0
        for letter in letters:
            if self.matches(letter):
                yield letter
                taken += 1
                if self.limit is not None and taken >= self.limit:
                    return


def parse_stages(values: Iterable[str]) -> tuple[str, ...]:
    """Stage ids in pipeline order (all stages when none are given)."""
    chosen = list(dict.fromkeys(values))
    unknown = [s for s in chosen if s not in STAGE_IDS]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; choose one of: {', '.join(STAGE_IDS)}")
    return tuple(s for s in STAGE_IDS if s in chosen) if chosen else STAGE_IDS


def parse_reasons(values: Iterable[str]) -> frozenset[str]:
    """Reason codes, checked against :class:`dlq.reasons.Reason` ("?": malformed ones)."""
    chosen = frozenset(values)
    unknown = sorted(chosen - set(REASONS) - {UNKNOWN_REASON})
    if unknown:
        raise ConfigError(
            f"unknown reason {unknown[0]!r}; choose from: {', '.join(REASONS)} "
            f"(or {UNKNOWN_REASON!r} for malformed dead letters)"
        )
    return chosen


def make_filters(
    reasons: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> Filters:
    """Filters from command-line text; ConfigError (one line) when any part is wrong."""
    chosen = parse_reasons(reasons)
    since_ms = to_ms(parse_instant(since, "--since")) if since is not None else None
    until_ms = to_ms(parse_instant(until, "--until")) if until is not None else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ConfigError(f"--since {since} is not before --until {until}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {limit}")
    return Filters(chosen, since_ms, until_ms, limit)


# ----------------------------------------------------------------------- reading

_READ_TIMEOUT = 30.0


def _broker_call(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except KafkaException as exc:
        err = exc.args[0]
        detail = err.str() if isinstance(err, KafkaError) else str(err)
        raise BrokerError(
            f"{what}: {detail}; check KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
        ) from None


def _partitions(client: AdminClient, topic: str) -> list[int]:
    metadata = _broker_call(
        "cannot read topic metadata", lambda: client.list_topics(topic, timeout=10)
    )
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise BrokerError(f"topic {topic} does not exist; run `pipeline topics create`")
    return sorted(info.partitions)


def _owners(settings: Settings, topic: str) -> list[str]:
    return [s for s in STAGE_IDS if settings.stages[s].dlq == topic]


class _Reader:
    """One admin client and one assign-only consumer for a command; floors read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = admin(settings)
        self._consumer: Any = None
        self._floors: dict[tuple[str, int], int] = {}
        self._ends: dict[tuple[str, int], int] = {}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, topics: Sequence[str]) -> dict[str, list[int]]:
        """Partitions of each topic; their floors and end offsets are fetched here."""
        partitions = {t: _partitions(self.admin, t) for t in dict.fromkeys(topics)}
        tps = [(t, p) for t, ps in partitions.items() for p in ps]
        floors = committed_offsets(self.admin, floor_group(self.settings), tps)
        ends = _broker_call(
            "cannot read the end offsets of the dead-letter topics",
            lambda: high_watermarks(client_config(self.settings), tps),
        )
        for tp in tps:
            self._floors[tp] = floors.get(tp) or 0
            self._ends[tp] = ends[tp]
        return partitions

    def floor(self, topic: str, partition: int) -> int:
        return self._floors[(topic, partition)]

    def end(self, topic: str, partition: int) -> int:
        return self._ends[(topic, partition)]

    def records(self, topic: str, partition: int, start: int) -> Generator[Any, None, None]:
        """Messages of one partition from ``start`` to its end as of :meth:`prepare`."""
        end = self.end(topic, partition)
        if start >= end:
            return
        if self._consumer is None:
            self._consumer = consumer(self.settings)
        reader = self._consumer
        reader.assign([TopicPartition(topic, partition, start)])
        try:
            deadline = time.monotonic() + _READ_TIMEOUT
            while True:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"reading {topic}[{partition}] made no progress for {_READ_TIMEOUT:.0f}s"
                    )
                messages = _broker_call(
                    f"reading {topic}", lambda: reader.consume(num_messages=500, timeout=0.2)
                )
                for msg in messages:
                    if msg.partition() != partition or msg.topic() != topic:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if (msg.offset() or 0) >= end:
                                return
                            continue
                        raise BrokerError(f"reading {topic}[{partition}]: {err.str()}")
                    deadline = time.monotonic() + _READ_TIMEOUT
                    offset = msg.offset() or 0
                    if offset < start:
                        continue
                    if offset < end:
                        yield msg
                    if offset + 1 >= end:
                        return
        finally:
            reader.unassign()

    def dead_letters(
        self, stage: str, partition: int, start: int
    ) -> Generator[StoredDeadLetter, None, None]:
        topic = self.settings.stage(stage).dlq
        owners = _owners(self.settings, topic)
        for msg in self.records(topic, partition, start):
            letter = _from_message(stage, msg)
            if len(owners) > 1:  # a topic shared by stages: dlq.stage says whose it is
                holder = letter.header_stage
                if (holder if holder in owners else owners[0]) != stage:
                    continue
            yield letter


def _from_message(stage: str, msg: Any) -> StoredDeadLetter:
    _, ts = msg.timestamp()
    return parse_dead_letter(
        stage,
        msg.topic() or "",
        msg.partition() or 0,
        msg.offset() or 0,
        msg.key(),
        msg.value(),
        msg.headers(),
        ts,
    )


def iter_dead_letters(
    settings: Settings, stages: Sequence[str]
) -> Generator[StoredDeadLetter, None, None]:
    """Every dead letter of ``stages`` at or above its partition's floor, in stage,
    partition, offset order. Streams: nothing is held beyond the current record."""
    with _Reader(settings) as reader:
        partitions = reader.prepare([settings.stage(s).dlq for s in stages])
        for stage in stages:
            topic = settings.stage(stage).dlq
            for partition in partitions[topic]:
                yield from reader.dead_letters(stage, partition, reader.floor(topic, partition))


def read_dead_letters(
    settings: Settings, stages: Sequence[str], filters: Filters | None = None
) -> list[StoredDeadLetter]:
    """The dead letters of ``stages`` that pass ``filters`` (purged ones never do)."""
    chosen = filters or Filters()
    letters = iter_dead_letters(settings, stages)
    try:
        return list(chosen.apply(letters))
    finally:
        letters.close()


class NotFound(PipelineError):
    """No dead letter at that REF (or it was purged)."""


def find(settings: Settings, ref: Ref) -> StoredDeadLetter:
    """The dead letter at ``ref``; :class:`NotFound` (exit 1) if there is none."""
    with _Reader(settings) as reader:
        topic = settings.stage(ref.stage).dlq
        partitions = reader.prepare([topic])[topic]
        if ref.partition not in partitions:
            raise NotFound(f"dead letter {ref} not found: {topic} has no partition {ref.partition}")
        floor = reader.floor(topic, ref.partition)
        if ref.offset < floor:
            raise NotFound(
                f"dead letter {ref} was purged (the floor of {topic}[{ref.partition}] is {floor})"
            )
        end = reader.end(topic, ref.partition)
        if ref.offset >= end:
            raise NotFound(
                f"dead letter {ref} not found: {topic}[{ref.partition}] ends at offset {end}"
            )
        letters = reader.dead_letters(ref.stage, ref.partition, ref.offset)
        try:
            for letter in letters:
                if letter.offset == ref.offset:
                    return letter
                break
        finally:
            letters.close()
    raise NotFound(f"dead letter {ref} not found (deleted by retention or not a dead letter)")


# ---------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class SummaryRow:
    stage: str
    reason: str
    count: int
    oldest_failed_at_ms: int | None
    newest_failed_at_ms: int | None
    max_replay_count: int


def summarize(letters: Iterable[StoredDeadLetter]) -> list[SummaryRow]:
    """Counts by stage and reason with the oldest and newest failed-at (stage order)."""
    acc: dict[tuple[str, str], list[Any]] = {}
    for letter in letters:
        row = acc.setdefault((letter.stage, letter.reason), [0, None, None, 0])
        row[0] += 1
        at = letter.failed_at_ms
        if at is not None:
            row[1] = at if row[1] is None else min(row[1], at)
            row[2] = at if row[2] is None else max(row[2], at)
        row[3] = max(row[3], letter.replay_count)

    def order(key: tuple[str, str]) -> tuple[int, int, str]:
        stage, reason = key
        rank = REASONS.index(reason) if reason in REASONS else len(REASONS)
        return (STAGE_IDS.index(stage) if stage in STAGE_IDS else len(STAGE_IDS), rank, stage)

    return [SummaryRow(s, r, *acc[(s, r)]) for s, r in sorted(acc, key=order)]


# ------------------------------------------------------------ text and JSON views


def iso(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC (``…Z``)."""
    if ms is None:
        return None
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utf8_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\r\t" for c in text)


@dataclass(frozen=True, slots=True)
class Preview:
    encoding: str  # "text" | "hex" | "none"
    text: str
    size: int
    truncated: bool


def preview(data: bytes | None, limit: int = PREVIEW_BYTES) -> Preview:
    """The first ``limit`` bytes: as text when printable UTF-8, else as hex."""
    if data is None:
        return Preview("none", "", 0, False)
    head = data[:limit]
    truncated = len(data) > limit
    for cut in range(4 if truncated else 1):  # a multi-byte character may straddle the cut
        try:
            decoded = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _printable(decoded):
            return Preview("text", decoded, len(data), truncated)
        break
    return Preview("hex", head.hex(" "), len(data), truncated)


def brief(letter: StoredDeadLetter) -> dict[str, Any]:
    """The envelope of a dead letter as JSON-ready fields (no key, value, headers)."""
    return {
        "ref": letter.ref,
        "stage": letter.stage,
        "reason": letter.reason,
        "error_class": letter.error_class,
        "error_message": letter.error_message,
        "original_topic": letter.original_topic,
        "original_partition": letter.original_partition,
        "original_offset": letter.original_offset,
        "original_timestamp": iso(letter.original_timestamp_ms),
        "original_timestamp_ms": letter.original_timestamp_ms,
        "failed_at": iso(letter.failed_at_ms),
        "failed_at_ms": letter.failed_at_ms,
        "attempts": letter.attempts,
        "replay_count": letter.replay_count,
        "dlq_topic": letter.topic,
        "dlq_partition": letter.partition,
        "dlq_offset": letter.offset,
        "problems": list(letter.problems),
    }


def full(letter: StoredDeadLetter) -> dict[str, Any]:
    """Everything, bytes as base64 plus a UTF-8 text field when they decode."""
    return {
        **brief(letter),
        "key_b64": b64(letter.key),
        "key_text": utf8_text(letter.key),
        "value_b64": b64(letter.value),
        "value_text": utf8_text(letter.value),
        "headers": [
            {"name": n, "value_b64": b64(v), "value_text": utf8_text(v)} for n, v in letter.headers
        ],
    }


# ----------------------------------------------------------------------- export

EXPORT_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
_EXPORT_BATCH = 5000


def export_format(path: str | Path) -> str:
    """``parquet`` or ``jsonl`` from the file name; ConfigError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ConfigError(
            f"cannot export to {str(path)!r}: the file name must end in .parquet or .jsonl"
        )
    return EXPORT_FORMATS[suffix]


def parquet_schema() -> Any:
    import pyarrow as pa

    ts = pa.timestamp("ms", tz="UTC")
    return pa.schema(
        [
            ("ref", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("error_class", pa.string()),
            ("error_message", pa.string()),
            ("original_topic", pa.string()),
            ("original_partition", pa.int32()),
            ("original_offset", pa.int64()),
            ("original_timestamp", ts),
            ("failed_at", ts),
            ("attempts", pa.int32()),
            ("replay_count", pa.int32()),
            ("key", pa.binary()),
            ("value", pa.binary()),
            (
                "headers",
                pa.list_(pa.struct([("name", pa.string()), ("value", pa.binary())])),
            ),
        ]
    )


def _parquet_rows(letters: Sequence[StoredDeadLetter]) -> dict[str, list[Any]]:
    return {
        "ref": [d.ref for d in letters],
        "stage": [d.stage for d in letters],
        "reason": [d.reason for d in letters],
        "error_class": [d.error_class for d in letters],
        "error_message": [d.error_message for d in letters],
        "original_topic": [d.original_topic for d in letters],
        "original_partition": [d.original_partition for d in letters],
        "original_offset": [d.original_offset for d in letters],
        "original_timestamp": [d.original_timestamp_ms for d in letters],
        "failed_at": [d.failed_at_ms for d in letters],
        "attempts": [d.attempts for d in letters],
        "replay_count": [d.replay_count for d in letters],
        "key": [d.key for d in letters],
        "value": [d.value for d in letters],
        "headers": [[{"name": n, "value": v} for n, v in d.headers] for d in letters],
    }


def _batches(letters: Iterable[StoredDeadLetter], size: int) -> Iterator[list[StoredDeadLetter]]:
    batch: list[StoredDeadLetter] = []
    for letter in letters:
        batch.append(letter)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def export(letters: Iterable[StoredDeadLetter], path: str | Path) -> int:
    """Write ``letters`` to a Parquet or JSON-lines file (by extension); return the count.

    The file appears complete or not at all (written beside it, then renamed).
    """
    target = Path(path)
    kind = export_format(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    count = 0
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema()
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in _batches(letters, _EXPORT_BATCH):
                    writer.write_table(pa.table(_parquet_rows(batch), schema=schema))
                    count += len(batch)
        else:
            with tmp.open("w", encoding="utf-8") as out:
                for letter in letters:
                    out.write(json.dumps(full(letter), ensure_ascii=False) + "\n")
                    count += 1
        os.replace(tmp, target)
    except OSError as exc:
        raise PipelineError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------- replay


class Pacer:
    """At most ``rate`` calls of :meth:`wait` return per second (no burst)."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def wait(self) -> None:
        if not self._interval:
            return
        now = self._clock()
        if self._next is not None and now < self._next:
            self._sleep(self._next - now)
            now = self._next
        self._next = now + self._interval


@dataclass(frozen=True, slots=True)
class ReplayReport:
    stage: str
    target_topic: str
    dry_run: bool
    max_replays: int
    sent: dict[str, int]  # by reason (what would be sent, on a dry run)
    refused: dict[str, int]  # by reason: replay-count already at --max-replays
    sent_refs: tuple[str, ...]
    refused_refs: tuple[str, ...]

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "target_topic": self.target_topic,
            "dry_run": self.dry_run,
            "max_replays": self.max_replays,
            "sent": self.sent,
            "refused": self.refused,
            "sent_total": self.sent_total,
            "refused_total": self.refused_total,
            "sent_refs": list(self.sent_refs),
            "refused_refs": list(self.refused_refs),
        }


def replay_headers(letter: StoredDeadLetter) -> list[Header]:
    """The original headers (no ``dlq.*``, no stale ``retry.*``) plus
    ``dlq.replay-count`` one higher than before."""
    kept = [(n, v) for n, v in letter.original_headers() if not n.startswith(RETRY_PREFIX)]
    return [*kept, (envelope.REPLAY_COUNT, str(letter.replay_count + 1).encode())]


def replay_timestamp(letter: StoredDeadLetter) -> int | None:
    """The original record's timestamp, so event-time code sees the original time."""
    for ts in (letter.original_timestamp_ms, letter.timestamp_ms):
        if ts is not None and ts > 0:
            return ts
    return None


def replay(
    settings: Settings,
    stage: str,
    filters: Filters | None = None,
    *,
    max_replays: int = 3,
    dry_run: bool = False,
    rate: float | None = None,
    flush_timeout: float = 90.0,
) -> ReplayReport:
    """Send a stage's matching dead letters back to its input topic.

    Dead letters whose replay-count is already ``max_replays`` or more are refused.
    Returns once the broker acknowledged every record sent; raises BrokerError or
    PipelineError if any was not (some may have been written: see the message).
    """
    target = settings.stage(stage).inputs[0]
    _partitions(admin(settings), target)  # fail fast (BrokerError) if it does not exist
    chosen = filters or Filters()
    to_send: list[StoredDeadLetter] = []
    refused: list[StoredDeadLetter] = []
    letters = iter_dead_letters(settings, [stage])
    try:
        for letter in chosen.apply(letters):
            (refused if letter.replay_count >= max_replays else to_send).append(letter)
    finally:
        letters.close()
    report = ReplayReport(
        stage=stage,
        target_topic=target,
        dry_run=dry_run,
        max_replays=max_replays,
        sent=dict(Counter(d.reason for d in to_send)),
        refused=dict(Counter(d.reason for d in refused)),
        sent_refs=tuple(d.ref for d in to_send),
        refused_refs=tuple(d.ref for d in refused),
    )
    if dry_run or not to_send:
        return report
    _send(settings, target, to_send, Pacer(rate), flush_timeout)
    return report


def _send(
    settings: Settings,
    topic: str,
    letters: Sequence[StoredDeadLetter],
    pacer: Pacer,
    flush_timeout: float,
) -> None:
    client = producer(settings)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    for letter in letters:
        pacer.wait()
        kwargs: dict[str, Any] = {"headers": replay_headers(letter), "on_delivery": on_delivery}
        ts = replay_timestamp(letter)
        if ts is not None:
            kwargs["timestamp"] = ts
        while True:
            try:
                client.produce(topic, letter.value, letter.key, **kwargs)
                break
            except BufferError:
                client.poll(0.05)
            except KafkaException as exc:
                raise BrokerError(f"cannot produce to {topic}: {exc.args[0]}") from None
        client.poll(0)
    left = client.flush(flush_timeout)
    total = len(letters)
    if left:
        raise BrokerError(
            f"{left} of {total} replayed record(s) not acknowledged by the broker within "
            f"{flush_timeout:.0f}s; some may have been written to {topic}"
        )
    if errors:
        raise PipelineError(
            f"{len(errors)} of {total} replayed record(s) failed ({errors[0]}); "
            f"the others were written to {topic}"
        )


# ------------------------------------------------------------------------ purge


@dataclass(frozen=True, slots=True)
class PartitionPurge:
    partition: int
    old_floor: int
    new_floor: int
    end: int
    purged: int  # dead letters between the old and new floor
    blocked_by: str | None = None  # REF of a dead letter without failed-at that stopped it


@dataclass(frozen=True, slots=True)
class PurgeReport:
    stage: str
    topic: str
    before_ms: int
    dry_run: bool
    partitions: tuple[PartitionPurge, ...]
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def purged(self) -> int:
        return sum(p.purged for p in self.partitions)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "topic": self.topic,
            "before": iso(self.before_ms),
            "dry_run": self.dry_run,
            "purged": self.purged,
            "by_reason": self.by_reason,
            "partitions": [
                {
                    "partition": p.partition,
                    "old_floor": p.old_floor,
                    "new_floor": p.new_floor,
                    "end": p.end,
                    "purged": p.purged,
                    "blocked_by": p.blocked_by,
                }
                for p in self.partitions
            ],
        }


def purge(settings: Settings, stage: str, before_ms: int, *, dry_run: bool = True) -> PurgeReport:
    """Move each partition's floor up to the first dead letter that failed at or after
    ``before_ms`` (scanning from the current floor; never backwards).

    A dead letter without a readable failed-at stops the floor (it is reported as
    ``blocked_by``): what cannot be dated is not hidden. Nothing is deleted; with
    ``dry_run`` nothing is changed at all.
    """
    topic = settings.stage(stage).dlq
    results: list[PartitionPurge] = []
    reasons: Counter[str] = Counter()
    with _Reader(settings) as reader:
        for partition in reader.prepare([topic])[topic]:
            old = reader.floor(topic, partition)
            end = reader.end(topic, partition)
            new, count, blocked = max(old, end), 0, None
            letters = reader.dead_letters(stage, partition, old)
            try:
                for letter in letters:
                    at = letter.failed_at_ms
                    if at is None or at >= before_ms:
                        new = letter.offset
                        blocked = letter.ref if at is None else None
                        break
                    count += 1
                    reasons[letter.reason] += 1
            finally:
                letters.close()
            results.append(PartitionPurge(partition, old, max(old, new), end, count, blocked))
        moved = [p for p in results if p.new_floor > p.old_floor]
        if moved and not dry_run:
            _set_floors(reader.admin, floor_group(settings), topic, moved)
    return PurgeReport(stage, topic, before_ms, dry_run, tuple(results), dict(reasons))


def _set_floors(
    client: AdminClient, group: str, topic: str, moved: Sequence[PartitionPurge]
) -> None:
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p.partition, p.new_floor) for p in moved]
    )
    futures = _broker_call(
        f"cannot store the purge floor (group {group})",
        lambda: client.alter_consumer_group_offsets([request], request_timeout=15),
    )
    answer = _broker_call(
        f"cannot store the purge floor (group {group})", lambda: futures[group].result()
    )
    for tp in answer.topic_partitions:
        if tp.error is not None:
            raise BrokerError(
                f"cannot store the purge floor of {topic}[{tp.partition}]: {tp.error.str()}"
            )
