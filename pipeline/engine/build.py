"""Building a stage's engine from its declaration: one place for workers, the
backfill controller and :mod:`pipeline.testing`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.engine.emit import Emitter
from pipeline.engine.process import StatelessEngine
from pipeline.engine.sink import SinkEngine
from pipeline.engine.stateful import StatefulEngine
from pipeline.errors import ConfigError
from pipeline.registry import resolve
from pipeline.settings import Settings, StageSpec
from pipeline.stage import StageContext, StageDef


def load_stage(settings: Settings, stage_id: str) -> StageDef:
    """The stage's code, checked against what pipeline.yaml declares for it."""
    spec = settings.stage(stage_id)
    definition = resolve(stage_id, spec.uses, settings.python_paths())
    check_declaration(stage_id, spec, definition)
    if spec.state_topic is not None:
        counts = {
            t: settings.topics[t].partitions
            for t in (*spec.inputs, spec.backfill_lane, spec.state_topic)
            if t is not None
        }
        if len(set(counts.values())) != 1:
            raise ConfigError(
                f"stateful stage {stage_id}: its inputs, backfill_lane and state_topic must "
                f"have one partition count (they have {counts})"
            )
    return definition


def check_declaration(stage_id: str, spec: StageSpec, definition: StageDef) -> None:
    """ConfigError where the code and the declaration disagree."""
    if definition.stateful and spec.state_topic is None:
        raise ConfigError(
            f"stage {stage_id} ({definition.name}) is stateful: declare its changelog as "
            f"stages.{stage_id}.state_topic (a compacted topic)"
        )
    if not definition.stateful and spec.state_topic is not None:
        raise ConfigError(
            f"stage {stage_id} ({definition.name}) keeps no state; remove "
            f"stages.{stage_id}.state_topic"
        )
    if definition.kind == "sink" and spec.all_outputs:
        raise ConfigError(
            f"stage {stage_id} ({definition.name}) is a sink: its effect is outside Kafka; "
            f"remove stages.{stage_id}.output/outputs"
        )
    definition.make_config(stage_id, spec.config)  # ConfigError naming the setting


def build_engine(
    stage_id: str,
    spec: StageSpec,
    definition: StageDef,
    lookups: Mapping[str, Mapping[bytes, bytes]] | None = None,
    clock: Callable[[], float] = time.time,
) -> Any:
    """The stateless or stateful engine of one stage, with its context."""
    check_declaration(stage_id, spec, definition)
    missing = set(spec.lookups) - set(lookups or {})
    if missing:
        raise ConfigError(f"stage {stage_id}: lookup(s) {sorted(missing)} are not available here")
    ctx = StageContext(
        stage_id,
        definition.make_config(stage_id, spec.config),
        spec.all_outputs,
        lookups,
        clock=clock,
    )
    emitter = Emitter(stage_id, spec.all_outputs, ctx.now_ms)
    if definition.stateful:
        return StatefulEngine(
            stage_id,
            definition,
            ctx,
            emitter,
            spec.on_error,
            spec.idle_timeout_s,
            clock,
            spec.ended_lane_retention_s,
        )
    if definition.kind == "sink":
        return SinkEngine(stage_id, definition, ctx, emitter, spec.on_error)
    return StatelessEngine(stage_id, definition, ctx, emitter, spec.on_error)
