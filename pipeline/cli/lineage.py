"""``pipeline lineage trace ID``: the path of one record through the stages."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import handle_errors, print_table, settings_from
from pipeline.errors import PipelineError
from pipeline.lineage import find, hops, trace
from pipeline.timeparse import from_ms, parse_duration, parse_instant, to_ms


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
@click.option(
    "--from",
    "start",
    metavar="ISO8601",
    default=None,
    help="Look for hops from this instant on (default: the time in the id, the "
    "reading's own, minus a minute). For a reading sent or backfilled long after its "
    "own time, or hops of a later redrive.",
)
@click.option(
    "--within",
    metavar="DURATION",
    default=None,
    help="Read this long after the first hop (ISO 8601, default PT1H), all of it; "
    "without it the read stops once the path is complete.",
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Read the whole lineage topic, every partition (hops of any age and format; "
    "slow on a long topic).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def trace_command(
    ctx: click.Context,
    lineage_id: str,
    start: str | None,
    within: str | None,
    everything: bool,
    as_json: bool,
) -> None:
    """Every hop of the record LINEAGE_ID (the `lineage-id` header, also in dead
    letters and as first/last id of an aggregate): ingest → … → the aggregate
    window it was counted in, or the dead letter where it stopped, and re-drives.

    Reads one partition of the lineage topic near the reading's time (O(log n)
    fetches to find it, then the lineage of one window): hops much later than the
    reading's entry (a dead letter redriven days later) need --from or --within.
    Exits 1 if no hop of it was found."""
    settings = settings_from(ctx)
    search = find.Search(
        start_ms=to_ms(parse_instant(start, "--from")) if start is not None else None,
        within_ms=(
            int(parse_duration(within, "--within").total_seconds() * 1000)
            if within is not None
            else find.DEFAULT_WITHIN_MS
        ),
        whole_window=within is not None,
    )
    searched: list[find.Searched] = []
    cost = None
    if everything:
        found = trace.trace(settings, lineage_id)
    else:
        located = find.find(settings, lineage_id, search)
        found, searched, cost = located.trace, located.searched, located.cost
    if not found.hops and not found.children:
        where = _searched(searched[0]) if searched else f"{settings.lineage_topic}"
        hint = "" if everything else "; give --from (when it was sent), --within, or --all"
        raise PipelineError(
            f"no hop of {lineage_id} in {where}; check the id (a ULID from the lineage-id "
            f"header) and that the record reached ingest{hint}"
        )
    if as_json:
        doc = found.as_dict()
        if not everything:
            doc["searched"] = [s.as_dict() for s in searched]
            doc["cost"] = cost.as_dict() if cost is not None else None
        click.echo(json.dumps(doc, indent=2))
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
        for stored in window.get("stored", []):
            click.echo(f"  stored by {stored['stage']} at {stored['ref']}")
    click.echo(f"end: {found.end}")
    for part in searched:
        click.echo(f"read {_searched(part)} (stopped: {part.stopped})")
    if searched and not found.complete:
        click.echo("hops outside what was read are not shown: --from, --within or --all")


def _searched(part: find.Searched) -> str:
    def when(ms: int) -> str:
        return from_ms(ms).isoformat(timespec="milliseconds")

    until = when(part.to_ms) if part.to_ms is not None else "its end"
    return (
        f"{part.records} record(s) of {part.topic}[{part.partition}] from "
        f"{when(part.from_ms)} to {until}"
    )
