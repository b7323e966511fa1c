"""Fixes for Faust bugs that lose records after a table restore.

Measured on faust-streaming 0.15.3 (see TEST_BROKER.md); applied by the
composition root, never at import:

A. ``Recovery.on_recovery_completed`` resumes partitions and seeks while message
   flow is on; records fetched in between are dropped unacked by
   ``flow_control.resume()`` and the commit skips them. Fix: stop the consumer's
   flow and suspend flow control before the original runs (it turns both back
   on after seeking).
C. Recovery's target ("highwater") comes from ListOffsets, which the embedded
   broker answers with the base of the last batch + 1: recovery stopped inside
   the last changelog batch. Fix: :class:`pipeline.transport.BatchConsumer`
   answers ``highwaters`` from a Fetch response (:func:`pipeline.kafka.high_watermarks`).

B (an off-by-one in Faust's commit check) is avoided for stage input topics by
the batch consumer's own offset bookkeeping.
"""

from __future__ import annotations

from faust.tables.recovery import Recovery

_APPLIED = "_pipeline_fix_a"


def apply_faust_fixes() -> None:
    """Install fix A (idempotent)."""
    if getattr(Recovery, _APPLIED, False):
        return
    original = Recovery.on_recovery_completed

    async def on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        self.app.flow_control.suspend()
        await original(self, generation_id)

    Recovery.on_recovery_completed = on_recovery_completed  # type: ignore[method-assign]
    setattr(Recovery, _APPLIED, True)
