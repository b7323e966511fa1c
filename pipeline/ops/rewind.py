"""Rewind (or advance) a stage's committed consumer-group offsets: ``pipeline replay``.

A rewind is planned per input partition of the stage (current committed offset,
target offset, low/high watermarks) and applied only on request, with
``AdminClient.alter_consumer_group_offsets``, and only while the stage's group
has no live member: a live worker would overwrite the new offsets with its next
commit (and real Kafka refuses the change anyway).

Broker facts this module works around (see :mod:`pipeline.kafka`):

* the high watermark comes from :func:`pipeline.kafka.high_watermarks` (a Fetch
  response); the embedded broker's ListOffsets(latest) is not the end;
* the embedded broker answers every ``offsets_for_times`` with 0, so a
  time-based target asked of the broker is *verified* by reading the record
  timestamps at the answer and just before it, and found by a linear scan of the
  partition when the answer is wrong (:func:`resolve_time_offset`);
* liveness comes from ``describe_consumer_groups``: the embedded broker reports a
  live group as ``STABLE`` with an empty member list, real Kafka lists members,
  so a group is live if it lists members *or* is in any state but
  EMPTY/DEAD/UNKNOWN (:func:`is_live`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline.errors import ConfigError, PipelineError
from pipeline.kafka.clients import broker_error, client_config
from pipeline.kafka.offsets import committed_offsets, high_watermarks
from pipeline.kafka.seek import PartitionSeeker, timestamp
from pipeline.kafka.topics import require_topics
from pipeline.settings import Settings
from pipeline.timeparse import parse_duration, parse_instant, to_ms

TP = tuple[str, int]
TargetKind = Literal["time", "shift", "offset", "earliest", "latest"]

#: Group states in which no consumer is a member. Anything else is live.
IDLE_STATES = frozenset({"EMPTY", "DEAD", "UNKNOWN"})

TARGET_OPTIONS = (
    "--to-datetime",
    "--by-duration",
    "--shift-by",
    "--to-offset",
    "--to-earliest",
    "--to-latest",
)


# --------------------------------------------------------------------------- pure


@dataclass(frozen=True, slots=True)
class Target:
    """Where to move the group: ``value`` is epoch ms (time), N (shift, offset), else 0."""

    kind: TargetKind
    value: int
    description: str


def parse_target(
    *,
    to_datetime: str | None,
    by_duration: str | None,
    shift_by: int | None,
    to_offset: int | None,
    to_earliest: bool,
    to_latest: bool,
    now: datetime,
) -> Target:
    """The one target the operator chose; ConfigError (one line) otherwise."""
    given = [
        name
        for name, value in zip(
            TARGET_OPTIONS,
            (to_datetime, by_duration, shift_by, to_offset, to_earliest or None, to_latest or None),
            strict=True,
        )
        if value is not None
    ]
    if not given:
        raise ConfigError(f"choose where to move the group: one of {', '.join(TARGET_OPTIONS)}")
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} exclude each other; give exactly one target")
    if to_datetime is not None:
        instant = parse_instant(to_datetime, "--to-datetime")
        return Target("time", to_ms(instant), f"first record at or after {_shown(instant)}")
    if by_duration is not None:
        duration = parse_duration(by_duration, "--by-duration")
        at = now - duration
        return Target(
            "time", to_ms(at), f"first record at or after now - {by_duration} ({_shown(at)})"
        )
    if shift_by is not None:
        return Target("shift", shift_by, f"committed offset {shift_by:+d}")
    if to_offset is not None:
        if to_offset < 0:
            raise ConfigError(f"--to-offset {to_offset} must be >= 0")
        return Target("offset", to_offset, f"offset {to_offset}")
    if to_earliest:
        return Target("earliest", 0, "low watermark (earliest)")
    return Target("latest", 0, "high watermark (latest)")


def _shown(instant: datetime) -> str:
    return instant.replace(microsecond=0).isoformat()


def clamp(offset: int, low: int, high: int) -> int:
    return max(low, min(offset, high))


def offset_target(target: Target, current: int | None, low: int, high: int) -> tuple[int, str]:
    """Target offset of one partition for a non-time target, and a note saying why."""
    if target.kind == "earliest":
        return low, "low watermark"
    if target.kind == "latest":
        return high, "high watermark"
    if target.kind == "shift":
        base, note = (current, "commit") if current is not None else (low, "no commit: low")
        wanted = base + target.value
        note = f"{note} {target.value:+d}"
    elif target.kind == "offset":
        wanted, note = target.value, "absolute"
    else:
        raise ValueError(f"{target.kind} targets are resolved by resolve_time_offset")
    offset = clamp(wanted, low, high)
    if offset != wanted:
        note += " (clamped)"
    return offset, note


def resolve_time_offset(
    target_ms: int,
    candidate: int | None,
    low: int,
    high: int,
    ts_at: Callable[[int], int | None],
    scan: Callable[[], int],
) -> tuple[int, str]:
    """The first offset in [low, high) whose record timestamp is >= ``target_ms``
    (``high`` if there is none), and how it was found: ``"broker"`` or ``"scan"``.

    ``candidate`` is the broker's ``offsets_for_times`` answer (None: "no such
    record"). It is accepted when the records around it agree: the record at it
    is at or after the target (or it is ``high``) and the record before it is
    earlier (or it is ``low``). ``ts_at(offset)`` is the timestamp of the record
    at ``offset`` (None if it cannot be read, which fails the check); ``scan()``
    reads the partition from ``low`` and is called only when the check fails.
    """
    offset = high if candidate is None else candidate
    if low <= offset <= high:
        here = None if offset == high else ts_at(offset)
        at_or_after = offset == high or (here is not None and here >= target_ms)
        if at_or_after:
            before = None if offset == low else ts_at(offset - 1)
            if offset == low or (before is not None and before < target_ms):
                return offset, "broker"
    return scan(), "scan"


def is_live(state: str, members: int) -> bool:
    """Whether a group described as ``state`` with ``members`` listed has live members."""
    return members > 0 or state.upper() not in IDLE_STATES


def stage_partitions(settings: Settings, stage_id: str, partition: int | None) -> list[TP]:
    """The stage's input partitions (only ``partition`` if given), from pipeline.yaml."""
    inputs = settings.stage(stage_id).inputs
    tps = [(t, p) for t in inputs for p in range(settings.topics[t].partitions)]
    if partition is None:
        return tps
    chosen = [tp for tp in tps if tp[1] == partition]
    if not chosen:
        counts = ", ".join(f"{t} has {settings.topics[t].partitions}" for t in inputs)
        raise ConfigError(f"partition {partition} does not exist: {counts} partition(s)")
    return chosen


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    topic: str
    partition: int
    current: int | None
    target: int
    low: int
    high: int
    #: "broker" | "scan" for time targets, else the target kind
    method: str
    note: str
    #: the broker's offsets_for_times answer (time targets only)
    broker_answer: int | None = None

    @property
    def resume_from(self) -> int:
        """Where the group resumes today: its commit, else the log start (stages
        consume with auto.offset.reset=earliest)."""
        return self.current if self.current is not None else self.low

    @property
    def delta(self) -> int:
        """Records that will be processed again (negative: skipped)."""
        return self.resume_from - self.target

    def as_dict(self, applied: bool) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "current": self.current,
            "target": self.target,
            "delta": self.delta,
            "low": self.low,
            "high": self.high,
            "method": self.method,
            "broker_answer": self.broker_answer,
            "note": self.note,
            "applied": applied,
        }


