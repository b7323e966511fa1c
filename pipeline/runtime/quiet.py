"""Consumer lag from committed offsets and Fetch high watermarks, and the
pipeline-quiet check the aggregate uses before advancing an idle watermark.

High watermarks come from :func:`pipeline.kafka.high_watermarks` (a Fetch
response), because the embedded broker answers ListOffsets with a value inside
the last batch, which would make lag look smaller than it is.
"""

from __future__ import annotations

import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError
from pipeline.kafka.clients import admin
from pipeline.kafka.offsets import group_lag
from pipeline.settings import Settings


class PipelineQuiet:
    """Answers "have ``stage_id`` and every stage upstream of it (in the topology)
    committed all their input?", at most once per ``ttl``.

    An idle partition's watermark may only advance when nothing is on its way:
    if a stage upstream is down or behind, or records wait in the stage's own
    input, they would otherwise arrive after their windows closed and be
    dead-lettered as late.
    """

    def __init__(self, settings: Settings, stage_id: str, ttl: float) -> None:
        self._settings = settings
        self._upstream = settings.topology.upstream(stage_id)
        self._ttl = ttl
        self._client: AdminClient | None = None
        self._checked_at = float("-inf")
        self._quiet = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < self._ttl:
            return self._quiet
        if self._client is None:
            self._client = admin(self._settings)
        client = self._client
        try:
            self._quiet = all(
                not any(group_lag(self._settings, client, stage).values())
                for stage in self._upstream
            )
        except (BrokerError, KafkaException):
            # the broker did not answer: nothing is known to be quiet (the worker's
            # broker probe reports and, in time, exits; this must not crash it)
            self._quiet = False
        self._checked_at = time.monotonic()
        return self._quiet
