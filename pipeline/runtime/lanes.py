"""Live first: the governor that keeps a backfill lane from starving live input."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline.obs import metrics
from pipeline.settings import RunnerSettings

if TYPE_CHECKING:
    from pipeline.runtime.stage_app import StageApp


class LaneGovernor:
    """Live first: the backfill lane is fetched only while the live inputs have no
    more than a batch waiting on the broker.

    It pauses the lane's partitions (it never holds a lane batch back: a waiting
    agent would fill its queue, block Faust's fetch loop for live input too, and
    stop a rebalance that waits for the batch). Lane batches already fetched are
    processed, alternating with live ones at the binding's lock. After
    ``runner.backfill_max_defer_s`` paused, the lane gets half a second: under live
    overload a backfill slows down but never stops.
    """

    def __init__(
        self,
        app: StageApp,
        stage_id: str,
        lane: str,
        live_inputs: frozenset[str],
        runner: RunnerSettings,
    ) -> None:
        self.app = app
        self.stage_id = stage_id
        self.lane = lane
        self.live_inputs = live_inputs
        self.enough = runner.batch_max_records
        self.max_defer_s = runner.backfill_max_defer_s
        self.paused_since: float | None = None
        self.open_until = 0.0
        self.generation: int | None = None

    async def tick(self) -> None:
        app = self.app
        if self.generation != app.consumer_generation_id:  # a rebalance resumed everything
            self.generation, self.paused_since = app.consumer_generation_id, None
        consumer = app.consumer
        lane = [tp for tp in consumer.assignment() if tp.topic == self.lane]
        if not lane:
            return
        now = time.monotonic()
        busy = now >= self.open_until and live_backlog(app, self.live_inputs) > self.enough
        if busy and self.paused_since is None:
            consumer.pause_partitions(lane)
            self.paused_since = now
            metrics.BACKFILL_DEFERRED.labels(self.stage_id).inc()
        elif self.paused_since is not None and (
            not busy or now - self.paused_since > self.max_defer_s
        ):
            consumer.resume_partitions(lane)
            if busy:
                self.open_until = now + 0.5
            self.paused_since = None


def live_backlog(app: StageApp, topics: frozenset[str]) -> int:
    """Records of ``topics`` on the broker that this worker has not taken yet: the
    high watermark of the last Fetch minus the next offset handed to the agent."""
    consumer = app.consumer
    handed: dict[Any, int] = getattr(consumer, "_expected", {})
    total = 0
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: S112 (not fetched yet, or moving in a rebalance)
            continue
        nxt = handed.get(tp)
        if high is not None and nxt is not None:
            total += max(0, high - nxt)
    return total
