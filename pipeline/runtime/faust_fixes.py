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

D. aiokafka (under Faust) sends LeaveGroup on shutdown only when its generation
   is > 0; the embedded broker numbers generations from 0, so a worker that
   joined once never left: the group stayed STABLE after every worker stopped
   (the broker does not expire the member either), and an offset rewind was
   refused forever. Fix: leave whenever a generation was assigned (>= 0; aiokafka
   uses -1 for "none"). On Kafka, where generations start at 1, nothing changes.

B (an off-by-one in Faust's commit check) is avoided for stage input topics by
the batch consumer's own offset bookkeeping.
"""

from __future__ import annotations

from typing import Any

import aiokafka.consumer.group_coordinator as group_coordinator
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from faust.tables.recovery import Recovery

_APPLIED = "_pipeline_fix_a"


async def _maybe_leave_group(self: Any) -> None:
    """aiokafka's ``GroupCoordinator._maybe_leave_group`` with ``>= 0`` (fix D)."""
    if self.generation >= 0 and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except KafkaError as err:
            group_coordinator.log.error("LeaveGroup request failed: %s", err)
        else:
            group_coordinator.log.info("LeaveGroup request succeeded")
    self.reset_generation()


def apply_faust_fixes() -> None:
    """Install fixes A and D (idempotent)."""
    if getattr(Recovery, _APPLIED, False):
        return
    group_coordinator.GroupCoordinator._maybe_leave_group = _maybe_leave_group
    original = Recovery.on_recovery_completed

    async def on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
        self.app.consumer.stop_flow()
        self.app.flow_control.suspend()
        await original(self, generation_id)

    Recovery.on_recovery_completed = on_recovery_completed  # type: ignore[method-assign]
    setattr(Recovery, _APPLIED, True)
