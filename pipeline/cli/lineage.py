"""``pipeline lineage trace ID``: the path of one record through the stages."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import handle_errors, print_table, settings_from
from pipeline.errors import PipelineError
from pipeline.lineage import hops, trace
from pipeline.timeparse import from_ms


@click.group("lineage")
def lineage_group() -> None:
    """Record lineage: where a reading went (hops on the lineage topic)."""


def _where(coords: list[object] | None) -> str:
    if not coords:
        return "-"
    topic, partition, offset = coords
    return f"{topic}[{partition}]@{offset}"


@lineage_group.command("trace")
@click.argument("lineage_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def trace_command(ctx: click.Context, lineage_id: str, as_json: bool) -> None:
    """Every hop of the record LINEAGE_ID (the `lineage-id` header, also in dead
    letters and as first/last id of an aggregate): ingest → … → the aggregate
    window it was counted in, or the dead letter where it stopped, and re-drives.
    Exits 1 if no hop of it exists."""
    settings = settings_from(ctx)
    found = trace.trace(settings, lineage_id)
    if not found.hops and not found.children:
        raise PipelineError(
            f"no hop of {lineage_id} on {settings.lineage_topic}; check the id (a ULID from "
            "the lineage-id header) and that the record reached ingest"
        )
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
        return
    rows = []
    for hop in found.hops:
        detail = hop.get("reason") or ""
        if hop["outcome"] == hops.COUNTED:
            *key, start = hop["window"]
            when = from_ms(start).isoformat() if isinstance(start, int) else start
            detail = f"into {' '.join(str(k) for k in key)} {when}"
        elif hop.get("parent"):
            detail = f"from {hop['parent']}"
        rows.append(
            [
                from_ms(hop["at"]).isoformat(timespec="milliseconds"),
                hop["stage"],
                hop["outcome"],
                _where(hop["in"]),
                _where(hop.get("out")),
                detail,
            ]
        )
    print_table(["at", "stage", "outcome", "in", "out", "detail"], rows)
    if found.parent:
        click.echo(f"parent: {found.parent} (split by a stage into this and other records)")
    for child in found.children:
        click.echo(f"child: {child}")
    for window in found.windows:
        summary = ", ".join(
            f"{k} {v}" for k, v in window.items() if k != "at" and not isinstance(v, dict | list)
        )
        click.echo(f"result at {_where(window['at'])}: {summary}")
    click.echo(f"end: {found.end}")