# ------------------------------------------------------------------ broker side


class PartitionReader(PartitionSeeker):
    """Single records, scans and watermarks of partitions, read with assign (no
    group, no commits); the read loop is :class:`~pipeline.kafka.seek.PartitionSeeker`'s."""

    def low_watermark(self, tp: TP) -> int:
        low, _ = self._probe.get_watermark_offsets(TopicPartition(*tp), timeout=self._timeout)
        return int(low)

    def offsets_for_times(self, tps: Iterable[TP], target_ms: int) -> dict[TP, int | None]:
        asked = [TopicPartition(t, p, target_ms) for t, p in tps]
        if not asked:
            return {}
        answer = self._probe.offsets_for_times(asked, timeout=self._timeout)
        return {
            (tp.topic, tp.partition): (tp.offset if tp.error is None and tp.offset >= 0 else None)
            for tp in answer
        }

    def timestamp_at(self, tp: TP, offset: int) -> int | None:
        """Timestamp (ms) of the record at exactly ``offset``; None if there is none."""
        msg = self.first_at(tp, offset, offset + 1)
        return None if msg is None or msg.offset() != offset else timestamp(msg)

    def first_from_time(self, tp: TP, target_ms: int, low: int, high: int) -> int:
        """First offset in [low, high) with timestamp >= ``target_ms``, else ``high``:
        a linear scan, exact whatever order the timestamps are in."""
        for msg in self.scan(tp, low, high):
            ts = timestamp(msg)
            if ts is not None and ts >= target_ms:
                return msg.offset() or low
        return high


