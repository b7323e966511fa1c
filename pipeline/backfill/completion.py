"""When is a backfill done? When every stage on its way has committed past it.

The controller knows the end offsets it produced in the entry topic. Stage by
stage (entry … aggregate):

1. wait until the stage's group has committed past the targets in its input;
   a stage acknowledges a batch's outputs before it commits it, so at that moment
   every output the run caused is in the stage's output topic;
2. if the stage has a retry topic, wait ``max_attempts`` rounds until the group
   has committed past a snapshot of the retry topic's end: each round settles one
   more attempt of the run's retried records (the last attempt dead-letters);
3. the next stage's targets are the ends of its input topics and backfill lane,
   read now (a lane batch's outputs go to the next lane, a retried record's to
   the ordinary output).

Live records in the same topics are waited for too: the barrier is
conservative, never early. Then the controller sends one end-of-input record per
partition of the aggregate's input and waits for the aggregate to commit past
them: the run's last windows are emitted and the run is COMPLETE. (The marker
goes into the aggregate's lane; backfilled records that came the other way, as
retries, were committed before it was sent.)

A stage that does not move for ``backfill.stall_timeout_s`` while it has records
of the run to commit fails the run with a reason (no worker, or stopped by its
dead-letter budget).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from pipeline import contract
from pipeline.errors import PipelineError
from pipeline.kafka.clients import admin, client_config, producer
from pipeline.kafka.offsets import committed_offsets, high_watermarks, partitions_of
from pipeline.kafka.produce import produce_acked
from pipeline.settings import STAGE_IDS, Settings

TP = tuple[str, int]


class RunFailed(PipelineError):
    """The run cannot complete (a stage stalled, the input changed …)."""


class RunCancelled(PipelineError):
    """``backfill cancel`` was asked for this run."""


def stage_chain(entry_stage: str) -> list[str]:
    return list(STAGE_IDS[STAGE_IDS.index(entry_stage) :])


def input_topics(settings: Settings, stage: str) -> list[str]:
    spec = settings.stage(stage)
    return [*spec.inputs, *([spec.backfill_lane] if spec.backfill_lane else [])]


def remaining(targets: Mapping[TP, int], committed: Mapping[TP, int | None]) -> int:
    """Records below ``targets`` the group has not committed yet."""
    return sum(max(0, end - (committed.get(tp) or 0)) for tp, end in targets.items())


class Completion:
    """Waits, stage by stage, for the run's records to be committed everywhere."""

    def __init__(
        self,
        settings: Settings,
        run_source: str,
        *,
        stall_timeout_s: float,
        poll_s: float = 0.5,
        on_wait: Callable[[str, int], None] = lambda stage, left: None,
        check_cancel: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.source = run_source
        self.stall_timeout_s = stall_timeout_s
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.check_cancel = check_cancel
        self._client = admin(settings)

    def ends(self, topics: list[str]) -> dict[TP, int]:
        return high_watermarks(client_config(self.settings), partitions_of(self.settings, topics))

    def wait_stage(self, stage: str, targets: Mapping[TP, int]) -> None:
        """Return once ``stage``'s group has committed ``targets``; RunFailed if it
        makes no progress for the stall timeout, RunCancelled on a cancel request."""
        targets = {tp: end for tp, end in targets.items() if end > 0}
        if not targets:
            return
        group = self.settings.group_id(stage)
        last_left: int | None = None
        moved_at = time.monotonic()
        while True:
            committed = committed_offsets(self._client, group, list(targets))
            left = remaining(targets, committed)
            self.on_wait(stage, left)
            if left == 0:
                return
            now = time.monotonic()
            if last_left is None or left < last_left:
                last_left, moved_at = left, now
            elif now - moved_at > self.stall_timeout_s:
                raise RunFailed(
                    f"stage {stage} made no progress for {now - moved_at:.0f}s with {left} "
                    "record(s) to commit: no worker running, or stopped by its dead-letter "
                    "budget; see `pipeline status`, fix it, then `pipeline backfill resume`"
                )
            if self.check_cancel():
                raise RunCancelled("cancel requested")
            time.sleep(self.poll_s)

    def through_stages(self, entry_stage: str, entry_targets: Mapping[TP, int]) -> None:
        targets = dict(entry_targets)
        chain = stage_chain(entry_stage)
        for stage, after in zip(chain, [*chain[1:], None], strict=True):
            spec = self.settings.stage(stage)
            self.wait_stage(stage, targets)
            if spec.retry is not None:
                for _ in range(spec.retry.max_attempts):
                    self.wait_stage(stage, self.ends([spec.retry.topic]))
            if after is not None:
                # what this stage wrote is in the next one's input and lane (a lane
                # batch's outputs) or input (a retried record's)
                targets = self.ends(input_topics(self.settings, after))

    def send_end_of_input(self) -> dict[TP, int]:
        """One end-of-input record per partition of the aggregate's backfill lane (else
        its input); returns the offset after each (what the aggregate has to commit)."""
        spec = self.settings.stage(STAGE_IDS[-1])
        marked = [spec.backfill_lane] if spec.backfill_lane else list(spec.inputs)
        headers: list[tuple[str, bytes]] = [
            (contract.H_SOURCE, self.source.encode()),
            (contract.H_CONTROL, contract.CONTROL_END_OF_INPUT.encode()),
        ]
        tps = partitions_of(self.settings, marked)
        return produce_acked(
            producer(self.settings),
            [(topic, None, b"", headers, None) for topic, _ in tps],
            "send end-of-input",
            partitions=[partition for _, partition in tps],
            timeout=30,
        )
