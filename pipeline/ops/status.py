"""``pipeline status``: how each stage is doing, from the broker alone.

Per stage, in pipeline order (ingest, parse, enrich, aggregate):

group state, members
    From ``describe_consumer_groups`` (:func:`pipeline.rewind.group_state`). The
    embedded broker lists no members but reports the state right (``STABLE``
    while a member is live, ``EMPTY`` after it left), so a group is *live* if it
    lists members or is in any state but EMPTY/DEAD/UNKNOWN
    (:func:`pipeline.rewind.is_live`). The embedded broker never expires a
    SIGKILLed member: its group stays ``STABLE``, so such a stage shows as
    ``stalled``, not ``down``.
lag
    Per input partition, and the stage's retry topic (whose records are still on
    their way): end offset (high watermark from a Fetch response,
    :func:`pipeline.kafka.high_watermarks`) minus the group's committed offset
    (0 where it committed nothing), as :func:`pipeline.lag.group_lag` computes it;
    read at the end of the sample. Total: their sum.
lag (s)
    The age of the oldest record not yet committed, per input partition with lag:
    the status time minus when the record at the committed offset came into the
    pipeline (its ``ingest-ts`` header, or its timestamp where that is later,
    :func:`pipeline.obs.lag_time.record_time_s`; a landing record's timestamp is
    when the device's reading arrived). From the broker alone this is an upper bound:
    a record that waited in an upstream stage counts that wait too. The workers'
    gauge ``pipeline_consumer_lag_seconds`` knows when each record reached the
    stage's own input (the ends it saw) and is the figure to autoscale on. Per
    stage: the largest over its partitions, retries held for their backoff left out.
throughput
    Records per second the group committed over a sampling interval: committed
    offsets are read, ``sample_s`` seconds pass, they are read again; the sum of
    the (non-negative) per-partition deltas divided by the elapsed time. The
    sample should be longer than ``runner.commit_interval_s``, or a working stage
    may commit nothing during it.
waiting
    Lag on a retry partition whose next record (at the committed offset) has a
    ``retry.due-at`` later than the start of the sample minus one commit
    interval: the stage holds it on purpose until its backoff ends, so it counts
    as lag but not as a stall.
DLQ depth
    Dead letters on the stage's dead-letter topic above the purge floor, from
    offsets (O(1), whatever the topic holds), and those of the last day by
    ``dlq.reason`` (:func:`dlq.summary.window_summary`: a bounded read). A DLQ topic
    several stages share is counted from the last day's only.
last processed
    The timestamp of the last record of the stage's output topic: the last record
    of each partition (read at high watermark - 1 with a group-less consumer),
    the latest of them; none when the topic is empty. It is the timestamp the
    stage gave the record, which is event time for some stages (ingest keeps the
    landing record's timestamp, parse and enrich the reading's ``ts``, aggregate
    the window end), so it says how far the output has got, not the wall-clock
    time of the last commit.
verdict
    ``ok``       no lag and records committed during the sample (or, live, the
                 only lag is retries waiting for their backoff);
    ``idle``     no lag and nothing committed during the sample, whatever the
                 members (nothing to do);
    ``behind``   lag and offsets advanced during the sample;
    ``stalled``  lag, live members, no progress during the sample (e.g. a stage
                 stopped by its dead-letter budget);
    ``down``     lag and no live member.

    ``ok``, ``idle`` and ``behind`` are healthy; ``stalled`` and ``down`` are not
    (``pipeline status`` exits 1).

Pure functions (verdicts, JSON, table rows) take plain data; every broker read is
in :func:`collect`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, TopicPartition

from dlq import retry
from dlq.read import Filters
from dlq.summary import window_summary
from dlq.view import iso
from pipeline.errors import BrokerError
from pipeline.kafka.clients import admin, broker_error, client_config, consumer
from pipeline.kafka.offsets import committed_offsets, high_watermarks, partitions_of
from pipeline.kafka.topics import require_topics
from pipeline.obs.failures import Failure, read_failures
from pipeline.obs.lag_time import record_time_s
from pipeline.ops.rewind import group_state, is_live
from pipeline.settings import Settings

TP = tuple[str, int]
Verdict = Literal["ok", "idle", "behind", "stalled", "down", "crash-looping"]

HEALTHY: frozenset[str] = frozenset({"ok", "idle", "behind"})
DEFAULT_SAMPLE_S = 2.0
#: the dead letters shown by reason are those of the last day (held ones are counted
#: from offsets, whatever their age)
DLQ_WINDOW_MS = 24 * 3_600_000
_READ_TIMEOUT = 10.0

# --------------------------------------------------------------------------- pure


def verdict(lag: int, waiting: int, committed: int, live: bool) -> Verdict:
    """The verdict for a stage with ``lag`` records not committed (``waiting`` of
    them retries not due yet), ``committed`` records committed during the sample,
    and whether its group has a live member (see the module docstring)."""
    if lag <= 0:
        return "ok" if committed > 0 else "idle"
    if not live:
        return "down"
    if lag - waiting <= 0:
        return "ok"
    if committed > 0:
        return "behind"
    return "stalled"


def is_healthy(v: str) -> bool:
    return v in HEALTHY


def committed_delta(
    before: Mapping[TP, int | None], after: Mapping[TP, int | None], partitions: Iterable[TP]
) -> int:
    """Records committed between two reads of a group's offsets (a partition that
    went backwards, e.g. rewound, counts 0)."""
    return sum(max(0, (after.get(tp) or 0) - (before.get(tp) or 0)) for tp in partitions)


def rate(count: int, elapsed_s: float) -> float:
    return count / elapsed_s if elapsed_s > 0 else 0.0


def is_waiting(due_at_ms: int, since_ms: int) -> bool:
    """Whether a retry record due at ``due_at_ms`` may still be held on purpose
    (``since_ms``: the start of the sample minus one commit interval)."""
    return due_at_ms > since_ms


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    end: int
    retry: bool = False
    #: a retry partition whose next record is held until its backoff ends
    waiting: bool = False
    #: seconds the record at the committed offset has waited (None: no lag, or unread)
    lag_s: float | None = None

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.committed or 0))

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
            "retry": self.retry,
            "waiting": self.waiting,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
        }


@dataclass(frozen=True, slots=True)
class StageStatus:
    stage: str
    group: str
    state: str
    members: int
    partitions: tuple[PartitionLag, ...]
    committed_in_sample: int
    elapsed_s: float
    #: dead letters of the last day, by reason (a window: the cost does not grow
    #: with the DLQ's history)
    dlq_by_reason: Mapping[str, int] = field(default_factory=dict)
    #: dead letters the stage's DLQ holds (from offsets; None when shared)
    dlq_held: int | None = None
    last_processed_ms: int | None = None
    #: batches workers of the stage failed on and no batch got past yet
    failures: tuple[Failure, ...] = ()

    @property
    def live(self) -> bool:
        return is_live(self.state, self.members)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def waiting(self) -> int:
        return sum(p.lag for p in self.partitions if p.waiting)

    @property
    def lag_s(self) -> float | None:
        """The oldest uncommitted record's age over the partitions (held retries aside)."""
        ages = [p.lag_s for p in self.partitions if p.lag_s is not None and not p.waiting]
        return max(ages) if ages else None

    @property
    def throughput(self) -> float:
        return rate(self.committed_in_sample, self.elapsed_s)

    @property
    def dlq_depth(self) -> int:
        """Dead letters held (the last day's when the DLQ topic is shared)."""
        if self.dlq_held is not None:
            return self.dlq_held
        return sum(self.dlq_by_reason.values())

    @property
    def verdict(self) -> Verdict:
        if any(f.looping for f in self.failures):
            return "crash-looping"
        return verdict(self.lag, self.waiting, self.committed_in_sample, self.live)

    @property
    def healthy(self) -> bool:
        return is_healthy(self.verdict)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "group": self.group,
            "state": self.state,
            "members": self.members,
            "live": self.live,
            "lag": self.lag,
            "waiting": self.waiting,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
            "partitions": [p.as_json() for p in self.partitions],
            "committed_in_sample": self.committed_in_sample,
            "sample_elapsed_s": round(self.elapsed_s, 3),
            "throughput": round(self.throughput, 3),
            "dlq_depth": self.dlq_depth,
            "dlq_by_reason": dict(self.dlq_by_reason),
            "dlq_by_reason_since": "24h",
            "last_processed": iso(self.last_processed_ms),
            "last_processed_ms": self.last_processed_ms,
            "verdict": self.verdict,
            "healthy": self.healthy,
            "failures": [
                {
                    "topic": f.topic,
                    "partition": f.partition,
                    "offset": f.offset,
                    "last_offset": f.last_offset,
                    "attempts": f.attempts,
                    "error": f.error,
                    "at": iso(f.at_ms),
                }
                for f in self.failures
            ],
        }


