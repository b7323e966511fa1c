"""``pipeline replay STAGE``: move a stage's committed offsets to re-process (or skip) input.

Registered on the ``pipeline`` group at the end of :mod:`pipeline.cli`. This
module does not import :mod:`pipeline.cli` at import time: that module imports
this one, and under ``python -m pipeline.cli`` the import would be circular.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from pipeline.cli.common import handle_errors, print_table, settings_from

F = TypeVar("F", bound=Callable[..., Any])


@click.command()
@click.argument("stage")
@click.option(
    "--to-datetime",
    metavar="ISO8601",
    default=None,
    help="First record at or after this instant (needs a timezone, e.g. ...T10:00:00Z).",
)
@click.option(
    "--by-duration",
    metavar="PnDTnHnMnS",
    default=None,
    help="First record at or after now minus this ISO 8601 duration, e.g. PT10M.",
)
@click.option(
    "--shift-by",
    type=int,
    metavar="N",
    default=None,
    help="Move the committed offset by N (negative: back); clamped to the watermarks.",
)
@click.option("--to-offset", type=int, metavar="N", default=None, help="Absolute offset (clamped).")
@click.option("--to-earliest", is_flag=True, help="The low watermark: re-process everything.")
@click.option("--to-latest", is_flag=True, help="The high watermark: skip everything pending.")
@click.option("--partition", type=int, default=None, help="Only this partition.")
@click.option(
    "--execute/--dry-run",
    default=False,
    help="Apply the new offsets (default: --dry-run, show them only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def replay(
    ctx: click.Context,
    stage: str,
    to_datetime: str | None,
    by_duration: str | None,
    shift_by: int | None,
    to_offset: int | None,
    to_earliest: bool,
    to_latest: bool,
    partition: int | None,
    execute: bool,
    as_json: bool,
) -> None:
    """Rewind (or advance) STAGE's committed consumer-group offsets.

    Exactly one target option. Dry run by default: shows, per input partition,
    the committed offset, the target, the delta (records processed again;
    negative: skipped) and the watermarks. --execute applies it, and refuses
    while the stage's group has live members.
    """
    from pipeline.errors import ConfigError
    from pipeline.kafka.clients import admin
    from pipeline.ops.rewind import (
        apply_plan,
        ensure_idle,
        parse_target,
        plan_rewind,
        stage_partitions,
    )

    # Everything that needs no broker is checked first.
    target = parse_target(
        to_datetime=to_datetime,
        by_duration=by_duration,
        shift_by=shift_by,
        to_offset=to_offset,
        to_earliest=to_earliest,
        to_latest=to_latest,
        now=datetime.now(UTC),
    )
    if partition is not None and partition < 0:
        raise ConfigError(f"--partition {partition} must be >= 0")
    settings = settings_from(ctx)
    stage_partitions(settings, stage, partition)
    group = settings.group_id(stage)

    client = admin(settings)
    plans = plan_rewind(settings, client, stage, target, partition)
    if execute:
        ensure_idle(client, group)
        apply_plan(client, group, plans)

    if as_json:
        click.echo(json.dumps([p.as_dict(applied=execute) for p in plans], indent=2))
        return
    click.echo(f"replay {stage}: group {group}, target: {target.description}")
    print_table(
        ["topic", "partition", "current", "target", "delta", "low", "high", "how"],
        [
            [
                p.topic,
                p.partition,
                "-" if p.current is None else p.current,
                p.target,
                f"{p.delta:+d}",
                p.low,
                p.high,
                p.note,
            ]
            for p in plans
        ],
    )
    if execute:
        click.echo(f"applied: group {group} moved on {len(plans)} partition(s)")
    else:
        click.echo(
            "dry run: nothing changed; add --execute to apply (stop the stage's workers first)"
        )
