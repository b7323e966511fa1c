"""When is a backfill done? When every stage on its way has committed past it.

The controller knows the end offsets it produced in the entry topic. Stage by
stage, in topological order over the entry stage and every stage downstream of it
(:meth:`pipeline.topology.Topology.downstream`):

1. wait until the stage's group has committed past the targets in its input;
   a stage acknowledges a batch's outputs before it commits it, so at that moment
   every output the run caused is in the stage's output topic;
2. if the stage has a retry topic, wait ``max_attempts`` rounds until the group
   has committed past a snapshot of the retry topic's end: each round settles one
   more attempt of the run's retried records (the last attempt dead-letters);
3. the next stage's targets are the ends of its input topics and backfill lane,
   read now (a lane batch's outputs go to the next lane, a retried record's to
   the ordinary output).

4. if the stage is stateful (it has a ``state_topic``), send one end-of-input record
   per partition of its backfill lane (else its inputs) and wait for it to commit
   past them: the run's lane in its state has emitted its last results (e.g. the
   run's windows), which are in its outputs before the next stage is looked at.

Live records in the same topics are waited for too: the barrier is
conservative, never early. When the last stage is through, the run is COMPLETE.
(Backfilled records that came the other way, as retries, were committed before a
marker was sent.)

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
from pipeline.settings import Settings

TP = tuple[str, int]


class RunFailed(PipelineError):
    """The run cannot complete (a stage stalled, the input changed …)."""


class RunCancelled(PipelineError):
    """``backfill cancel`` was asked for this run."""


def stage_chain(settings: Settings, entry_stage: str) -> list[str]:
    """The stages a run entering at ``entry_stage`` goes through, in order."""
    return list(settings.topology.downstream(entry_stage))


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

    def through_stages(
        self,
        entry_stage: str,
        entry_targets: Mapping[TP, int],
        end_lane: Callable[[str], Mapping[TP, int]],
    ) -> None:
        """Wait for every stage of the run in turn; ``end_lane(stage)`` sends (or
        recalls, on a resume) a stateful stage's end-of-input markers and returns the
        offsets after them."""
        for stage in stage_chain(self.settings, entry_stage):
            spec = self.settings.stage(stage)
            targets = (
                dict(entry_targets)
                if stage == entry_stage
                else self.ends(input_topics(self.settings, stage))
            )
            self.wait_stage(stage, targets)
            if spec.retry is not None:
                for _ in range(spec.retry.max_attempts):
                    self.wait_stage(stage, self.ends([spec.retry.topic]))
            if spec.state_topic is not None:
                self.wait_stage(stage, end_lane(stage))

    def send_end_of_input(self, stage: str) -> dict[TP, int]:
        """One end-of-input record per partition of ``stage``'s backfill lane (else its
        inputs); returns the offset after each (what the stage has to commit)."""
        spec = self.settings.stage(stage)
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