def report_json(statuses: Sequence[StageStatus], sample_s: float) -> dict[str, Any]:
    """What ``pipeline status --json`` prints."""
    return {
        "sample_s": sample_s,
        "healthy": all(s.healthy for s in statuses),
        "unhealthy": [s.stage for s in statuses if not s.healthy],
        "stages": [s.as_json() for s in statuses],
    }


def problem_line(statuses: Sequence[StageStatus]) -> str | None:
    """One line naming the unhealthy stages and why; None if all are healthy."""
    bad = [s for s in statuses if not s.healthy]
    if not bad:
        return None
    parts = []
    for s in bad:
        if s.verdict == "crash-looping":
            looping = next(f for f in s.failures if f.looping)
            parts.append(f"{s.stage} crash-looping ({looping.describe()})")
            continue
        why = "no live member" if s.verdict == "down" else "no progress during the sample"
        parts.append(f"{s.stage} {s.verdict} (lag {s.lag}, {why})")
    return "unhealthy stage(s): " + "; ".join(parts)


def format_dlq(by_reason: Mapping[str, int], held: int | None = None) -> str:
    """``held (last day: reason n, ...)``."""
    total = sum(by_reason.values()) if held is None else held
    if not total:
        return "0"
    recent = ", ".join(f"{r} {n}" for r, n in by_reason.items() if n)
    return f"{total} (last day: {recent})" if recent else str(total)


