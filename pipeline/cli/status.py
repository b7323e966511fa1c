"""``pipeline status``: consumer group, lag, throughput, dead letters, last output
and a verdict per stage (definitions in :mod:`pipeline.status`).

Exits 0 when every stage is ok, idle or behind; 1 when any is stalled or down,
after printing the table (or JSON), with one line on stderr naming them.
"""

from __future__ import annotations

import json
import time

import click

from pipeline.cli.common import fail, handle_errors, print_table, settings_from
from pipeline.ops.status import (
    DEFAULT_SAMPLE_S,
    PARTITION_HEADERS,
    SUMMARY_HEADERS,
    collect,
    partition_rows,
    problem_line,
    report_json,
    summary_rows,
)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--sample-s",
    type=click.FloatRange(0.1, 600.0),
    default=DEFAULT_SAMPLE_S,
    show_default=True,
    help="Seconds over which committed offsets are sampled for throughput and progress "
    "(longer than runner.commit_interval_s).",
)
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool, sample_s: float) -> None:
    """Per stage: group state and members, lag per input partition, throughput,
    dead letters by reason, last output record and a verdict (ok, idle, behind,
    stalled, down, crash-looping). Exits 1 if any stage is stalled, down or
    crash-looping (its workers failed on the same batch twice in a row)."""
    settings = settings_from(ctx)
    statuses = collect(settings, sample_s)
    if as_json:
        click.echo(json.dumps(report_json(statuses, sample_s), indent=2))
    else:
        print_table(SUMMARY_HEADERS, summary_rows(statuses, int(time.time() * 1000)))
        click.echo()
        print_table(PARTITION_HEADERS, partition_rows(statuses))
    problem = problem_line(statuses)
    if problem is not None:
        fail(problem, 1)
