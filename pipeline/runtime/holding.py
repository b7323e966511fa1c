"""What a worker holds back: batches a sink has not made durable yet, and batches
that wait for an unreachable dependency.

**Durable offsets.** An agent acks a batch (letting Faust commit its offsets) only
once the stage is done with it. For a sink that is when its records are stored
outside Kafka: at once for a sink that writes each batch (a database), later for
one that buffers (files rolled by size or time). :class:`HeldBatches` keeps a
sink's batches per partition and acks them, oldest first, up to the offset the
sink reported durable; after a buffering sink's flush it commits at once, so at
most the last flush can be uncommitted when a worker dies (the Parquet sink's
manifest relies on that).

**Unavailable dependencies.** :class:`DependencyWait` is the wait between two runs
of a batch that raised :class:`~pipeline.errors.Unavailable`: backoff doubling up
to a cap, ``/readyz`` 503 and ``pipeline_dependency_up`` 0 meanwhile, ``/healthz``
503 once it lasts longer than ``runner.liveness_timeout_s``, one log line when it
starts, one every 30 s, one when it ends.

**Rebalances and stops.** Faust waits (``wait_empty``) until every batch handed to
an agent is acked. A held or waiting batch would never be: :meth:`HeldBatches.abandon`
gives them up instead (the consumer forgets them, nothing is acked), the sink drops
its buffers, and the batches are fetched again from the committed offsets by
whichever worker gets the partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import Unavailable
from pipeline.obs import metrics
from pipeline.obs.health import HEALTH

log = logging.getLogger("pipeline.runtime.holding")

_LOG_EVERY_S = 30.0


class HeldBatches:
    """A sink's batches (Faust events) not acked yet, per (topic, partition)."""

    def __init__(
        self,
        stage_id: str,
        commit: Callable[[], Any],
        on_committed: Callable[[str, int, int], None],
        drop: Callable[[], None],
        commit_on_release: bool,
    ) -> None:
        self.stage_id = stage_id
        self._commit = commit
        self._on_committed = on_committed
        self._drop = drop
        self.commit_on_release = commit_on_release
        self.held: dict[tuple[str, int], list[Any]] = {}
        self.durable: dict[tuple[str, int], int] = {}

    def made_durable(self, durable: dict[tuple[str, int], int]) -> None:
        for tp, through in durable.items():
            if through > self.durable.get(tp, -1):
                self.durable[tp] = through

    async def hold(self, event: Any) -> None:
        """Keep ``event`` until its batch is durable; ack what is durable now."""
        message = event.message
        self.held.setdefault((message.topic, message.partition), []).append(event)
        await self.release()

    async def release(self) -> None:
        """Ack every held batch whose last offset is durable; commit at once after a
        buffering sink's flush."""
        released: dict[tuple[str, int], int] = {}
        for tp, events in self.held.items():
            through = self.durable.get(tp)
            if through is None:
                continue
            while events and events[0].message.offset <= through:
                events.pop(0).ack()
                released[tp] = through
        if not released or not self.commit_on_release:
            return
        committed = await self._commit()
        if committed is False:
            return  # nothing new to commit (already committed on the interval)
        metrics.SINK_FLUSHES.labels(self.stage_id).inc()
        for (topic, partition), through in released.items():
            self._on_committed(topic, partition, through + 1)

    def abandon(self) -> list[Any]:
        """Give up every held batch (the sink drops its buffers); returns their
        messages for the consumer to forget."""
        messages = [event.message for events in self.held.values() for event in events]
        self.held.clear()
        self.durable.clear()
        self._drop()
        if messages:
            log.info(
                "stage %s: %d batch(es) not yet durable given up (fetched again from the "
                "committed offsets)",
                self.stage_id,
                len(messages),
            )
        return messages


class DependencyWait:
    """Waits between runs of a batch whose dependency is unreachable."""

    def __init__(
        self,
        stage_id: str,
        backoff_s: float,
        backoff_max_s: float,
        liveness_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage_id = stage_id
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.liveness_timeout_s = liveness_timeout_s
        self.clock = clock
        #: since when, and which dependency, while one is down
        self.since: float | None = None
        self.dependency = ""
        self.error = ""
        self._logged_at = 0.0
        #: messages whose batch is waiting, and those given up meanwhile
        self.waiting: set[Any] = set()
        self.abandoned: set[Any] = set()

    def problem(self) -> str | None:
        """A liveness problem once a dependency has been down for too long."""
        since = self.since
        if since is None:
            return None
        down = self.clock() - since
        if down <= self.liveness_timeout_s:
            return None
        return (
            f"stage {self.stage_id}: {self.dependency} unreachable for {down:.0f}s "
            f"(runner.liveness_timeout_s={self.liveness_timeout_s:g}): {self.error}"
        )

    def failed(self, exc: Unavailable, attempt: int) -> float:
        """Note a failed attempt; returns how long to wait before the next."""
        now = self.clock()
        dependency = exc.dependency
        metrics.DEPENDENCY_UP.labels(self.stage_id, dependency).set(0)
        metrics.DEPENDENCY_FAILURES.labels(self.stage_id, dependency).inc()
        if self.since is None:
            self.since, self._logged_at = now, now
            log.warning(
                "stage %s: %s unreachable (%s); the batch is held and run again with backoff",
                self.stage_id,
                dependency,
                exc,
            )
        elif now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "stage %s: %s still unreachable after %.0fs (attempt %d): %s",
                self.stage_id,
                dependency,
                now - self.since,
                attempt,
                exc,
            )
        self.dependency, self.error = dependency, str(exc)
        HEALTH.not_ready(f"{self.stage_id}_dependency", f"{dependency} unreachable: {exc}")
        return float(min(self.backoff_s * 2 ** max(0, attempt - 1), self.backoff_max_s))

    def recovered(self) -> None:
        if self.since is None:
            return
        log.warning(
            "stage %s: %s reachable again after %.0fs",
            self.stage_id,
            self.dependency,
            self.clock() - self.since,
        )
        metrics.DEPENDENCY_UP.labels(self.stage_id, self.dependency).set(1)
        HEALTH.not_ready(f"{self.stage_id}_dependency", None)
        self.since = None

    async def wait(self, message: Any, seconds: float) -> bool:
        """Sleep ``seconds`` (in short steps); True if the batch was given up
        meanwhile (a rebalance or a stop: see :meth:`abandon`)."""
        self.waiting.add(message)
        try:
            deadline = self.clock() + seconds
            while self.clock() < deadline:
                if message in self.abandoned:
                    break
                await asyncio.sleep(min(0.1, max(0.0, deadline - self.clock())))
        finally:
            self.waiting.discard(message)
        if message in self.abandoned:
            self.abandoned.discard(message)
            return True
        return False

    def abandon(self) -> list[Any]:
        """Give up the waiting batches; returns their messages."""
        messages = list(self.waiting)
        self.abandoned.update(messages)
        if messages:
            log.info(
                "stage %s: %d batch(es) waiting for %s given up (fetched again from the "
                "committed offsets)",
                self.stage_id,
                len(messages),
                self.dependency,
            )
        return messages