def format_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172_800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_last(ms: int | None, now_ms: int) -> str | None:
    if ms is None:
        return None
    return f"{iso(ms)} ({format_age((now_ms - ms) / 1000)} ago)"


def format_lag_s(seconds: float | None) -> str:
    """A lag in seconds for the table: ``-`` without lag, else its age."""
    return "-" if seconds is None else format_age(seconds)


def age_s(timestamp_ms: int, headers: Sequence[tuple[str, bytes]], now_ms: int) -> float | None:
    """How long a record has waited since it came into the pipeline (see lag (s))."""
    since = record_time_s(timestamp_ms, headers)
    return None if since is None else max(0.0, now_ms / 1000 - since)


def format_lag(status: StageStatus) -> str:
    if status.waiting:
        return f"{status.lag} ({status.waiting} waiting)"
    return str(status.lag)


SUMMARY_HEADERS = [
    "stage",
    "state",
    "members",
    "lag",
    "lag s",
    "rec/s",
    "dlq",
    "last processed",
    "verdict",
]
PARTITION_HEADERS = ["stage", "topic", "partition", "committed", "end", "lag", "lag s"]


def summary_rows(statuses: Sequence[StageStatus], now_ms: int) -> list[list[Any]]:
    return [
        [
            s.stage,
            s.state,
            s.members,
            format_lag(s),
            format_lag_s(s.lag_s),
            f"{s.throughput:.1f}",
            format_dlq(s.dlq_by_reason, s.dlq_held),
            format_last(s.last_processed_ms, now_ms),
            s.verdict,
        ]
        for s in statuses
    ]


