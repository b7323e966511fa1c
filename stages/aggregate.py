"""Aggregate: ``iot.enriched`` → ``iot.aggregates``; event-time tumbling windows.

Windows are ``[start, start + window_s)`` per ``(device_id, metric)``, aligned to the
epoch, with count, min, max and mean of the calibrated value, the device's site and
unit, and the first and last reading's time and lineage id. This stage is one
configuration of the framework's windowed-aggregation operator
(:mod:`pipeline.operators.window`); ``stages.aggregate.config`` in pipeline.yaml sets
``window_s``, ``allowed_lateness_s``, ``backfill_lateness_s`` and
``closed_retention_s``. Late readings, duplicates, backfill lanes, idle partitions and
crash safety are the operator's and the engine's (see there).
"""

from __future__ import annotations

from pipeline.operators import window_stage

aggregate = window_stage(
    key=("device_id", "metric"),
    carry=("site", "unit"),
    time="ts",
    value="value",
    aggregations=("count", "min", "max", "mean"),
    schema="aggregate/1",
)
