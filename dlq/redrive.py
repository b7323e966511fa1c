"""``dlq replay``: dead letters back to their stage's input, paced.

A replayed record keeps its original key, value, headers and timestamp;
``dlq.replay-count`` goes up by one, and records already replayed ``max_replays``
times are refused (and listed), so a record that fails for good cannot loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    KafkaException,
)

from dlq import envelope
from dlq.original import OriginalGone, original_value
from dlq.read import Filters, Header, StoredDeadLetter, iter_dead_letters, topic_partitions
from dlq.reasons import STATE_UNREADABLE
from dlq.retry import PREFIX as RETRY_PREFIX
from pipeline.errors import BrokerError, PipelineError
from pipeline.kafka.clients import admin, producer
from pipeline.settings import Settings


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
    #: dead letters left out, ref -> why: a truncated one whose original is gone
    #: (its prefix is never replayed), one too large for the input topic
    skipped: dict[str, str] = field(default_factory=dict)

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
            "skipped": self.skipped,
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
    A truncated dead letter is replayed with its whole original value, read back
    from its source topic (:mod:`dlq.original`), never with its prefix; one whose
    original is gone is left out and reported in ``skipped``, as is one larger than
    the input topic takes (``topics.<name>.max_message_bytes``, else
    ``runner.max_message_bytes``). Returns once the broker
    acknowledged every record sent; raises BrokerError or PipelineError if any was
    not (some may have been written: see the message).
    """
    target = settings.stage(stage).inputs[0]
    topic_partitions(admin(settings), target)  # fail fast (BrokerError) if it does not exist
    chosen = filters or Filters()
    to_send: list[StoredDeadLetter] = []
    refused: list[StoredDeadLetter] = []
    letters = iter_dead_letters(settings, [stage])
    try:
        for letter in chosen.apply(letters):
            (refused if letter.replay_count >= max_replays else to_send).append(letter)
    finally:
        letters.close()
    skipped: dict[str, str] = {}
    values: dict[str, bytes | None] = {}
    limit = input_limit(settings, target)
    for letter in to_send:
        if letter.reason == STATE_UNREADABLE:
            skipped[letter.ref] = (
                f"dead letter {letter.ref}: a record of stage {stage}'s state, not an input "
                f"record; it cannot be replayed into {target} (read it with `pipeline dlq "
                "show`; the state starts empty where it was)"
            )
            continue
        try:
            value = values[letter.ref] = original_value(settings, letter)
        except OriginalGone as exc:
            skipped[letter.ref] = str(exc)
            continue
        size = len(value) + len(letter.key or b"")
        if size > limit:
            skipped[letter.ref] = (
                f"dead letter {letter.ref}: its record of {size} bytes is larger than {target} "
                f"takes ({limit}); raise topics.{target}.max_message_bytes to replay it"
            )
    to_send = [d for d in to_send if d.ref not in skipped]
    report = ReplayReport(
        stage=stage,
        target_topic=target,
        dry_run=dry_run,
        max_replays=max_replays,
        sent=dict(Counter(d.reason for d in to_send)),
        refused=dict(Counter(d.reason for d in refused)),
        sent_refs=tuple(d.ref for d in to_send),
        refused_refs=tuple(d.ref for d in refused),
        skipped=skipped,
    )
    if dry_run or not to_send:
        return report
    _send(settings, target, to_send, Pacer(rate), flush_timeout, values, limit)
    return report


def input_limit(settings: Settings, topic: str) -> int:
    """The largest record (key and value; headers are small) a replay writes to
    ``topic``: its declared ``max_message_bytes``, else the producer's limit."""
    spec = settings.topics.get(topic)
    declared = spec.max_message_bytes if spec is not None else None
    return declared or settings.runner.max_message_bytes


def _send(
    settings: Settings,
    topic: str,
    letters: Sequence[StoredDeadLetter],
    pacer: Pacer,
    flush_timeout: float,
    values: dict[str, bytes | None],
    limit: int,
) -> None:
    # room for the headers above the record's own limit
    client = producer(settings, **{"message.max.bytes": limit + 65_536})
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
                client.produce(topic, values.get(letter.ref, letter.value), letter.key, **kwargs)
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