def partition_rows(statuses: Sequence[StageStatus]) -> list[list[Any]]:
    return [
        [
            s.stage,
            p.topic + (" (retry)" if p.retry else ""),
            p.partition,
            p.committed,
            p.end,
            f"{p.lag} (waiting)" if p.waiting and p.lag else p.lag,
            format_lag_s(p.lag_s),
        ]
        for s in statuses
        for p in s.partitions
    ]


# ------------------------------------------------------------------ broker side


def _records_at(settings: Settings, wanted: Mapping[TP, int]) -> dict[TP, Any]:
    """The first record at or after the given offset of each partition (None if
    there is none), read with assign by a consumer that never commits."""
    if not wanted:
        return {}
    reader = consumer(settings)
    found: dict[TP, Any] = {}
    try:
        reader.assign([TopicPartition(t, p, max(0, o)) for (t, p), o in wanted.items()])
        pending = set(wanted)
        deadline = time.monotonic() + _READ_TIMEOUT
        while pending:
            if time.monotonic() > deadline:
                t, p = sorted(pending)[0]
                raise BrokerError(
                    f"reading {t}[{p}] at offset {wanted[(t, p)]} got nothing "
                    f"within {_READ_TIMEOUT:.0f}s"
                )
            for msg in reader.consume(num_messages=500, timeout=0.2):
                tp = (msg.topic() or "", msg.partition() or 0)
                at = msg.offset()
                if tp not in pending or at is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise BrokerError(f"reading {tp[0]}[{tp[1]}]: {err.str()}")
                    if at >= wanted[tp]:
                        found[tp] = None
                        pending.discard(tp)
                    continue
                if at >= wanted[tp]:
                    found[tp] = msg
                    pending.discard(tp)
        return found
    finally:
        reader.close()


def _last_timestamp(settings: Settings, topic: str) -> int | None:
    tps = partitions_of(settings, [topic])
    ends = high_watermarks(client_config(settings), tps, _READ_TIMEOUT)
    last = _records_at(settings, {tp: ends[tp] - 1 for tp in tps if ends[tp] > 0})
    stamps = []
    for msg in last.values():
        if msg is None:
            continue
        kind, ts = msg.timestamp()
        if kind != TIMESTAMP_NOT_AVAILABLE and ts >= 0:
            stamps.append(int(ts))
    return max(stamps) if stamps else None


def _last_of(settings: Settings, topics: Sequence[str]) -> int | None:
    """When the stage last wrote an output (None for a sink: it writes none)."""
    stamps = [ts for t in topics if (ts := _last_timestamp(settings, t)) is not None]
    return max(stamps) if stamps else None


def _dlq_by_reason(
    settings: Settings, now_ms: int
) -> tuple[dict[str, dict[str, int]], dict[str, int | None]]:
    """Dead letters of the last :data:`DLQ_WINDOW_MS` per stage and reason (a bounded
    read, :func:`dlq.summary.window_summary`), and what each stage's DLQ holds (from
    offsets; None for a DLQ topic several stages share)."""
    out: dict[str, dict[str, int]] = {s: {} for s in settings.stage_ids}
    summary = window_summary(settings, settings.stage_ids, Filters(), now_ms - DLQ_WINDOW_MS, None)
    for row in summary.rows:
        out[row.stage][row.reason] = row.count
    return out, summary.held