def plan_rewind(
    settings: Settings,
    client: AdminClient,
    stage_id: str,
    target: Target,
    partition: int | None = None,
    timeout: float = 10.0,
) -> list[PartitionPlan]:
    """Per input partition of the stage: where its group is and where ``target`` is.

    Reads only; changes nothing.
    """
    tps = stage_partitions(settings, stage_id, partition)
    require_topics(client, dict.fromkeys(t for t, _ in tps), timeout)
    group = settings.group_id(stage_id)
    committed = committed_offsets(client, group, tps, timeout)
    reader = PartitionReader(settings, timeout)
    try:
        highs = high_watermarks(client_config(settings), tps, timeout)
        lows = {tp: reader.low_watermark(tp) for tp in tps}
        answers = reader.offsets_for_times(tps, target.value) if target.kind == "time" else {}
        plans = []
        for tp in tps:
            low, high, current = lows[tp], highs[tp], committed.get(tp)
            if target.kind == "time":
                answer = answers.get(tp)
                offset, method = resolve_time_offset(
                    target.value,
                    answer,
                    low,
                    high,
                    ts_at=functools.partial(reader.timestamp_at, tp),
                    scan=functools.partial(reader.first_from_time, tp, target.value, low, high),
                )
                shown = "none" if answer is None else str(answer)
                note = "broker's answer" if method == "broker" else f"scanned (broker: {shown})"
                plans.append(PartitionPlan(*tp, current, offset, low, high, method, note, answer))
            else:
                offset, note = offset_target(target, current, low, high)
                plans.append(PartitionPlan(*tp, current, offset, low, high, target.kind, note))
        return plans
    except KafkaException as exc:
        raise broker_error(f"cannot read the partitions of stage {stage_id}", exc) from None
    finally:
        reader.close()


def group_state(client: AdminClient, group_id: str, timeout: float = 10.0) -> tuple[str, int]:
    """``(state, members listed)`` of a group, from describe_consumer_groups."""
    try:
        description = client.describe_consumer_groups([group_id], request_timeout=timeout)[
            group_id
        ].result()
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return "DEAD", 0
        raise broker_error(f"cannot describe consumer group {group_id}", exc) from None
    state = description.state
    name = state.name if isinstance(state, ConsumerGroupState) else str(state)
    return name, len(description.members or [])


def ensure_idle(client: AdminClient, group_id: str, timeout: float = 10.0) -> None:
    """Raise PipelineError (one line) if the group has live members."""
    state, members = group_state(client, group_id, timeout)
    if is_live(state, members):
        raise PipelineError(
            f"consumer group {group_id} is live (state {state}, {members} member(s) listed); "
            "stop the stage's workers first"
        )


def apply_plan(
    client: AdminClient, group_id: str, plans: list[PartitionPlan], timeout: float = 10.0
) -> None:
    """Commit every plan's target for ``group_id``, then read the commits back."""
    if not plans:
        return
    request = ConsumerGroupTopicPartitions(
        group_id, [TopicPartition(p.topic, p.partition, p.target) for p in plans]
    )
    try:
        answer = client.alter_consumer_group_offsets([request], request_timeout=timeout)[
            group_id
        ].result()
    except KafkaException as exc:
        raise broker_error(f"cannot alter the offsets of group {group_id}", exc) from None
    refused = [tp for tp in answer.topic_partitions if tp.error is not None]
    if refused:
        tp = refused[0]
        raise PipelineError(
            f"broker refused the new offset of group {group_id} on {tp.topic}[{tp.partition}]: "
            f"{tp.error.str()} ({len(refused)} of {len(plans)} partition(s) refused)"
        )
    after = committed_offsets(client, group_id, [(p.topic, p.partition) for p in plans], timeout)
    for p in plans:
        got = after.get((p.topic, p.partition))
        if got != p.target:
            raise PipelineError(
                f"group {group_id} on {p.topic}[{p.partition}] reads back offset {got}, "
                f"not {p.target}; the change did not stick"
            )
