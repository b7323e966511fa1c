"""Dead letters at rest, read: references, parsing, filters, and the reader.

A dead letter is addressed by a REF, ``<stage>:<dlq partition>:<dlq offset>``
(``parse:0:17``): the stage whose dead-letter topic holds it and its place there.

Every read starts at a partition's purge *floor* (:mod:`dlq.purge`). Dead letters
whose ``dlq.*`` headers are missing or malformed are still read: unknown fields
are ``None``, the reason is ``"?"`` and :attr:`StoredDeadLetter.problems` says what
is wrong. Nothing here lets one odd record stop a command.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from dlq import envelope
from dlq.reasons import REASON_CODE
from pipeline.errors import BrokerError, ConfigError, PipelineError
from pipeline.kafka.clients import admin, client_config, consumer
from pipeline.kafka.offsets import committed_offsets, high_watermarks
from pipeline.kafka.seek import ReadCost
from pipeline.settings import Settings
from pipeline.timeparse import parse_instant, to_ms

#: The reason shown for a dead letter whose ``dlq.reason`` is missing or malformed.
UNKNOWN_REASON = "?"

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


_REF = re.compile(r"([a-z][a-z0-9-]*):(\d{1,9}):(\d{1,19})")


def parse_ref(text: str, stage_ids: Sequence[str]) -> Ref:
    """``parse:0:17`` → Ref; ConfigError (one line) for anything else."""
    match = _REF.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"bad dead-letter reference {text!r}; expected <stage>:<partition>:<offset>, "
            "e.g. parse:0:17"
        )
    stage = match.group(1)
    if stage not in stage_ids:
        raise ConfigError(
            f"bad dead-letter reference {text!r}: unknown stage {stage!r}; "
            f"choose one of: {', '.join(stage_ids)}"
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
    reason: str  # a reason code (dlq.reasons), or "?"
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
    if reason is not None and not REASON_CODE.match(reason):
        problems.append(f"{envelope.REASON} {reason[:40]!r} is not a reason code")
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

    def matches_reason(self, letter: StoredDeadLetter) -> bool:
        return not self.reasons or letter.reason in self.reasons

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


def parse_stages(values: Iterable[str], stage_ids: Sequence[str]) -> tuple[str, ...]:
    """Stage ids in pipeline order (all stages when none are given)."""
    chosen = list(dict.fromkeys(values))
    unknown = [s for s in chosen if s not in stage_ids]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; choose one of: {', '.join(stage_ids)}")
    return tuple(s for s in stage_ids if s in chosen) if chosen else tuple(stage_ids)


def parse_reasons(values: Iterable[str], known: Collection[str] | None = None) -> frozenset[str]:
    """Reason codes, checked against ``known`` (the chosen stages' declared reasons)
    when it is given, else only for their form (snake_case); "?": malformed ones."""
    chosen = frozenset(values)
    bad = sorted(r for r in chosen if r != UNKNOWN_REASON and not REASON_CODE.match(r))
    if known is not None:
        bad = sorted(r for r in chosen if r != UNKNOWN_REASON and r not in known)
    if bad:
        choose = f"choose from: {', '.join(known)}" if known is not None else "a snake_case code"
        raise ConfigError(
            f"unknown reason {bad[0]!r}; {choose} (or {UNKNOWN_REASON!r} for malformed "
            "dead letters)"
        )
    return chosen


def make_filters(
    reasons: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    known: Collection[str] | None = None,
) -> Filters:
    """Filters from command-line text; ConfigError (one line) when any part is wrong."""
    chosen = parse_reasons(reasons, known)
    since_ms = to_ms(parse_instant(since, "--since")) if since is not None else None
    until_ms = to_ms(parse_instant(until, "--until")) if until is not None else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ConfigError(f"--since {since} is not before --until {until}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {limit}")
    return Filters(chosen, since_ms, until_ms, limit)


# ----------------------------------------------------------------------- reading

_READ_TIMEOUT = 30.0


def broker_call(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except KafkaException as exc:
        err = exc.args[0]
        detail = err.str() if isinstance(err, KafkaError) else str(err)
        raise BrokerError(
            f"{what}: {detail}; check KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
        ) from None


def topic_partitions(client: AdminClient, topic: str) -> list[int]:
    metadata = broker_call(
        "cannot read topic metadata", lambda: client.list_topics(topic, timeout=10)
    )
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise BrokerError(f"topic {topic} does not exist; run `pipeline topics create`")
    return sorted(info.partitions)


def owners_of(settings: Settings, topic: str) -> list[str]:
    """The stages whose dead-letter topic ``topic`` is."""
    return [s for s in settings.stage_ids if settings.stages[s].dlq == topic]


class Reader:
    """One admin client and one assign-only consumer for a command; floors read once.
    ``cost`` counts the records read (:class:`pipeline.kafka.seek.ReadCost`)."""

    def __init__(self, settings: Settings, cost: ReadCost | None = None) -> None:
        self.settings = settings
        self.cost = cost
        self.admin = admin(settings)
        self._consumer: Any = None
        self._floors: dict[tuple[str, int], int] = {}
        self._ends: dict[tuple[str, int], int] = {}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, topics: Sequence[str]) -> dict[str, list[int]]:
        """Partitions of each topic; their floors and end offsets are fetched here."""
        partitions = {t: topic_partitions(self.admin, t) for t in dict.fromkeys(topics)}
        tps = [(t, p) for t, ps in partitions.items() for p in ps]
        floors = committed_offsets(self.admin, floor_group(self.settings), tps)
        ends = broker_call(
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
        if self.cost is not None:
            self.cost.seeks += 1
            self.cost.partitions.add((topic, partition))
        try:
            deadline = time.monotonic() + _READ_TIMEOUT
            while True:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"reading {topic}[{partition}] made no progress for {_READ_TIMEOUT:.0f}s"
                    )
                messages = broker_call(
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
                        if self.cost is not None:
                            self.cost.count(msg)
                        yield msg
                    if offset + 1 >= end:
                        return
        finally:
            reader.unassign()

    def dead_letters(
        self, stage: str, partition: int, start: int
    ) -> Generator[StoredDeadLetter, None, None]:
        topic = self.settings.stage(stage).dlq
        owners = owners_of(self.settings, topic)
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
    with Reader(settings) as reader:
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
    with Reader(settings) as reader:
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