def _heads(settings: Settings, partitions: list[PartitionLag], since_ms: int) -> list[PartitionLag]:
    """The partitions, with the age of the record at the committed offset of each that
    has lag, and retry partitions whose next record is held until its backoff ends
    marked waiting."""
    heads = _records_at(
        settings, {(p.topic, p.partition): p.committed or 0 for p in partitions if p.lag}
    )
    now_ms = int(time.time() * 1000)
    out = []
    for p in partitions:
        msg = heads.get((p.topic, p.partition))
        if msg is None:
            out.append(p)
            continue
        headers = [(k, v or b"") for k, v in (msg.headers() or [])]
        kind, ts = msg.timestamp()
        stamp = ts if kind != TIMESTAMP_NOT_AVAILABLE else 0
        held = p.retry and is_waiting(retry.due_at_ms(headers), since_ms)
        out.append(replace(p, waiting=held, lag_s=age_s(stamp, headers, now_ms)))
    return out


def collect(settings: Settings, sample_s: float = DEFAULT_SAMPLE_S) -> list[StageStatus]:
    """Read the status of every stage, sampling committed offsets over ``sample_s``.

    Raises BrokerError (one line) if the broker cannot be read or a topic is missing.
    """
    client = admin(settings)
    stage_ids = settings.stage_ids
    specs = {s: settings.stage(s) for s in stage_ids}
    retry_topics = {s: spec.retry.topic if spec.retry else None for s, spec in specs.items()}
    inputs = {
        s: partitions_of(
            settings,
            [
                *spec.inputs,
                *([spec.backfill_lane] if spec.backfill_lane else []),  # a backfill's lag too
                *([spec.retry.topic] if spec.retry else []),
            ],
        )
        for s, spec in specs.items()
    }
    require_topics(
        client,
        dict.fromkeys(
            t
            for s, spec in specs.items()
            for t in (
                *spec.inputs,
                spec.backfill_lane,
                *spec.all_outputs,
                spec.dlq,
                retry_topics[s],
            )
            if t is not None
        ),
    )
    try:
        started_ms = int(time.time() * 1000)
        before: dict[str, tuple[float, dict[TP, int | None]]] = {}
        for s in stage_ids:
            at = time.monotonic()
            before[s] = (at, committed_offsets(client, settings.group_id(s), inputs[s]))
        deadline = min(at for at, _ in before.values()) + sample_s
        # read what does not need the sample while it runs
        dlq, dlq_held = _dlq_by_reason(settings, int(time.time() * 1000))
        last = {s: _last_of(settings, specs[s].all_outputs) for s in stage_ids}
        time.sleep(max(0.0, deadline - time.monotonic()))
        after: dict[str, tuple[float, dict[TP, int | None]]] = {}
        for s in stage_ids:
            at = time.monotonic()
            after[s] = (at, committed_offsets(client, settings.group_id(s), inputs[s]))
        ends = high_watermarks(
            client_config(settings), [tp for s in stage_ids for tp in inputs[s]], _READ_TIMEOUT
        )
        groups = {s: group_state(client, settings.group_id(s)) for s in stage_ids}
        failed: dict[str, list[Failure]] = {}
        for failure in read_failures(settings):
            failed.setdefault(failure.stage, []).append(failure)
        since_ms = started_ms - int(settings.runner.commit_interval_s * 1000)
        statuses = []
        for s in stage_ids:
            committed = after[s][1]
            parts = [
                PartitionLag(t, p, committed.get((t, p)), ends[(t, p)], retry=t == retry_topics[s])
                for t, p in inputs[s]
            ]
            parts = _heads(settings, parts, since_ms)
            state, members = groups[s]
            statuses.append(
                StageStatus(
                    stage=s,
                    group=settings.group_id(s),
                    state=state,
                    members=members,
                    partitions=tuple(parts),
                    committed_in_sample=committed_delta(before[s][1], committed, inputs[s]),
                    elapsed_s=after[s][0] - before[s][0],
                    dlq_by_reason=dlq[s],
                    dlq_held=dlq_held.get(s),
                    last_processed_ms=last[s],
                    failures=tuple(
                        f
                        for f in failed.get(s, ())
                        if (committed.get((f.topic, f.partition)) or 0) <= f.offset
                    ),
                )
            )
        return statuses
    except KafkaException as exc:
        raise broker_error("cannot read the pipeline's status", exc) from None
