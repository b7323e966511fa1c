"""``pipeline sink``: what a sink stage needs outside Kafka before it runs."""

from __future__ import annotations

import click

from pipeline.cli.common import handle_errors, settings_from
from pipeline.errors import ConfigError, Unavailable


@click.group("sink")
def sink() -> None:
    """Sinks: stages whose effect is outside Kafka (pipeline.sinks)."""


@sink.command("init")
@click.argument("stage")
@click.pass_context
@handle_errors
def sink_init(ctx: click.Context, stage: str) -> None:
    """Create what STAGE writes to (the PostgreSQL sink: its table, a TimescaleDB
    hypertable when the extension is there). Safe to run again."""
    from pipeline.engine.build import build_engine, load_stage

    settings = settings_from(ctx)
    spec = settings.stage(stage)
    definition = load_stage(settings, stage)
    if definition.kind != "sink":
        raise ConfigError(f"stage {stage} ({definition.name}) is not a sink")
    engine = build_engine(stage, spec, definition, {name: {} for name in spec.lookups})
    init = getattr(engine.processor, "init_schema", None)
    if init is None:
        click.echo(f"stage {stage} ({definition.name}): nothing to initialise")
        return
    try:
        click.echo(init())
    except Unavailable as exc:
        raise Unavailable(
            exc.dependency,
            f"stage {stage}: {exc.dependency} unreachable ({exc}); check its dsn and that it runs",
        ) from None
    finally:
        engine.close()
